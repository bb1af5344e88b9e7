"""Bad input and interruptions: a diverging run stops and keeps its checkpoints, a kill at any
instant loses no epoch line, used output folders are refused, odd images and annotations keep their
contents or are counted, and every bad argument or file gets one line `SCRIPT: error: ...`, exit 2."""
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import load_fixture
from PIL import Image

import distill
import model
import predict
import support
import teacher
import train_det as td
import train_pose
import train_seg

SIZE = 64
# pycocotools' mask decoder trips numpy 2's __array__ copy-keyword deprecation on every mask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic COCO set (8 training, 4 validation images), the tiny demo network as a JSON config,
    and a checkpoint of another, narrower network."""
    root = tmp_path_factory.mktemp("robust")
    coco = td.make_synthetic_coco(str(root / "coco"), num_train=8, num_val=4, img_size=SIZE, seed=1)
    cfg = td.demo_config(td.Task())
    (root / "tiny.json").write_text(json.dumps(cfg))
    other = json.loads(json.dumps(cfg))
    other["ViTAdapter"].update(embed_dim=32)
    other["HybridEncoder"].update(in_channels=[32] * 3, hidden_dim=32, dim_feedforward=64)
    other["ECTransformer"].update(feat_channels=[32] * 3, hidden_dim=32, dim_feedforward=64)
    other["num_classes"] = 3
    torch.save({"model": model.build_model(other).state_dict()}, root / "other.pth")
    return dict(root=root, coco=coco, config=str(root / "tiny.json"), other=str(root / "other.pth"))


def argv(data, out, *extra):
    return ["--data", data["coco"], "--model", data["config"], "--img-size", str(SIZE), "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--output-dir", str(out), "--lr", "1e-3", *extra]


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in ("last.pth", "best.pth", "log.jsonl")}


def error_line(capsys, main, args):
    """Run a script's main(args): it must exit with code 2 and one line `SCRIPT: error: ...`."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    return err.splitlines()[-1]


def fake_evaluate(aps):
    """An evaluate() that returns the next of `aps` as the AP: epochs better or worse on demand."""
    aps = iter(aps)
    return lambda *args, **kwargs: {"bbox": [next(aps)] + [0.0] * 11}


def checkpoint(path):
    return torch.load(path, weights_only=True)


# ---- non-finite losses ----

def test_a_nan_in_the_criterion_stops_the_run_and_keeps_every_file(data, tmp_path, capsys):
    td.main(argv(data, tmp_path, "--epochs", "3", "--stop-after", "1"))
    before = files_of(tmp_path)

    def nan_boxes(cfg):  # a network whose box predictions went NaN: the criterion must not hide it
        criterion = td.build_criterion(cfg)
        return lambda outputs, targets: criterion({**outputs, "pred_boxes": outputs["pred_boxes"] * np.nan}, targets)

    resume = argv(data, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "last.pth"))
    line = error_line(capsys, lambda a: td.main(a, td.Task(build_criterion=nan_boxes)), resume)
    assert re.match(r"train_det.py: error: non-finite loss at epoch 2, step 0: loss_mal \S+, loss_bbox nan, ", line)
    assert line.endswith(f"Stopped; {tmp_path / 'last.pth'} is unchanged")
    assert files_of(tmp_path) == before

    # The diverging run: a learning rate of 1e6 blows the weights up within the epoch.
    line = error_line(capsys, td.main, resume + ["--lr", "1e6", "--backbone-lr", "1e6"])
    assert re.match(r"train_det.py: error: non-finite (loss|gradient norm) at epoch 2, step \d: loss_mal ", line)
    assert files_of(tmp_path) == before


def test_the_pose_criterion_reports_nan_keypoints_as_nan_losses():
    fx = load_fixture("pose_tiny")
    net = model.load_weights(model.build_model(fx["config"]), fx["state_dict"]).train()
    outputs = net(fx["images"])
    losses = train_pose.build_criterion(fx["config"])({**outputs, "pred_keypoints": outputs["pred_keypoints"] * np.nan},
                                                      fx["train"]["targets"])
    assert not torch.isfinite(losses["loss_keypoints"]) and not torch.isfinite(sum(losses.values()))


def test_evaluation_refuses_non_finite_predictions(data, tmp_path, capsys):
    ds = td.CocoDetection(f"{data['coco']}/val2017", f"{data['coco']}/annotations/instances_val2017.json")
    evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat)
    nan = dict(labels=torch.zeros(1, dtype=torch.int64), boxes=torch.full((1, 4), float("nan")), scores=torch.ones(1))
    with pytest.raises(FloatingPointError, match="non-finite predictions .* for image 1"):
        evaluator.update([1], [nan])

    td.main(argv(data, tmp_path, "--epochs", "1"))
    tuned = td.main(argv(data, tmp_path / "eval", "--tune", str(tmp_path / "last.pth"), "--eval-only"))
    assert tuned["coco_bbox"] == checkpoint(tmp_path / "last.pth")["log"][0]["coco_bbox"]  # every tensor fits
    ckpt = checkpoint(tmp_path / "last.pth")
    ckpt["ema"]["module"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                             for k, v in ckpt["ema"]["module"].items()}
    torch.save(ckpt, tmp_path / "nan.pth")
    line = error_line(capsys, td.main, argv(data, tmp_path, "--resume", str(tmp_path / "nan.pth"), "--eval-only"))
    assert line.startswith(f"train_det.py: error: --resume {tmp_path / 'nan.pth'} holds non-finite weights (NaN or inf) "
                           f"in ")  # refused before any prediction


# ---- crash consistency ----

class Killed(BaseException):
    """A kill -9 at a chosen instant: nothing after it runs."""


def kill_at(monkeypatch, function, when):
    real = getattr(td, function)

    def patched(*args):
        if when(*args):
            raise Killed
        return real(*args)
    monkeypatch.setattr(td, function, patched)


@pytest.mark.parametrize("instant", ["between last.pth and best.pth", "between best.pth and log.jsonl"])
def test_a_kill_between_the_epoch_files_loses_no_epoch_line(data, tmp_path, monkeypatch, instant):
    # AP 0.1, 0.3, 0.2: epoch 2 is the best, so epoch 2 writes best.pth and epoch 3 does not.
    monkeypatch.setattr(td, "evaluate", fake_evaluate([0.1, 0.3]))
    if instant == "between last.pth and best.pth":
        kill_at(monkeypatch, "save_checkpoint", lambda state, path: path.endswith("best.pth") and state["epoch"] == 2)
    else:
        kill_at(monkeypatch, "write_log", lambda lines, path: len(lines) == 2)
    with pytest.raises(Killed):
        td.run(td.parse_args(argv(data, tmp_path, "--epochs", "3")), td.Task())
    assert checkpoint(tmp_path / "last.pth")["epoch"] == 2
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # epoch 2's line is not written yet
    (tmp_path / f"{support.TMP_PREFIX}{os.getpid() + 1}.last.pth").write_bytes(b"left by a killed run")
    (tmp_path / "results.tmp2.csv").write_bytes(b"the user's own")  # removed by an earlier clean-up

    monkeypatch.undo()
    monkeypatch.setattr(td, "evaluate", fake_evaluate([0.2]))
    td.run(td.parse_args(argv(data, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "last.pth"))), td.Task())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2, 3] and [m["coco_bbox"][0] for m in log] == [0.1, 0.3, 0.2]
    best, last = checkpoint(tmp_path / "best.pth"), checkpoint(tmp_path / "last.pth")
    assert best["epoch"] == last["best_epoch"] == 2 and best["best"] == last["best"] == 0.3
    assert last["log"] == log and sorted(os.listdir(tmp_path)) == [support.LOCK_NAME, "best.pth", "curves.png",
                                                                   "last.pth", "log.jsonl", "results.tmp2.csv"]


def test_a_failed_write_keeps_the_old_file_and_names_a_full_disk(tmp_path):
    path = tmp_path / "last.pth"
    td.save_checkpoint({"epoch": 1}, str(path))
    before = path.read_bytes()
    os.symlink("/dev/full", support.temporary_path(path))  # the temporary file lands on a full device
    with pytest.raises(OSError, match=f"cannot write {path}: disk full"):
        td.save_checkpoint({"epoch": 2, "weights": torch.zeros(1000)}, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]


# ---- output folders and resuming ----

def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(td, "evaluate", fake_evaluate([0.3, 0.1, 0.2, 0.15, 0.5]))
    td.main(argv(data, tmp_path, "--epochs", "3", "--stop-after", "2"))  # best.pth: epoch 1, last.pth: epoch 2
    before = files_of(tmp_path)
    line = error_line(capsys, td.main, argv(data, tmp_path, "--epochs", "3"))
    assert line == (f"train_det.py: error: --output-dir {tmp_path} already holds a run (last.pth, best.pth, "
                    f"log.jsonl): continue it with --resume, or replace it with --overwrite")
    line = error_line(capsys, td.main, argv(data, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "best.pth")))
    assert line == (f"train_det.py: error: --resume {tmp_path / 'best.pth'} is epoch 1, but {tmp_path / 'last.pth'} is "
                    f"epoch 2, which resuming would roll back: resume from {tmp_path / 'last.pth'}, or continue "
                    f"epoch 1 in another --output-dir")
    line = error_line(capsys, td.main, argv(data, tmp_path, "--epochs", "2", "--resume", str(tmp_path / "last.pth")))
    assert "has done 2 epochs already; give --epochs above that" in line
    assert files_of(tmp_path) == before

    # A changed --lr is applied from the next epoch, and said; --epochs not given is the run's.
    td.main(argv(data, tmp_path, "--resume", str(tmp_path / "last.pth"), "--lr", "2e-3"))
    assert "--resume: --lr 0.002 (so far 0.001) applies from epoch 3 on" in capsys.readouterr().out
    last = checkpoint(tmp_path / "last.pth")
    assert last["epoch"] == 3 and last["args"]["epochs"] == 3 and last["args"]["lr"] == 2e-3
    # (the tiny config's random ViT trains at the head's first rate, 1e-3, which --lr alone leaves)
    assert {g["initial_lr"] for g in last["optimizer"]["param_groups"]} == {2e-3, 1e-3}

    # Continued in another folder, the run keeps its lines and its best epoch there.
    td.main(argv(data, tmp_path, "--resume", str(tmp_path / "last.pth"), "--epochs", "4", "--output-dir",
                 str(tmp_path / "branch")))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "branch" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert checkpoint(tmp_path / "branch" / "best.pth")["epoch"] == 1 and files_of(tmp_path)["best.pth"] == before["best.pth"]

    td.main(argv(data, tmp_path, "--epochs", "1", "--overwrite"))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]
    assert checkpoint(tmp_path / "best.pth")["epoch"] == checkpoint(tmp_path / "last.pth")["epoch"] == 1


def test_distill_refuses_to_replace_a_trained_student(data, tmp_path, capsys):
    images = f"{data['coco']}/train2017"
    (tmp_path / "student.pth").write_bytes(b"a trained student")
    line = error_line(capsys, distill.main, ["--teacher", data["other"], "--images", images, "--output-dir",
                                             str(tmp_path)])
    assert line.startswith(f"distill.py: error: --output-dir {tmp_path} already holds a run (student.pth)")
    assert (tmp_path / "student.pth").read_bytes() == b"a trained student"


# ---- images and annotations ----

@pytest.mark.parametrize("mode, pixels, expected", [
    ("I;16", np.array([[0, 257, 32896, 65535]], dtype=np.uint16), [0, 1, 128, 255]),
    ("I", np.array([[0, 257, 32896, 65535]], dtype=np.int32), [0, 1, 128, 255]),
    ("F", np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), [0, 64, 128, 255]),
])
def test_grey_images_of_more_than_8_bits_keep_their_contents(tmp_path, mode, pixels, expected):
    image = Image.fromarray(pixels)
    assert image.mode == mode
    rgb = np.asarray(predict.to_rgb(image))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == expected and (rgb == rgb[..., :1]).all()
    if mode == "I;16":  # a 16-bit PNG, through the detection data set and distillation's reader
        Image.fromarray(np.tile(pixels, (8, 4))).save(tmp_path / "a.png")
        assert Image.open(tmp_path / "a.png").mode == "I;16"
        ann = {"images": [dict(id=1, file_name="a.png", width=16, height=8)], "categories": [dict(id=1, name="a")],
               "annotations": [dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 4, 4], area=16, iscrowd=0)]}
        (tmp_path / "a.json").write_text(json.dumps(ann))
        image, _ = td.CocoDetection(str(tmp_path), str(tmp_path / "a.json"))[0]
        assert np.asarray(image)[0, :4, 1].tolist() == expected
        assert np.asarray(distill.read_image(str(tmp_path / "a.png")))[0, :4, 2].tolist() == expected


def write_annotations(data, tmp_path, change, split="val"):
    """The synthetic set's annotation file of `split`, changed in place by change(dict), in tmp_path."""
    with open(f"{data['coco']}/annotations/instances_{split}2017.json") as f:
        ann = json.load(f)
    change(ann)
    path = tmp_path / f"{split}.json"
    path.write_text(json.dumps(ann))
    return str(path)


def test_bad_boxes_are_dropped_from_training_and_evaluation_and_counted(data, tmp_path):
    def spoil(ann):
        boxes = [[float("nan"), 1, 5, 5], [1, 1, float("inf"), 5], [-1e30, -1e30, 3e30, 3e30], [1, 1, 0, 5]]
        for a, box in zip(ann["annotations"], boxes):
            a["bbox"] = box
    path = write_annotations(data, tmp_path, spoil)
    total = len(json.loads(open(path).read())["annotations"])
    with pytest.warns(UserWarning) as caught:
        ds = td.CocoDetection(f"{data['coco']}/val2017", path)
    messages = [str(w.message) for w in caught]
    assert ds.dropped_boxes == {"with a non-finite coordinate": 2, "mostly outside their image": 1,
                                "of zero or negative size": 1} and ds.num_dropped_boxes == 4
    assert f"2 boxes with a non-finite coordinate in {path}; dropped from training and evaluation" in messages
    # None is left in the ground truth, where COCOeval would match any detection to a NaN box.
    assert len(ds.coco.anns) == sum(map(len, ds.instances.values())) == total - 4
    assert all(np.isfinite(a["bbox"]).all() for a in ds.coco.anns.values())


def test_a_garbage_compressed_rle_is_skipped_naming_its_annotation(data, tmp_path):
    def garbage(ann):
        spoilt = ann["annotations"][1]
        info = next(image for image in ann["images"] if image["id"] == spoilt["image_id"])
        spoilt["segmentation"] = {"size": [info["height"], info["width"]], "counts": "garbage!!"}
    path = write_annotations(data, tmp_path, garbage)
    ident = json.loads(open(path).read())["annotations"][1]["id"]
    with pytest.warns(UserWarning, match=rf"1 objects without a usable mask \(malformed RLE, e.g. annotation {ident}\)"):
        ds = train_seg.CocoSegmentation(f"{data['coco']}/val2017", path)
    assert ds.mask_skipped == {"malformed RLE": 1}
    for i in range(len(ds)):  # every kept mask decodes
        assert len(ds[i][1]["masks"]) == len(ds[i][1]["labels"])


# ---- one line for every bad argument and file ----

@pytest.fixture(scope="module")
def bad(data):
    """Files for the table below: broken annotation files, non-checkpoints, a used output folder."""
    root = data["root"] / "bad"
    root.mkdir()
    variants = {"no_objects": ("train", lambda a: a.update(annotations=[])),
                "no_val_objects": ("val", lambda a: a.update(annotations=[])),
                "no_width": ("val", lambda a: a["images"][1].pop("width")),
                "no_name": ("val", lambda a: a["categories"][0].pop("name")),
                "no_bbox": ("val", lambda a: a["annotations"][0].pop("bbox"))}
    paths = {}
    for name, (split, change) in variants.items():
        (root / name).mkdir()
        paths[name] = write_annotations(data, root / name, change, split)
    (root / "not.json").write_text('{"images": [')
    (root / "list.json").write_text("[1, 2]")
    torch.save(torch.zeros(3), root / "tensor.pth")
    torch.save([torch.zeros(3)], root / "list.pth")
    (root / "file").write_text("not a folder")
    (root / "used").mkdir()
    (root / "used" / "last.pth").write_bytes(b"an earlier detection run")
    (root / "used" / "student.pth").write_bytes(b"an earlier distillation")
    (root / "corrupt").mkdir()
    for i in range(3):
        (root / "corrupt" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    return dict(paths, root=str(root), coco=data["coco"], config=data["config"], other=data["other"])


def det(p, *extra):
    return ["--data", p["coco"], "--model", p["config"], "--img-size", str(SIZE), "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--output-dir", f"{p['root']}/out", "--epochs", "1", *extra]


def files(p, train="{coco}/annotations/instances_train2017.json", val="{coco}/annotations/instances_val2017.json"):
    return det(p, "--train-images", f"{p['coco']}/train2017", "--train-ann", train.format(**p),
               "--val-images", f"{p['coco']}/val2017", "--val-ann", val.format(**p))[2:]


def dist(p, *extra):
    return ["--teacher", p["other"], "--images", f"{p['coco']}/train2017", "--img-size", str(SIZE), "--workers", "0",
            "--device", "cpu", "--output-dir", f"{p['root']}/distill", *extra]


CASES = {  # name: (main, argv from the files above, the expected line)
    "--epochs 0": (td.main, lambda p: det(p, "--epochs", "0"), "--epochs must be at least 1, got 0"),
    "--epochs -1": (td.main, lambda p: det(p, "--epochs", "-1"), "--epochs must be at least 1, got -1"),
    "--stop-after 0": (td.main, lambda p: det(p, "--stop-after", "0"), "--stop-after must be at least 1, got 0"),
    "--batch-size 0": (td.main, lambda p: det(p, "--batch-size", "0"), "--batch-size must be at least 1, got 0"),
    "--workers -1": (td.main, lambda p: det(p, "--workers", "-1"), "--workers must be at least 0, got -1"),
    "--img-size 0": (td.main, lambda p: det(p, "--img-size", "0"), "--img-size 0: expected H \\[W\\], positive multiples of 32"),
    "--img-size 100": (td.main, lambda p: det(p, "--img-size", "100", "64"), "--img-size 100 64: expected H \\[W\\]"),
    "--model of another task": (td.main, lambda p: det(p, "--model", "ecpose_s"),
                                "--model ecpose_s is not a detection model; train_det.py trains ecdet_s, ecdet_m"),
    "--model unknown": (td.main, lambda p: det(p, "--model", "ecdet_q"), "--model: unknown preset 'ecdet_q'; expected "),
    "--model not a config": (td.main, lambda p: det(p, "--model", f"{p['root']}/list.json"),
                             "--model .*list.json: expected a JSON object \\(a model config\\), found a list"),
    "--device cuda without a GPU": (td.main, lambda p: det(p, "--device", "cuda"),
                                    "--device cuda: no CUDA GPU is visible to torch here"),
    "--device gpu": (td.main, lambda p: det(p, "--device", "gpu"), "--device gpu: .*device"),
    "--output-dir is a file": (td.main, lambda p: det(p, "--output-dir", f"{p['root']}/file"),
                               "--output-dir .*/file is a file, not a folder"),
    "--output-dir holds a run": (td.main, lambda p: det(p, "--output-dir", f"{p['root']}/used"),
                                 "--output-dir .*/used already holds a run \\(last.pth\\): continue it with --resume"),
    "--resume and --overwrite": (td.main, lambda p: det(p, "--resume", p["other"], "--overwrite"),
                                 "--resume continues the run in --output-dir and --overwrite replaces it"),
    "--resume of a tensor": (td.main, lambda p: det(p, "--resume", f"{p['root']}/tensor.pth"),
                             "--resume .*tensor.pth holds a Tensor, not a checkpoint \\(a dict\\)"),
    "--resume of a list": (td.main, lambda p: det(p, "--resume", f"{p['root']}/list.pth"),
                           "--resume .*list.pth holds a list, not a checkpoint"),
    "--resume of nothing": (td.main, lambda p: det(p, "--resume", f"{p['root']}/nowhere.pth"),
                            "--resume .*nowhere.pth does not exist"),
    "--resume of weights only": (td.main, lambda p: det(p, "--resume", p["other"]),
                                 "--resume .*other.pth is not a training checkpoint of this project \\(use --tune\\)"),
    "--tune of another model, --eval-only": (
        td.main, lambda p: det(p, "--tune", p["other"], "--eval-only"),
        "--tune .*other.pth fits \\d+ of the model's \\d+ tensors \\(\\d+% of its numbers; not e.g. .*\\): "
        "--eval-only evaluates the network as it is"),
    "--tune of another model": (td.main, lambda p: det(p, "--tune", p["other"]),
                                "--tune .*other.pth fits .*: is it a checkpoint of this model\\?"),
    "--backbone-weights of a list": (td.main, lambda p: det(p, "--backbone-weights", f"{p['root']}/list.pth"),
                                     "--backbone-weights .*list.pth holds a list"),
    "--backbone-weights of a detector": (td.main, lambda p: det(p, "--backbone-weights", p["other"]),
                                         "--backbone-weights .*other.pth does not fit this model's ViT: checkpoint "
                                         "does not match the model; missing: "),
    "no annotation file": (td.main, lambda p: det(p, "--data", p["root"]),
                           "COCO annotation file not found: .*instances_val2017.json"),
    "annotations not JSON": (td.main, lambda p: files(p, val="{root}/not.json"),
                             "COCO annotation file .*not.json is not valid JSON"),
    "no object to train on": (td.main, lambda p: files(p, train="{no_objects}"),
                              "COCO annotation file .*train.json has no object to train on \\(of 0 annotations"),
    "no object to evaluate on": (td.main, lambda p: files(p, val="{no_val_objects}"),
                                 "val.json has no object to evaluate on .*: COCO AP is undefined without ground truth"),
    "an image without width": (td.main, lambda p: files(p, val="{no_width}"),
                               "COCO annotation file .*val.json: image 2 has no valid 'width' \\(found None\\)"),
    "a category without name": (td.main, lambda p: files(p, val="{no_name}"),
                                "COCO annotation file .*val.json: category 1 has no 'name'"),
    "an annotation without bbox": (td.main, lambda p: files(p, val="{no_bbox}"),
                                   "COCO annotation file .*val.json: annotation 1 is malformed: KeyError\\('bbox'\\)"),
    "train_seg.py, a detector": (train_seg.main, lambda p: det(p, "--model", "ecdet_s"),
                                 "train_seg.py: error: --model ecdet_s is not a segmentation model"),
    "train_seg.py, a detector's config": (train_seg.main, lambda p: det(p),
                                          "train_seg.py: error: --model .*tiny.json is not a segmentation model: "),
    "train_pose.py --batch-size 0": (lambda a: td.main(a, train_pose.POSE), lambda p: det(p, "--batch-size", "0"),
                                     "train_pose.py: error: --batch-size must be at least 1, got 0"),
    "teacher.py --epochs 0": (teacher.main, lambda p: ["--arch", "dinov3_vits16", *det(p, "--epochs", "0")[2:]],
                              "teacher.py: error: --epochs must be at least 1, got 0"),
    "teacher.py without --arch": (teacher.main, lambda p: det(p)[2:], "teacher.py: error: --arch is required"),
    "teacher.py --arch unknown": (teacher.main, lambda p: ["--arch", "dinov3_vitz16", *det(p)[4:]],
                                  "teacher.py: error: --arch dinov3_vitz16: unknown DINOv3 model"),
    "distill.py --epochs 0": (distill.main, lambda p: dist(p, "--epochs", "0"),
                              "distill.py: error: --epochs must be at least 1, got 0"),
    "distill.py --img-size 0": (distill.main, lambda p: dist(p, "--img-size", "0"),
                                "distill.py: error: --img-size 0: expected H \\[W\\], positive multiples of 16"),
    "distill.py, only corrupt images": (distill.main, lambda p: dist(p, "--images", f"{p['root']}/corrupt"),
                                        "distill.py: error: --images .*/corrupt: none of its 3 image files can be read"),
    "distill.py, no such folder": (distill.main, lambda p: dist(p, "--images", f"{p['root']}/nowhere"),
                                   "distill.py: error: --images .*/nowhere: no such folder"),
    "distill.py --teacher of a list": (distill.main, lambda p: dist(p, "--teacher", f"{p['root']}/list.pth")[2:],
                                       "distill.py: error: --teacher .*list.pth holds a list, not a checkpoint"),
    "distill.py --resume of nothing": (distill.main, lambda p: dist(p, "--resume"),
                                       "distill.py: error: --resume: no student_last.pth in .*/distill"),
    "distill.py, a used --output-dir": (distill.main, lambda p: dist(p, "--output-dir", f"{p['root']}/used"),
                                        "distill.py: error: --output-dir .*/used already holds a run \\(student.pth\\)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_exit_code_2(bad, capsys, case):
    main, args, expected = CASES[case]
    if case == "--device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    line = error_line(capsys, main, args(bad))
    script = re.match(r"(\S+\.py): error: ", expected)
    assert line.startswith(f"{script.group(1) if script else 'train_det.py'}: error: "), line
    assert re.search(expected, line), line
