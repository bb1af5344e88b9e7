"""ECDet: object detection with a distilled ECViT backbone, trained on COCO (EdgeCrafter, stage 3).

    torchrun --nproc_per_node 8 train_det.py --model ecdet_s --data /coco --backbone-weights ecvitt.pth
    python train_det.py --demo          # a short CPU run on a synthetic data set

The file reads top to bottom as the stage runs: the COCO-format data set, the ECDet augmentation
recipe with its epoch policy, batch collation with MixUp, a synthetic data set for demos and tests,
COCO AP evaluation; then the loss (Hungarian matching and the ECDet criterion); then the training
loop (AdamW, warm-up + flat-cosine schedule, EMA, AMP, DDP, checkpoints and resume).

Box conventions: data sets and annotations hold pixel boxes; the targets the model trains on hold
normalised (cx, cy, w, h) in [0, 1]; the evaluator takes pixel (x1, y1, x2, y2) boxes in the
original image.
"""
import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou, generalized_box_iou
from tqdm import tqdm

import model
from model import weighting_function

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The training recipe per preset (the original's configs/ecdet/ecdet_*.yml and ecseg/ecseg_*.yml):
# epochs, head and backbone learning rates, weight decay, and the augmentation epochs (mosaic and
# mixup while epoch < mosaic_epoch, strong augmentation off from stop_epoch on).
_RECIPE = ("epochs", "lr", "backbone_lr", "weight_decay", "mosaic_prob", "mosaic_epoch", "stop_epoch")
RECIPES = {name: dict(zip(_RECIPE, values)) for name, values in {
    "ecdet_s": (74, 5e-4, 2.5e-5, 1e-4, 0.75, 36, 72),
    "ecdet_m": (62, 5e-4, 2.5e-5, 1e-4, 0.75, 30, 60),
    "ecdet_l": (50, 5e-4, 5e-6, 1.25e-4, 1.0, 24, 48),
    "ecdet_x": (50, 5e-4, 2.5e-6, 1.25e-4, 1.0, 24, 48),
    "ecseg_s": (74, 5e-4, 2.5e-5, 1e-4, 0.75, 36, 72),
    "ecseg_m": (74, 5e-4, 2.5e-5, 1e-4, 0.75, 36, 72),
    "ecseg_l": (50, 5e-4, 2.5e-6, 1.25e-4, 1.0, 24, 48),
    "ecseg_x": (50, 5e-4, 2.5e-6, 1.25e-4, 1.0, 24, 48),
    # The CPU demo: a randomly initialised ViT learns at the full rate; a short mosaic phase.
    "demo": (20, 1e-3, 1e-3, 1e-4, 0.5, 4, 18),
}.items()}
# Shared by every preset: total batch 32, AdamW betas, warm-up iterations (at most 3 epochs), the
# floor of the cosine as a fraction of the lr, EMA decay and its warm-up, gradient-norm clipping.
TRAINING = dict(batch_size=32, betas=(0.9, 0.999), warmup_iter=2000, lr_gamma=0.5, ema_decay=0.9999,
                ema_warmups=1000, clip_max_norm=0.1)

# Target entries with one row per object: Mosaic and MixUp concatenate them, SanitizeBoxes filters
# them together. "keypoints" (a tv_tensors.KeyPoints) and "area" are for the pose stage.
INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints", "area")


# ---- Data: COCO-format data set ----

def load_coco(ann_file):
    """Parse a COCO-format annotation file into a pycocotools COCO, with errors that name the file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {ann_file} is not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"COCO annotation file {ann_file} lacks the top-level keys {missing}")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise ValueError(f"COCO annotation file {ann_file} has an entry without {e!r}") from e
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection / instance segmentation data set.

    Categories map to contiguous labels 0..K-1 in order of category id (`label_to_cat`,
    `cat_to_label`, `names`). Crowd annotations are not training targets; boxes of zero or negative
    size after clipping to the image are dropped and counted (`num_dropped_boxes`). Listed images
    missing from img_dir are left out at construction (`num_missing`); an image that fails to decode,
    or whose size differs from its annotation, is replaced by the next readable one at load time
    (`num_unreadable`, counted per process, so per DataLoader worker). Both warn.

    Item: (image, target). Without transforms, image is an RGB PIL image and target["boxes"] pixel
    x1, y1, x2, y2 BoundingBoxes (PIL until normalisation, as the original: its affine and colour
    ops are several times faster than on tensors). After DetTransforms, image is float (3, H, W)
    normalised with ImageNet mean/std and target holds
        boxes (n, 4) float, normalised cx, cy, w, h in [0, 1]
        labels (n,) int64, contiguous
        masks (n, H, W) uint8, only with return_masks (decoded from polygons or RLE)
        image_id int; orig_size (2,) int64, (w, h) of the image on disk
    """

    def __init__(self, img_dir, ann_file, transforms=None, return_masks=False):
        self.img_dir, self.ann_file = img_dir, ann_file
        self.transforms, self.return_masks = transforms, return_masks
        self.coco = load_coco(ann_file)
        cat_ids = sorted(self.coco.cats)
        self.label_to_cat = dict(enumerate(cat_ids))
        self.cat_to_label = {c: label for label, c in self.label_to_cat.items()}
        self.names = [self.coco.cats[c]["name"] for c in cat_ids]
        self.instances, self.num_dropped_boxes = self._select_instances()
        try:
            self.ids = [i for i in sorted(self.coco.imgs) if os.path.isfile(self._path(i))]
        except KeyError as e:
            raise ValueError(f"COCO annotation file {ann_file} has an image without {e!r}") from e
        self.num_missing = len(self.coco.imgs) - len(self.ids)
        self.num_unreadable = 0
        if not self.ids:
            raise FileNotFoundError(f"none of the {len(self.coco.imgs)} images listed in {ann_file} is in {img_dir}")
        if self.num_missing:
            warnings.warn(f"{self.num_missing} images listed in {ann_file} are missing from {img_dir}; skipped")
        if self.num_dropped_boxes:
            warnings.warn(f"{self.num_dropped_boxes} boxes of zero or negative size in {ann_file}; dropped")

    def _select_instances(self):
        """{image_id: [(annotation, label, [x1, y1, x2, y2] clipped to the image)]}, number dropped."""
        instances, dropped = {}, 0
        for ann in self.coco.dataset["annotations"]:
            try:
                if ann.get("iscrowd", 0):
                    continue
                if ann["category_id"] not in self.cat_to_label:
                    raise ValueError(f"unknown category_id {ann['category_id']}")
                info = self.coco.imgs[ann["image_id"]]
                x, y, w, h = ann["bbox"]
                x1, y1 = max(x, 0.0), max(y, 0.0)
                x2, y2 = min(x + w, info["width"]), min(y + h, info["height"])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                ident = ann.get("id") if isinstance(ann, dict) else ann
                raise ValueError(f"COCO annotation file {self.ann_file}: annotation {ident} is malformed: {e!r}") from e
            if x2 <= x1 or y2 <= y1:
                dropped += 1
                continue
            label = self.cat_to_label[ann["category_id"]]
            instances.setdefault(ann["image_id"], []).append((ann, label, [x1, y1, x2, y2]))
        return instances, dropped

    def _path(self, image_id):
        return os.path.join(self.img_dir, self.coco.imgs[image_id]["file_name"])

    def __len__(self):
        return len(self.ids)

    def set_epoch(self, epoch):
        """Forward the epoch to the transforms' epoch policy. With DataLoader workers this reaches
        them only if they are started after the call (persistent_workers=False, as the original)."""
        if hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    def load(self, idx):
        """(image, target) of self.ids[idx] before transforms, or None if the image can't be used."""
        image_id = self.ids[idx]
        info, path = self.coco.imgs[image_id], self._path(image_id)
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")  # also forces the decode, so broken files fail here
        except OSError as e:
            return self._skip(path, repr(e))
        w, h = im.size
        if (w, h) != (info["width"], info["height"]):
            return self._skip(path, f"size {w}x{h} differs from {info['width']}x{info['height']} in {self.ann_file}")
        objects = self.instances.get(image_id, [])
        boxes = torch.tensor([box for _, _, box in objects], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([label for _, label, _ in objects], dtype=torch.int64),
            "image_id": image_id,
            "orig_size": torch.tensor([w, h]),
        }
        if self.return_masks:
            masks = [torch.from_numpy(self.coco.annToMask(ann)) for ann, _, _ in objects]
            target["masks"] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8))
        return im, target

    def _skip(self, path, reason):
        self.num_unreadable += 1
        warnings.warn(f"skipping image {path}: {reason} ({self.num_unreadable} skipped in this process)")
        return None

    def __getitem__(self, idx):
        # A bad file is replaced by the next readable image, so one file can't stop a long run.
        for k in range(len(self.ids)):
            sample = self.load((idx + k) % len(self.ids))
            if sample is not None:
                return self.transforms(*sample) if self.transforms is not None else sample
        raise RuntimeError(f"none of the images of {self.ann_file} in {self.img_dir} can be read")


# ---- Data: augmentation (the ECDet recipe) ----

def merge_instances(targets):
    """One target with the objects of all `targets` (same canvas); other entries from targets[0]."""
    merged = dict(targets[0])
    for key in INSTANCE_KEYS:
        if key in merged:
            parts = [t[key] for t in targets]
            cat = torch.cat(parts)
            merged[key] = tv_tensors.wrap(cat, like=parts[0]) if isinstance(parts[0], tv_tensors.TVTensor) else cat
    return merged


class Mosaic:
    """Mosaic of four images, as in the original (from D-FINE/DEIM).

    The current sample is resized to short side `output_size` and added to a cache of at most
    `max_cached_images` samples (when full, a random one but the newest is dropped if `random_pop`,
    else the oldest). Three samples drawn from the cache with replacement join it, each placed at
    the top-left of one cell of a 2x2 grid of cells (max h, max w) on a zero canvas; then one
    RandomAffine (rotation in degrees, translation as a fraction, scale) moves the whole canvas.
    Boxes, masks and keypoints move with the pixels. Input: an RGB PIL image and its target.
    """

    def __init__(self, output_size=320, rotation_range=10, translation_range=(0.1, 0.1),
                 scaling_range=(0.5, 1.5), fill_value=0, max_cached_images=50, random_pop=True):
        self.resize = T.Resize(output_size)
        self.affine = T.RandomAffine(rotation_range, translate=translation_range, scale=scaling_range, fill=fill_value)
        self.max_cached_images, self.random_pop = max_cached_images, random_pop
        self.cache = []

    def __call__(self, image, target):
        image, target = self.resize(image, target)
        self.cache.append((image, target))
        if len(self.cache) > self.max_cached_images:
            self.cache.pop(random.randint(0, len(self.cache) - 2) if self.random_pop else 0)
        samples = [(image, target)] + random.choices(self.cache, k=3)
        cell_h = max(TF.get_size(img)[0] for img, _ in samples)
        cell_w = max(TF.get_size(img)[1] for img, _ in samples)
        canvas = Image.new(image.mode, (2 * cell_w, 2 * cell_h))  # black, as the original's
        targets = []
        for (img, tgt), (x, y) in zip(samples, [(0, 0), (cell_w, 0), (0, cell_h), (cell_w, cell_h)]):
            h, w = TF.get_size(img)
            canvas.paste(img, (x, y))
            pad = [x, y, 2 * cell_w - x - w, 2 * cell_h - y - h]  # left, top, right, bottom
            targets.append({k: TF.pad(v, pad) if isinstance(v, tv_tensors.TVTensor) else v for k, v in tgt.items()})
        return self.affine(canvas, merge_instances(targets))


class SanitizeBoxes(T.SanitizeBoundingBoxes):
    """SanitizeBoundingBoxes (drop boxes under min_size pixels) that drops the same rows from every
    per-object entry of the target and keeps their tv_tensor types (KeyPoints stay KeyPoints)."""

    def __init__(self, min_size=1):
        super().__init__(min_size=min_size, labels_getter=self._per_object)

    @staticmethod
    def _per_object(sample):
        target = sample[1]  # boxes and masks are found by type; the rest by key
        return [target[k] for k in INSTANCE_KEYS if k in target and not isinstance(target[k], (tv_tensors.BoundingBoxes, tv_tensors.Mask))]

    def transform(self, inpt, params):
        out = super().transform(inpt, params)
        keep_type = isinstance(inpt, tv_tensors.TVTensor) and not isinstance(out, tv_tensors.TVTensor)
        return tv_tensors.wrap(out, like=inpt) if keep_type else out


def normalised_cxcywh(boxes):
    """BoundingBoxes on a canvas (H, W) -> plain (n, 4) tensor of cx, cy, w, h divided by (W, H, W, H)."""
    h, w = boxes.canvas_size
    cxcywh = TF.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    return cxcywh.as_subclass(torch.Tensor).float() / torch.tensor([w, h, w, h], dtype=torch.float32)


class DetTransforms:
    """The ECDet pipeline: (PIL image, pixel target) -> (normalised float image, model target).

    train, in the original's order:
        Mosaic (with probability mosaic_prob while epoch < mosaic_epoch)
        RandomPhotometricDistort(p=0.5)
        RandomZoomOut(fill=0), RandomIoUCrop with probability 0.8 (both skipped on mosaic samples)
        SanitizeBoxes(min_size=1), RandomHorizontalFlip, Resize(img_size), SanitizeBoxes(min_size=1)
    val: Resize(img_size).
    Both end with float in [0, 1] -> Normalize(ImageNet) and boxes -> normalised cx, cy, w, h.
    Epoch policy (the original's `policy: stop_epoch`): from stop_epoch on, the strong ops (Mosaic,
    PhotometricDistort, ZoomOut, IoUCrop) are off. Call set_epoch at the start of every epoch.
    mosaic_size is Mosaic's output_size; None means img_size // 2, the original's 320 at 640.
    """

    def __init__(self, train, img_size=640, mosaic_prob=0.75, mosaic_epoch=36, stop_epoch=72, mosaic_size=None):
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.train, self.epoch = train, 0
        self.mosaic_prob, self.mosaic_epoch, self.stop_epoch = mosaic_prob, mosaic_epoch, stop_epoch
        self.mosaic = Mosaic(output_size=mosaic_size or min(size) // 2)
        self.photometric = T.RandomPhotometricDistort(p=0.5)
        self.zoom_out = T.RandomZoomOut(fill=0)
        self.iou_crop, self.iou_crop_prob = T.RandomIoUCrop(), 0.8
        self.resize = T.Resize(size)
        self.flip_resize = T.Compose([SanitizeBoxes(), T.RandomHorizontalFlip(), self.resize, SanitizeBoxes()])
        self.normalize = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def set_epoch(self, epoch):
        # DataLoader workers start every epoch from a fresh copy with an empty mosaic cache; the
        # main process does the same so that a resumed run sees the same mosaics.
        self.epoch = epoch
        self.mosaic.cache.clear()

    def __call__(self, image, target):
        if self.train:
            strong = self.epoch < self.stop_epoch
            with_mosaic = strong and self.epoch < self.mosaic_epoch and random.random() < self.mosaic_prob
            if with_mosaic:
                image, target = self.mosaic(image, target)
            if strong:
                image, target = self.photometric(image, target)
            # A mosaic is already zoomed and shifted; the original never stacks ZoomOut/IoUCrop on it.
            if strong and not with_mosaic:
                image, target = self.zoom_out(image, target)
                if torch.rand(1).item() < self.iou_crop_prob:
                    image, target = self.iou_crop(image, target)
            image, target = self.flip_resize(image, target)
        else:
            image, target = self.resize(image, target)
        target = dict(target, boxes=normalised_cxcywh(target["boxes"]))
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        return self.normalize(image).as_subclass(torch.Tensor), target


# ---- Data: batch collation with MixUp ----

class BatchImageCollate:
    """[(image (3, H, W), target)] * B -> (images (B, 3, H, W), [target] * B), with batch MixUp.

    With probability mixup_prob while epoch < mixup_epoch (the original's BatchImageCollateFunction):
    beta ~ U(0.45, 0.55), one per batch; image i becomes beta * image_i + (1 - beta) * image_{i-1}
    (cyclic), and target i gets its own objects followed by those of image i-1 (the loss weighs them
    all alike, as the original's does). The original
    ECDet collate does no multi-scale training (D-FINE's `scales` are not in its configs), so
    neither does this. The DataLoader copies this object into its workers when an epoch's
    iteration starts, so set_epoch must come before that.
    """

    def __init__(self, mixup_prob=0.0, mixup_epoch=0):
        self.mixup_prob, self.mixup_epoch, self.epoch = mixup_prob, mixup_epoch, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __call__(self, batch):
        images = torch.stack([image for image, _ in batch])
        targets = [target for _, target in batch]
        if self.epoch < self.mixup_epoch and random.random() < self.mixup_prob:
            beta = round(random.uniform(0.45, 0.55), 6)
            images = beta * images + (1.0 - beta) * images.roll(1, dims=0)
            targets = [merge_instances([own, other]) for own, other in zip(targets, targets[-1:] + targets[:-1])]
        return images, targets


# ---- Data: synthetic COCO-format data set ----

# Non-contiguous category ids, as in COCO, so the label remap is exercised.
SYNTHETIC_CATEGORIES = {1: "circle", 3: "square", 7: "triangle"}
_CORNERS = {"circle": 32, "square": 4, "triangle": 3}


def _background(rng, w, h):
    """(h, w, 3) uint8: a colour ramp between two dark colours plus Gaussian noise."""
    a, b = rng.uniform(0, 140, size=(2, 3))
    ramp = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    return np.clip(a + (b - a) * ramp + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _synthetic_image(rng, img_size, image_id, ann_id, split_dir):
    """Draw one image, save it, return its COCO image entry and annotations."""
    w, h = (int(img_size * s) for s in rng.uniform(0.625, 1.0, size=2))
    canvas = Image.fromarray(_background(rng, w, h))
    draw = ImageDraw.Draw(canvas)
    placed, annotations = [], []
    for _ in range(rng.choice(5, p=[0.05, 0.25, 0.3, 0.25, 0.15])):
        for _ in range(20):  # retry until the shape's square hull overlaps no earlier one
            r = rng.uniform(0.08, 0.22) * min(w, h)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(abs(cx - px) > r + pr or abs(cy - py) > r + pr for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = int(rng.choice(list(SYNTHETIC_CATEGORIES)))
        n = _CORNERS[SYNTHETIC_CATEGORIES[cat]]
        angle = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(n) / n
        poly = np.round(np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], 1), 2)
        colour = rng.integers(60, 256, size=3)
        colour[rng.integers(3)] = 255  # one saturated channel keeps shapes brighter than the background
        draw.polygon([tuple(p) for p in poly.tolist()], fill=tuple(colour.tolist()))
        (x1, y1), (x2, y2) = poly.min(0), poly.max(0)
        segmentation = [poly.ravel().tolist()]
        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))))
        annotations.append(dict(id=ann_id + len(annotations), image_id=image_id, category_id=cat, iscrowd=0, area=area,
                                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)], segmentation=segmentation))
    file_name = f"{image_id:012d}.jpg"
    canvas.save(os.path.join(split_dir, file_name), quality=90)
    return dict(id=image_id, file_name=file_name, width=w, height=h), annotations


def make_synthetic_coco(root, num_train=200, num_val=50, img_size=128, seed=0,
                        draw=_synthetic_image, categories=None, ann_prefix="instances"):
    """Write a small COCO-format data set of coloured shapes on noisy backgrounds; returns root.

    Layout: root/train2017/*.jpg, root/val2017/*.jpg, root/annotations/instances_{train,val}2017.json.
    Each image has sides drawn from [0.625, 1] * img_size pixels and 0-4 non-overlapping regular
    polygons (circle = 32 corners, square, triangle; category ids 1, 3, 7), each annotated with bbox
    (x, y, w, h pixels), area (of the polygon's mask), iscrowd 0 and a polygon segmentation.
    The same seed writes the same files. Other stages write their own data in this layout by
    passing draw (as _synthetic_image), their categories (COCO category dicts) and ann_prefix.
    """
    rng = np.random.default_rng(seed)
    categories = categories or [dict(id=c, name=name, supercategory="shape") for c, name in SYNTHETIC_CATEGORIES.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        split_dir = os.path.join(root, split)
        os.makedirs(split_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            # ids from 1: COCOeval takes a matched-annotation id of 0 for "unmatched"
            image, anns = draw(rng, img_size, image_id, len(annotations) + 1, split_dir)
            images.append(image)
            annotations += anns
        data = dict(info=dict(description="EdgeCrafter synthetic shapes"), images=images,
                    annotations=annotations, categories=categories)
        with open(os.path.join(root, "annotations", f"{ann_prefix}_{split}.json"), "w") as f:
            json.dump(data, f)
    return root


# ---- Evaluation: COCO AP ----

class CocoEvaluator:
    """COCO AP (pycocotools) of postprocessed predictions, for iou_types "bbox", "segm", "keypoints".

    update(image_ids, results): results[i] belongs to image image_ids[i] and holds labels (n,)
    (mapped to category ids by label_to_cat), scores (n,), and per iou_type: "bbox" boxes (n, 4)
    pixel x1, y1, x2, y2 in the original image; "segm" masks (n, H, W) or (n, 1, H, W) at the
    original size (bool, or probabilities cut at 0.5); "keypoints" keypoints (n, 3K), per keypoint
    pixel x, y in the original image and a score (COCO's result format).
    summarize(): gathers every rank's results (torch.distributed, when initialised), evaluates on
    rank 0, prints the standard table and returns {iou_type: the COCO stats (12; keypoints 10)} on
    every rank.
    An image passed to update() without detections counts as all-missed; images never passed are
    not evaluated (as the original). Use one evaluator per evaluation pass.
    """

    def __init__(self, coco_gt, label_to_cat, iou_types=("bbox",)):
        unknown = set(iou_types) - {"bbox", "segm", "keypoints"}
        if unknown:
            raise ValueError(f"iou_types must be among 'bbox', 'segm', 'keypoints'; got {sorted(unknown)}")
        self.coco_gt, self.label_to_cat, self.iou_types = coco_gt, label_to_cat, tuple(iou_types)
        self.results = {}  # image_id -> {iou_type: [COCO result dicts]}; a repeated image overwrites

    def update(self, image_ids, results):
        for image_id, res in zip(image_ids, results):
            image_id = int(image_id)
            cats = [self.label_to_cat[label] for label in res["labels"].tolist()]
            scores = res["scores"].float().tolist()
            entry = {}
            if "bbox" in self.iou_types:
                x1, y1, x2, y2 = res["boxes"].float().cpu().unbind(-1)
                xywh = torch.stack([x1, y1, x2 - x1, y2 - y1], -1).tolist()
                entry["bbox"] = [dict(image_id=image_id, category_id=c, bbox=b, score=s) for c, b, s in zip(cats, xywh, scores)]
            if "segm" in self.iou_types:
                entry["segm"] = [dict(image_id=image_id, category_id=c, segmentation=rle, score=s)
                                 for c, rle, s in zip(cats, self._encode(res["masks"]), scores)]
            if "keypoints" in self.iou_types:
                entry["keypoints"] = [dict(image_id=image_id, category_id=c, keypoints=k, score=s)
                                      for c, k, s in zip(cats, res["keypoints"].float().cpu().tolist(), scores)]
            self.results[image_id] = entry

    @staticmethod
    def _encode(masks):
        masks = masks.detach().cpu().reshape(-1, *masks.shape[-2:])
        masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
        if len(masks) == 0:
            return []
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # bytes don't survive json or pickling to other tools
        return rles

    def summarize(self):
        results = self.results
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)
            # DistributedSampler repeats images to even out ranks; keying by image id drops the repeats
            results = {image_id: entry for part in gathered for image_id, entry in part.items()}
        stats = None
        if not distributed or dist.get_rank() == 0:
            if not results:
                raise RuntimeError("CocoEvaluator.summarize() called before any update()")
            stats = {iou_type: self._evaluate(iou_type, results) for iou_type in self.iou_types}
        if distributed:
            box = [stats]
            dist.broadcast_object_list(box, src=0)
            stats = box[0]
        return stats

    def _evaluate(self, iou_type, results):
        detections = [d for entry in results.values() for d in entry[iou_type]]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
            # loadRes fails on an empty list; an empty COCO makes every object a miss, AP 0
            coco_dt = self.coco_gt.loadRes(detections) if detections else COCO()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
            coco_eval.params.imgIds = sorted(results)
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"IoU metric: {iou_type}")
        coco_eval.summarize()
        return [float(s) for s in coco_eval.stats]


# ---- Evaluation: pictures ----

_PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (255, 178, 29), (207, 210, 49),
            (26, 147, 52), (0, 212, 187), (52, 69, 147), (132, 56, 255), (255, 55, 199), (255, 112, 31)]


def draw_predictions(images, targets, results, names, path, score_threshold=0.5, ncols=4, skeleton=()):
    """Save a PNG grid of images with their predicted boxes, class names and scores; returns path.

    images: (B, 3, H, W) normalised as DetTransforms makes them; targets: their targets (orig_size
    is used to bring boxes to the image tensor's size); results: per image, labels (n,), boxes (n, 4)
    pixel x1, y1, x2, y2 in the original image, scores (n,), and optionally masks (n, h, w) at the
    original size, blended in in the class colour; names: class name per label.
    Detections scoring below score_threshold are not drawn.
    With keypoints (n, 3K) (pixel x, y, score) in the results, each person's keypoints are drawn
    too, joined by the `skeleton`'s (i, j) pairs of keypoint indices.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for image, target, res in zip(images, targets, results):
        pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1).mul(255)
        (h, w), (orig_w, orig_h) = image.shape[-2:], target["orig_size"].tolist()
        keep = res["scores"] >= score_threshold
        if "masks" in res:  # half the class colour over each drawn detection's mask
            masks = res["masks"][keep].detach().float().cpu().reshape(-1, 1, *res["masks"].shape[-2:])
            masks = F.interpolate(masks, size=(h, w), mode="nearest")[:, 0].bool()
            for mask, label in zip(masks, res["labels"][keep].tolist()):
                colour = torch.tensor(_PALETTE[label % len(_PALETTE)], dtype=torch.float32)
                pixels[:, mask] = 0.5 * pixels[:, mask] + 0.5 * colour[:, None]
        tile = Image.fromarray(pixels.round().byte().permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile)
        scale = torch.tensor([w / orig_w, h / orig_h, w / orig_w, h / orig_h])
        boxes = res["boxes"][keep].detach().float().cpu() * scale
        for box, label, score in zip(boxes.tolist(), res["labels"][keep].tolist(), res["scores"][keep].tolist()):
            colour = _PALETTE[label % len(_PALETTE)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 3, box[1] + 2), f"{names[label]} {score:.2f}", fill=colour)
        if "keypoints" in res:  # one colour per person, as they are often of one class
            points = res["keypoints"][keep].detach().float().cpu().unflatten(-1, (-1, 3))[..., :2] * scale[:2]
            for i, xy in enumerate(points.tolist()):
                colour = _PALETTE[i % len(_PALETTE)]
                for a, b in skeleton:
                    draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=2)
                for x, y in xy:
                    draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        tiles.append(tile)
    if not tiles:
        raise ValueError("draw_predictions() got no images")
    ncols = min(ncols, len(tiles))
    nrows = math.ceil(len(tiles) / ncols)
    tile_w, tile_h = tiles[0].size
    grid = Image.new("RGB", (ncols * tile_w, nrows * tile_h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % ncols) * tile_w, (i // ncols) * tile_h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path


# ---- Loss: matching and the ECDet criterion ----

def cxcywh_to_xyxy(boxes):
    """(..., 4) cx, cy, w, h -> x1, y1, x2, y2, with negative sizes clamped to 0: FDR can
    predict an edge past the opposite one, and the IoUs below need x1 <= x2."""
    return box_convert(torch.cat([boxes[..., :2], boxes[..., 2:].clamp(min=0)], -1), 'cxcywh', 'xyxy')


def paired_iou(boxes1, boxes2, giou=False):
    """IoU (or GIoU) of boxes1[k] with boxes2[k]: (N, 4), (N, 4) x1, y1, x2, y2 -> (N,)."""
    fn = generalized_box_iou if giou else box_iou
    return fn(boxes1[:, None], boxes2[:, None]).flatten()


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth objects (DETR's bipartite matching).

    For an image with Q queries and T objects, query i and object j cost

        C_ij = λ_cls · cost_cls(p_i[c_j]) + λ_L1 · |b_i − b̂_j|_1 − λ_GIoU · GIoU(b_i, b̂_j)

    where p_i = sigmoid(logits_i) are the query's class probabilities, c_j is the object's class
    and the boxes b_i (predicted) and b̂_j (ground truth) are normalised cx, cy, w, h (GIoU on
    their corners). The class cost is the sigmoid focal loss at the object's class, positive
    minus negative (α = 0.25, γ = 2), so that confidence in the right class lowers the cost:

        cost_cls(p) = α (1 − p)^γ · (−log(p + 1e-8)) − (1 − α) p^γ · (−log(1 − p + 1e-8))

    ECDet weighs λ_cls = 2, λ_L1 = 5, λ_GIoU = 2. Per image, scipy's `linear_sum_assignment`
    picks the min(Q, T) pairs of least total cost; the other queries are matched to nothing.
    """

    def __init__(self, weight_dict, alpha, gamma):
        super().__init__()
        self.cost_class = weight_dict['cost_class']
        self.cost_bbox = weight_dict['cost_bbox']
        self.cost_giou = weight_dict['cost_giou']
        self.alpha, self.gamma = alpha, gamma

    def cost(self, outputs, targets):
        """C for the whole batch, (B·Q, T_1 + ... + T_B). A subclass adds its own terms here."""
        p = outputs['pred_logits'].flatten(0, 1).sigmoid()[:, torch.cat([t['labels'] for t in targets])]
        b = outputs['pred_boxes'].flatten(0, 1)
        b_hat = torch.cat([t['boxes'] for t in targets])
        alpha, gamma = self.alpha, self.gamma
        cost_pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
        cost_neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
        cost_l1 = torch.cdist(b, b_hat, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(b_hat))
        return self.cost_bbox * cost_l1 + self.cost_class * (cost_pos - cost_neg) + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4). targets: B dicts with labels (T,)
        and boxes (T, 4). Returns B pairs (query indices, object indices), int64 CPU tensors of
        length min(Q, T), query indices ascending."""
        B, Q = outputs['pred_logits'].shape[:2]
        C = self.cost(outputs, targets).view(B, Q, -1).cpu().nan_to_num(nan=1.0)
        sizes = [len(t['boxes']) for t in targets]
        return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[b]))
                for b, c in enumerate(C.split(sizes, -1))]


def union_of_matches(matchings):
    """The union of several matchings of one batch (ECDet's "go" indices).

    matchings: a list (one per layer) of B (query indices, object indices) pairs, CPU tensors.
    Per image: every query matched by any layer, to the object it was matched to most often,
    ordered by that count, descending. Ties fall as torch's unstable CPU sort leaves them (as in the
    original: a stable sort would train some tied queries toward another object).
    """
    union = []
    for per_layer in zip(*matchings):
        pairs = torch.stack([torch.cat([q for q, _ in per_layer]), torch.cat([o for _, o in per_layer])], 1)
        pairs, counts = torch.unique(pairs, dim=0, return_counts=True)
        best = {}
        for q, o in pairs[torch.argsort(counts, descending=True)].tolist():
            best.setdefault(q, o)
        union.append((torch.tensor(list(best), dtype=torch.int64), torch.tensor(list(best.values()), dtype=torch.int64)))
    return union


def match_all(matcher, outputs, targets):
    """The matchings of the last decoder layer, the earlier ones (aux_outputs), the pre-decoder head
    (pre_outputs) and the encoder's queries (enc_aux_outputs), and the union of them all."""
    indices = matcher(outputs, targets)
    layers = [matcher(o, targets) for o in outputs['aux_outputs']]
    pre = matcher(outputs['pre_outputs'], targets)
    encoder = [matcher(o, targets) for o in outputs['enc_aux_outputs']]
    return indices, layers, pre, encoder, union_of_matches([indices, *layers, pre, *encoder])


def denoising_matches(dn_meta, targets):
    """Denoising query matches: the positive query of group g for object j reconstructs object j."""
    return [(q, torch.arange(len(t['labels']), device=q.device).repeat(dn_meta['dn_num_group']))
            for q, t in zip(dn_meta['dn_positive_idx'], targets)]


def mean_over_ranks(n, device):
    """n averaged over the DDP ranks when torch.distributed is initialised, at least 1, a float."""
    n = torch.as_tensor([n], dtype=torch.float, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1).item()


def batch_index(indices):
    """(image index, query index) of every matched query, to index (B, Q, ...) tensors."""
    return (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
            torch.cat([q for q, _ in indices]))


def matched(targets, indices, key):
    """The matched objects' `key` ('labels' or 'boxes'), in the order of batch_index."""
    return torch.cat([t[key][o] for t, (_, o) in zip(targets, indices)])


@torch.no_grad()
def fgl_targets(ref_points, boxes, reg_max, up, reg_scale):
    """The FGL target: each ground-truth edge as a mix of its two neighbouring FDR bins.

    ref_points: (N, 4) cx, cy, w, h the decoder refined from; boxes: (N, 4) their objects, x1, y1,
    x2, y2. Each edge's distance d (in distance2bbox's units) lies between W(k) and W(k + 1);
    returns k (4N,) int64 and the weights (4N,) of bins k and k + 1, which interpolate d linearly.
    An edge beyond W's range goes wholly to the end bin.
    """
    c = abs(reg_scale)
    unit = (ref_points[:, 2:] / c + 1e-16).repeat(1, 2)
    d = (torch.cat([ref_points[:, :2] - boxes[:, :2], boxes[:, 2:] - ref_points[:, :2]], 1) / unit - 0.5 * c).reshape(-1)
    W = weighting_function(reg_max, up, reg_scale)
    k = (W <= d[:, None]).sum(1) - 1
    left = k.clamp(0, reg_max - 1)
    to_left, to_right = (d - W[left]).abs(), (W[left + 1] - d).abs()
    weight_right = torch.where(k < 0, 0.0, torch.where(k >= reg_max, 1.0, to_left / (to_left + to_right)))
    return left, 1 - weight_right, weight_right


class ECCriterion(nn.Module):
    """The ECDet training loss: weighted terms, each normalised by the (DDP-averaged) number of
    matched objects.

    - MAL (matchability-aware loss): sigmoid BCE on every class logit, the target being q^γ at the
      matched object's class, q the IoU of the query's box with the object's (γ = 1.5), 0 elsewhere;
      unmatched entries weigh p^γ (p = sigmoid(logit)), matched ones 1.
    - L1 and GIoU on the matched boxes.
    - FGL (fine-grained localisation): the FDR corner distributions' focal distribution loss toward
      the two bins around each ground-truth edge (fgl_targets), weighted by IoU.
    - DDF (decoupled distillation focal): KL from the last decoder layer's corner distributions
      (the teacher) to each earlier layer's at temperature 5, weighted by IoU for matched queries and
      by the teacher's class confidence for the others, the two groups' means mixed in the ratio
      sqrt(#matched) : sqrt(#unmatched).

    Every decoder layer (`_aux_{i}`, the last unsuffixed), the pre-decoder head (`_pre`) and the
    encoder's query selection (`_enc_{i}`) gets the terms; the box terms and FGL use the union of
    all their matchings, MAL each output's own. Denoising queries (`_dn_{i}`, `_dn_pre`) are matched
    to the objects they were made from. An output without corners gets no FGL or DDF.

    The original's `enc_meta` (class-agnostic query selection) is not read: ECDet never enables it.
    A subclass adds terms by extending `loss_functions`. A term function takes (out, targets,
    indices, num_boxes, shared), shared holding what all outputs share (up, reg_scale, DDF's
    balance), and returns {} for an output that lacks its prediction.
    """

    union_losses = ('boxes', 'local')  # computed on the union of the layers' matchings
    T = 5  # DDF temperature

    def __init__(self, matcher, weight_dict, losses, gamma, num_classes, reg_max):
        super().__init__()
        self.matcher = matcher
        self.weight_dict, self.losses = dict(weight_dict), list(losses)
        self.gamma, self.num_classes, self.reg_max = gamma, num_classes, reg_max
        unknown = set(self.losses) - set(self.loss_functions())
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; known: {sorted(self.loss_functions())}")

    def loss_functions(self):
        return {'mal': self.loss_mal, 'boxes': self.loss_boxes, 'local': self.loss_local}

    def loss_mal(self, out, targets, indices, num_boxes, shared):
        logits = out['pred_logits']
        idx = batch_index(indices)
        iou = paired_iou(cxcywh_to_xyxy(out['pred_boxes'][idx]), cxcywh_to_xyxy(matched(targets, indices, 'boxes')))
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = matched(targets, indices, 'labels')
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        q = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        q[idx] = iou.detach().to(logits.dtype)
        target = (q[..., None] * onehot).pow(self.gamma)
        weight = logits.detach().sigmoid().pow(self.gamma) * (1 - onehot) + onehot
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction='none')
        return {'loss_mal': loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, out, targets, indices, num_boxes, shared):
        b = out['pred_boxes'][batch_index(indices)]
        b_hat = matched(targets, indices, 'boxes')
        giou = paired_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(b_hat), giou=True)
        return {'loss_bbox': F.l1_loss(b, b_hat, reduction='none').sum() / num_boxes,
                'loss_giou': (1 - giou).sum() / num_boxes}

    def loss_local(self, out, targets, indices, num_boxes, shared):
        if 'pred_corners' not in out:
            return {}
        n_bins = self.reg_max + 1
        idx = batch_index(indices)
        b_hat = cxcywh_to_xyxy(matched(targets, indices, 'boxes'))
        corners = out['pred_corners'][idx].reshape(-1, n_bins)
        left, weight_left, weight_right = fgl_targets(
            out['ref_points'][idx].detach(), b_hat, self.reg_max, shared['up'], shared['reg_scale'])
        iou = paired_iou(cxcywh_to_xyxy(out['pred_boxes'][idx]), b_hat).detach()
        fgl = (F.cross_entropy(corners, left, reduction='none') * weight_left
               + F.cross_entropy(corners, left + 1, reduction='none') * weight_right) * iou.repeat_interleave(4)
        losses = {'loss_fgl': fgl.sum() / num_boxes}
        if 'teacher_corners' not in out:
            return losses

        student = out['pred_corners'].reshape(-1, n_bins)
        teacher = out['teacher_corners'].reshape(-1, n_bins)
        if torch.equal(student, teacher):  # the last denoising layer is its own teacher
            losses['loss_ddf'] = student.sum() * 0
            return losses
        weight = out['teacher_logits'].detach().sigmoid().amax(-1)
        weight[idx] = iou.to(weight.dtype)
        is_matched = torch.zeros_like(weight, dtype=torch.bool)
        is_matched[idx] = True
        weight, is_matched = weight.flatten().repeat_interleave(4), is_matched.flatten().repeat_interleave(4)
        kl = F.kl_div(F.log_softmax(student / self.T, 1), F.softmax(teacher.detach() / self.T, 1), reduction='none')
        ddf = weight * self.T ** 2 * kl.sum(-1)
        ddf_matched = ddf[is_matched].mean() if is_matched.any() else 0
        ddf_unmatched = ddf[~is_matched].mean() if (~is_matched).any() else 0
        n_pos, n_neg = shared['ddf_balance']
        losses['loss_ddf'] = (ddf_matched * n_pos + ddf_unmatched * n_neg) / (n_pos + n_neg)
        return losses

    def weighted_terms(self, out, targets, own, union, shared, suffix):
        """All terms of one output, weighted, names suffixed. own and union: (indices, number of
        boxes), the output's own matching and the one union_losses use."""
        functions, terms = self.loss_functions(), {}
        for name in self.losses:
            terms.update(functions[name](out, targets, *(union if name in self.union_losses else own), shared))
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def forward(self, outputs, targets):
        """outputs: the network's training dict: pred_logits (B, Q, K), pred_boxes (B, Q, 4)
        cx, cy, w, h, pred_corners (B, Q, 4 (reg_max + 1)), ref_points (B, Q, 4), up and
        reg_scale (1,), aux_outputs (the earlier decoder layers, with teacher_corners and
        teacher_logits), pre_outputs, enc_aux_outputs, and with denoising dn_outputs,
        dn_pre_outputs, dn_meta. targets: B dicts with labels (T,) int64 and boxes (T, 4)
        normalised cx, cy, w, h. Returns the weighted terms; their sum is the training loss."""
        device = outputs['pred_logits'].device
        layers = outputs['aux_outputs']
        pre, encoder = outputs['pre_outputs'], outputs['enc_aux_outputs']
        indices, layer_indices, pre_indices, encoder_indices, union = match_all(self.matcher, outputs, targets)
        num_union = mean_over_ranks(sum(len(q) for q, _ in union), device)
        num_boxes = mean_over_ranks(sum(len(t['labels']) for t in targets), device)

        # DDF's balance counts the union's corners, as if each rank held 8 images.
        B, Q = outputs['pred_logits'].shape[:2]
        n_pos = torch.tensor(4 * sum(len(q) for q, _ in union), device=device)
        balance = ((n_pos * (8 / B)) ** 0.5, ((4 * B * Q - n_pos) * (8 / B)) ** 0.5)
        shared = {'up': outputs['up'], 'reg_scale': outputs['reg_scale'], 'ddf_balance': balance}

        groups = [('', outputs, indices),
                  *[(f'_aux_{i}', o, ix) for i, (o, ix) in enumerate(zip(layers, layer_indices))],
                  ('_pre', pre, pre_indices),
                  *[(f'_enc_{i}', o, ix) for i, (o, ix) in enumerate(zip(encoder, encoder_indices))]]
        losses = {}
        for suffix, out, ix in groups:
            losses.update(self.weighted_terms(out, targets, (ix, num_boxes), (union, num_union), shared, suffix))

        if 'dn_outputs' in outputs:
            dn_indices = denoising_matches(outputs['dn_meta'], targets)
            dn = (dn_indices, max(num_boxes * outputs['dn_meta']['dn_num_group'], 1))  # 0 groups: no targets
            dn_groups = [*[(f'_dn_{i}', o) for i, o in enumerate(outputs['dn_outputs'])],
                         ('_dn_pre', outputs['dn_pre_outputs'])]
            for suffix, out in dn_groups:
                losses.update(self.weighted_terms(out, targets, dn, dn, shared, suffix))
        # An empty denoising batch has empty means; the original zeroes NaN terms likewise.
        return {k: v.nan_to_num(nan=0.0) for k, v in losses.items()}


def _require(section, keys, where):
    for key in keys:
        if key not in section:
            raise KeyError(f"criterion config: {where} has no '{key}'")


def build_criterion(cfg, matcher_cls=HungarianMatcher, criterion_cls=ECCriterion):
    """The ECDet criterion from a preset name or a config dict in the original's vocabulary:
    {'num_classes': 80, 'ECCriterion': {'weight_dict', 'losses', 'gamma', 'reg_max',
    'matcher': {'type', 'weight_dict', 'alpha', 'gamma'}}}. Other keys of the two sections go to
    the classes' constructors (a subclass for segmentation takes its own there)."""
    if isinstance(cfg, str):
        cfg = model.preset_config(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"build_criterion takes a preset name or a config dict, got {type(cfg).__name__}")
    _require(cfg, ['num_classes', 'ECCriterion'], 'the config')
    section = dict(cfg['ECCriterion'])
    _require(section, ['weight_dict', 'losses', 'gamma', 'reg_max', 'matcher'], "'ECCriterion'")
    matcher_cfg = dict(section.pop('matcher'))
    _require(matcher_cfg, ['weight_dict', 'alpha', 'gamma'], "'ECCriterion.matcher'")
    _require(matcher_cfg['weight_dict'], ['cost_class', 'cost_bbox', 'cost_giou'], "'ECCriterion.matcher.weight_dict'")
    if matcher_cfg.pop('type', 'HungarianMatcher') != 'HungarianMatcher':
        raise ValueError("criterion config: 'ECCriterion.matcher.type' must be 'HungarianMatcher'")
    if not cfg.get('use_focal_loss', True):
        raise ValueError("criterion config: ECDet's matcher uses the focal class cost; use_focal_loss must be true")
    section.pop('alpha', None)  # the original's focal/VFL weight; MAL has none
    return criterion_cls(matcher_cls(**matcher_cfg), num_classes=cfg['num_classes'], **section)


# ---- Training: optimizer, schedule, EMA ----

def param_groups(net, lr, backbone_lr, weight_decay):
    """AdamW groups of the original recipe: the ViT (`backbone.backbone.*`) at backbone_lr, everything
    else (the feature generator's projections included) at lr; no weight decay on norms and biases."""
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        vit = name.startswith("backbone.backbone.")
        no_decay = any(key in name for key in ("norm", "bn", "bias"))
        groups.setdefault((vit, no_decay), []).append(p)
    return [{"params": ps, "lr": backbone_lr if vit else lr, "initial_lr": backbone_lr if vit else lr,
             "weight_decay": 0.0 if no_decay else weight_decay} for (vit, no_decay), ps in sorted(groups.items())]


def flat_cosine(step, total, warmup, flat, no_aug, lr, min_lr):
    """The learning rate at iteration `step`: quadratic warm-up to lr, flat until iteration `flat`,
    cosine decay to min_lr, and min_lr for the last `no_aug` iterations (strong augmentation off)."""
    if step <= warmup:
        return lr * (step / warmup) ** 2 if warmup > 0 else lr
    if step <= flat:
        return lr
    if step >= total - no_aug:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - flat) / (total - flat - no_aug)))


class ModelEMA:
    """Exponential moving average of the weights (and buffers) with decay d * (1 - exp(-n / warmups))
    after n updates, so that early, quickly changing weights are not averaged in for long."""

    def __init__(self, net, decay, warmups):
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0

    @torch.no_grad()
    def update(self, net):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.warmups))
        current = net.state_dict()
        for name, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(current[name].detach(), alpha=1 - d)

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


# ---- Training: processes, devices, checkpoints ----

def setup_distributed(device):
    """(rank, world size, device) from the environment torchrun provides; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, world, device


def save_checkpoint(obj, path):
    """Write atomically: a killed run leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path}: {e}") from None


def load_matching(net, state, what):
    """Load the entries of `state` whose names and shapes fit `net` (fine-tuning on other classes)."""
    own = net.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise SystemExit(f"{what}: no parameter matches the model; is it a checkpoint of this kind of model?")
    net.load_state_dict(fits, strict=False)
    skipped = sorted(set(own) - set(fits))
    print(f"{what}: loaded {len(fits)} of {len(own)} tensors" + (f"; kept initial values of {len(skipped)}, "
          f"e.g. {', '.join(skipped[:3])}" if skipped else ""))


def to_device(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def to_float(outputs):
    """Autocast outputs in float32: the loss runs in full precision, as in the original."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float(v) for v in outputs)
    return outputs


# ---- Training: the task a stage trains, and the loop ----

@dataclasses.dataclass
class Task:
    """What a stage changes in the shared loop: ECSeg and ECPose pass their own."""
    name: str = "detection"
    default_model: str = "ecdet_s"
    ann_prefix: str = "instances"        # annotations/{ann_prefix}_{train,val}2017.json
    iou_types: tuple = ("bbox",)
    # Preset name -> recipe: the _RECIPE keys; a recipe may also replace TRAINING's entries, and
    # set the batch MixUp's probability (mixup_prob, default mosaic_prob).
    recipes: dict = dataclasses.field(default_factory=lambda: RECIPES)
    dataset: type = CocoDetection        # (img_dir, ann_file, transforms) -> data set
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    transforms: type = DetTransforms
    build_criterion: object = build_criterion  # cfg -> criterion
    make_synthetic: object = make_synthetic_coco
    draw: object = draw_predictions
    demo: dict = dataclasses.field(default_factory=dict)  # this stage's changes to DEMO (and its lr)

    def postprocess(self, outputs, orig_sizes, cfg):
        return model.postprocess(outputs, orig_sizes, model.num_top_queries(cfg))


def make_loader(task, img_dir, ann_file, train, args, recipe, rank, world):
    transforms = task.transforms(train, args.img_size, mosaic_prob=recipe["mosaic_prob"],
                                 mosaic_epoch=recipe["mosaic_epoch"], stop_epoch=recipe["stop_epoch"])
    data = task.dataset(img_dir, ann_file, transforms, **task.dataset_kwargs)
    if train:
        sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
        collate = BatchImageCollate(recipe.get("mixup_prob", recipe["mosaic_prob"]), recipe["mosaic_epoch"])
    else:  # every rank its own slice, no padding: the evaluator sees each image once
        sampler, collate = list(range(rank, len(data), world)), BatchImageCollate()
    batch = args.batch_size // world
    if train and len(data) < batch * world:
        raise SystemExit(f"{ann_file}: {len(data)} usable images, fewer than one batch of {args.batch_size}")
    return torch.utils.data.DataLoader(data, batch, sampler=sampler, collate_fn=collate, num_workers=args.workers,
                                       drop_last=train, pin_memory=args.device_type == "cuda")


def set_epoch(loader, epoch, seed, rank):
    """Start epoch `epoch`: shuffling, augmentation policy and the random streams all follow from
    (seed, epoch, rank), so that a resumed run repeats exactly what the uninterrupted one would do."""
    for obj in (loader.sampler, loader.dataset, loader.collate_fn):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    stream = seed + 1000 * epoch + rank
    random.seed(stream)
    np.random.seed(stream)
    torch.manual_seed(stream)


def train_one_epoch(net, criterion, loader, optimizer, scaler, ema, schedule, epoch, args, rank):
    net.train()
    sums, count = {}, 0
    steps = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = schedule(step, group["initial_lr"])
        images, targets = images.to(args.device, non_blocking=True), to_device(targets, args.device)
        with torch.autocast(args.device_type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            outputs = net(images, targets)
        losses = criterion(to_float(outputs), targets)
        loss = sum(losses.values())
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
            raise SystemExit(f"non-finite loss at epoch {epoch + 1}, step {i} (global {step}): {terms}. "
                             f"Stopping; the last checkpoint in {args.output_dir} is intact.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        ema.update(net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        count += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
    means = torch.tensor([sums[k] / max(count, 1) for k in sorted(sums)], device=args.device)
    if dist.is_initialized():
        dist.all_reduce(means)
        means /= dist.get_world_size()
    return dict(zip(sorted(sums), means.tolist()))


@torch.no_grad()
def evaluate(net, loader, task, cfg, args, rank, picture=None):
    """COCO AP of `net` on the loader's images: {iou_type: the 12 COCO numbers}. With `picture`,
    rank 0 also draws its first batch's predictions there."""
    net.eval()
    data = loader.dataset
    evaluator = CocoEvaluator(data.coco, data.label_to_cat, task.iou_types)
    for images, targets in tqdm(loader, desc="eval", disable=rank != 0, dynamic_ncols=True, leave=False):
        with torch.autocast(args.device_type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            outputs = net(images.to(args.device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(args.device)
        results = task.postprocess(to_float(outputs), sizes, cfg)
        evaluator.update([t["image_id"] for t in targets], results)
        if picture is not None and rank == 0:
            task.draw(images, targets, results, data.names, picture)
            picture = None
    return evaluator.summarize()


def dataset_paths(args, task):
    """(train images, train annotations, val images, val annotations) from --data or the explicit options."""
    explicit = [args.train_images, args.train_ann, args.val_images, args.val_ann]
    if args.data:
        ann = os.path.join(args.data, "annotations", "{}_{}2017.json")
        default = [os.path.join(args.data, "train2017"), ann.format(task.ann_prefix, "train"),
                   os.path.join(args.data, "val2017"), ann.format(task.ann_prefix, "val")]
        return [e or d for e, d in zip(explicit, default)]
    if not all(explicit[2:]) or (not args.eval_only and not all(explicit[:2])):
        raise SystemExit("give --data ROOT (COCO layout) or --train-images, --train-ann, --val-images and --val-ann")
    return explicit


def model_config(args, task, num_classes):
    """The model's configuration: a preset or a JSON file, with this data set's classes and image size."""
    if args.model.endswith(".json"):
        try:
            with open(args.model) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--model {args.model}: cannot read the JSON config: {e}") from None
    else:
        try:
            cfg = model.preset_config(args.model)
        except ValueError as e:
            raise SystemExit(f"--model: {e}") from None
    cfg = copy.deepcopy(cfg)
    cfg["num_classes"], cfg["eval_spatial_size"] = num_classes, list(args.img_size)
    return cfg


def run(args, task):
    """Train (or with --eval-only, evaluate) a network of `task`; returns the last epoch's metrics."""
    rank, world, device = setup_distributed(args.device)
    args.device, args.device_type = device, device.type
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is the total over {world} processes; make it a multiple")
    if any(s % 32 for s in args.img_size):
        raise SystemExit(f"--img-size {args.img_size}: each side must be a multiple of 32")
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    args.amp_dtype = amp_dtype
    name = args.recipe or (args.model if args.model in task.recipes else task.default_model)
    if name not in task.recipes:
        raise SystemExit(f"--recipe {name!r} is unknown; expected one of {', '.join(task.recipes)}")
    base = task.recipes[name]
    recipe = dict(base)
    recipe.update({k: getattr(args, k) for k in ("epochs", "lr", "backbone_lr") if getattr(args, k) is not None})
    # Another length keeps the recipe's shape: mosaic for the same share of epochs, and the same
    # number of final epochs without strong augmentation.
    recipe["mosaic_epoch"] = round(base["mosaic_epoch"] * recipe["epochs"] / base["epochs"])
    recipe["stop_epoch"] = max(recipe["epochs"] - (base["epochs"] - base["stop_epoch"]), 0)
    training = {k: recipe.get(k, v) for k, v in TRAINING.items()}
    args.epochs = recipe["epochs"]
    args.clip_max_norm = training["clip_max_norm"]
    os.makedirs(args.output_dir, exist_ok=True)

    train_dir, train_ann, val_dir, val_ann = dataset_paths(args, task)
    val_loader = make_loader(task, val_dir, val_ann, False, args, recipe, rank, world)
    cfg = model_config(args, task, len(val_loader.dataset.names))
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    net = model.build_model(cfg)
    if args.backbone_weights:
        try:
            net.backbone.backbone.load_state_dict(load_checkpoint(args.backbone_weights))
        except RuntimeError as e:
            raise SystemExit(f"--backbone-weights {args.backbone_weights} does not fit {args.model}'s ViT: {e}") from None
    start_epoch, best, ckpt = 0, -1.0, None
    if args.tune:
        load_matching(net, model.checkpoint_state_dict(load_checkpoint(args.tune)), f"--tune {args.tune}")
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if "optimizer" not in ckpt:
            raise SystemExit(f"--resume {args.resume} is not a training checkpoint of this project (use --tune)")
        model.load_weights(net, ckpt["model"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
    net.to(device)
    ema = ModelEMA(net, training["ema_decay"], training["ema_warmups"])
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])

    if args.eval_only:
        stats = evaluate(ema.module, val_loader, task, cfg, args, rank, os.path.join(args.output_dir, "predictions.png"))
        return {f"coco_{k}": v for k, v in stats.items()}

    train_loader = make_loader(task, train_dir, train_ann, True, args, recipe, rank, world)
    if len(train_loader.dataset.names) != cfg["num_classes"] or train_loader.dataset.names != val_loader.dataset.names:
        raise SystemExit(f"{train_ann} and {val_ann} have different categories")
    criterion = task.build_criterion(cfg)
    train_net = net
    if world > 1:
        if device.type == "cuda":
            train_net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        train_net = torch.nn.parallel.DistributedDataParallel(train_net, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(net, recipe["lr"], recipe["backbone_lr"], recipe["weight_decay"]),
                                  lr=recipe["lr"], betas=training["betas"], weight_decay=recipe["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    steps = len(train_loader)
    total, no_aug = args.epochs * steps, (args.epochs - recipe["stop_epoch"]) * steps
    warmup, flat = min(training["warmup_iter"], 3 * steps), recipe["mosaic_epoch"] * steps
    schedule = lambda step, lr: flat_cosine(step, total, warmup, flat, no_aug, lr, lr * training["lr_gamma"])

    if rank == 0:
        print(f"{task.name}: {args.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters), "
              f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images, "
              f"{world} process(es) on {device}, batch {args.batch_size}, {args.epochs} epochs"
              + (f", resuming after epoch {start_epoch}" if start_epoch else ""))
    metrics = {}
    for epoch in range(start_epoch, min(args.epochs, args.stop_after or args.epochs)):
        t0 = time.time()
        set_epoch(train_loader, epoch, args.seed, rank)
        losses = train_one_epoch(train_net, criterion, train_loader, optimizer, scaler, ema, schedule, epoch, args, rank)
        stats = evaluate(ema.module, val_loader, task, cfg, args, rank, os.path.join(args.output_dir, "predictions.png"))
        ap = stats[task.iou_types[-1]][0]
        metrics = {"epoch": epoch + 1, "loss": sum(losses.values()), "losses": losses,
                   **{f"coco_{k}": v for k, v in stats.items()}, "time": round(time.time() - t0, 1)}
        if rank == 0:
            state = {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": max(best, ap), "config": cfg,
                     "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}}
            save_checkpoint(state, os.path.join(args.output_dir, "last.pth"))
            if ap > best:
                save_checkpoint(state, os.path.join(args.output_dir, "best.pth"))
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            print(f"epoch {epoch + 1}: loss {metrics['loss']:.4f}, AP {ap:.4f} (best {max(best, ap):.4f})")
        best = max(best, ap)
    return metrics


def parse_args(argv=None, task=Task()):
    parser = argparse.ArgumentParser(description=f"Train {task.default_model.split('_')[0].upper()} ({task.name}) on a COCO-format data set.")
    parser.add_argument("--model", default=task.default_model, help="preset name or a JSON config in the original's vocabulary")
    parser.add_argument("--data", help="COCO root: annotations/, train2017/, val2017/")
    parser.add_argument("--train-images"), parser.add_argument("--train-ann")
    parser.add_argument("--val-images"), parser.add_argument("--val-ann")
    parser.add_argument("--recipe", help="training recipe (epochs, learning rates, augmentation schedule) by "
                        "preset name; default: the --model preset's")
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=TRAINING["batch_size"], help="total over all processes")
    parser.add_argument("--lr", type=float), parser.add_argument("--backbone-lr", type=float)
    parser.add_argument("--img-size", type=int, nargs="+", default=[640], help="H [W], multiples of 32")
    parser.add_argument("--output-dir", default=f"outputs/{task.name}")
    parser.add_argument("--resume", help="continue a run from its last.pth")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs (to train in chunks with --resume)")
    parser.add_argument("--tune", help="start from these weights (a released or own checkpoint; unmatched tensors stay)")
    parser.add_argument("--backbone-weights", help="a distilled ECViT in the released ecvit*.pth format")
    parser.add_argument("--amp", action="store_true", help="mixed precision: bf16 where supported, else fp16 with a gradient scaler")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights of --resume or --tune")
    parser.add_argument("--demo", action="store_true", help="train a small model on a synthetic data set on the CPU")
    args = parser.parse_args(argv)
    args.img_size = args.img_size * 2 if len(args.img_size) == 1 else args.img_size
    if args.eval_only and not (args.resume or args.tune):
        parser.error("--eval-only needs weights: --resume or --tune")
    return args


def demo_config(task):
    """A small network for the CPU demo: ECDet-S's layout at a quarter of its width and depth (ECPose:
    with a 64-wide, 3-layer pose decoder of 2 heads, as the demo ViT has, and 3 queries, one per
    figure the pose demo's images hold at most: in a run as short as the demo, every spare query
    still finds a figure already found and scores nearly as high as the first one)."""
    cfg = model.preset_config(task.default_model)
    cfg["ViTAdapter"].update(embed_dim=64, num_heads=2, depth=4, interaction_indexes=[2, 3])
    cfg["HybridEncoder"].update(in_channels=[64] * 3, hidden_dim=64, dim_feedforward=128)
    if "DETRTransformer" in cfg:  # ECPose's decoder
        cfg["DETRTransformer"].update(hidden_dim=64, dim_feedforward=128, nhead=2, num_queries=3)
        cfg["DETRPosePostProcessor"]["num_select"] = 3
        return cfg
    cfg["ECTransformer"].update(feat_channels=[64] * 3, hidden_dim=64, dim_feedforward=128, num_layers=3,
                                num_queries=50, num_denoising=30)
    cfg["PostProcessor"]["num_top_queries"] = 50
    return cfg


def demo(args, task, cfg=None):
    """The README's first command: a synthetic data set, a short CPU training run, COCO AP and a
    picture of predictions, all under --output-dir. `cfg`: the network (default: demo_config(task));
    the task's `demo` entries override DEMO."""
    settings = {**DEMO, **task.demo}
    root = os.path.join(args.output_dir, "demo_data")
    if not os.path.exists(os.path.join(root, "annotations")):
        task.make_synthetic(root, num_train=settings["num_train"], num_val=settings["num_val"],
                            img_size=settings["img_size"])
    os.makedirs(args.output_dir, exist_ok=True)
    config = os.path.join(args.output_dir, "demo_model.json")
    with open(config, "w") as f:
        json.dump(cfg or demo_config(task), f, indent=1)
    args.data, args.model, args.recipe, args.device, args.workers = root, config, "demo", "cpu", 0
    args.img_size, args.batch_size = [settings["img_size"]] * 2, settings["batch_size"]
    if "lr" in settings:  # a stage's own rate, for the heads and the randomly initialised ViT alike
        args.lr, args.backbone_lr = args.lr or settings["lr"], args.backbone_lr or settings["lr"]
    metrics = run(args, task)
    name = task.iou_types[-1]
    print(f"demo: {name} AP {metrics[f'coco_{name}'][0]:.3f}, AP50 {metrics[f'coco_{name}'][1]:.3f} after "
          f"{metrics['epoch']} epochs; predictions drawn in {os.path.join(args.output_dir, 'predictions.png')}")
    return metrics


# The CPU demo's data (its schedule is RECIPES["demo"]).
DEMO = dict(num_train=256, num_val=32, img_size=160, batch_size=16)


def main(argv=None, task=None):
    task = task or Task()
    args = parse_args(argv, task)
    if args.demo:
        return demo(args, task)
    return run(args, task)


if __name__ == "__main__":
    main()
