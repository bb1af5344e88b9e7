"""Data as it comes: --data reads the original's COCO layout, a Roboflow COCO export and a YOLO data set
(boxes, polygons, keypoints) alike; images are read upright (EXIF orientation); bad files get one line."""
import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image

import predict
import support
import train_det as td
import train_pose as tp
import train_seg as ts

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def to_yolo(coco_root, dest, ann_prefix="instances", rows="boxes", names=("circle", "square", "triangle")):
    """Write the synthetic COCO set at coco_root as a YOLO data set: dest/data.yaml, images/{train,val}/,
    labels/{train,val}/*.txt with normalised rows of `rows` (boxes, polygons or keypoints)."""
    for split in ("train", "val"):
        coco = json.loads(open(f"{coco_root}/annotations/{ann_prefix}_{split}2017.json").read())
        labels = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        os.makedirs(f"{dest}/images/{split}"), os.makedirs(f"{dest}/labels/{split}")
        for image in coco["images"]:
            shutil.copy(f"{coco_root}/{split}2017/{image['file_name']}", f"{dest}/images/{split}/")
            w, h, lines = image["width"], image["height"], []
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                x, y, bw, bh = ann["bbox"]
                numbers = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                if rows == "polygons":
                    numbers = [v / (w, h)[i % 2] for i, v in enumerate(ann["segmentation"][0])]
                if rows == "keypoints":
                    numbers += [v / (w, h, 1)[i % 3] for i, v in enumerate(ann["keypoints"])]
                lines.append(" ".join(map(str, [labels[ann["category_id"]], *numbers])))
            stem = os.path.splitext(image["file_name"])[0]
            open(f"{dest}/labels/{split}/{stem}.txt", "w").write("\n".join(lines))
    extra = "kpt_shape: [17, 3]\n" if rows == "keypoints" else ""
    listed = "\n".join(f"  {i}: {name}  # a comment" for i, name in enumerate(names))
    open(f"{dest}/data.yaml", "w").write(f"path: .\ntrain: images/train\nval: images/val\n{extra}names:\n{listed}\n")
    return dest


def to_roboflow(coco_root, dest):
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(f"{coco_root}/{split}2017", f"{dest}/{folder}")
        shutil.copy(f"{coco_root}/annotations/instances_{split}2017.json", f"{dest}/{folder}/_annotations.coco.json")
    return dest


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    coco = support.make_synthetic_coco(str(root / "coco"), num_train=4, num_val=2, img_size=SIZE, seed=1)
    config = root / "tiny.json"
    config.write_text(json.dumps(td.demo_config()))
    return dict(root=root, coco=coco, config=str(config), roboflow=to_roboflow(coco, str(root / "roboflow")),
                yolo=to_yolo(coco, str(root / "yolo")))


def train(main, data, config, out, *extra):
    return main(["--data", data, "--model", config, "--img-size", str(SIZE), "--batch-size", "2", "--workers", "0",
                 "--device", "cpu", "--epochs", "1", "--output-dir", str(out), "--backbone-weights", "none", *extra])


@pytest.mark.parametrize("layout", ["coco", "roboflow", "yolo", "yolo/data.yaml"])
def test_every_layout_trains_and_evaluates_one_epoch(layouts, layout, tmp_path):
    data = os.path.join(layouts["root"], layout) if layout.startswith("yolo/") else layouts[layout]
    metrics = train(td.main, data, layouts["config"], tmp_path)
    assert metrics["epoch"] == 1 and len(metrics["coco_bbox"]) == 12
    ckpt = torch.load(tmp_path / "last.pth", weights_only=False)
    assert ckpt["names"] == ["circle", "square", "triangle"]
    # YOLO's classes are its category ids; COCO and Roboflow keep the file's
    assert ckpt["category_ids"] == ([0, 1, 2] if layout.startswith("yolo") else [1, 3, 7])


def test_yolo_boxes_match_the_coco_they_came_from(layouts):
    _, coco = support.yolo_to_coco(f"{layouts['yolo']}/data.yaml", "val", "boxes")
    original = json.loads(open(f"{layouts['coco']}/annotations/instances_val2017.json").read())
    assert [(i["file_name"].split("/")[-1], i["width"], i["height"]) for i in coco["images"]] == \
        [(i["file_name"], i["width"], i["height"]) for i in original["images"]]
    for ours, theirs in zip(coco["annotations"], original["annotations"]):
        assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-6)


def test_yolo_polygons_train_ecseg(layouts, tmp_path):
    data = to_yolo(layouts["coco"], str(tmp_path / "yolo"), rows="polygons")
    config = tmp_path / "seg.json"
    config.write_text(json.dumps(ts.demo_config()))
    metrics = train(ts.main, data, str(config), tmp_path / "out")
    assert len(metrics["coco_segm"]) == 12
    _, coco = support.yolo_to_coco(f"{data}/data.yaml", "train", "polygons")
    original = json.loads(open(f"{layouts['coco']}/annotations/instances_train2017.json").read())
    assert coco["annotations"][0]["segmentation"][0] == pytest.approx(original["annotations"][0]["segmentation"][0])
    assert coco["annotations"][0]["area"] == pytest.approx(original["annotations"][0]["area"], rel=0.05)


def test_yolo_keypoints_train_ecpose(tmp_path):
    coco = support.make_synthetic_pose(str(tmp_path / "coco"), num_train=2, num_val=1, img_size=SIZE, seed=1)
    data = to_yolo(coco, str(tmp_path / "yolo"), "person_keypoints", "keypoints", names=["person"])
    config = tmp_path / "pose.json"
    config.write_text(json.dumps(tp.demo_config()))
    metrics = train(tp.main, data, str(config), tmp_path / "out")
    assert len(metrics["coco_keypoints"]) == 10
    _, converted = support.yolo_to_coco(f"{data}/data.yaml", "val", "keypoints", 17)
    original = json.loads(open(f"{coco}/annotations/person_keypoints_val2017.json").read())
    assert converted["annotations"][0]["category_id"] == 1  # COCO's person
    assert converted["annotations"][0]["keypoints"] == pytest.approx(original["annotations"][0]["keypoints"])


def test_read_yaml_takes_the_forms_data_yaml_files_use(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("# Roboflow\ntrain: ../train/images\nval: '../valid/images'\ntest:\n\nnc: 2\n"
                    "names: ['a, b', \"c\"]  # two\nkpt_shape: [17, 3]\nroboflow:\n  workspace: w\n  version: 3\n")
    cfg = support.read_yaml(path)
    assert cfg == {"train": "../train/images", "val": "../valid/images", "test": None, "nc": 2, "names": ["a, b", "c"],
                   "kpt_shape": [17, 3], "roboflow": {"workspace": "w", "version": 3}}
    path.write_text("path: /data/set  # absolute\ntrain: [a/images, b/images]\nnames:\n  - cat\n  - 'dog # not a comment'\n")
    assert support.read_yaml(path) == {"path": "/data/set", "train": ["a/images", "b/images"],
                                       "names": ["cat", "dog # not a comment"]}
    assert support.yolo_names({"names": {0: "x", 1: "y"}}, path) == ["x", "y"]
    assert support.yolo_label_path("/d/images/train/images/a.b.jpg") == "/d/images/train/labels/a.b.txt"


def test_roboflow_yolo_export_paths_resolve_as_ultralytics_reads_them(layouts, tmp_path):
    """Roboflow's data.yaml names ../train/images beside it; the images are at train/images."""
    data = to_yolo(layouts["coco"], str(tmp_path / "rf"))
    os.rename(f"{data}/images", f"{data}/train_images")
    text = open(f"{data}/data.yaml").read().replace("path: .\n", "").replace("images/", "../train_images/")
    open(f"{data}/data.yaml", "w").write(text)
    assert len(support.yolo_images(support.read_yaml(f"{data}/data.yaml"), "val", data, "data.yaml")) == 2


def bad_yolo(layouts, tmp_path, change):
    data = to_yolo(layouts["coco"], str(tmp_path / "bad"))
    change(data)
    return data


def edit(path, old, new):
    def change(data):
        text = open(f"{data}/{path}").read()
        open(f"{data}/{path}", "w").write(re.sub(old, new, text, count=1))
    return change


BAD = {  # name: (data set from layouts and tmp_path, the expected line)
    "a YOLO row of 4 numbers": (lambda l, t: bad_yolo(l, t, edit("labels/train/000000000001.txt", r" \S+\n|$", "\n")),
                                r"labels/train/000000000001.txt, line 1: 4 numbers; expected 5 \(class cx cy w h"),
    "a class beyond names": (lambda l, t: bad_yolo(l, t, edit("labels/val/000000000001.txt", r"^\d", "7")),
                             r"labels/val/000000000001.txt, line 1: class 7, but .*data.yaml names 3 classes \(0..2\)"),
    "a data.yaml path that does not exist": (lambda l, t: bad_yolo(l, t, edit("data.yaml", "images/val", "images/v")),
                                             r"data.yaml: val: images/v does not exist"),
    "a Roboflow folder without its JSON": (
        lambda l, t: (shutil.copytree(l["roboflow"], t / "rf"), os.remove(t / "rf/valid/_annotations.coco.json"),
                      str(t / "rf"))[-1],
        r"a Roboflow COCO export, but .*/valid has no _annotations.coco.json"),
    "no layout": (lambda l, t: str(t), r"not a data set layout this project reads; looked for "
                                       r"annotations/instances_val2017.json \(COCO\), .*data.yaml \(YOLO\)"),
    "train_seg.py, box rows": (lambda l, t: bad_yolo(l, t, lambda data: None),
                               r"labels/train/000000000001.txt, line 1: 5 numbers; expected class x1 y1 x2 y2 x3 y3"),
    "train_pose.py, no kpt_shape": (lambda l, t: bad_yolo(l, t, lambda data: None),
                                    r"data.yaml: expected kpt_shape: \[K, 2 or 3\] for keypoint labels, found None"),
}
MAINS = {"train_seg.py, box rows": ts.main, "train_pose.py, no kpt_shape": tp.main}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_sets_get_one_line_and_write_nothing(layouts, tmp_path, capsys, case):
    make, expected = BAD[case]
    data = make(layouts, tmp_path)
    main = MAINS.get(case, td.main)
    with pytest.raises(SystemExit) as exit_info:
        train(main, data, layouts["config"], tmp_path / "out")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    script = case.split(",")[0] if case in MAINS else "train_det.py"
    assert exit_info.value.code == 2 and line.startswith(f"{script}: error: --data " if case in (
        "no layout", "a Roboflow folder without its JSON") else f"{script}: error: "), line
    assert re.search(expected, line), line
    assert not list((tmp_path / "out").glob("*.json"))


def exif_image(path, size=(48, 32), orientation=6):
    """A picture stored `size` (w, h) whose EXIF orientation turns it; its top-left stored pixel is red."""
    image = Image.new("RGB", size, "blue")
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[support.EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, quality=100)
    return path


def test_images_are_read_upright(tmp_path):
    path = exif_image(tmp_path / "phone.jpg")
    assert predict.load_image(str(path)).size == (32, 48)  # orientation 6: turned by 90 degrees
    assert support.upright_size(path) == (32, 48)
    # an annotation made in the stored frame keeps it; one made upright gets the upright image
    for width, height in ((48, 32), (32, 48)):
        coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": width, "height": height}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0}],
                "categories": [{"id": 1, "name": "thing"}]}
        (tmp_path / "ann.json").write_text(json.dumps(coco))
        image, target = td.CocoDetection(str(tmp_path), str(tmp_path / "ann.json")).load(0)
        assert image.size == (width, height) and target["boxes"].canvas_size == (height, width)


def test_predict_reports_boxes_in_the_upright_frame(tmp_path):
    path = exif_image(tmp_path / "phone.jpg")
    cfg = td.demo_config()
    torch.save({"model": td.model.build_model(cfg).state_dict(), "config": cfg}, tmp_path / "net.pth")
    predict.main(["--weights", str(tmp_path / "net.pth"), "--source", str(path), "--conf", "0",
                  "--output-dir", str(tmp_path / "out")])
    line = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert (line["width"], line["height"]) == (32, 48) and line["detections"]
    assert Image.open(tmp_path / "out" / "phone.jpg").size == (32, 48)
    # scored against annotations made in the stored frame, it is read in that frame, as training reads it
    coco = {"images": [{"id": 1, "file_name": "phone.jpg", "width": 48, "height": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    summary = predict.main(["--weights", str(tmp_path / "net.pth"), "--source", str(tmp_path), "--coco-ann",
                            str(tmp_path / "ann.json"), "--output-dir", str(tmp_path / "scored")])
    assert summary["images"] == 1 and summary["skipped"] == 0
    line = json.loads((tmp_path / "scored" / "predictions.jsonl").read_text())
    assert (line["width"], line["height"]) == (48, 32)
