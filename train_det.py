"""ECDet: object detection with a distilled ECViT backbone, trained on COCO (EdgeCrafter, stage 3).

    torchrun --nproc_per_node 8 train_det.py --model ecdet_s --data /coco --backbone-weights ecvitt.pth
    python train_det.py --demo          # a short CPU run on a synthetic data set

The file reads top to bottom as the stage runs: the COCO-format data set, the ECDet augmentation
recipe with its epoch policy, batch collation with MixUp; the loss (Hungarian matching and the ECDet
criterion); the training loop (AdamW, warm-up + flat-cosine schedule, EMA, AMP) with COCO AP
evaluation, `train`, which ECSeg, ECPose and the teacher call with what they change. Run folders,
checkpoints and resume, argument checks, downloads, DDP and the synthetic demo data are support.py's.

Box conventions: data sets and annotations hold pixel boxes; the targets the model trains on hold
normalised (cx, cy, w, h) in [0, 1]; the evaluator takes pixel (x1, y1, x2, y2) boxes in the
original image.
"""
import copy
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou, generalized_box_iou
from tqdm import tqdm

import model
import predict
import support
from model import weighting_function

# The training recipe per preset (the original's configs/ecdet/ecdet_*.yml):
# epochs, head and backbone learning rates, weight decay, and the augmentation epochs (mosaic and
# mixup while epoch < mosaic_epoch: DEIM's Dense O2O, more objects per image and so more one-to-one
# matches; strong augmentation off from stop_epoch on).
_RECIPE = ("epochs", "lr", "backbone_lr", "weight_decay", "mosaic_prob", "mosaic_epoch", "stop_epoch")
RECIPES = {name: dict(zip(_RECIPE, values)) for name, values in {
    "ecdet_s": (74, 5e-4, 2.5e-5, 1e-4, 0.75, 36, 72),
    "ecdet_m": (62, 5e-4, 2.5e-5, 1e-4, 0.75, 30, 60),
    "ecdet_l": (50, 5e-4, 5e-6, 1.25e-4, 1.0, 24, 48),
    "ecdet_x": (50, 5e-4, 2.5e-6, 1.25e-4, 1.0, 24, 48),
    # The CPU demo: a randomly initialised ViT learns at the full rate; a short mosaic phase.
    "demo": (20, 1e-3, 1e-3, 1e-4, 0.5, 4, 18),
}.items()}
# Shared by every preset: total batch 32, AdamW betas, warm-up iterations (at most 3 epochs), the
# floor of the cosine as a fraction of the lr, EMA decay and its warm-up, gradient-norm clipping.
TRAINING = dict(batch_size=32, betas=(0.9, 0.999), warmup_iter=2000, lr_gamma=0.5, ema_decay=0.9999,
                ema_warmups=1000, clip_max_norm=0.1)

# The target entries that describe the whole image; every other entry has one row per object (boxes,
# labels, and what a stage adds), which Mosaic and MixUp concatenate and SanitizeBoxes filters together.
IMAGE_KEYS = ("image_id", "orig_size")


# ---- Data: COCO-format data set ----
class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection / instance segmentation data set.

    Categories map to contiguous labels 0..K-1 in order of category id (`label_to_cat`,
    `cat_to_label`, `names`). Crowd annotations are not training targets. Boxes with a non-finite
    coordinate, of zero or negative size after clipping to the image, or mostly (more than half)
    outside it are dropped from training and from the evaluation's ground truth, and counted by
    reason (`dropped_boxes`, in all `num_dropped_boxes`). Listed images
    missing from img_dir are left out at construction (`num_missing`); an image that fails to decode,
    or whose size differs from its annotation, is replaced by the next readable one at load time
    (`num_unreadable`, counted per process, so per DataLoader worker). Both warn.

    Item: (image, target). Without transforms, image is an RGB PIL image and target["boxes"] pixel
    x1, y1, x2, y2 BoundingBoxes (PIL until normalisation, as the original: its affine and colour
    ops are several times faster than on tensors). After DetTransforms, image is float (3, H, W)
    normalised with ImageNet mean/std and target holds
        boxes (n, 4) float, normalised cx, cy, w, h in [0, 1]
        labels (n,) int64, contiguous
        image_id int; orig_size (2,) int64, (w, h) of the image on disk
    """

    def __init__(self, img_dir, ann_file, transforms=None):
        self.img_dir, self.ann_file, self.transforms = img_dir, ann_file, transforms
        self.coco = predict.load_coco(ann_file)
        support.check_coco_entries(self.coco, ann_file)
        cat_ids = sorted(self.coco.cats)
        self.label_to_cat = dict(enumerate(cat_ids))
        self.cat_to_label = {c: label for label, c in self.label_to_cat.items()}
        self.names = [self.coco.cats[c]["name"] for c in cat_ids]
        self.instances, self.dropped_boxes = self._select_instances()
        self.num_dropped_boxes = sum(self.dropped_boxes.values())
        self.ids = [i for i in sorted(self.coco.imgs) if os.path.isfile(self._path(i))]
        self.num_missing = len(self.coco.imgs) - len(self.ids)
        self.num_unreadable = 0
        if not self.ids:
            raise FileNotFoundError(f"none of the {len(self.coco.imgs)} images listed in {ann_file} is in {img_dir}")
        if not any(self.load(i) is not None for i in range(len(self.ids))):  # stops at the first readable one
            raise ValueError(f"none of the {len(self.ids)} images of {ann_file} in {img_dir} can be used: each fails to "
                             f"decode or differs in size from its entry (see the warnings)")
        if self.num_missing:
            warnings.warn(f"{self.num_missing} images listed in {ann_file} are missing from {img_dir}; skipped")

    def _select_instances(self):
        """The usable boxes (support.usable_boxes); a stage's data set narrows them further."""
        return support.usable_boxes(self.coco, self.ann_file, self.cat_to_label)

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
                # Upright (EXIF orientation applied), unless the annotation's size fits only the stored frame.
                turned = im.getexif().get(support.EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                stored = turned and im.size == (info["width"], info["height"]) != im.size[::-1]
                im = predict.to_rgb(im, upright=not stored)  # also forces the decode, so broken files fail here
        except (OSError, Image.DecompressionBombError) as e:  # the latter: more pixels than PIL takes
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
    for key in set(merged) - set(IMAGE_KEYS):
        parts = [t[key] for t in targets]
        cat = torch.cat(parts)
        merged[key] = tv_tensors.wrap(cat, like=parts[0]) if isinstance(parts[0], tv_tensors.TVTensor) else cat
    return merged


class Mosaic:
    """Mosaic of four images (YOLOv4's), as in the original: DEIM's Dense O2O (Huang et al., 2025).

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
        return [v for k, v in target.items()
                if k not in IMAGE_KEYS and not isinstance(v, (tv_tensors.BoundingBoxes, tv_tensors.Mask))]

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
        target = {k: v.as_subclass(torch.Tensor) if isinstance(v, tv_tensors.Mask) else v for k, v in target.items()}
        return support.normalize(image), target  # the networks' input convention, as predict.py feeds them


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
        images = [image for image, _ in batch]
        targets = [target for _, target in batch]
        if self.epoch < self.mixup_epoch and random.random() < self.mixup_prob:
            beta = round(random.uniform(0.45, 0.55), 6)
            # image_{i-1} + beta * (image_i - image_{i-1}), written straight into the batch: one pass over
            # memory, where stacking, rolling and scaling copies take five (half a worker's time at 640).
            mixed = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype)
            for i, image in enumerate(images):
                torch.lerp(images[i - 1], image, beta, out=mixed[i])
            images = mixed
            targets = [merge_instances([own, other]) for own, other in zip(targets, targets[-1:] + targets[:-1])]
        else:
            images = torch.stack(images)
        return images, targets


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
    """One-to-one assignment of queries to ground-truth objects: DETR's bipartite matching (Carion
    et al., "End-to-End Object Detection with Transformers", 2020).

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

    config_type = 'HungarianMatcher'  # the original's `type` of the matcher section
    config_keys = ('weight_dict', 'alpha', 'gamma')  # the matcher section's required keys
    costs = ('cost_class', 'cost_bbox', 'cost_giou')  # the λs, read from weight_dict

    def __init__(self, weight_dict, alpha, gamma):
        super().__init__()
        missing = [c for c in self.costs if c not in weight_dict]
        if missing:
            raise KeyError(f"criterion config: the matcher's weight_dict has no {', '.join(map(repr, missing))}")
        for c in self.costs:
            setattr(self, c, weight_dict[c])
        self.alpha, self.gamma = alpha, gamma

    def class_cost(self, outputs, targets):
        """cost_cls of every query for every object's class, (B·Q, T_1 + ... + T_B)."""
        p = outputs['pred_logits'].flatten(0, 1).sigmoid()[:, torch.cat([t['labels'] for t in targets])]
        cost_pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        cost_neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        return cost_pos - cost_neg

    def cost(self, outputs, targets):
        """C for the whole batch, (B·Q, T_1 + ... + T_B). A subclass adds or replaces terms here."""
        b = outputs['pred_boxes'].flatten(0, 1)
        b_hat = torch.cat([t['boxes'] for t in targets])
        cost_l1 = torch.cdist(b, b_hat, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(b_hat))
        return self.cost_bbox * cost_l1 + self.cost_class * self.class_cost(outputs, targets) + self.cost_giou * cost_giou

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
    """The union of several matchings of one batch (ECDet's "go" indices: D-FINE's global optimal
    matching of its GO-LSD, on which the box terms, FGL and DDF train every layer).

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


def batch_index(indices):
    """(image index, query index) of every matched query, to index (B, Q, ...) tensors."""
    return (torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]),
            torch.cat([q for q, _ in indices]))


def matched(targets, indices, key):
    """The matched objects' `key` ('labels' or 'boxes'), in the order of batch_index."""
    return torch.cat([t[key][o] for t, (_, o) in zip(targets, indices)])


def matched_iou(out, targets, indices):
    """IoU (N,) of each matched query's box with its object's, detached: the quality MAL, FGL and DDF read."""
    b = out['pred_boxes'][batch_index(indices)]
    return paired_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(matched(targets, indices, 'boxes'))).detach()


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


# Loss weights and matching costs of the released ECDet recipe (the original's ECCriterion section).
CRITERION = {
    "weight_dict": {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5},
    "losses": ["mal", "boxes", "local"], "gamma": 1.5, "alpha": 0.75, "reg_max": 32,
    "matcher": {"type": "HungarianMatcher", "weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2},
                "alpha": 0.25, "gamma": 2.0},
}


class ECCriterion(nn.Module):
    """The ECDet training loss: DETR's set prediction loss (Carion et al., "End-to-End Object
    Detection with Transformers", 2020) with the terms of D-FINE (Peng et al., "D-FINE: Redefine
    Regression Task in DETRs as Fine-grained Distribution Refinement", 2025) and DEIM (Huang et al.,
    "DEIM: DETR with Improved Matching for Fast Convergence", 2025):

        L = λ_MAL L_MAL + λ_L1 L_L1 + λ_GIoU L_GIoU + λ_FGL L_FGL + λ_DDF L_DDF

    summed over every output below, ECDet's λs 1, 5, 2, 0.15, 1.5 (weight_dict). Each term is one
    method that states its formula: loss_mal, loss_l1, loss_giou, loss_fgl, loss_ddf; the original's
    config names them in groups ('mal', 'boxes' = L1 + GIoU, 'local' = FGL + DDF). N, the divisor of
    every term, is the number of matches it is computed on, averaged over the DDP ranks, at least 1.

    Every decoder layer (`_aux_{i}`, the last unsuffixed), the pre-decoder head (`_pre`) and the
    encoder's query selection (`_enc_{i}`) gets the terms; the box terms and FGL use the union of
    all their matchings (union_of_matches), MAL each output's own. Denoising queries (`_dn_{i}`,
    `_dn_pre`) are matched to the objects they were made from. An output without corners gets no
    FGL or DDF.

    The original's `enc_meta` (class-agnostic query selection) is not read: ECDet never enables it.
    A subclass adds or replaces terms in `loss_functions`. A term function takes (out, targets,
    indices, num_boxes, shared), shared holding what all outputs share (shared_terms), and returns {}
    for an output that lacks its prediction. The class attributes tell build_criterion its config.
    """

    section, family, preset = 'ECCriterion', 'ecdet', CRITERION
    config_keys = ('weight_dict', 'losses', 'gamma', 'reg_max', 'matcher')
    unused_keys = ('alpha',)  # the original's focal/VFL weight; MAL has none
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

    @classmethod
    def preset_config(cls, name):
        """model.preset_config(name) with the loss section of the preset's family, this class's or a parent's."""
        cfg = model.preset_config(name)
        for c in cls.__mro__:
            if name.startswith(f"{vars(c).get('family')}_"):
                cfg[c.section] = copy.deepcopy(c.preset)
                break
        return cfg

    def loss_functions(self):
        return {'mal': self.loss_mal, 'boxes': self.loss_boxes, 'local': self.loss_local}

    def quality_target(self, q, p, onehot):
        """MAL's target and weight per logit; q (B, Q, K): the match's quality at its class, p = sigmoid."""
        return q.pow(self.gamma), p.pow(self.gamma) * (1 - onehot) + onehot

    def quality_loss(self, logits, targets, indices, quality, num_boxes):
        """Sigmoid BCE of every class logit (B, Q, K) toward `quality` (IoU, OKS: one per match), by
        quality_target, summed over all B·Q·K logits and divided by N (as the original: a mean over
        the queries, times Q)."""
        idx = batch_index(indices)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = matched(targets, indices, 'labels')
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        q = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        q[idx] = quality.detach().to(logits.dtype)
        target, weight = self.quality_target(q[..., None] * onehot, logits.detach().sigmoid(), onehot)
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction='none')
        if not logits.shape[1]:  # denoising queries of a batch without objects: the mean below would be 0/0
            return loss.sum()
        return loss.mean(1).sum() * logits.shape[1] / num_boxes

    def loss_mal(self, out, targets, indices, num_boxes, shared):
        """MAL, DEIM's matchability-aware loss, on every class logit of pred_logits (B, Q, K). With
        p = sigmoid(logit) and q = IoU(b, b̂) of a matched query's box with its object's (both detached):

            target t = q^γ at the matched object's class, 0 at every other logit
            weight w = 1 at the matched object's class, p^γ at every other logit
            L_MAL = (1 / N) Σ_{b, i, k} w · −[t log p + (1 − t) log(1 − p)],    γ = 1.5

        so an unmatched logit costs as in the focal loss (without α), and a matched one asks for a confidence
        equal to its box's (powered) IoU."""
        return {'loss_mal': self.quality_loss(out['pred_logits'], targets, indices, matched_iou(out, targets, indices),
                                              num_boxes)}

    def loss_l1(self, out, targets, indices, num_boxes, shared):
        """DETR's L1 box loss on normalised cx, cy, w, h: L_L1 = (1 / N) Σ_matched |b − b̂|_1."""
        b, b_hat = out['pred_boxes'][batch_index(indices)], matched(targets, indices, 'boxes')
        return {'loss_bbox': F.l1_loss(b, b_hat, reduction='none').sum() / num_boxes}

    def loss_giou(self, out, targets, indices, num_boxes, shared):
        """DETR's GIoU box loss (GIoU: Rezatofighi et al., 2019) on the boxes' corners x1, y1, x2, y2:

            L_GIoU = (1 / N) Σ_matched (1 − GIoU(b, b̂))"""
        b, b_hat = out['pred_boxes'][batch_index(indices)], matched(targets, indices, 'boxes')
        giou = paired_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(b_hat), giou=True)
        return {'loss_giou': (1 - giou).sum() / num_boxes}

    def loss_boxes(self, out, targets, indices, num_boxes, shared):
        return {**self.loss_l1(out, targets, indices, num_boxes, shared),
                **self.loss_giou(out, targets, indices, num_boxes, shared)}

    def loss_fgl(self, out, targets, indices, num_boxes, shared):
        """FGL, D-FINE's fine-grained localisation loss, on the FDR corner logits pred_corners
        (B, Q, 4 (reg_max + 1)). Each matched query's edge e has the distribution P_e = softmax over
        its reg_max + 1 bins; its object's edge lies between bins n_e and n_e + 1 (fgl_targets, from
        the detached ref_points) at interpolation weights ω_e, ω'_e:

            L_FGL = (1 / N) Σ_matched IoU(b, b̂) Σ_{e = 1..4} [ω_e · −log P_e(n_e) + ω'_e · −log P_e(n_e + 1)]

        with the IoU detached: the better a box already fits, the more its edges' bins are sharpened."""
        if 'pred_corners' not in out:
            return {}
        idx = batch_index(indices)
        corners = out['pred_corners'][idx].reshape(-1, self.reg_max + 1)
        left, weight_left, weight_right = fgl_targets(
            out['ref_points'][idx].detach(), cxcywh_to_xyxy(matched(targets, indices, 'boxes')), self.reg_max,
            shared['up'], shared['reg_scale'])
        fgl = (F.cross_entropy(corners, left, reduction='none') * weight_left
               + F.cross_entropy(corners, left + 1, reduction='none') * weight_right)
        return {'loss_fgl': (fgl * matched_iou(out, targets, indices).repeat_interleave(4)).sum() / num_boxes}

    def loss_ddf(self, out, targets, indices, num_boxes, shared):
        """DDF, D-FINE's decoupled distillation focal loss: the last decoder layer's corner
        distributions (teacher_corners, detached) teach this layer's (pred_corners), every query's.
        Per edge e of the B·Q·4 edges, at temperature T = 5:

            ℓ_e = α_e · T² · KL(softmax(teacher_e / T) ‖ softmax(pred_e / T))
            α_e = IoU(b, b̂) for a matched query, max_k sigmoid(teacher_logits)_k for the others
            L_DDF = (√E_m · mean_{matched e} ℓ_e + √E_u · mean_{unmatched e} ℓ_e) / (√E_m + √E_u)

        E_m and E_u are the matched and unmatched edges of the union of matchings (shared_terms'
        ddf_balance), the same for every output; an empty group's mean counts 0. It is not divided by
        N. A layer that is its own teacher (the last denoising layer) gets 0."""
        if 'pred_corners' not in out or 'teacher_corners' not in out:
            return {}
        student = out['pred_corners'].reshape(-1, self.reg_max + 1)
        teacher = out['teacher_corners'].reshape(-1, self.reg_max + 1)
        if torch.equal(student, teacher):
            return {'loss_ddf': student.sum() * 0}
        idx = batch_index(indices)
        weight = out['teacher_logits'].detach().sigmoid().amax(-1)
        weight[idx] = matched_iou(out, targets, indices).to(weight.dtype)
        is_matched = torch.zeros_like(weight, dtype=torch.bool)
        is_matched[idx] = True
        weight, is_matched = weight.flatten().repeat_interleave(4), is_matched.flatten().repeat_interleave(4)
        kl = F.kl_div(F.log_softmax(student / self.T, 1), F.softmax(teacher.detach() / self.T, 1), reduction='none')
        ddf = weight * self.T ** 2 * kl.sum(-1)
        ddf_matched = ddf[is_matched].mean() if is_matched.any() else 0
        ddf_unmatched = ddf[~is_matched].mean() if (~is_matched).any() else 0
        n_pos, n_neg = shared['ddf_balance']
        return {'loss_ddf': (ddf_matched * n_pos + ddf_unmatched * n_neg) / (n_pos + n_neg)}

    def loss_local(self, out, targets, indices, num_boxes, shared):
        return {**self.loss_fgl(out, targets, indices, num_boxes, shared),
                **self.loss_ddf(out, targets, indices, num_boxes, shared)}

    def weighted_terms(self, out, targets, own, union, shared, suffix):
        """All terms of one output, weighted, names suffixed. own and union: (indices, number of
        boxes), the output's own matching and the one union_losses use."""
        functions, terms = self.loss_functions(), {}
        for name in self.losses:
            terms.update(functions[name](out, targets, *(union if name in self.union_losses else own), shared))
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def shared_terms(self, outputs, union):
        """FDR's up and reg_scale, and DDF's balance (√E_m, √E_u), each scaled by √(8 / B) as in the original
        (counted as if each rank held 8 images), which cancels in L_DDF's ratio."""
        B, Q = outputs['pred_logits'].shape[:2]
        n_pos = torch.tensor(4 * sum(len(q) for q, _ in union), device=outputs['pred_logits'].device)
        balance = ((n_pos * (8 / B)) ** 0.5, ((4 * B * Q - n_pos) * (8 / B)) ** 0.5)
        return {'up': outputs['up'], 'reg_scale': outputs['reg_scale'], 'ddf_balance': balance}

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
        num_union = support.mean_over_ranks(sum(len(q) for q, _ in union), device)
        num_boxes = support.mean_over_ranks(sum(len(t['labels']) for t in targets), device)
        shared = self.shared_terms(outputs, union)

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
        return losses


def build_criterion(cfg, matcher=HungarianMatcher, criterion=ECCriterion):
    """A criterion from a preset name or a config dict in the original's vocabulary, ECDet's by default:
    {'num_classes': 80, 'ECCriterion': {'weight_dict', 'losses', 'gamma', 'reg_max', 'matcher': {'type',
    'weight_dict', 'alpha', 'gamma'}}}; ECSeg and ECPose pass their classes, which name the section and its
    keys (support.criterion_sections checks them). num_classes is the section's own, else the config's."""
    if isinstance(cfg, str):
        cfg = criterion.preset_config(cfg)
    matcher_kwargs, kwargs = support.criterion_sections(cfg, matcher, criterion)
    try:
        return criterion(matcher(**matcher_kwargs), **kwargs)
    except TypeError as e:
        raise ValueError(f"criterion config: '{criterion.section}': {e}") from None


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


# ---- Training: the loop every stage runs ----
def autocast(args):
    return torch.autocast(args.device_type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None)


def make_loader(dataset, transforms, img_dir, ann_file, train, args, recipe, rank, world):
    transforms = transforms(train, args.img_size, mosaic_prob=recipe["mosaic_prob"],
                            mosaic_epoch=recipe["mosaic_epoch"], stop_epoch=recipe["stop_epoch"])
    data = dataset(img_dir, ann_file, transforms)
    if not data.instances:
        raise ValueError(f"COCO annotation file {ann_file} has no object to {'train' if train else 'evaluate'} on (of "
                         f"{len(data.coco.anns)} annotations, none a usable box; crowd regions don't count)"
                         + ("" if train else ": COCO AP is undefined without ground truth"))
    if train:
        sampler = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
        collate = BatchImageCollate(recipe.get("mixup_prob", recipe["mosaic_prob"]), recipe["mosaic_epoch"])
    else:  # every rank its own slice, no padding: the evaluator sees each image once
        sampler, collate = list(range(rank, len(data), world)), BatchImageCollate()
    batch = args.batch_size // world
    if train and len(data) < batch * world:
        raise ValueError(f"{ann_file}: {len(data)} usable images, fewer than one batch of {args.batch_size}")
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


def optimise(loss, terms, net, optimizer, scaler, clip_max_norm, stage, epoch, step, checkpoint):
    """One step on `loss`, the gradient norm clipped to clip_max_norm (if > 0). A non-finite loss (on any
    rank) or gradient norm stops the run: support.diverged() names the stage, where, the `terms` and checkpoint."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise support.diverged(f"{stage}loss", epoch, step, terms, checkpoint)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # a no-op without fp16
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip_max_norm if clip_max_norm > 0 else math.inf)
    # The gradients are all-reduced, so every rank stops together; fp16's scaler skips its own overflows.
    if not scaler.is_enabled() and not torch.isfinite(norm):
        raise support.diverged(f"{stage}gradient norm", epoch, step, {**terms, "gradient_norm": norm}, checkpoint)
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(net, criterion, loader, optimizer, scaler, ema, schedule, epoch, args, rank):
    net.train()
    sums, count = {}, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = schedule(epoch * len(loader) + i, group["initial_lr"])
        images, targets = images.to(args.device, non_blocking=True), support.to_device(targets, args.device)
        with autocast(args):
            outputs = net(images, targets)
        losses = criterion(support.to_float(outputs), targets)
        loss = sum(losses.values())
        optimise(loss, losses, net, optimizer, scaler, args.clip_max_norm, "", epoch, i,
                 os.path.join(args.output_dir, "last.pth"))
        ema.update(net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        count += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
    means = support.average_over_ranks(torch.tensor([sums[k] / max(count, 1) for k in sorted(sums)], device=args.device))
    return dict(zip(sorted(sums), means.tolist()))


@torch.no_grad()
def make_optimizer(groups, betas, args, ckpt=None):
    """AdamW over param groups (with lr, initial_lr, weight_decay) and the gradient scaler, restored from `ckpt`."""
    optimizer = torch.optim.AdamW(groups, betas=betas)
    scaler = torch.amp.GradScaler(args.device_type, enabled=args.amp_dtype == torch.float16)
    if ckpt is not None:
        support.restore_optimizer(optimizer, scaler, ckpt)
    return optimizer, scaler


@torch.no_grad()
def evaluate(net, loader, postprocess, cfg, args, rank, iou_types, draw=None, picture=None):
    """COCO AP of `net` on the loader's images: {iou_type: the 12 COCO numbers}. With `picture`,
    rank 0 also draws its first batch's predictions there (draw: predict.draw_batch or a stage's)."""
    net.eval()
    data = loader.dataset
    evaluator = predict.CocoEvaluator(data.coco, data.label_to_cat, iou_types)
    for images, targets in tqdm(loader, desc="eval", disable=rank != 0, dynamic_ncols=True, leave=False):
        with autocast(args):
            outputs = net(images.to(args.device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(args.device)
        results = postprocess(support.to_float(outputs), sizes, cfg)
        evaluator.update([t["image_id"] for t in targets], results)
        if picture is not None and rank == 0:
            draw(images, targets, results, data.names, picture)
            picture = None
    return evaluator.summarize()


def postprocess(outputs, orig_sizes, cfg):
    """ECDet's results for COCO evaluation: model.postprocess with the config's number of detections."""
    return model.postprocess(outputs, orig_sizes, model.num_top_queries(cfg))


def class_heads(cfg):
    """The names of the network's tensors whose shape follows num_classes (the class heads): those that
    change when the network is built, on the meta device (no memory, no time), with one class more."""
    with torch.device("meta"):
        own = model.build_model(cfg).state_dict()
        other = model.build_model({**cfg, "num_classes": cfg["num_classes"] + 1}).state_dict()
    return {k for k, v in own.items() if v.shape != other[k].shape}


def train(args, recipes=RECIPES, dataset=CocoDetection, transforms=DetTransforms, criterion=ECCriterion,
          matcher=HungarianMatcher, postprocess=postprocess, iou_types=("bbox",), draw=predict.draw_batch,
          restart_from_best=True):
    """Train (or with --eval-only, evaluate) a network; returns the last epoch's metrics. ECDet's stage by
    default; ECSeg, ECPose and the teacher call it with what they change: their recipes, data set,
    augmentation, criterion and matcher (whose preset_config adds the loss section to a preset), results,
    COCO AP types, pictures, and whether training restarts from the best checkpoint at stop_epoch (the
    original's ECDet/ECSeg engine does, its ECPose engine does not)."""
    rank, world = support.start_run(args)
    support.check_output_dir(args)
    ckpt = support.resume_checkpoint(args) if args.resume else None
    backbone_lr_given = args.backbone_lr is not None
    recipe = support.training_recipe(args, recipes, TRAINING)
    train_dir, train_ann, val_dir, val_ann = support.dataset_paths(args, iou_types)
    val_loader = make_loader(dataset, transforms, val_dir, val_ann, False, args, recipe, rank, world)
    names = val_loader.dataset.names
    cfg = support.model_config(args, criterion.preset_config, len(names))
    try:
        loss = build_criterion(cfg, matcher, criterion)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--model {args.model} is not a {args.task} model: {e.args[0] if e.args else e}") from None
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    try:
        net = model.build_model(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--model {args.model}: {e}") from None
    # --resume and --tune bring the ViT's weights (the original then skips its download too)
    if not (args.resume or args.tune) or args.backbone_weights not in (None, "none"):
        if not support.initial_backbone(net, cfg, args, rank, model.ECVIT, backbone_lr_given) and not backbone_lr_given:
            recipe["backbone_lr"] = args.backbone_lr = recipe["lr"]  # a random ViT learns only at the head's rate
    if args.tune:
        support.tune_weights(net, args, model.PRESETS, class_heads(cfg), cfg["num_classes"], rank)
    if ckpt is not None:
        try:
            model.load_weights(net, ckpt["model"])
        except ValueError as e:
            raise ValueError(f"--resume {args.resume}: {e}") from None
    net = net.to(args.device)
    start_epoch, best, best_epoch = (ckpt["epoch"], ckpt["best"], ckpt.get("best_epoch", 0)) if ckpt else (0, -1.0, 0)
    ema = ModelEMA(net, recipe["ema_decay"], recipe["ema_warmups"])
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
    scores = lambda picture: evaluate(ema.module, val_loader, postprocess, cfg, args, rank, iou_types, draw, picture)
    if args.eval_only:  # reads the run only: its picture stays the one of the run's last epoch
        return {f"coco_{k}": v for k, v in scores(None).items()}

    train_loader = make_loader(dataset, transforms, train_dir, train_ann, True, args, recipe, rank, world)
    if train_loader.dataset.names != names:
        raise ValueError(f"{train_ann} and {val_ann} have different categories")
    train_net = support.distributed(net, args.device, world)
    optimizer, scaler = make_optimizer(param_groups(net, recipe["lr"], recipe["backbone_lr"], recipe["weight_decay"]),
                                       recipe["betas"], args, ckpt)
    support.clean_output_dir(args)
    history = support.restore_run_files(args, ckpt) if ckpt is not None else []
    steps = len(train_loader)
    total, no_aug = args.epochs * steps, (args.epochs - recipe["stop_epoch"]) * steps
    warmup, flat = min(recipe["warmup_iter"], 3 * steps), recipe["mosaic_epoch"] * steps
    schedule = lambda step, lr: flat_cosine(step, total, warmup, flat, no_aug, lr, lr * recipe["lr_gamma"])

    if rank == 0:
        print(f"{args.task}: {args.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters), "
              f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images, "
              f"{world} process(es) on {args.device}, batch {args.batch_size}, {args.epochs} epochs"
              + (f", resuming after epoch {start_epoch}" if start_epoch else ""))
    metrics, board = {}, support.TensorBoard(args.output_dir, rank)
    for epoch in range(start_epoch, min(args.epochs, args.stop_after or args.epochs)):
        t0 = time.time()
        if restart_from_best and epoch == recipe["stop_epoch"] > 0:
            support.restart_from_best(os.path.join(args.output_dir, "best.pth"), net, ema, optimizer, scaler, rank)
        set_epoch(train_loader, epoch, args.seed, rank)
        losses = train_one_epoch(train_net, loss, train_loader, optimizer, scaler, ema, schedule, epoch, args, rank)
        stats = scores(os.path.join(args.output_dir, "predictions.png"))
        ap = stats[iou_types[-1]][0]
        metrics = {"epoch": epoch + 1, "loss": sum(losses.values()), "losses": losses,
                   **{f"coco_{k}": v for k, v in stats.items()}, "time": round(time.time() - t0, 1)}
        history.append(metrics)
        if ap > best:
            best, best_epoch = ap, epoch + 1
        if rank == 0:
            # The checkpoint carries the log and the best epoch, so that a resume after a kill between
            # these three writes restores the other two (support.restore_run_files).
            state = {"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best, "best_epoch": best_epoch,
                     "log": history, "config": cfg, "names": names,
                     "category_ids": [val_loader.dataset.label_to_cat[label] for label in range(len(names))],
                     "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}}
            support.save_checkpoint(state, os.path.join(args.output_dir, "last.pth"))
            if best_epoch == epoch + 1:
                support.save_checkpoint(state, os.path.join(args.output_dir, "best.pth"))
            support.write_log(history, os.path.join(args.output_dir, "log.jsonl"))
            support.draw_log(os.path.join(args.output_dir, "log.jsonl"), os.path.join(args.output_dir, "curves.png"))
            board.add(support.epoch_scalars(losses, optimizer, stats), epoch + 1)
            print(f"epoch {epoch + 1}: loss {metrics['loss']:.4f}, AP {ap:.4f} (best {best:.4f})")
    return metrics


def demo_config(preset="ecdet_s", preset_config=ECCriterion.preset_config):
    """The CPU demo's network: the preset (ECDet-S's layout) with the ViT and encoder at a quarter of their
    width and depth, and a 64-wide, 3-layer decoder of 50 queries."""
    cfg = preset_config(preset)
    cfg["ViTAdapter"].update(embed_dim=64, num_heads=2, depth=4, interaction_indexes=[2, 3])
    cfg["HybridEncoder"].update(in_channels=[64] * 3, hidden_dim=64, dim_feedforward=128)
    if "ECTransformer" in cfg:
        cfg["ECTransformer"].update(feat_channels=[64] * 3, hidden_dim=64, dim_feedforward=128, num_layers=3,
                                    num_queries=50, num_denoising=30)
        cfg["PostProcessor"]["num_top_queries"] = 50
    return cfg


def make_parser(script="train_det.py", name="detection", default_model="ecdet_s", **options):
    """A stage's command line (support.training_parser), --batch-size defaulting to TRAINING's."""
    return support.training_parser(script, name, default_model, TRAINING["batch_size"], **options)


def parse_args(argv=None, parser=None):
    return support.parse_training_args(parser or make_parser(), argv, model.PRESETS)


def main(argv=None):
    args = parse_args(argv)
    if args.demo:  # the README's first command: synthetic shapes, a short CPU run, COCO AP and a picture
        return support.run_script("train_det.py", support.demo, args, train, demo_config())
    return support.run_script("train_det.py", train, args)


if __name__ == "__main__":
    main()
