"""Bad input and interruptions: a diverging run stops and keeps its checkpoints, a kill at any
instant loses no epoch line, used output folders are refused, odd images and annotations keep their
contents or are counted, and every bad argument or file gets one line `SCRIPT: error: ...`, exit 2."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_fixture
from PIL import Image

import distill
import export
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
    coco = support.make_synthetic_coco(str(root / "coco"), num_train=8, num_val=4, img_size=SIZE, seed=1)
    cfg = td.demo_config()
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

def test_a_nan_in_the_criterion_stops_the_run_and_keeps_every_file(data, tmp_path, capsys, monkeypatch):
    td.main(argv(data, tmp_path, "--epochs", "3", "--stop-after", "1"))
    before = files_of(tmp_path)
    build = td.build_criterion

    def nan_boxes(*how):  # a network whose box predictions went NaN: the criterion must not hide it
        criterion = build(*how)
        return lambda outputs, targets: criterion({**outputs, "pred_boxes": outputs["pred_boxes"] * np.nan}, targets)

    monkeypatch.setattr(td, "build_criterion", nan_boxes)
    resume = argv(data, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "last.pth"))
    line = error_line(capsys, td.main, resume)
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
    before = tree(tmp_path)
    td.main(argv(data, tmp_path, "--resume", str(tmp_path / "last.pth"), "--eval-only"))
    assert tree(tmp_path) == before  # --eval-only only reads the run: its predictions.png stays the epoch's
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
    real = getattr(support, function)

    def patched(*args):
        if when(*args):
            raise Killed
        return real(*args)
    monkeypatch.setattr(support, function, patched)


@pytest.mark.parametrize("instant", ["between last.pth and best.pth", "between best.pth and log.jsonl"])
def test_a_kill_between_the_epoch_files_loses_no_epoch_line(data, tmp_path, monkeypatch, instant):
    # AP 0.1, 0.3, 0.2: epoch 2 is the best, so epoch 2 writes best.pth and epoch 3 does not.
    monkeypatch.setattr(td, "evaluate", fake_evaluate([0.1, 0.3]))
    if instant == "between last.pth and best.pth":
        kill_at(monkeypatch, "save_checkpoint", lambda state, path: path.endswith("best.pth") and state["epoch"] == 2)
    else:
        kill_at(monkeypatch, "write_log", lambda lines, path: len(lines) == 2)
    with pytest.raises(Killed):
        td.train(td.parse_args(argv(data, tmp_path, "--epochs", "3")))
    assert checkpoint(tmp_path / "last.pth")["epoch"] == 2
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # epoch 2's line is not written yet
    (tmp_path / f"{support.TMP_PREFIX}{os.getpid() + 1}.last.pth").write_bytes(b"left by a killed run")
    (tmp_path / "results.tmp2.csv").write_bytes(b"the user's own")  # removed by an earlier clean-up

    monkeypatch.undo()
    monkeypatch.setattr(td, "evaluate", fake_evaluate([0.2]))
    td.train(td.parse_args(argv(data, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "last.pth"))))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1, 2, 3] and [m["coco_bbox"][0] for m in log] == [0.1, 0.3, 0.2]
    best, last = checkpoint(tmp_path / "best.pth"), checkpoint(tmp_path / "last.pth")
    assert best["epoch"] == last["best_epoch"] == 2 and best["best"] == last["best"] == 0.3
    run_files = sorted(name for name in os.listdir(tmp_path) if not name.startswith("events.out.tfevents."))  # TensorBoard's
    assert last["log"] == log and run_files == [support.LOCK_NAME, "best.pth", "curves.png", "last.pth", "log.jsonl",
                                                "results.tmp2.csv"]


def test_a_failed_write_keeps_the_old_file_and_names_a_full_disk(tmp_path):
    path = tmp_path / "last.pth"
    support.save_checkpoint({"epoch": 1}, str(path))
    before = path.read_bytes()
    os.symlink("/dev/full", support.temporary_path(path))  # the temporary file lands on a full device
    with pytest.raises(OSError, match=f"cannot write {path}: disk full"):
        support.save_checkpoint({"epoch": 2, "weights": torch.zeros(1000)}, str(path))
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
                "no_bbox": ("val", lambda a: a["annotations"][0].pop("bbox")),
                # ids: each would silently give an image another's objects, or count an object twice
                "same_image_id": ("val", lambda a: a["images"][1].update(id=a["images"][0]["id"])),
                "same_annotation_id": ("val", lambda a: a["annotations"][1].update(id=a["annotations"][0]["id"])),
                "string_image_ids": ("train", string_image_ids),
                "mixed_image_ids": ("val", lambda a: a["images"][0].update(id=str(a["images"][0]["id"]))),
                "float_annotation_id": ("val", lambda a: a["annotations"][2].update(id=2.5)),
                "string_image_ref": ("val", lambda a: a["annotations"][0].update(image_id="1"))}
    paths = {}
    for name, (split, change) in variants.items():
        (root / name).mkdir()
        paths[name] = write_annotations(data, root / name, change, split)
    (root / "not.json").write_text('{"images": [')
    (root / "list.json").write_text("[1, 2]")
    torch.save(torch.zeros(3), root / "tensor.pth")
    torch.save([torch.zeros(3)], root / "list.pth")
    cfg = json.loads(open(data["config"]).read())
    weights = {k: v.float() if v.is_floating_point() else v for k, v in model.build_model(cfg).state_dict().items()}
    torch.save({"model": weights, "config": cfg}, root / "tiny.pth")
    poisoned = dict(weights, **{k: torch.full_like(v, float("nan")) for k, v in list(weights.items())[:1]})
    torch.save({"model": poisoned, "config": cfg, "ema": {}, "optimizer": {}, "scaler": {}, "epoch": 1, "best": 0.0},
               root / "nan.pth")
    torch.save({"model": {k: float("inf") if v.is_floating_point() else v for k, v in weights.items()}, "config": cfg},
               root / "floats.pth")  # a state dict of numbers, not tensors
    run = {"model": weights, "ema": {"module": weights, "updates": 1}, "optimizer": {}, "scaler": {}, "epoch": 1, "best": 0.0}
    torch.save({**run, "ema": {"module": {k: 0.0 for k in weights}}}, root / "floats_run.pth")
    torch.save({**run, "epoch": "1"}, root / "string_epoch.pth")
    (root / "empty.pth").write_bytes(b"")
    (root / "heads.json").write_text(json.dumps({**cfg, "HybridEncoder": {**cfg["HybridEncoder"], "nhead": 3}}))
    (root / "typo.json").write_text(json.dumps({**cfg, "HybridEncodr": {"nhead": 4}}))
    (root / "file").write_text("not a folder")
    (root / "used").mkdir()
    (root / "used" / "last.pth").write_bytes(b"an earlier detection run")
    (root / "used" / "student.pth").write_bytes(b"an earlier distillation")
    (root / "corrupt").mkdir()
    for i in range(3):
        (root / "corrupt" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    return dict(paths, root=str(root), coco=data["coco"], config=data["config"], other=data["other"])


def string_image_ids(ann):
    for entry in ann["images"] + ann["annotations"]:
        key = "id" if "file_name" in entry else "image_id"
        entry[key] = str(entry[key])


def det(p, *extra):
    return ["--data", p["coco"], "--model", p["config"], "--img-size", str(SIZE), "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--output-dir", f"{p['root']}/out", "--epochs", "1", *extra]


def files(p, train="{coco}/annotations/instances_train2017.json", val="{coco}/annotations/instances_val2017.json"):
    return det(p, "--train-images", f"{p['coco']}/train2017", "--train-ann", train.format(**p),
               "--val-images", f"{p['coco']}/val2017", "--val-ann", val.format(**p))[2:]


def dist(p, *extra):
    return ["--teacher", p["other"], "--images", f"{p['coco']}/train2017", "--img-size", str(SIZE), "--workers", "0",
            "--device", "cpu", "--output-dir", f"{p['root']}/distill", *extra]


def pred(p, *extra):
    return ["--weights", f"{p['root']}/tiny.pth", "--source", f"{p['coco']}/val2017", "--output-dir",
            f"{p['root']}/predict", *extra]


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
                           "--data .*: not a data set layout this project reads; looked for "
                           "annotations/instances_val2017.json \\(COCO\\)"),
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
    "train_pose.py --batch-size 0": (train_pose.main, lambda p: det(p, "--batch-size", "0"),
                                     "train_pose.py: error: --batch-size must be at least 1, got 0"),
    "teacher.py --epochs 0": (teacher.main, lambda p: ["--arch", "dinov3_vits16", *det(p, "--epochs", "0")[4:]],
                              "teacher.py: error: --epochs must be at least 1, got 0"),
    "teacher.py without --arch": (teacher.main, lambda p: det(p)[4:], "teacher.py: error: --arch is required"),
    "teacher.py --model": (teacher.main, lambda p: ["--arch", "dinov3_vits16", *det(p)[2:]],
                           "teacher.py: error: unrecognized arguments: --model"),
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
    "distill.py --resume of nothing": (distill.main, lambda p: dist(p, "--resume", f"{p['root']}/distill/student_last.pth"),
                                       "distill.py: error: --resume .*/distill/student_last.pth does not exist"),
    "distill.py, a used --output-dir": (distill.main, lambda p: dist(p, "--output-dir", f"{p['root']}/used"),
                                        "distill.py: error: --output-dir .*/used already holds a run \\(student.pth\\)"),
    # issue 24: numbers accepted silently or misreported
    "--seed -1": (td.main, lambda p: det(p, "--seed", "-1"), "--seed must be at least 0, got -1"),
    "distill.py --seed -1": (distill.main, lambda p: dist(p, "--seed", "-1"), "distill.py: error: --seed must be at least 0"),
    "--lr -1": (td.main, lambda p: det(p, "--lr", "-1"), "--lr must be a finite number, 0 or more, got -1.0"),
    "--backbone-lr nan": (td.main, lambda p: det(p, "--backbone-lr", "nan"), "--backbone-lr must be a finite number, 0 or more, got nan"),
    "distill.py --lr=-1e-3": (distill.main, lambda p: dist(p, "--lr=-1e-3"), "distill.py: error: --lr must be a finite number"),
    "--lr inf": (td.main, lambda p: det(p, "--lr", "inf"), "--lr must be a finite number, 0 or more, got inf"),
    "predict.py --conf 1.5": (predict.main, lambda p: pred(p, "--conf", "1.5"), "predict.py: error: --conf 1.5: expected a score in \\[0, 1\\]"),
    "predict.py --conf -0.1": (predict.main, lambda p: pred(p, "--conf", "-0.1"), "predict.py: error: --conf -0.1: expected a score"),
    "predict.py --conf nan": (predict.main, lambda p: pred(p, "--conf", "nan"), "predict.py: error: --conf nan: expected a score"),
    # sizes and configs the network cannot take
    "--img-size too small for the queries": (td.main, lambda p: det(p, "--img-size", "32"),
                                              "--img-size 32 32: too small for this network, whose decoder selects 50 queries"),
    "predict.py --img-size too small": (predict.main, lambda p: pred(p, "--img-size", "64", "32"),
                                        "predict.py: error: --img-size 64 32: too small for this network"),
    "widths the heads don't divide": (td.main, lambda p: det(p, "--model", f"{p['root']}/heads.json"),
                                      "--model .*heads.json: config section 'HybridEncoder': embed_dim must be divisible"),
    "predict.py, widths the heads don't divide": (
        predict.main, lambda p: pred(p, "--model", f"{p['root']}/heads.json"),
        "predict.py: error: --model .*heads.json: config section 'HybridEncoder': embed_dim must be divisible"),
    "an unknown top-level config key": (td.main, lambda p: det(p, "--model", f"{p['root']}/typo.json"),
                                        "--model .*typo.json: config: unknown top-level keys \\['HybridEncodr'\\]"),
    # devices
    "predict.py --device gpu": (predict.main, lambda p: pred(p, "--device", "gpu"), "predict.py: error: --device gpu: "),
    "predict.py --device meta": (predict.main, lambda p: pred(p, "--device", "meta"),
                                 "predict.py: error: --device meta: expected cpu, cuda or cuda:N"),
    # annotation files, checked whole before any training or evaluation
    "two images with one id": (td.main, lambda p: files(p, val="{same_image_id}"),
                               "COCO annotation file .*val.json: image ids must be unique; repeated: 1$"),
    "two annotations with one id": (td.main, lambda p: files(p, val="{same_annotation_id}"),
                                    "COCO annotation file .*val.json: annotation ids must be unique; repeated: 1$"),
    "string image ids": (td.main, lambda p: files(p, train="{string_image_ids}"),
                         "COCO annotation file .*train.json: image ids must be integers; found 8 of type str: '1', '2'"),
    "image ids of mixed types": (td.main, lambda p: files(p, val="{mixed_image_ids}"),
                                 "COCO annotation file .*val.json: image ids must be integers; found 1 of type str: '1'$"),
    "a float annotation id": (td.main, lambda p: files(p, val="{float_annotation_id}"),
                              "val.json: annotation ids must be integers; found 1 of type float: 2.5$"),
    "an image_id as a string": (td.main, lambda p: files(p, val="{string_image_ref}"),
                                "val.json: the image_id of annotations 1 is not an integer$"),
    "predict.py --coco-ann, two images with one id": (
        predict.main, lambda p: pred(p, "--coco-ann", p["same_image_id"]),
        "predict.py: error: COCO annotation file .*val.json: image ids must be unique"),
    # checkpoints: empty, of non-finite weights, of entries that are not tensors; every loader
    "--resume of an empty file": (td.main, lambda p: det(p, "--resume", f"{p['root']}/empty.pth"),
                                  "cannot read --resume .*empty.pth: the file is empty \\(0 bytes\\)"),
    "--tune of an empty file": (td.main, lambda p: det(p, "--tune", f"{p['root']}/empty.pth"),
                                "cannot read --tune .*empty.pth: the file is empty"),
    "--backbone-weights of an empty file": (td.main, lambda p: det(p, "--backbone-weights", f"{p['root']}/empty.pth"),
                                            "cannot read --backbone-weights .*empty.pth: the file is empty"),
    "predict.py --weights of an empty file": (predict.main, lambda p: pred(p, "--weights", f"{p['root']}/empty.pth"),
                                              "predict.py: error: cannot read --weights .*empty.pth: the file is empty"),
    "--resume of NaN weights": (td.main, lambda p: det(p, "--resume", f"{p['root']}/nan.pth"),
                                "--resume .*nan.pth holds non-finite weights \\(NaN or inf\\) in 1 tensors, e.g. model."),
    "--tune of NaN weights, --eval-only": (td.main, lambda p: det(p, "--tune", f"{p['root']}/nan.pth", "--eval-only"),
                                           "--tune .*nan.pth holds non-finite weights"),
    "--backbone-weights of NaN weights": (td.main, lambda p: det(p, "--backbone-weights", f"{p['root']}/nan.pth"),
                                          "--backbone-weights .*nan.pth holds non-finite weights"),
    "predict.py --weights of NaN weights": (predict.main, lambda p: pred(p, "--weights", f"{p['root']}/nan.pth"),
                                            "predict.py: error: --weights .*nan.pth holds non-finite weights"),
    "export.py --weights of NaN weights": (export.main, lambda p: ["--weights", f"{p['root']}/nan.pth", "--onnx",
                                                                   f"{p['root']}/nan.onnx"],
                                           "export.py: error: --weights .*nan.pth holds non-finite weights"),
    "distill.py --teacher of NaN weights": (distill.main, lambda p: dist(p, "--teacher", f"{p['root']}/nan.pth")[2:],
                                            "distill.py: error: --teacher .*nan.pth holds non-finite weights"),
    "export.py --onnx onto its --weights": (export.main, lambda p: ["--weights", f"{p['root']}/tiny.pth", "--onnx",
                                                                    f"{p['root']}/tiny.pth"],
                                            "export.py: error: --onnx .*tiny.pth: that is an input of this export"),
    "--resume of numbers, not tensors": (td.main, lambda p: det(p, "--resume", f"{p['root']}/floats_run.pth"),
                                         "--resume .*floats_run.pth \\(ema\\): \\d+ entries of its state dict are not "
                                         "tensors"),
    "--resume of a string epoch": (td.main, lambda p: det(p, "--resume", f"{p['root']}/string_epoch.pth"),
                                   "--resume .*string_epoch.pth: its epoch and best AP are not numbers"),
    "predict.py --weights of numbers, not tensors": (
        predict.main, lambda p: pred(p, "--weights", f"{p['root']}/floats.pth"),
        "predict.py: error: --weights .*floats.pth: checkpoint: \\d+ entries of its state dict are not tensors, e.g. "),
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


# ---- what is not the run's own: sources, other folders, other runs (issue 24) ----

def tree(folder):
    """{relative path: bytes} of every file below folder (links as their targets' names)."""
    folder = str(folder)
    return {os.path.relpath(os.path.join(d, n), folder): os.readlink(os.path.join(d, n)) if os.path.islink(
        os.path.join(d, n)) else open(os.path.join(d, n), "rb").read() for d, _, names in os.walk(folder) for n in names}


def photos(folder, names=("photo.jpg", "sub/photo.jpg")):
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(folder / name)


def nest_parent_of_source(t):  # the issue's: sub/photo.jpg was drawn over photo.jpg
    return ["--source", str(t / "photos/sub"), "--output-dir", str(t / "photos")]


def nest_source_is_output(t):
    return ["--source", str(t / "photos"), "--output-dir", str(t / "photos")]


def nest_file_in_output(t):
    return ["--source", str(t / "photos/sub/photo.jpg"), "--output-dir", str(t / "photos")]


def link_to_the_sources(t):  # out/sub is the source folder itself
    (t / "out").mkdir()
    os.symlink(t / "photos/sub", t / "out/sub")
    return ["--source", str(t / "photos"), "--output-dir", str(t / "out")]


def link_out_of_the_folder(t):  # out/sub leads to a folder of the user's
    (t / "out").mkdir()
    (t / "elsewhere").mkdir()
    os.symlink(t / "elsewhere", t / "out/sub")
    return ["--source", str(t / "photos"), "--output-dir", str(t / "out")]


@pytest.mark.parametrize("way", [nest_parent_of_source, nest_source_is_output, nest_file_in_output,
                                 link_to_the_sources, link_out_of_the_folder])
def test_predict_refuses_outputs_that_land_on_sources_or_leave_its_folder(bad, tmp_path, capsys, way):
    photos(tmp_path / "photos")
    args = way(tmp_path)
    before = tree(tmp_path)
    line = error_line(capsys, predict.main, ["--weights", f"{bad['root']}/tiny.pth", *args])
    assert re.match(r"predict.py: error: --output-dir \S+?( holds --source's folder|: the drawn picture of)", line), line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("file_name", ["../outside.jpg", "ABSOLUTE"])
def test_predict_draws_every_coco_image_inside_its_folder(bad, tmp_path, file_name):
    photos(tmp_path, ["images/inside.jpg", "outside.jpg"])
    file_name = str(tmp_path / "outside.jpg") if file_name == "ABSOLUTE" else file_name
    ann = {"images": [dict(id=1, file_name="inside.jpg", width=48, height=40), dict(id=2, file_name=file_name, width=48,
                                                                                  height=40)],
           "annotations": [dict(id=i, image_id=i, category_id=1, bbox=[4, 4, 20, 20], area=400, iscrowd=0) for i in (1, 2)],
           "categories": [dict(id=1, name="a")]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "outside.jpg", tmp_path / "out/predictions.jsonl")  # written over, never through
    before = tree(tmp_path / "images"), (tmp_path / "outside.jpg").read_bytes()
    summary = predict.main(["--weights", f"{bad['root']}/tiny.pth", "--source", str(tmp_path / "images"), "--coco-ann",
                            str(tmp_path / "ann.json"), "--output-dir", str(tmp_path / "out"), "--overwrite"])
    assert summary["images"] == 2 and (tree(tmp_path / "images"), (tmp_path / "outside.jpg").read_bytes()) == before
    written = sorted(tree(tmp_path / "out"))
    # outside.jpg, ../outside.jpg from the images (also when named absolutely), is drawn to __/outside.jpg
    assert written == ["__/outside.jpg", "coco_results_bbox.json", "inside.jpg", "predictions.jsonl"]
    assert not os.path.islink(tmp_path / "out/predictions.jsonl")


def test_predict_reads_a_folder_with_a_link_loop_once(tmp_path):
    photos(tmp_path / "photos")
    os.symlink(tmp_path / "photos", tmp_path / "photos/sub/loop")
    root, paths = predict.find_sources(str(tmp_path / "photos"))
    assert [os.path.relpath(p, root) for p in paths] == ["photo.jpg", "sub/photo.jpg"]
    assert distill.find_images(str(tmp_path / "photos"), "--images") == paths
    # the output folder inside the source folder is not read as sources
    photos(tmp_path / "photos/out", ["drawn.jpg"])
    assert predict.find_sources(str(tmp_path / "photos"), skip=str(tmp_path / "photos/out"))[1] == paths


def test_a_video_without_frames_is_one_line_naming_it(bad, tmp_path, capsys):
    import av
    with av.open(str(tmp_path / "empty.avi"), "w") as container:  # a header with a video stream, no frame
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    line = error_line(capsys, predict.main, ["--weights", f"{bad['root']}/tiny.pth", "--source",
                                             str(tmp_path / "empty.avi"), "--output-dir", str(tmp_path / "out")])
    assert line == f"predict.py: error: --source {tmp_path / 'empty.avi'}: the video has no frames"
    assert not (tmp_path / "out").exists()  # the folder the refused run made is gone again


def test_one_run_per_folder_at_a_time(data, bad, tmp_path, capsys):
    (tmp_path / f"{support.TMP_PREFIX}1.last.pth").write_bytes(b"being written by the other run")
    (tmp_path / "results.tmp2.csv").write_bytes(b"the user's own")
    before = tree(tmp_path)
    import fcntl
    with open(tmp_path / support.LOCK_NAME, "a+") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        line = error_line(capsys, td.main, argv(data, tmp_path, "--epochs", "1"))
        assert line == (f"train_det.py: error: --output-dir {tmp_path} is in use by another run (process ?): wait "
                        f"for it to end, or choose another folder")
        line = error_line(capsys, predict.main, ["--weights", f"{bad['root']}/tiny.pth", "--source",
                                                 f"{data['coco']}/val2017", "--output-dir", str(tmp_path)])
        assert "is in use by another run" in line, line
    assert tree(tmp_path) == {**before, support.LOCK_NAME: b""}  # nothing of the other run's removed

    # A killed holder (kill -9) leaves no stuck lock: the kernel lets go of it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, support; support.claim_folder(sys.argv[1]); "
                               "print('held', flush=True); sys.stdin.read()", str(tmp_path)],
                              cwd=os.path.dirname(support.__file__), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(ValueError, match=rf"is in use by another run \(process {holder.pid}\)"):
        support.claim_folder(str(tmp_path))
    holder.kill()
    holder.wait()
    support.claim_folder(str(tmp_path))
    support.release_folders()


def test_a_refused_run_leaves_no_folder_it_made_and_deletes_nothing(bad, tmp_path, capsys):
    used = tmp_path / "used"  # an earlier run, a killed run's temporary file, a user's file named alike
    used.mkdir()
    for name in ("last.pth", "log.jsonl", f"{support.TMP_PREFIX}1.best.pth", "results.tmp2.csv"):
        (used / name).write_bytes(name.encode())
    before = tree(used)
    line = error_line(capsys, td.main, det(bad, "--output-dir", str(used), "--overwrite", "--tune",
                                           f"{bad['root']}/nowhere.pth"))
    assert "nowhere.pth does not exist" in line and tree(used) == before  # --overwrite deletes only once all is checked
    line = error_line(capsys, td.main, det(bad, "--output-dir", str(used), "--overwrite", "--model",
                                           f"{bad['root']}/typo.json"))
    assert "unknown top-level keys" in line and tree(used) == before

    new = tmp_path / "new" / "run"
    line = error_line(capsys, td.main, det(bad, "--output-dir", str(new), "--resume", f"{bad['root']}/nowhere.pth"))
    assert "does not exist" in line and not (tmp_path / "new").exists()
    line = error_line(capsys, predict.main, ["--weights", f"{bad['root']}/tiny.pth", "--source", f"{bad['root']}/corrupt",
                                             "--output-dir", str(new)])
    assert "none of its 3 images could be read" in line and not (tmp_path / "new").exists()


def test_full_disks_and_refused_writes_name_the_file_and_keep_the_old_one(data, bad, tmp_path, monkeypatch, capsys):
    picture = tmp_path / "curves.png"
    support.draw_curves([("loss", {"total": [3.0, 2.0]})], str(picture))
    before = picture.read_bytes()
    os.symlink("/dev/full", support.temporary_path(picture))
    with pytest.raises(OSError, match=f"cannot write {picture}: disk full"):
        support.draw_curves([("loss", {"total": [3.0, 1.0]})], str(picture))
    assert picture.read_bytes() == before and os.listdir(tmp_path) == ["curves.png"]

    # torch's zip writer turns ENOSPC into a RuntimeError: on a full disk, that is said too
    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(support.os, "statvfs", lambda path: type("Stats", (), {"f_bavail": 0}))
    line = error_line(capsys, td.main, argv(data, tmp_path / "run", "--epochs", "1"))
    assert line == f"train_det.py: error: cannot write {tmp_path / 'run' / 'last.pth'}: disk full (no space left on device)"
    assert os.listdir(tmp_path / "run") == ["predictions.png"]  # no last.pth, no half of one, and the lock let go
    monkeypatch.undo()

    # predict.py's pictures: a refused write is one line naming the picture
    out = tmp_path / "predict"
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    line = error_line(capsys, predict.main, ["--weights", f"{bad['root']}/tiny.pth", "--source",
                                             f"{data['coco']}/val2017/000000000001.jpg", "--output-dir", str(out)])
    assert line == f"predict.py: error: cannot write {out / '000000000001.jpg'}: Permission denied"
    assert not out.exists()


def test_an_onnx_file_of_non_finite_weights_is_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Mul", ["images", "w"], ["scores"]), helper.make_node("Identity", ["orig_target_sizes"],
                                                                                   ["sizes"])]
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64]),
                                             helper.make_tensor_value_info("orig_target_sizes", TensorProto.INT64, [1, 2])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 64, 64]),
                               helper.make_tensor_value_info("sizes", TensorProto.INT64, [1, 2])],
                              [numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "nan.onnx")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    line = error_line(capsys, predict.main, ["--weights", str(tmp_path / "nan.onnx"), "--source", str(tmp_path / "a.jpg"),
                                             "--output-dir", str(tmp_path / "out")])
    assert line == f"predict.py: error: --weights {tmp_path / 'nan.onnx'} holds non-finite weights (NaN or inf) in 1 " \
                   f"tensors, e.g. w: refused"
    openvino = pytest.importorskip("openvino")  # the same graph as OpenVINO IR
    openvino.save_model(openvino.convert_model(str(tmp_path / "nan.onnx")), str(tmp_path / "nan.xml"))
    line = error_line(capsys, predict.main, ["--weights", str(tmp_path / "nan.xml"), "--source", str(tmp_path / "a.jpg"),
                                             "--output-dir", str(tmp_path / "out")])
    assert re.fullmatch(rf"predict.py: error: --weights {tmp_path / 'nan.xml'} holds non-finite weights .*: refused", line)
    assert not (tmp_path / "out").exists()


def test_an_image_too_large_for_pil_is_skipped_and_counted(tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "huge.png")
    ann = {"images": [dict(id=1, file_name="huge.png", width=128, height=128), dict(id=2, file_name="small.png", width=16,
                                                                                  height=16)],
           "annotations": [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 8, 8], area=64, iscrowd=0) for i in (1, 2)],
           "categories": [dict(id=1, name="a")]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 128 x 128 is more than twice that: PIL refuses it
    with pytest.warns(UserWarning, match="skipping image .*huge.png: DecompressionBombError"):
        ds = td.CocoDetection(str(tmp_path), str(tmp_path / "ann.json"))
        image, target = ds[0]
    assert image.size == (16, 16) and target["image_id"] == 2 and ds.num_unreadable == 2  # at construction and at ds[0]


def test_weights_given_as_dicts_are_checked_too():
    net = model.build_model(json.loads(json.dumps(td.demo_config())))
    sd = net.state_dict()
    with pytest.raises(ValueError, match="checkpoint holds non-finite weights .* e.g. backbone"):
        model.load_weights(net, {"ema": {"module": {**sd, next(iter(sd)): sd[next(iter(sd))] * np.inf}}})
    with pytest.raises(ValueError, match=r"checkpoint: 1 entries of its state dict are not tensors, e.g. \S+ \(list\)"):
        model.load_weights(net, {"model": {**sd, next(iter(sd)): [1.0]}})
    model.load_weights(net, {"model": sd})  # the anchors' inf (positions never selected) is by design
    # an export folds them into constants of other names (e.g. /net/decoder/Expand_1_output_0): there inf passes
    support.check_finite([("/net/decoder/Expand_1_output_0", np.array([np.inf]))], "an ONNX file", exported=True)
    with pytest.raises(ValueError, match="an ONNX file holds non-finite weights"):
        support.check_finite([("w", np.array([np.nan]))], "an ONNX file", exported=True)
