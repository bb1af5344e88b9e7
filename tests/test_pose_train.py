"""train_pose.py's data, evaluation and loop: COCO keypoints through the augmentations, flips that
swap left and right, bad input, keypoint AP, and short training runs."""
import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import model
import predict
import support
import train_det as td
import train_pose as tp

SIZE = 96


@pytest.fixture(scope="module")
def pose_root(tmp_path_factory):
    return support.make_synthetic_pose(str(tmp_path_factory.mktemp("pose")), num_train=12, num_val=6, img_size=SIZE)


def dataset(root, split="train2017", transforms=None, **kwargs):
    return tp.CocoKeypoints(f"{root}/{split}", f"{root}/annotations/person_keypoints_{split}.json", transforms, **kwargs)


def pixels(xy):
    """KeyPoints -> plain (n, 17, 2) tensor."""
    return xy.as_subclass(torch.Tensor)


# ---- data ----

def test_synthetic_figures_load_as_coco_keypoints(pose_root, tmp_path):
    ds = dataset(pose_root)
    assert ds.names == ["", "person"] and ds.label_to_cat == {0: 0, 1: 1}  # labels are category ids
    image, target = ds.load(0)
    n = len(target["labels"])
    assert n >= 1 and torch.equal(target["labels"], torch.ones(n, dtype=torch.int64))
    assert target["keypoints"].shape == (n, 17, 2) and target["keypoints"].canvas_size == image.size[::-1]
    raw = [a for a in ds.coco.imgToAnns[ds.ids[0]]]
    v = torch.tensor([a["keypoints"][2::3] for a in raw])
    assert torch.equal(pixels(target["keypoints"]).isnan().all(-1), v == 0)  # unlabelled -> NaN
    assert torch.equal(target["area"], torch.tensor([a["area"] for a in raw], dtype=torch.float32))
    # Figures face the camera: the left shoulder is on the image's right.
    xy = pixels(target["keypoints"])
    assert (xy[:, 5, 0] > xy[:, 6, 0]).all()
    again = support.make_synthetic_pose(str(tmp_path), num_train=12, num_val=6, img_size=SIZE)
    for name in ("person_keypoints_train2017.json", "person_keypoints_val2017.json"):
        assert (tmp_path / "annotations" / name).read_text() == open(f"{pose_root}/annotations/{name}").read()


def test_demo_has_a_query_for_every_figure(pose_root):
    figures = collections.Counter(a["image_id"] for a in dataset(pose_root).coco.dataset["annotations"])
    assert max(figures.values()) == 3 == tp.demo_config()["DETRTransformer"]["num_queries"]


def test_flip_swaps_left_and_right_and_agrees_with_boxes(pose_root):
    assert all(tp.KEYPOINT_NAMES[j] == n.replace("left", "R").replace("right", "left").replace("R", "right")
               for n, j in zip(tp.KEYPOINT_NAMES, tp.FLIP_INDEX))
    ds = dataset(pose_root)
    for idx in range(len(ds)):
        image, target = ds.load(idx)
        flipped, out = tp.hflip(image, target)
        w = image.size[0]
        assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
        xy, fxy = pixels(target["keypoints"]), pixels(out["keypoints"])
        expected = xy[:, tp.FLIP_INDEX].clone()
        expected[..., 0] = w - expected[..., 0]
        torch.testing.assert_close(fxy, expected, equal_nan=True)
        both = ~fxy[:, [5, 6], 0].isnan().any(-1)  # a shoulder outside the image is not labelled
        assert (fxy[both, 5, 0] > fxy[both, 6, 0]).all()  # still facing the camera: left and right swapped
        # Keypoints and boxes flip alike (x -> W - x): offsets from the box centre just change sign.
        centre, flipped_centre = target["boxes"][:, 0::2].mean(1), out["boxes"][:, 0::2].mean(1)
        torch.testing.assert_close(fxy[..., 0] - flipped_centre[:, None], centre[:, None] - xy[:, tp.FLIP_INDEX, 0],
                                   equal_nan=True)
        again = tp.hflip(flipped, out)[1]
        torch.testing.assert_close(pixels(again["keypoints"]), xy, equal_nan=True)


def person_boxes(target, size):
    cx, cy, w, h = (target["boxes"] * size).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@pytest.mark.parametrize("epoch", [0, 1, 3])
def test_keypoints_follow_the_training_augmentations(pose_root, epoch):
    """Mosaic, MixUp, copy-paste, zoom-out, flip and resize move keypoints with their boxes."""
    random.seed(epoch)
    torch.manual_seed(epoch)
    tf = tp.PoseTransforms(True, SIZE, mosaic_prob=0.5, mosaic_epoch=2, stop_epoch=3, start_epoch=1)
    tf.set_epoch(epoch)
    ds = dataset(pose_root, transforms=tf)
    counts = []
    for idx in range(2 * len(ds)):
        image, target = ds[idx % len(ds)]
        n = len(target["labels"])
        counts.append(n)
        assert image.shape == (3, SIZE, SIZE) and target["keypoints"].shape == (n, 51)
        xy, v = target["keypoints"][:, :34].view(n, 17, 2) * SIZE, target["keypoints"][:, 34:]
        assert set(v.unique().tolist()) <= {0.0, 1.0} and (v.sum(1) > 0).all()
        assert (xy[v == 0] == 0).all()
        boxes = person_boxes(target, SIZE)
        inside = (xy >= boxes[:, None, :2] - 1) & (xy <= boxes[:, None, 2:] + 1)
        assert inside.all(-1)[v > 0].all()
        shoulders = (v[:, 5] > 0) & (v[:, 6] > 0)
        assert (xy[shoulders, 5, 0] > xy[shoulders, 6, 0]).all()
        assert (target["area"] > 0).all() and (target["area"] <= target["boxes"][:, 2] * target["boxes"][:, 3] + 1e-6).all()
    raw = sum(len(dataset(pose_root).instances.get(i, [])) for i in ds.ids)
    if epoch == 1:  # mosaic and copy-paste add persons; at epoch 3 the strong ops are off
        assert sum(counts) > 2 * raw
    if epoch in (0, 3):
        assert sum(counts) == 2 * raw


def test_resize_zoom_out_and_crop_keep_keypoints_exact(pose_root):
    ds = dataset(pose_root)
    image, target = ds.load(1)
    w, h = image.size
    xy, v = pixels(target["keypoints"]), ~pixels(target["keypoints"]).isnan().any(-1)
    out = tp.PoseTransforms(False, SIZE)(image, target)[1]  # val: resize only
    torch.testing.assert_close(out["keypoints"][:, :34], torch.where(v[..., None], xy / torch.tensor([w, h]), 0).flatten(1))
    assert torch.equal(out["keypoints"][:, 34:], v.float())
    torch.testing.assert_close(out["area"], target["area"] / (w * h))

    random.seed(0)
    zoomed, zt = tp.zoom_out(image, target)
    (zh, zw), (px, py) = TF.get_size(zoomed), ((zoomed.size[0] - w) // 2, (zoomed.size[1] - h) // 2)
    assert zw - w == 2 * px and zh - h == 2 * py and px > 0
    torch.testing.assert_close(pixels(zt["keypoints"]), xy + torch.tensor([px, py]), equal_nan=True)

    # A crop: keypoints left outside become unlabelled; a person without any labelled one is dropped.
    crop_w = int(xy[0, :, 0].nanquantile(0.5))
    cropped = {k: TF.crop(val, 0, 0, h, crop_w) if k in ("boxes", "keypoints") else val for k, val in target.items()}
    cropped["area"] = target["area"] / ((target["boxes"][:, 2] - target["boxes"][:, 0]) * (target["boxes"][:, 3] - target["boxes"][:, 1]))
    out = tp.to_targets(cropped)
    inside = v & (xy[..., 0] <= crop_w)
    assert inside.sum() < v.sum() and len(out["labels"]) == inside.any(-1).sum()
    assert torch.equal(out["keypoints"][:, 34:], inside[inside.any(-1)].float())


def test_unlabelled_keypoints_stay_unlabelled(pose_root):
    ds = dataset(pose_root)
    unlabelled = 0
    for idx in range(len(ds)):
        image, target = ds.load(idx)
        labelled = ~pixels(target["keypoints"]).isnan().any(-1)[:, tp.FLIP_INDEX]
        unlabelled += (~labelled).sum()
        image, target = tp.zoom_out(*tp.hflip(image, target))
        out = tp.PoseTransforms(False, SIZE)(image, target)[1]
        assert torch.equal(out["keypoints"][:, 34:], labelled.float())
        assert (out["keypoints"][:, :34].view(-1, 17, 2)[~labelled] == 0).all()
    assert unlabelled > 0


def test_bad_annotations_are_skipped_and_counted(pose_root, tmp_path):
    data = json.loads(open(f"{pose_root}/annotations/person_keypoints_val2017.json").read())
    anns = [a for a in data["annotations"] if a["image_id"] == 1]
    good = anns[0]
    bad = [dict(good, id=901, iscrowd=1), {k: v for k, v in good.items() if k != "keypoints"} | {"id": 902},
           dict(good, id=903, keypoints=[1, 2, 2]), dict(good, id=904, keypoints=[0] * 51, num_keypoints=0)]
    data["annotations"] = [good] + bad
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as record:
        ds = tp.CocoKeypoints(f"{pose_root}/val2017", str(ann_file), tp.PoseTransforms(True, SIZE))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("2 persons in") and "no list of 51" in m for m in messages)
    assert any(m.startswith("1 persons in") and "no labelled keypoint" in m for m in messages)
    assert (ds.num_without_keypoints, ds.num_unlabelled) == (2, 1)
    assert ds.ids == [1] and len(ds[0][1]["labels"]) == 1  # training skips images without a usable person
    with pytest.warns(UserWarning, match="no labelled keypoint"):
        assert len(tp.CocoKeypoints(f"{pose_root}/val2017", str(ann_file))) == 6  # evaluation keeps them

    # The repaired file can still be evaluated: the persons without keypoints are ignored.
    evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat, ("keypoints",))
    evaluator.update([1], [perfect_result(good)])
    assert evaluator.summarize()["keypoints"][0] == pytest.approx(1.0)

    data["annotations"] = bad
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json has no usable person"):
        tp.CocoKeypoints(f"{pose_root}/val2017", str(ann_file))


# ---- evaluation ----

def perfect_result(*anns):
    keypoints = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 51)
    keypoints[:, 2::3] = 1.0  # COCO result format: x, y, score per keypoint
    return {"labels": torch.ones(len(anns), dtype=torch.int64), "scores": torch.ones(len(anns)), "keypoints": keypoints}


def test_keypoint_evaluation_of_perfect_and_no_predictions(pose_root):
    ds = dataset(pose_root, "val2017")
    evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat, ("keypoints",))
    empty = predict.CocoEvaluator(ds.coco, ds.label_to_cat, ("keypoints",))
    for image_id in ds.ids:
        anns = ds.coco.imgToAnns[image_id]
        info = ds.coco.imgs[image_id]
        # Through the network's postprocessing: logits for class 1 (person) on the persons' queries.
        logits = torch.full((1, 20, 2), -10.0)
        logits[0, :len(anns), 1] = 10.0
        points = torch.rand(1, 20, 34)
        points[0, :len(anns)] = perfect_result(*anns)["keypoints"].view(-1, 17, 3)[..., :2].flatten(1) / torch.tensor([info["width"], info["height"]] * 17)
        results = tp.postprocess({"pred_logits": logits, "pred_keypoints": points}, torch.tensor([[info["width"], info["height"]]]), {})
        evaluator.update([image_id], results)
        empty.update([image_id], [{"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0), "keypoints": torch.zeros(0, 51)}])
    stats = evaluator.summarize()["keypoints"]
    assert len(stats) == 10 and stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert empty.summarize()["keypoints"][:2] == [0.0, 0.0]


def test_pictures_draw_each_persons_skeleton(tmp_path):
    keypoints = torch.zeros(2, 17, 3)
    keypoints[:, :, :2] = torch.tensor([[20.0, 10.0], [40.0, 10.0]])[:, None]
    keypoints[:, 9, 1] = 50.0  # the left wrist: the bone 7-9 (elbow to wrist) runs down x = 20 and x = 40
    result = {"labels": torch.ones(2, dtype=torch.int64), "scores": torch.tensor([0.9, 0.2]),
              "keypoints": keypoints.flatten(1), "boxes": torch.tensor([[20.0, 10.0, 20.0, 50.0], [40.0, 10.0, 40.0, 50.0]])}
    path = predict.draw_batch(torch.zeros(1, 3, 64, 64), [{"orig_size": torch.tensor([64, 64])}], [result], ["", "person"],
                              str(tmp_path / "p.png"), score_threshold=0.3)
    picture = np.asarray(Image.open(path)).astype(int)
    assert tuple(picture[30, 20]) == support.PALETTE[0]  # the first person's elbow-wrist bone
    assert abs(picture[30, 40] - picture[30, 55]).sum() == 0  # the second scores under the threshold


# ---- training ----

def tiny_config():
    """The demo network with 20 queries. With the demo's 3, one per figure, the loss of the few steps
    below swings by a fifth from step to step (381, 409, 313, 396 ... 332) and the short run ends at
    keypoint AP50 0; with 20 the loss falls and the short run learns (numbers at TINY)."""
    cfg = tp.demo_config()
    cfg["eval_spatial_size"] = [SIZE, SIZE]
    cfg["DETRTransformer"]["num_queries"] = cfg["DETRPosePostProcessor"]["num_select"] = 20
    return cfg


def test_training_steps_lower_the_loss(pose_root):
    ds = dataset(pose_root, transforms=tp.PoseTransforms(False, SIZE))
    images, targets = td.BatchImageCollate()([ds[i] for i in range(4)])
    torch.manual_seed(0)
    net = model.build_model(tiny_config()).train()
    criterion = tp.build_criterion(tiny_config())
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = sum(criterion(net(images), targets).values())  # no targets to the network: no random denoising
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-3:]) < 0.85 * losses[0], losses


# The short run: TINY["images"] synthetic images evaluated on themselves (what is tested is that
# keypoints are learnt through the whole loop, not generalisation), without augmentation.
# Measured (tiny_config), one thread: keypoint AP50 0.21, 0.34, 0.47 for seeds 0, 1, 2 on an AMD Zen 4;
# 0.55 (AP 0.20) for seed 1 on a Zen 3. With the suite's two threads the run is left to how the CPU
# splits and rounds the sums of its first steps: AP50 0.034 on the Zen 4, 0.0 on the Zen 3, so it runs
# on one. At initialisation 0; asserted: clearly above that.
TINY = dict(images=2, size=64, seed=1, epochs=90, batch=2, lr="1e-3", min_ap50=0.02)


def test_short_run_learns_keypoints_and_logs_them(tmp_path, monkeypatch):
    monkeypatch.setattr(support, "save_checkpoint", lambda state, path: None)  # tested by train_det's tests; slow here
    torch.set_num_threads(1)  # the measured path (two threads round otherwise, and end elsewhere on other CPUs)
    root = support.make_synthetic_pose(str(tmp_path / "data"), num_train=TINY["images"], num_val=1, img_size=TINY["size"],
                                  seed=TINY["seed"])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config()))
    images, ann = f"{root}/train2017", f"{root}/annotations/person_keypoints_train2017.json"
    args = tp.parse_args(["--train-images", images, "--train-ann", ann, "--val-images", images, "--val-ann", ann,
                          "--model", str(config), "--img-size", str(TINY["size"]), "--batch-size", str(TINY["batch"]),
                          "--epochs", str(TINY["epochs"]), "--lr", TINY["lr"], "--backbone-lr", TINY["lr"],
                          "--workers", "0", "--device", "cpu", "--output-dir", str(tmp_path)])
    no_augmentation = lambda train, img_size, **policy: tp.PoseTransforms(False, img_size)
    metrics = tp.train(args, transforms=no_augmentation)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == TINY["epochs"] and len(log[-1]["coco_keypoints"]) == 10
    assert log[0]["coco_keypoints"][1] == 0.0 and any(k.startswith("loss_oks_dn") for k in log[-1]["losses"])
    assert metrics["coco_keypoints"][1] >= TINY["min_ap50"], metrics["coco_keypoints"]
    assert (tmp_path / "predictions.png").exists()


def test_cli_is_train_dets_with_ecpose_defaults():
    pose, det = tp.parse_args([]), td.parse_args([])
    assert vars(pose).keys() == vars(det).keys()
    assert (pose.model, pose.output_dir) == ("ecpose_s", "outputs/pose")


def test_demo_trains_ecpose_with_its_settings(tmp_path, monkeypatch, capsys):
    seen = {}
    metrics = {"epoch": 1, "coco_keypoints": [0.25] * 10, "coco_keypoints_per_class": {"x": [0.25, 0.5]}}  # as train_det.train's
    monkeypatch.setattr(tp, "train", lambda args: seen.update(vars(args)) or metrics)
    monkeypatch.setattr(support, "make_synthetic_pose", lambda root, **sizes: seen.update(sizes) or os.makedirs(f"{root}/annotations"))
    tp.main(["--demo", "--output-dir", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("demo: keypoints AP 0.250, AP50 0.250 after 1 epochs")
    assert seen["recipe"] == "demo" and seen["img_size"] == [128, 128] and seen["batch_size"] == 4
    recipe = tp.POSE_RECIPES["demo"]
    assert recipe["mixup_prob"] == 0.0 and recipe["stop_epoch"] == 0 and seen["num_train"] == 1024
    config = json.loads((tmp_path / "demo_model.json").read_text())
    assert config["model"] == "ECPose" and config["DETRTransformer"]["num_queries"] == 3
    assert config["DETRPosePostProcessor"]["num_select"] == 3


def test_script_runs_with_train_dets_options():
    done = subprocess.run([sys.executable, str(Path(tp.__file__)), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ECPOSE (pose)" in done.stdout and "--backbone-weights" in done.stdout
