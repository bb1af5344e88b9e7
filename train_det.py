"""ECDet: object detection with a distilled ECViT backbone (EdgeCrafter, stage "detection").

Data and evaluation come first in this file: a COCO-format data set, the ECDet augmentation recipe
with its epoch policy, batch collation with MixUp, a synthetic COCO-format data set for demos and
tests, and COCO AP evaluation.

Box conventions: data sets and annotations hold pixel boxes; the targets the model trains on hold
normalised (cx, cy, w, h) in [0, 1]; the evaluator takes pixel (x1, y1, x2, y2) boxes in the
original image.
"""
import contextlib
import io
import json
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Augmentation schedule per preset (configs/ecdet/ecdet_{s,m,l,x}.yml of the original). The epoch
# counts they go with: S 74, M 62, L 50, X 50. ECSeg presets use the ECDet ones.
AUG_PRESETS = {
    "s": dict(mosaic_prob=0.75, mosaic_epoch=36, stop_epoch=72, mixup_prob=0.75, mixup_epoch=36),
    "m": dict(mosaic_prob=0.75, mosaic_epoch=30, stop_epoch=60, mixup_prob=0.75, mixup_epoch=30),
    "l": dict(mosaic_prob=1.0, mosaic_epoch=24, stop_epoch=48, mixup_prob=1.0, mixup_epoch=24),
    "x": dict(mosaic_prob=1.0, mosaic_epoch=24, stop_epoch=48, mixup_prob=1.0, mixup_epoch=24),
}

# Target entries with one row per object: Mosaic and MixUp concatenate them, SanitizeBoxes filters
# them together. "keypoints" (a tv_tensors.KeyPoints) is for the pose stage.
INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints")


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
        self.epoch = epoch

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
    (cyclic), target i gets its own objects followed by those of image i-1, and target["mixup"]
    (n,) float holds beta for its own objects and 1 - beta for the borrowed ones. The original
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
            mixed = []
            for own, other in zip(targets, targets[-1:] + targets[:-1]):
                target = merge_instances([own, other])
                weights = [beta] * len(own["labels"]) + [1.0 - beta] * len(other["labels"])
                target["mixup"] = torch.tensor(weights, dtype=torch.float32)
                mixed.append(target)
            targets = mixed
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


def make_synthetic_coco(root, num_train=200, num_val=50, img_size=128, seed=0):
    """Write a small COCO-format data set of coloured shapes on noisy backgrounds; returns root.

    Layout: root/train2017/*.jpg, root/val2017/*.jpg, root/annotations/instances_{train,val}2017.json.
    Each image has sides drawn from [0.625, 1] * img_size pixels and 0-4 non-overlapping regular
    polygons (circle = 32 corners, square, triangle; category ids 1, 3, 7), each annotated with bbox
    (x, y, w, h pixels), area (of the polygon's mask), iscrowd 0 and a polygon segmentation.
    The same seed writes the same files.
    """
    rng = np.random.default_rng(seed)
    categories = [dict(id=c, name=name, supercategory="shape") for c, name in SYNTHETIC_CATEGORIES.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        split_dir = os.path.join(root, split)
        os.makedirs(split_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            # ids from 1: COCOeval takes a matched-annotation id of 0 for "unmatched"
            image, anns = _synthetic_image(rng, img_size, image_id, len(annotations) + 1, split_dir)
            images.append(image)
            annotations += anns
        data = dict(info=dict(description="EdgeCrafter synthetic shapes"), images=images,
                    annotations=annotations, categories=categories)
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
    return root


# ---- Evaluation: COCO AP ----

class CocoEvaluator:
    """COCO AP (pycocotools) of postprocessed predictions, for iou_types "bbox" and/or "segm".

    update(image_ids, results): results[i] belongs to image image_ids[i] and holds labels (n,)
    contiguous, boxes (n, 4) pixel x1, y1, x2, y2 in the original image, scores (n,), and for
    "segm" masks (n, H, W) or (n, 1, H, W) at the original size (bool, or probabilities cut at 0.5).
    summarize(): gathers every rank's results (torch.distributed, when initialised), evaluates on
    rank 0, prints the standard table and returns {iou_type: the 12 COCO stats} on every rank.
    An image passed to update() without detections counts as all-missed; images never passed are
    not evaluated (as the original). Use one evaluator per evaluation pass.
    """

    def __init__(self, coco_gt, label_to_cat, iou_types=("bbox",)):
        unknown = set(iou_types) - {"bbox", "segm"}
        if unknown:
            raise ValueError(f"iou_types must be among 'bbox', 'segm'; got {sorted(unknown)}")
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


def draw_predictions(images, targets, results, names, path, score_threshold=0.5, ncols=4):
    """Save a PNG grid of images with their predicted boxes, class names and scores; returns path.

    images: (B, 3, H, W) normalised as DetTransforms makes them; targets: their targets (orig_size
    is used to bring boxes to the image tensor's size); results: per image, labels (n,), boxes (n, 4)
    pixel x1, y1, x2, y2 in the original image, scores (n,); names: class name per label.
    Detections scoring below score_threshold are not drawn.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for image, target, res in zip(images, targets, results):
        pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
        tile = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        draw = ImageDraw.Draw(tile)
        (h, w), (orig_w, orig_h) = image.shape[-2:], target["orig_size"].tolist()
        scale = torch.tensor([w / orig_w, h / orig_h, w / orig_w, h / orig_h])
        keep = res["scores"] >= score_threshold
        boxes = res["boxes"][keep].detach().float().cpu() * scale
        for box, label, score in zip(boxes.tolist(), res["labels"][keep].tolist(), res["scores"][keep].tolist()):
            colour = _PALETTE[label % len(_PALETTE)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 3, box[1] + 2), f"{names[label]} {score:.2f}", fill=colour)
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
