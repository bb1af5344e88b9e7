"""ECPose: multi-person pose estimation with a distilled ECViT backbone, trained on COCO keypoints.

    torchrun --nproc_per_node 8 train_pose.py --model ecpose_s --data /coco --backbone-weights ecpose_vitt.pth
    python train_pose.py --demo          # a short CPU run on synthetic stick figures

The file reads top to bottom as the stage runs: the COCO keypoints data set, the ECPose augmentation
recipe, then the loss (object keypoint similarity, DETRPose
matching and criterion) and the training entry point. The loop (optimiser, schedule, EMA, AMP, DDP,
checkpoints) and COCO evaluation are train_det's: `train` at the end calls it with what ECPose changes.

Keypoint conventions. Coordinates are continuous like box corners: pixel i spans [i, i + 1), so a
horizontal flip maps x -> W - x for keypoints and boxes alike and a skeleton stays inside its
flipped box (torchvision and the original flip keypoints as pixel indices, x -> W - 1 - x).
- Data sets and augmentations hold pixel keypoints as tv_tensors.KeyPoints (n, 17, 2), NaN where
  COCO's visibility is 0 (not labelled), so that every geometric transform keeps them unlabelled.
- Targets the model trains on are per-image dicts: `labels` (n,) int64 (COCO category ids, person =
  1), `boxes` (n, 4) normalised cx, cy, w, h, `keypoints` (n, 51) = 17 normalised (x, y) pairs then
  17 visibilities (0 or 1; COCO's 1 "occluded" and 2 "visible" are both 1, as in the original) and
  `area` (n,) the segment area divided by the image area.
- Results (model.postprocess) hold `keypoints` (n, 51) = per keypoint pixel x, y in the
  original image and a score, and `labels` that already are category ids.
"""
import functools
import random
import warnings

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import tv_tensors

import model
import predict
import support
import train_det as td
from support import KEYPOINT_NAMES
from train_det import (IMAGE_KEYS, CocoDetection, ECCriterion, HungarianMatcher, Mosaic, batch_index, matched,
                       merge_instances, normalised_cxcywh)

# ---------------------------------------------------------------------------------------------
# Data: COCO keypoints
# ---------------------------------------------------------------------------------------------
# FLIP_INDEX[k]: the keypoint that k becomes in the mirror image (a left wrist turns into a right one).
FLIP_INDEX = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
K = len(KEYPOINT_NAMES)


class CocoKeypoints(CocoDetection):
    """A COCO keypoints data set (person_keypoints_*.json): CocoDetection plus keypoints and areas.

    Labels are category ids, ECPose's classes (person = 1): label_to_cat is the identity on 0..max
    id, names[i] the name of category i ("" for unused ids). A person is a target if it is not
    crowd, has a `keypoints` list of 3 * 17 numbers and a labelled keypoint (the original drops
    num_keypoints == 0 likewise). Those without the list (`num_without_keypoints`; entered in the
    in-memory ground truth as persons without labelled keypoints, which COCOeval ignores) or
    without a labelled keypoint (`num_unlabelled`) are counted and warned about; a file without any
    usable person is an error. With skip_empty (default: when the transforms train, as the original
    does for its training set) images without a usable person are left out.

    Item without transforms: (RGB PIL image, target): CocoDetection's entries and keypoints, a
    KeyPoints (n, 17, 2) of pixel x, y, NaN where not labelled (visibility 0), and area (n,),
    COCO's segment area in pixels. After PoseTransforms: the model's target (module docstring).
    """

    def __init__(self, img_dir, ann_file, transforms=None, skip_empty=None):
        self.num_without_keypoints = self.num_unlabelled = 0
        super().__init__(img_dir, ann_file, transforms)
        last = max(self.coco.cats)
        self.label_to_cat = self.cat_to_label = {c: c for c in range(last + 1)}
        self.names = [self.coco.cats[c]["name"] if c in self.coco.cats else "" for c in range(last + 1)]
        if getattr(transforms, "train", False) if skip_empty is None else skip_empty:
            self.ids = [i for i in self.ids if i in self.instances]
        if self.num_without_keypoints:
            warnings.warn(f"{self.num_without_keypoints} persons in {ann_file} have no list of {3 * K} keypoint "
                          f"numbers; skipped, and ignored by the evaluation")
        if self.num_unlabelled:
            warnings.warn(f"{self.num_unlabelled} persons in {ann_file} have no labelled keypoint; skipped")

    def _select_instances(self):
        """CocoDetection's objects, with labels = category ids, less those without usable keypoints."""
        repaired = set()
        for ann in self.coco.dataset["annotations"]:
            if not isinstance(ann, dict):
                continue  # CocoDetection names the malformed annotation
            keypoints = ann.get("keypoints")
            if not (isinstance(keypoints, list) and len(keypoints) == 3 * K
                    and all(isinstance(v, (int, float)) for v in keypoints)):
                ann["keypoints"], ann["num_keypoints"] = [0] * (3 * K), 0
                repaired.add(id(ann))
            ann.setdefault("num_keypoints", sum(v > 0 for v in ann["keypoints"][2::3]))
        instances, dropped = super()._select_instances()
        usable = {}
        for image_id, objects in instances.items():
            for ann, _, box in objects:
                if id(ann) in repaired:
                    self.num_without_keypoints += 1
                elif not any(v > 0 for v in ann["keypoints"][2::3]):
                    self.num_unlabelled += 1
                elif not isinstance(ann.get("area"), (int, float)):
                    raise ValueError(f"COCO annotation file {self.ann_file}: annotation {ann.get('id')} has no 'area'")
                else:
                    usable.setdefault(image_id, []).append((ann, ann["category_id"], box))
        if not usable:
            raise ValueError(f"COCO annotation file {self.ann_file} has no usable person (of {len(self.coco.anns)} "
                             f"annotations, {self.num_without_keypoints} lack keypoints and {self.num_unlabelled} "
                             f"have none labelled; crowd and empty boxes don't count)")
        return usable, dropped

    def load(self, idx):
        sample = super().load(idx)
        if sample is None:
            return None
        image, target = sample
        objects = self.instances.get(self.ids[idx], [])
        keypoints = torch.tensor([ann["keypoints"] for ann, _, _ in objects], dtype=torch.float32).reshape(-1, K, 3)
        xy = keypoints[..., :2].masked_fill(keypoints[..., 2:] == 0, float("nan"))
        target["keypoints"] = tv_tensors.KeyPoints(xy, canvas_size=target["boxes"].canvas_size)
        target["area"] = torch.tensor([float(ann["area"]) for ann, _, _ in objects], dtype=torch.float32)
        return image, target


# ---------------------------------------------------------------------------------------------
# Data: augmentation (the ECPose recipe)
# ---------------------------------------------------------------------------------------------
# The training recipe per preset (the original's configs/ecpose/ecpose_*_coco.yml and ecpose.yml):
# epochs, learning rates, weight decay; strong augmentation from epoch 4 (PoseTransforms'
# start_epoch) until stop_epoch, mosaic with probability 0.5 until mosaic_epoch (the policy's
# epochs [4, 45, 90] for S and M, [4, 48, 72] for L and X); no batch MixUp (its MixUp is
# MixUpCopyPaste's, per sample). The rate warms up for 500 iterations, then stays constant (the
# original's MultiStepLR milestone, 5000 epochs, is never reached): flat_cosine with lr_gamma 1,
# whose warm-up is quadratic where the original's is linear. EMA warm-up 2000 updates. L and X
# accumulate two half batches per step in the original, a memory saving not repeated here.
POSE_RECIPES = {f"ecpose_{size}": dict(epochs=epochs, lr=5e-4, backbone_lr=backbone_lr, weight_decay=wd,
                                       mosaic_prob=0.5, mosaic_epoch=mosaic_epoch, stop_epoch=stop_epoch,
                                       mixup_prob=0.0, warmup_iter=500, lr_gamma=1.0, ema_warmups=2000)
                for size, (epochs, backbone_lr, wd, mosaic_epoch, stop_epoch) in {
                    "s": (92, 2.5e-5, 1e-4, 45, 90), "m": (92, 2.5e-5, 1e-4, 45, 90),
                    "l": (74, 2.5e-6, 1.25e-4, 48, 72), "x": (74, 2.5e-6, 1.25e-4, 48, 72)}.items()}
# The CPU demo: train_det's "demo" rates (1e-3 for the heads and the randomly initialised ViT alike)
# for 9 epochs of 256 steps, without any strong augmentation (stop_epoch 0; with it from epoch 4,
# keypoint AP50 was still 0 after 8 epochs): 200 warm-up steps, the full rate until epoch 7, then a
# tenth of it (lr_gamma; with no strong augmentation the schedule has no cosine part). The last two
# epochs at the low rate took keypoint AP from 0.21 to 0.33 (AP50 0.57 to 0.72, README).
POSE_RECIPES["demo"] = dict(td.RECIPES["demo"], epochs=9, mosaic_epoch=7, stop_epoch=0, mixup_prob=0.0,
                            lr_gamma=0.1, warmup_iter=200)


def hflip(image, target):
    """Mirror the image, its boxes and keypoints (x -> W - x for both) and swap left and right."""
    points = target["keypoints"].as_subclass(torch.Tensor)[:, FLIP_INDEX].clone()
    points[..., 0] = TF.get_size(image)[1] - points[..., 0]
    return TF.horizontal_flip(image), dict(target, boxes=TF.horizontal_flip(target["boxes"]),
                                           keypoints=tv_tensors.wrap(points, like=target["keypoints"]))


def zoom_out(image, target, side_range=(1.0, 2.5)):
    """The original's RandomZoomOut: black borders of (r - 1) times the width on the left and on the
    right, (r - 1) times the height above and below, r ~ U(side_range); the image stays centred.
    (The original reads width and height swapped from its target; this pads as it means to.)"""
    h, w = TF.get_size(image)
    r = random.uniform(*side_range)
    pad = [int((r - 1) * w), int((r - 1) * h)] * 2
    return TF.pad(image, pad), {k: TF.pad(v, pad) if isinstance(v, tv_tensors.TVTensor) else v
                                for k, v in target.items()}


class MixUpCopyPaste:
    """The original's MixUpCopyPaste, on one (PIL image, target) pair whose `area` is each person's
    share of its box (see PoseTransforms).

    Every sample joins a cache of the last `max_cached` samples (when full, a random one but the
    newest leaves; the original keeps one cache per op). Then, as the original splits one draw:
    - MixUp (probability 1/4): blend with an earlier cached sample resized to this one's size,
      a * this + (1 - a) * other with a ~ U(0.45, 0.55); the target gets both samples' persons.
    - copy-paste (probability 1/2): up to 3 persons from the cache are cut out by their boxes and
      blended (weight b ~ U(0.45, 0.55)) onto random places; each keeps the keypoints inside its
      box, and its area is its box's (share 1), as in the original.
    - nothing (probability 1/4).
    """

    def __init__(self, max_cached=50):
        self.cache, self.max_cached = [], max_cached

    def __call__(self, image, target):
        self.cache.append((image, target))
        if len(self.cache) > self.max_cached:
            self.cache.pop(random.randint(0, len(self.cache) - 2))
        r = random.random()
        if r < 0.25 and len(self.cache) > 1:
            other, other_target = random.choice(self.cache[:-1])
            other, other_target = T.Resize(TF.get_size(image))(other, other_target)
            return Image.blend(other, image, random.uniform(0.45, 0.55)), merge_instances([target, other_target])
        if r >= 0.5:
            return self.copy_paste(image, target)
        return image, target

    def copy_paste(self, image, target):
        persons = [(img, t, i) for img, t in self.cache for i in range(len(t["labels"]))]
        (h, w), image, pasted = TF.get_size(image), image.copy(), []
        for source, t, i in random.sample(persons, min(3, len(persons))):
            x1, y1, x2, y2 = (int(v) for v in t["boxes"][i].tolist())
            pw, ph = min(x2 - x1, w), min(y2 - y1, h)
            if pw <= 0 or ph <= 0:
                continue
            x, y = random.randint(0, w - pw), random.randint(0, h - ph)
            patch = source.crop((x1, y1, x1 + pw, y1 + ph))
            image.paste(Image.blend(image.crop((x, y, x + pw, y + ph)), patch, random.uniform(0.45, 0.55)), (x, y))
            xy = t["keypoints"].as_subclass(torch.Tensor)[i]
            inside = ((xy >= torch.tensor([x1, y1])) & (xy < torch.tensor([x1 + pw, y1 + ph]))).all(-1, keepdim=True)
            pasted.append(([x, y, x + pw, y + ph], torch.where(inside, xy + torch.tensor([x - x1, y - y1]), torch.nan),
                           t["labels"][i]))
        if not pasted:
            return image, target
        boxes, xy, labels = zip(*pasted)
        new = {"boxes": tv_tensors.wrap(torch.tensor(boxes, dtype=torch.float32), like=target["boxes"]),
               "keypoints": tv_tensors.wrap(torch.stack(xy), like=target["keypoints"]),
               "labels": torch.stack(labels), "area": torch.ones(len(boxes))}
        return image, merge_instances([target, new])


def to_targets(target):
    """A transformed pixel target -> the model's target (module docstring). Keypoints not labelled or
    outside the image get visibility 0 and coordinates 0 (as the original); a person left without a
    labelled keypoint is dropped. `area` comes in as the share of the box, and leaves as the share
    of the image."""
    h, w = target["boxes"].canvas_size
    xy = target["keypoints"].as_subclass(torch.Tensor)
    visible = ((xy >= 0) & (xy <= torch.tensor([w, h]))).all(-1)  # NaN fails both
    xy = torch.where(visible[..., None], xy / torch.tensor([w, h], dtype=xy.dtype), 0.0)
    boxes = normalised_cxcywh(target["boxes"])
    target = dict(target, boxes=boxes, keypoints=torch.cat([xy.flatten(1), visible.to(xy.dtype)], 1),
                  area=target["area"] * boxes[:, 2] * boxes[:, 3])
    keep = visible.any(-1)
    return {k: v if k in IMAGE_KEYS else v[keep] for k, v in target.items()}


class PoseTransforms:
    """The ECPose pipeline: (PIL image, pixel target) -> (normalised float image, model target).

    train, in the original's order:
        Mosaic without its affine jitter (the original's PoseMosaic), probability mosaic_prob
            while start_epoch <= epoch < mosaic_epoch
        MixUpCopyPaste, then zoom_out with probability 0.5 if no mosaic was made; only while
            start_epoch <= epoch < stop_epoch (the original's `stop_epoch` policy)
        hflip, ColorJitter(brightness, contrast, saturation, hue = 0.4) each with probability 0.5
        Resize(img_size)
    val: Resize(img_size). Both end with ImageNet normalisation and to_targets.
    Each person's `area` travels as its share of its box, which resizing, padding, flipping and
    pasting leave alone, and becomes the share of the image again at the end. Call set_epoch at the
    start of every epoch.
    """

    def __init__(self, train, img_size=640, mosaic_prob=0.5, mosaic_epoch=45, stop_epoch=90, start_epoch=4):
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.train, self.epoch = train, 0
        self.mosaic_prob, self.start_epoch, self.mosaic_epoch, self.stop_epoch = (mosaic_prob, start_epoch,
                                                                                  mosaic_epoch, stop_epoch)
        self.mosaic = Mosaic(min(size) // 2, rotation_range=0, translation_range=None, scaling_range=None)
        self.mix = MixUpCopyPaste()
        self.jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.4)], p=0.5)
        self.resize = T.Resize(size)

    def set_epoch(self, epoch):
        self.epoch = epoch  # workers start every epoch from fresh copies: empty caches here too
        self.mosaic.cache.clear()
        self.mix.cache.clear()

    def __call__(self, image, target):
        x1, y1, x2, y2 = target["boxes"].as_subclass(torch.Tensor).unbind(-1)
        target = dict(target, area=target["area"] / ((x2 - x1) * (y2 - y1)))
        if self.train:
            strong = self.start_epoch <= self.epoch < self.stop_epoch
            with_mosaic = strong and self.epoch < self.mosaic_epoch and random.random() < self.mosaic_prob
            if with_mosaic:
                image, target = self.mosaic(image, target)
            if strong:
                image, target = self.mix(image, target)
                if not with_mosaic and random.random() < 0.5:
                    image, target = zoom_out(image, target)
            if random.random() < 0.5:
                image, target = hflip(image, target)
            image, target = self.jitter(image, target)
        image, target = self.resize(image, target)
        return support.normalize(image), to_targets(target)


# ---------------------------------------------------------------------------------------------
# Loss: object keypoint similarity, matching and the DETRPose criterion
# ---------------------------------------------------------------------------------------------


def keypoint_oks(pred, gt, visible, area, sigmas=model.COCO_SIGMAS):
    """COCO's object keypoint similarity, broadcast over leading dims.

    pred, gt: (..., 2K) normalised x, y pairs; visible: (..., K) visibility weights; area: (...)
    normalised object area. With d_k the distance of keypoint k,

        OKS = sum_k v_k exp(-d_k^2 / (2 area (2 sigma_k)^2)) / (sum_k v_k + 1e-6),

    clamped below at 1e-6. Returns (...).
    """
    d = (pred - gt).unflatten(-1, (-1, 2))
    squared = d[..., 0] ** 2 + d[..., 1] ** 2
    variance = (2 * sigmas.to(pred.device)) ** 2
    similarity = torch.exp(-squared / (area[..., None] * variance * 2)) * visible
    return (similarity.sum(-1) / (visible.sum(-1) + 1e-6)).clamp(min=1e-6)


def split_keypoints(keypoints):
    """(n, 3K) targets -> (n, 2K) x, y pairs and (n, K) visibilities."""
    K = keypoints.shape[-1] // 3
    return keypoints[..., :2 * K], keypoints[..., 2 * K:]


def matched_oks(out, targets, indices):
    """OKS (N,) of each matched query's pred_keypoints with its person's keypoints."""
    z_hat, v = split_keypoints(matched(targets, indices, "keypoints"))
    return keypoint_oks(out["pred_keypoints"][batch_index(indices)], z_hat, v, matched(targets, indices, "area"))


# Loss weights and matching costs of the released ECPose recipe (the original's DETRPoseCriterion).
CRITERION = {
    "num_classes": 2, "weight_dict": {"loss_vfl": 2.0, "loss_keypoints": 10.0, "loss_oks": 4.0},
    "focal_alpha": 0.25, "losses": ["vfl", "keypoints"], "num_body_points": 17,
    "matcher": {"type": "DETRPoseHungarianMatcher", "cost_class": 2.0, "cost_keypoints": 10.0, "cost_oks": 4.0,
                "focal_alpha": 0.25},
}


class DETRPoseHungarianMatcher(HungarianMatcher):
    """ECDet's matcher (train_det.HungarianMatcher) with DETRPose's keypoint costs in place of the box costs.

    For an image with Q queries and T persons, query i and person j cost

        C_ij = λ_cls · cost_cls(p_i[c_j]) + λ_kpt · Σ_k v_jk |z_ik − ẑ_jk| + λ_oks · (1 − OKS(z_i, ẑ_j))

    with ECDet's focal class cost (α = 0.25, γ = 2), z and ẑ the predicted and true normalised
    keypoints, v_jk the visibilities (the L1 term sums |Δx| + |Δy| of visible keypoints). ECPose
    weighs λ_cls = 2, λ_kpt = 10, λ_oks = 4. The original's config gives the λs and α flat.
    """

    config_type, config_keys = "DETRPoseHungarianMatcher", ()
    costs = ("cost_class", "cost_keypoints", "cost_oks")

    def __init__(self, cost_class=1.0, cost_keypoints=1.0, cost_oks=0.01, focal_alpha=0.25):
        super().__init__(dict(cost_class=cost_class, cost_keypoints=cost_keypoints, cost_oks=cost_oks), focal_alpha, 2.0)

    def cost(self, outputs, targets):
        """outputs: pred_logits (B, Q, num_classes), pred_keypoints (B, Q, 2K) -> C, (B·Q, T_1 + ... + T_B)."""
        z = outputs["pred_keypoints"].flatten(0, 1)[:, None]  # (B*Q, 1, 2K)
        z_hat, v = split_keypoints(torch.cat([t["keypoints"] for t in targets]))
        area = torch.cat([t["area"] for t in targets])
        cost_l1 = ((z - z_hat).abs() * v.repeat_interleave(2, 1)).sum(-1)
        cost_oks = 1 - keypoint_oks(z, z_hat, v, area)
        return (self.cost_class * self.class_cost(outputs, targets) + self.cost_keypoints * cost_l1
                + self.cost_oks * cost_oks)


class DETRPoseCriterion(ECCriterion):
    """The ECPose training loss, DETRPose's (Janampa and Pattichis, "DETRPose: Real-time end-to-end
    transformer model for multi-person pose estimation", 2025): ECDet's criterion
    (train_det.ECCriterion: its outputs, matchings, names and normalisation by N) with the terms

        L = λ_VFL L_VFL + λ_kpt L_kpt + λ_OKS L_OKS,    ECPose's λs 2, 10, 4

    in methods loss_vfl, loss_keypoint_l1 and loss_oks; the original's config groups the last two
    as 'keypoints', computed on the union of the matchings.
    """

    section, family, preset = "DETRPoseCriterion", "ecpose", CRITERION
    config_keys, unused_keys = ("matcher",), ()
    union_losses = ("keypoints",)

    def __init__(self, matcher, weight_dict, losses, num_classes, num_body_points=17, focal_alpha=0.25, gamma=2.0):
        if num_body_points != 17:
            raise ValueError(f"DETRPoseCriterion: num_body_points={num_body_points}; only COCO's 17 are implemented")
        super().__init__(matcher, weight_dict, losses, gamma, num_classes, reg_max=None)
        self.alpha = focal_alpha

    def loss_functions(self):
        return {"vfl": self.loss_vfl, "keypoints": self.loss_keypoints}

    def shared_terms(self, outputs, union):
        return {}

    def quality_target(self, q, p, onehot):
        return q, self.alpha * p.pow(self.gamma) * (1 - onehot) + q

    def loss_vfl(self, out, targets, indices, num_boxes, shared=None):
        """The varifocal loss (VarifocalNet, Zhang et al., 2021) on every class logit of pred_logits
        (B, Q, K), with p = sigmoid(logit) and q = OKS(z, ẑ) of a matched query with its person (both
        detached); ECDet's quality_loss with

            target t = q at the matched person's class, 0 at every other logit
            weight w = q at the matched person's class, α p^γ at every other logit (α = 0.25, γ = 2)
            L_VFL = (1 / N) Σ_{b, i, k} w · −[t log p + (1 − t) log(1 − p)]"""
        oks = matched_oks(out, targets, indices)
        return {"loss_vfl": self.quality_loss(out["pred_logits"], targets, indices, oks, num_boxes)}

    def loss_keypoint_l1(self, out, targets, indices, num_boxes, shared=None):
        """Keypoint L1 on normalised coordinates, of the visible keypoints (v_k = 1) only:

            L_kpt = (1 / N) Σ_matched Σ_k v_k (|x_k − x̂_k| + |y_k − ŷ_k|)"""
        z = out["pred_keypoints"][batch_index(indices)]
        z_hat, v = split_keypoints(matched(targets, indices, "keypoints"))
        l1 = F.l1_loss(z, z_hat, reduction="none") * v.repeat_interleave(2, 1)
        return {"loss_keypoints": l1.sum() / num_boxes}

    def loss_oks(self, out, targets, indices, num_boxes, shared=None):
        """OKS loss, with keypoint_oks's object keypoint similarity: L_OKS = (1 / N) Σ_matched (1 − OKS(z, ẑ))."""
        oks = matched_oks(out, targets, indices)
        return {"loss_oks": (1 - oks).sum() / num_boxes}

    def loss_keypoints(self, out, targets, indices, num_boxes, shared=None):
        return {**self.loss_keypoint_l1(out, targets, indices, num_boxes),
                **self.loss_oks(out, targets, indices, num_boxes)}


def build_criterion(cfg):
    """The ECPose criterion from a preset name ("ecpose_s", ...) or a config dict in the original's
    vocabulary: {'num_classes': 2, 'DETRPoseCriterion': {'weight_dict', 'losses', 'focal_alpha',
    'num_body_points', 'matcher': {'type', 'cost_class', 'cost_keypoints', 'cost_oks', 'focal_alpha'}}}
    (the section's own num_classes, when present, wins, as in the original); train_det.build_criterion."""
    return td.build_criterion(cfg, DETRPoseHungarianMatcher, DETRPoseCriterion)


# ---------------------------------------------------------------------------------------------
# Training: ECPose in train_det's loop, and the demo
# ---------------------------------------------------------------------------------------------
def postprocess(outputs, orig_sizes, cfg):
    """model.postprocess, each person's box the extent of its keypoints (as COCO's keypoint evaluation
    takes it)."""
    results = model.postprocess(outputs, orig_sizes, model.num_top_queries(cfg))
    for r in results:
        r["boxes"] = predict.keypoint_boxes(r["keypoints"])
    return results


def train(args, transforms=PoseTransforms):
    """ECPose's stage: train_det's loop with what keypoints change, all above: the recipes, keypoint data
    and augmentation, DETRPose's criterion and matcher, `keypoints` AP, pictures of poses from score 0.3 on.
    The original's ECPose engine does not restart from the best checkpoint at stop_epoch."""
    return td.train(args, recipes=POSE_RECIPES, dataset=CocoKeypoints, transforms=transforms,
                    criterion=DETRPoseCriterion, matcher=DETRPoseHungarianMatcher, postprocess=postprocess,
                    iou_types=("keypoints",), draw=functools.partial(predict.draw_batch, score_threshold=0.3),
                    restart_from_best=False)


def demo_config():
    """The demo's network: train_det's demo ViT and encoder with a 64-wide, 3-layer pose decoder of 2 heads,
    and 3 queries, one per figure the demo's images hold at most: in a run as short as the demo, every
    spare query still finds a figure already found and scores nearly as high as the first one."""
    cfg = td.demo_config("ecpose_s", DETRPoseCriterion.preset_config)
    cfg["DETRTransformer"].update(hidden_dim=64, dim_feedforward=128, nhead=2, num_queries=3)
    cfg["DETRPosePostProcessor"]["num_select"] = 3
    return cfg


def parse_args(argv=None):
    return td.parse_args(argv, td.make_parser("train_pose.py", "pose", "ecpose_s"))


def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        # 1024 images of 128 x 128 pixels at most, 2 figures each on average, in batches of 4: many small
        # steps (2304 in the 9 epochs), which the keypoint queries need more than large images.
        return support.run_script("train_pose.py", support.demo, args, train, demo_config(),
                                  support.make_synthetic_pose, num_train=1024, img_size=128, batch_size=4)
    return support.run_script("train_pose.py", train, args)


if __name__ == "__main__":
    main()
