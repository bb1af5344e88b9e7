"""Tests of the data and evaluation sections of train_det.py, on small synthetic COCO-format sets."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchvision import tv_tensors

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import predict  # noqa: E402
import support  # noqa: E402
import train_det as td  # noqa: E402
import train_seg  # noqa: E402

# pycocotools' mask decoder trips numpy 2's __array__ copy-keyword deprecation on every mask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SOURCE_SIZE, IMG_SIZE = 192, 96  # synthetic images are larger than the model input, as in COCO


@pytest.fixture(autouse=True)
def one_thread_and_seeds():
    # Two threads on two busy cores make small tensor ops many times slower; workers use one too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return support.make_synthetic_coco(str(tmp_path_factory.mktemp("coco")), num_train=24, num_val=16, img_size=SOURCE_SIZE)


def dataset(root, split="train2017", masks=False, **kwargs):
    cls = train_seg.CocoSegmentation if masks else td.CocoDetection
    return cls(os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json"), **kwargs)


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


# ---- synthetic data and the data set ----

def test_synthetic_round_trip_and_remap(coco_root, tmp_path):
    with open(os.path.join(coco_root, "annotations", "instances_train2017.json")) as f:
        data = json.load(f)
    assert sorted(c["id"] for c in data["categories"]) == [1, 3, 7]
    assert len(data["images"]) == 24 and len(data["annotations"]) > 24
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    assert any(w != h for w, h in sizes.values())
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        iw, ih = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= iw and y + h <= ih and w > 0 and h > 0
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert np.allclose(poly.min(0), [x, y], atol=1e-6) and 0 < ann["area"] <= w * h
    for im in data["images"]:
        assert Image.open(os.path.join(coco_root, "train2017", im["file_name"])).size == sizes[im["id"]]

    ds = dataset(coco_root, masks=True)
    assert ds.label_to_cat == {0: 1, 1: 3, 2: 7} and ds.names == ["circle", "square", "triangle"]
    assert ds.num_missing == ds.num_dropped_boxes == 0
    anns_by_image = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    for idx in range(len(ds)):
        image, target = ds[idx]
        anns = anns_by_image.get(target["image_id"], [])
        assert image.size == tuple(target["orig_size"].tolist()) == sizes[target["image_id"]]
        assert [ds.label_to_cat[label] for label in target["labels"].tolist()] == [a["category_id"] for a in anns]
        assert target["masks"].shape == (len(anns), image.size[1], image.size[0])
    # the same seed writes the same files; another seed does not
    again = support.make_synthetic_coco(str(tmp_path / "again"), num_train=24, num_val=16, img_size=SOURCE_SIZE)
    other = support.make_synthetic_coco(str(tmp_path / "other"), num_train=24, num_val=16, img_size=SOURCE_SIZE, seed=1)
    read = lambda root, name: open(os.path.join(root, name), "rb").read()  # noqa: E731
    ann_name, img_name = "annotations/instances_train2017.json", "train2017/000000000003.jpg"
    assert read(again, ann_name) == read(coco_root, ann_name) and read(again, img_name) == read(coco_root, img_name)
    assert read(other, ann_name) != read(coco_root, ann_name)


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
    root = support.make_synthetic_coco(str(tmp_path), num_train=6, num_val=1, img_size=64)
    os.remove(os.path.join(root, "train2017", "000000000002.jpg"))
    with open(os.path.join(root, "train2017", "000000000004.jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="1 images listed"):
        ds = dataset(root, transforms=td.DetTransforms(False, 64))
    assert ds.num_missing == 1 and len(ds) == 5 and 2 not in ds.ids
    with pytest.warns(UserWarning, match="000000000004.jpg"):
        ids = [ds[i][1]["image_id"] for i in range(len(ds))]
    assert ds.num_unreadable == 1
    assert 4 not in ids and ids.count(5) == 2  # image 4 is replaced by the next one, 5


def test_annotation_file_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        td.CocoDetection(str(tmp_path), missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        td.CocoDetection(str(tmp_path), str(broken))
    no_keys = write_json(tmp_path / "no_keys.json", {"images": []})
    with pytest.raises(ValueError, match=r"no_keys\.json.*annotations"):
        td.CocoDetection(str(tmp_path), no_keys)
    bad_ann = write_json(tmp_path / "bad_ann.json", {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                                                     "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
                                                     "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(ValueError, match=r"bad_ann\.json.*annotation 1"):
        td.CocoDetection(str(tmp_path), bad_ann)


def test_zero_size_and_crowd_boxes_are_not_targets(tmp_path):
    Image.new("L", (40, 30), 128).save(tmp_path / "a.png")  # grey: converted to RGB
    Image.new("RGB", (20, 20)).save(tmp_path / "empty.png")
    boxes = [[5, 5, 10, 8], [5, 5, 0, 8], [5, 5, 10, -2], [50, 5, 10, 8], [1, 1, 20, 20]]
    anns = [dict(id=i + 1, image_id=1, category_id=9, bbox=b, area=1.0, iscrowd=int(i == 4)) for i, b in enumerate(boxes)]
    anns[0]["category_id"] = 4
    ann_file = write_json(tmp_path / "ann.json", {
        "images": [dict(id=1, file_name="a.png", width=40, height=30), dict(id=2, file_name="empty.png", width=20, height=20)],
        "annotations": anns, "categories": [dict(id=9, name="nine"), dict(id=4, name="four")]})
    with pytest.warns(UserWarning, match="3 boxes of zero or negative size"):
        ds = td.CocoDetection(str(tmp_path), ann_file, transforms=td.DetTransforms(False, 32))
    assert ds.num_dropped_boxes == 3 and ds.names == ["four", "nine"]
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and target["orig_size"].tolist() == [40, 30]
    assert target["labels"].tolist() == [0]
    assert torch.allclose(target["boxes"], torch.tensor([[10 / 40, 9 / 30, 10 / 40, 8 / 30]]))
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


# ---- transforms ----

def mask_box(mask):
    """Tight pixel x1, y1, x2, y2 of a binary (H, W) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def pixel_boxes(target, size):
    cx, cy, w, h = (target["boxes"] * size).unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@pytest.mark.parametrize("mosaic_prob,rotation", [(0.0, 0), (1.0, 0), (1.0, 10)])
def test_train_transforms_keep_boxes_and_masks_together(coco_root, mosaic_prob, rotation):
    """A mask's tight box equals its box up to resampling (nearest-neighbour masks), except that
    a box cut by the image border is the clipped box of the whole shape and a rotated box is the
    hull of the rotated corners: those only contain the mask."""
    tf = td.DetTransforms(True, IMG_SIZE, mosaic_prob=mosaic_prob, mosaic_epoch=10, stop_epoch=20, mosaic_size=IMG_SIZE)
    tf.mosaic.affine.degrees = [-rotation, rotation]
    ds = dataset(coco_root, transforms=tf, masks=True)
    tight_checks = 0
    for idx in range(len(ds)):
        image, target = ds[idx]
        n = len(target["labels"])
        assert image.shape == (3, IMG_SIZE, IMG_SIZE) and image.dtype == torch.float32
        assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, IMG_SIZE, IMG_SIZE)
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        if n:  # the shapes (one saturated channel) outshine the dark background: the pixels moved with the masks
            brightness = (image * torch.tensor(support.IMAGENET_STD).view(3, 1, 1)).amax(0)
            shape = target["masks"].bool().any(0)
            assert brightness[shape].mean() > brightness[~shape].mean() + 0.1
        for box, mask in zip(pixel_boxes(target, IMG_SIZE), target["masks"]):
            if mask.sum() < 4:  # a sliver left by a crop may vanish in the nearest-neighbour resize
                continue
            tight = mask_box(mask)
            assert (tight[:2] >= box[:2] - 2.5).all() and (tight[2:] <= box[2:] + 2.5).all(), (tight, box)
            if not rotation and box.min() > 0.5 and box.max() < IMG_SIZE - 0.5:
                assert (tight - box).abs().max() <= 3, (tight, box)
                tight_checks += 1
    assert tight_checks > len(ds) or rotation


def test_val_transforms(coco_root):
    ds = dataset(coco_root, "val2017", transforms=td.DetTransforms(False, IMG_SIZE), masks=True)
    raw = dataset(coco_root, "val2017", masks=True)
    image, target = ds[0]
    raw_image, raw_target = raw[0]
    w, h = raw_image.size
    assert image.shape == (3, IMG_SIZE, IMG_SIZE) and -2.2 < image.min() and image.max() < 2.7
    assert target["orig_size"].tolist() == [w, h] and target["image_id"] == raw_target["image_id"]
    expected = raw_target["boxes"].as_subclass(torch.Tensor)
    expected = torch.stack([(expected[:, 0] + expected[:, 2]) / 2 / w, (expected[:, 1] + expected[:, 3]) / 2 / h,
                            (expected[:, 2] - expected[:, 0]) / w, (expected[:, 3] - expected[:, 1]) / h], -1)
    assert torch.allclose(target["boxes"], expected, atol=1e-5)


def test_epoch_policy_turns_mosaic_and_strong_ops_off(coco_root):
    tf = td.DetTransforms(True, IMG_SIZE, mosaic_prob=1.0, mosaic_epoch=2, stop_epoch=4)
    tf.iou_crop_prob = 1.0
    calls = []

    class Recorder:  # stands in for an op; the mosaic's cache must be emptied every epoch
        def __init__(self, name):
            self.name, self.cache = name, ["stale sample"]

        def __call__(self, image, target):
            calls.append(self.name)
            return image, target

    for name in ("mosaic", "photometric", "zoom_out", "iou_crop"):
        setattr(tf, name, Recorder(name))
    ds = dataset(coco_root, transforms=tf)
    expected = {0: ["mosaic", "photometric"], 2: ["photometric", "zoom_out", "iou_crop"], 4: []}
    for epoch, ops in expected.items():
        tf.mosaic.cache.append("stale sample")
        ds.set_epoch(epoch)
        assert tf.epoch == epoch and tf.mosaic.cache == []
        calls.clear()
        ds[0]
        assert calls == ops, epoch


def test_mosaic_combines_four_samples_and_caches():
    random.seed(1)
    mosaic = td.Mosaic(output_size=32, rotation_range=0, translation_range=(0, 0), scaling_range=(1, 1), max_cached_images=3)
    for i in range(5):  # a white box at a different place on each black image
        image = Image.new("RGB", (64, 48))
        box = [4.0 + 6 * i, 6.0, 20.0 + 6 * i, 30.0]
        image.paste((255, 255, 255), tuple(int(v) for v in box))
        target = {"boxes": tv_tensors.BoundingBoxes([box], format="XYXY", canvas_size=(48, 64)),
                  "labels": torch.tensor([i]), "image_id": i, "orig_size": torch.tensor([64, 48])}
        out_image, out = mosaic(image, target)
    assert len(mosaic.cache) == 3 and mosaic.cache[-1][1]["image_id"] == 4
    assert out_image.size == (2 * 42, 2 * 32) and out["boxes"].canvas_size == (64, 84)  # cells of 42 x 32
    assert out["image_id"] == 4 and len(out["labels"]) == 4 and out["labels"][0] == 4
    assert torch.allclose(out["boxes"][0], torch.tensor([28.0, 6.0, 44.0, 30.0]) * torch.tensor([42 / 64, 32 / 48] * 2))
    pixels = torch.from_numpy(np.asarray(out_image).copy()).float().mean(-1)
    for x1, y1, x2, y2 in out["boxes"].round().int().tolist():  # every box still covers its white patch
        assert pixels[y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 200
    assert pixels.mean() < 0.5 * 255


def test_pipeline_carries_keypoints(coco_root):
    tf = td.DetTransforms(True, IMG_SIZE, mosaic_prob=1.0, mosaic_epoch=1, stop_epoch=1)
    ds = dataset(coco_root)
    for epoch in (0, 1):  # with and without the strong ops
        tf.set_epoch(epoch)
        for idx in range(6):
            image, target = ds[idx]
            b = target["boxes"]
            centres = (b[:, None, :2] + b[:, None, 2:]) / 2
            target["keypoints"] = tv_tensors.KeyPoints(centres, canvas_size=b.canvas_size)
            image, target = tf(image, target)
            n = len(target["labels"])
            assert isinstance(target["keypoints"], tv_tensors.KeyPoints) and target["keypoints"].shape == (n, 1, 2)
            if epoch == 1:  # flip and resize only: the centre stays the box centre, but for torchvision
                # flipping points as pixel indices (x -> W - 1 - x) where boxes flip as areas (x -> W - x)
                assert torch.allclose(target["keypoints"][:, 0] / IMG_SIZE, target["boxes"][:, :2], atol=2 / IMG_SIZE)


# ---- collation and MixUp ----

def test_mixup_collate(coco_root):
    ds = dataset(coco_root, transforms=td.DetTransforms(False, IMG_SIZE), masks=True)
    batch = [ds[i] for i in range(4)]
    collate = td.BatchImageCollate(mixup_prob=1.0, mixup_epoch=2)
    images, targets = collate(batch)
    assert images.shape == (4, 3, IMG_SIZE, IMG_SIZE) and len(targets) == 4
    # beta from the first mixed image: images[0] - b_last = beta * (b_0 - b_last)
    diff, mixed = batch[0][0] - batch[-1][0], images[0] - batch[-1][0]
    beta = ((mixed * diff).sum() / (diff * diff).sum()).item()
    assert 0.45 <= beta <= 0.55
    for i, target in enumerate(targets):
        own, other = batch[i][1], batch[i - 1][1]
        n = len(own["labels"]) + len(other["labels"])
        assert torch.allclose(images[i], beta * batch[i][0] + (1 - beta) * batch[i - 1][0], atol=1e-5)
        assert torch.equal(target["boxes"], torch.cat([own["boxes"], other["boxes"]]))
        assert torch.equal(target["labels"], torch.cat([own["labels"], other["labels"]]))
        assert target["masks"].shape == (n, IMG_SIZE, IMG_SIZE)
        assert target["image_id"] == own["image_id"]
    collate.set_epoch(2)
    images, targets = collate(batch)
    assert torch.equal(images, torch.stack([image for image, _ in batch]))
    assert all(t is b[1] for t, b in zip(targets, batch))


# ---- evaluation ----

def perfect_predictions(ds):
    """Per-image results equal to the ground truth, in the evaluator's input format."""
    image_ids, results = [], []
    for image_id in ds.ids:
        anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        info = ds.coco.imgs[image_id]
        masks = [torch.from_numpy(ds.coco.annToMask(a)).bool() for a in anns]
        results.append(dict(labels=torch.tensor([ds.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                            boxes=boxes, scores=torch.ones(len(anns)),
                            masks=torch.stack(masks) if masks else torch.zeros(0, info["height"], info["width"], dtype=torch.bool)))
        image_ids.append(image_id)
    return image_ids, results


def test_evaluator_perfect_and_empty_predictions(coco_root, capsys):
    ds = dataset(coco_root, "val2017")
    image_ids, results = perfect_predictions(ds)
    evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat, iou_types=("bbox", "segm"))
    for start in range(0, len(image_ids), 5):
        evaluator.update(image_ids[start:start + 5], results[start:start + 5])
    stats = evaluator.summarize()
    assert set(stats) == {"bbox", "segm", "bbox_per_class", "segm_per_class"}
    assert len(stats["bbox"]) == len(stats["segm"]) == 12
    assert stats["segm_per_class"] == {name: [pytest.approx(1.0)] * 2 for name in ds.names}
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)
    assert stats["bbox"][1] == pytest.approx(1.0)
    assert "IoU metric: segm" in capsys.readouterr().out

    # labels not mapped back to category ids would mostly miss: the mapping is what makes AP 1
    wrong = predict.CocoEvaluator(ds.coco, {label: label for label in ds.label_to_cat})
    wrong.update(image_ids, results)
    assert wrong.summarize()["bbox"][0] < 0.9

    empty = predict.CocoEvaluator(ds.coco, ds.label_to_cat, iou_types=("bbox", "segm"))
    none = dict(labels=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4), scores=torch.zeros(0),
                masks=torch.zeros(0, 1, 8, 8))
    empty.update(image_ids, [none] * len(image_ids))
    stats = empty.summarize()
    assert stats["bbox"][0] == 0.0 and stats["segm"][0] == 0.0 and max(stats["bbox"]) <= 0


def half_detected(ds, rank, world_size):
    """Rank `rank`'s share of the val images; rank 0 detects nothing, the others are perfect."""
    image_ids, results = perfect_predictions(ds)
    image_ids, results = image_ids[rank::world_size], results[rank::world_size]
    if rank == 0:
        results = [dict(labels=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4), scores=torch.zeros(0))] * len(results)
    return image_ids, results


def _distributed_eval(rank, world_size, init_file, ann_file, img_dir, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ds = td.CocoDetection(img_dir, ann_file)
        evaluator = predict.CocoEvaluator(ds.coco, ds.label_to_cat)
        evaluator.update(*half_detected(ds, rank, world_size))
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(evaluator.summarize(), f)
    finally:
        dist.destroy_process_group()


def test_evaluator_gathers_across_ranks(coco_root, tmp_path):
    ann_file, img_dir = os.path.join(coco_root, "annotations", "instances_val2017.json"), os.path.join(coco_root, "val2017")
    # fork: the children inherit the imported modules instead of importing torch again
    mp.start_processes(_distributed_eval, args=(2, str(tmp_path / "init"), ann_file, img_dir, str(tmp_path / "stats")),
                       nprocs=2, start_method="fork")
    ds = td.CocoDetection(img_dir, ann_file)
    single = predict.CocoEvaluator(ds.coco, ds.label_to_cat)
    for rank in range(2):
        single.update(*half_detected(ds, rank, 2))
    expected = single.summarize()
    assert 0.2 < expected["bbox"][0] < 0.8  # neither rank alone gives this
    for rank in range(2):
        with open(tmp_path / f"stats.{rank}") as f:
            assert json.load(f)["bbox"] == pytest.approx(expected["bbox"])


def test_draw_predictions(coco_root, tmp_path):
    ds = dataset(coco_root, "val2017", transforms=td.DetTransforms(False, IMG_SIZE))
    image_ids, results = perfect_predictions(dataset(coco_root, "val2017"))
    batch = [ds[i] for i in range(3)]
    images = torch.stack([image for image, _ in batch])
    path = predict.draw_batch(images, [t for _, t in batch], results[:3], ds.names, str(tmp_path / "pics" / "val.png"), ncols=2)
    picture = Image.open(path)
    assert picture.size == (2 * IMG_SIZE, 2 * IMG_SIZE)
    pixels = np.asarray(picture)
    assert pixels[IMG_SIZE:, IMG_SIZE:].max() == 0  # the unused fourth cell stays black
    # every tile with detections shows the palette colour of its first detection's class
    tiles = [pixels[:IMG_SIZE, :IMG_SIZE], pixels[:IMG_SIZE, IMG_SIZE:], pixels[IMG_SIZE:, :IMG_SIZE]]
    with_boxes = [(tile, res) for tile, res in zip(tiles, results) if len(res["labels"])]
    assert with_boxes
    for tile, res in with_boxes:
        colour = np.array(support.PALETTE[res["labels"][0].item()])
        assert (tile.reshape(-1, 3) == colour).all(1).sum() > 10
