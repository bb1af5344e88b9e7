"""ECSeg: instance segmentation with a distilled ECViT backbone (EdgeCrafter, stage 3 for masks).

    torchrun --nproc_per_node 8 train_seg.py --model ecseg_s --data /coco --backbone-weights ecseg_vitt.pth
    python train_seg.py --demo          # a short CPU run on synthetic shapes with polygon masks

ECSeg is ECDet with a light mask head (model.SegmentationHead), so this stage is train_det.py plus
what masks add: COCO masks from polygons and RLE, checked and repaired; mask costs in the Hungarian
matching; mask BCE and dice losses on sampled points; and `bbox` plus `segm` COCO AP. Data
augmentation, MixUp, the training loop, DDP, checkpoints and the CLI are train_det's: masks are
tv_tensors.Mask objects, which every transform moves with the pixels.

Mask conventions: targets hold (n, H, W) uint8 masks on the network's input canvas; the network
predicts (B, Q, H/4, W/4) mask logits; points for the mask costs and losses are normalised (x, y)
in [0, 1], so predictions and targets of different resolutions are sampled at the same places.
"""
import collections
import functools
import math
import warnings

import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

import model
import predict
import support
import train_det
from train_det import ECCriterion, HungarianMatcher, batch_index, matched

# ---- Data: COCO masks, checked and repaired ----

def rle_counts(counts):
    """The run lengths of a COCO RLE's `counts`: an uncompressed list as it is; a compressed string
    decoded from pycocotools' format (per run, 5-bit groups in characters from '0', the sixth bit
    saying that another group follows and the fifth bit of the last one the sign; from the third run
    on, the difference to the run two before), or None when the string is not of that format."""
    if isinstance(counts, list):
        return counts
    runs, value, shift = [], 0, 0
    for c in (ord(ch) - 48 for ch in counts):
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value = shift = 0
    return None if shift else runs


def check_segmentation(segmentation, height, width):
    """A COCO segmentation, repaired where possible: (segmentation or None, repairs, why unusable).

    Polygons: a part with an odd number of coordinates loses the last one; a part with fewer than 3
    points or a non-numeric coordinate is dropped (pycocotools would even read a 4-number part as a
    box). RLE (compressed or not) must be of the image's size, with runs that add up to it
    (pycocotools decodes others into memory it never wrote). Unusable: no segmentation, no valid
    part, a mask wholly outside the image, a malformed or empty RLE.
    """
    if isinstance(segmentation, dict):
        try:
            if list(segmentation["size"]) != [height, width]:
                return None, set(), "RLE of another size than its image"
            runs = rle_counts(segmentation["counts"])
            if runs is None or not all(isinstance(r, int) and r >= 0 for r in runs) or sum(runs) != height * width:
                return None, set(), "malformed RLE"
            rle = mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) \
                else segmentation
            empty = mask_utils.area(rle) == 0
        except (KeyError, TypeError, ValueError):
            return None, set(), "malformed RLE"
        return (None, set(), "empty RLE") if empty else (segmentation, set(), None)
    if not isinstance(segmentation, list) or not segmentation:
        return None, set(), "no segmentation"
    parts, repairs = [], set()
    for part in segmentation:
        try:  # plain Python: COCO has close to a million polygons, mostly short
            finite = isinstance(part, list) and all(map(math.isfinite, part))
        except TypeError:
            finite = False
        if not finite:
            repairs.add("non-numeric polygon part dropped")
            continue
        if len(part) % 2:
            repairs.add("odd polygon length cut by one")
            part = part[:-1]
        if len(part) < 6:
            repairs.add("polygon part of fewer than 3 points dropped")
            continue
        parts.append(part)
    if not parts:
        return None, repairs, "no valid polygon"
    xs, ys = [x for p in parts for x in p[0::2]], [y for p in parts for y in p[1::2]]
    if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
        return None, repairs, "mask outside the image"
    return parts, repairs, None


class CocoSegmentation(train_det.CocoDetection):
    """train_det.CocoDetection with masks (decoded by pycocotools from polygons or RLE), whose
    segmentations are checked once at construction (check_segmentation).

    Repairs are written into the annotations, so that evaluation sees them too. An object without a
    usable mask is skipped for training and becomes a crowd region (its box) of the ground truth:
    COCOeval then ignores predictions on it instead of failing on its segmentation. Both are counted
    (`mask_repairs`, `mask_skipped`: objects per reason) and warned about; a file with no usable
    object at all is an error.
    """

    def load(self, idx):
        """CocoDetection's sample with masks, (n, H, W) uint8 tv_tensors.Mask of the image's objects."""
        sample = super().load(idx)
        if sample is not None:
            h, w = sample[1]["boxes"].canvas_size
            masks = [torch.from_numpy(self.coco.annToMask(ann)) for ann, _, _ in self.instances.get(self.ids[idx], [])]
            sample[1]["masks"] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8))
        return sample

    def _select_instances(self):
        instances, dropped = super()._select_instances()  # also checks every annotation's fields
        self.mask_repairs, self.mask_skipped = collections.Counter(), collections.Counter()
        example = {}  # the first annotation id per reason, for the warnings
        for ann in self.coco.dataset["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            info = self.coco.imgs[ann["image_id"]]
            segmentation, repairs, unusable = check_segmentation(ann.get("segmentation"), info["height"], info["width"])
            for reason in repairs | {unusable} - {None}:
                example.setdefault(reason, ann.get("id"))
            if unusable:
                self.mask_skipped[unusable] += 1
                x, y, w, h = ann["bbox"]
                ann.update(iscrowd=1, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
            elif repairs:
                ann["segmentation"] = segmentation
                self.mask_repairs.update(repairs)
        for repair, n in sorted(self.mask_repairs.items()):
            warnings.warn(f"{self.ann_file}: {n} objects repaired: {repair} (e.g. annotation {example[repair]})")
        for reason, n in sorted(self.mask_skipped.items()):
            warnings.warn(f"{self.ann_file}: {n} objects without a usable mask ({reason}, e.g. annotation "
                          f"{example[reason]}); skipped, and evaluated as crowd regions")
        instances = {image_id: kept for image_id, objects in instances.items()
                     if (kept := [o for o in objects if not o[0].get("iscrowd")])}
        if not instances:
            raise ValueError(f"COCO annotation file {self.ann_file} has no object with a usable box and mask")
        return instances, dropped


# ---- Loss: point sampling, and the mask terms on sampled points ----

def point_sample(maps, points, mode="bilinear"):
    """Values of maps (N, H, W) at points (N, P, 2), normalised (x, y) in [0, 1] -> (N, P)."""
    return F.grid_sample(maps[:, None], 2 * points[:, :, None] - 1, mode=mode, align_corners=False)[:, 0, :, 0]


def uncertain_points(logits, num_points, oversample_ratio=3, importance_sample_ratio=0.75):
    """PointRend's (Kirillov et al., 2020) training points for mask logits (N, h, w): draw
    oversample_ratio * num_points uniform points, keep the importance_sample_ratio share whose logits
    are nearest 0 (the least certain), and fill up with fresh uniform points. Returns (N, num_points, 2)."""
    N = len(logits)
    candidates = torch.rand(N, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()
    k = int(importance_sample_ratio * num_points)
    chosen = candidates.gather(1, uncertainty.topk(k, dim=1).indices[..., None].expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(N, num_points - k, 2, device=logits.device)], 1)


def pairwise_mask_bce(x, y):
    """Mean sigmoid BCE of every logit row x (N, P) with every target row y (T, P) -> (N, T)."""
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    return (pos @ y.T + neg @ (1 - y).T) / x.shape[1]


def pairwise_dice(x, y):
    """Dice loss 1 - (2 |s ∩ y| + 1) / (|s| + |y| + 1), s = sigmoid(x), of every row pair -> (N, T)."""
    s = x.sigmoid()
    return 1 - (2 * s @ y.T + 1) / (s.sum(-1)[:, None] + y.sum(-1)[None] + 1)


def mask_bce_loss(x, y, num_boxes):
    """Mask BCE of the matched masks' logits x (N, P) at their P points toward the objects' masks
    there, y (N, P) in {0, 1}:

        L_mask_ce = (1 / N) Σ_masks (1 / P) Σ_points −[y log σ(x) + (1 − y) log(1 − σ(x))]"""
    return F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(1).sum() / num_boxes


def mask_dice_loss(x, y, num_boxes):
    """Dice loss (V-Net, Milletari et al., 2016) of the same points, s = σ(x), smoothed by 1:

        L_mask_dice = (1 / N) Σ_masks [1 − (2 Σ_points s·y + 1) / (Σ_points s + Σ_points y + 1)]"""
    s = x.sigmoid()
    return (1 - (2 * (s * y).sum(-1) + 1) / (s.sum(-1) + y.sum(-1) + 1)).sum() / num_boxes


# ---- Loss: matching and the ECSeg criterion ----

class MaskHungarianMatcher(HungarianMatcher):
    """ECDet's matcher (train_det.HungarianMatcher) with ECSeg's mask costs (Mask2Former's) added to C:

        C_ij += λ_ce · BCE(m_i, m̂_j) + λ_dice · dice(m_i, m̂_j)

    both means over P = h·w // mask_point_sample_ratio random points shared by all pairs (one draw
    per call), m_i query i's mask logits bilinearly sampled there, m̂_j object j's mask at the
    nearest pixel. ECSeg weighs λ_ce = λ_dice = 5. Outputs without masks (the encoder's queries)
    are matched on the box costs alone, as in the original.
    """

    config_keys = HungarianMatcher.config_keys + ("mask_point_sample_ratio",)
    costs = HungarianMatcher.costs + ("cost_mask_ce", "cost_mask_dice")

    def __init__(self, weight_dict, alpha, gamma, mask_point_sample_ratio):
        super().__init__(weight_dict, alpha, gamma)
        self.mask_point_sample_ratio = mask_point_sample_ratio

    def cost(self, outputs, targets):
        C = super().cost(outputs, targets)
        if outputs.get("pred_masks") is None:
            return C
        logits = outputs["pred_masks"].flatten(0, 1)  # (B·Q, h, w)
        gt = torch.cat([t["masks"] for t in targets]).to(logits.dtype)  # (T, H, W)
        num_points = logits.shape[-2] * logits.shape[-1] // self.mask_point_sample_ratio
        points = torch.rand(1, num_points, 2, device=logits.device)
        x = point_sample(logits, points.expand(len(logits), -1, -1))
        y = point_sample(gt, points.expand(len(gt), -1, -1), mode="nearest")
        return C + self.cost_mask_ce * pairwise_mask_bce(x, y) + self.cost_mask_dice * pairwise_dice(x, y)


# Loss weights and matching costs of the released ECSeg recipe (its ECCriterion section).
CRITERION = {
    "weight_dict": {"loss_mal": 2.0, "loss_bbox": 1, "loss_giou": 1, "loss_fgl": 0.15, "loss_ddf": 1.5,
                    "loss_mask_ce": 5.0, "loss_mask_dice": 5.0},
    "losses": ["mal", "boxes", "local", "masks"], "gamma": 1.5, "alpha": 0.75, "reg_max": 32,
    "matcher": {"type": "HungarianMatcher", "weight_dict": {"cost_class": 2, "cost_bbox": 1, "cost_giou": 1,
                                                            "cost_mask_ce": 5, "cost_mask_dice": 5},
                "alpha": 0.25, "gamma": 2.0, "mask_point_sample_ratio": 16},
}


class ECSegCriterion(ECCriterion):
    """The ECDet criterion (train_det.ECCriterion) plus ECSeg's mask terms, for every output that
    has masks: the decoder layers, the pre-decoder head (with the last layer's masks) and the
    denoising queries; the encoder's queries have none. Each uses its own matching.

    - loss_mask_ce (mask_bce_loss) and loss_mask_dice (mask_dice_loss), both on
      P = max(h, h·w // mask_point_sample_ratio) points per mask, chosen by uncertain_points
      (oversample_ratio, importance_sample_ratio), as Mask2Former (Cheng et al., "Masked-attention
      Mask Transformer for Universal Image Segmentation", 2022) samples its mask losses.
    """

    family, preset = "ecseg", CRITERION

    def __init__(self, matcher, weight_dict, losses, gamma, num_classes, reg_max, oversample_ratio=3,
                 importance_sample_ratio=0.75):
        super().__init__(matcher, weight_dict, losses, gamma, num_classes, reg_max)
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio

    def loss_functions(self):
        return {**super().loss_functions(), "masks": self.loss_masks}

    def loss_masks(self, out, targets, indices, num_boxes, shared):
        """Both mask terms of the matched masks, on the same P points per mask (uncertain_points)."""
        if out.get("pred_masks") is None:
            return {}
        logits = out["pred_masks"][batch_index(indices)]  # (N, h, w)
        if not len(logits):
            return {"loss_mask_ce": logits.sum(), "loss_mask_dice": logits.sum()}
        h, w = logits.shape[-2:]
        with torch.no_grad():
            points = uncertain_points(logits, max(h, h * w // self.matcher.mask_point_sample_ratio),
                                      self.oversample_ratio, self.importance_sample_ratio)
            y = point_sample(matched(targets, indices, "masks").to(logits.dtype), points, mode="nearest")
        x = point_sample(logits, points)
        return {"loss_mask_ce": mask_bce_loss(x, y, num_boxes), "loss_mask_dice": mask_dice_loss(x, y, num_boxes)}

    def forward(self, outputs, targets):
        """As ECCriterion.forward; targets also hold masks (T, H, W), all on the same canvas."""
        missing = [i for i, t in enumerate(targets) if "masks" not in t]
        if missing:
            raise KeyError(f"ECSeg targets need 'masks'; targets {missing} have none")
        return super().forward(outputs, targets)


def build_criterion(cfg):
    """The ECSeg criterion from a preset name ("ecseg_s", ...) or a config dict in the original's
    vocabulary, as train_det.build_criterion, with the matcher's mask_point_sample_ratio and
    cost_mask_ce / cost_mask_dice, and loss_mask_ce / loss_mask_dice weights."""
    return train_det.build_criterion(cfg, MaskHungarianMatcher, ECSegCriterion)


# ---- Training: ECSeg in train_det's loop, and its demo ----

# The training recipe per preset (the original's configs/ecseg/ecseg_*.yml; S and M share one, L and
# X another) in train_det.RECIPES' terms, and its CPU demo's.
SEG_RECIPES = {f"ecseg_{size}": dict(zip(train_det._RECIPE, values)) for sizes, values in [
    ("sm", (74, 5e-4, 2.5e-5, 1e-4, 0.75, 36, 72)), ("lx", (50, 5e-4, 2.5e-6, 1.25e-4, 1.0, 24, 48))] for size in sizes}
SEG_RECIPES["demo"] = train_det.RECIPES["demo"]


def postprocess(outputs, orig_sizes, cfg, chunk=50):
    """model.postprocess with the masks (K, h, w) bool at the original size, on the CPU (the evaluator
    encodes them there), resized `chunk` masks at a time (bounding the float copy at full size)."""
    results = model.postprocess(outputs, orig_sizes, model.num_top_queries(cfg), resize_masks=False)
    for r, (w, h) in zip(results, orig_sizes.tolist()):
        r["masks"] = model.masks_at_size(r["masks"], (int(h), int(w)), chunk)
    return results


def train(args, transforms=train_det.DetTransforms):
    """ECSeg's stage: train_det's loop (and ECDet's augmentation) with what masks change, all above: the
    recipes, data with masks, the criterion and matcher with mask terms, `bbox` and `segm` AP. ECSeg
    weighs the box terms less than ECDet and its class scores follow the box IoU (MAL), so after a short
    run they sit near 0.3-0.5: pictures show scores from 0.3 on."""
    return train_det.train(args, recipes=SEG_RECIPES, dataset=CocoSegmentation, transforms=transforms,
                           criterion=ECSegCriterion, matcher=MaskHungarianMatcher, postprocess=postprocess,
                           iou_types=("bbox", "segm"), draw=functools.partial(predict.draw_batch, score_threshold=0.3))


def demo_config():
    """The demo's network: train_det's (ECDet-S's layout, small) with ECSeg's mask head."""
    return train_det.demo_config("ecseg_s", ECSegCriterion.preset_config)


def parse_args(argv=None):
    return train_det.parse_args(argv, train_det.make_parser("train_seg.py", "segmentation", "ecseg_s"))


def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        # The demo learns faster at twice ECDet's lr (24 epochs of an earlier schedule: mask AP 0.32 against
        # 0.17 at 1e-3); its numbers now: docs/results.md.
        return support.run_script("train_seg.py", support.demo, args, train, demo_config(), lr=2e-3)
    return support.run_script("train_seg.py", train, args)


if __name__ == "__main__":
    main()
