"""ECPose keypoint training: the loss (DETRPose matching and criterion).

The data pipeline and the training loop join this file later; this section defines the object
keypoint similarity, the Hungarian matcher, the DETRPose criterion and `build_criterion(cfg)`.

Targets are per-image dicts: `labels` (n,) int64 (COCO category ids, person = 1), `boxes` (n, 4)
normalised cx, cy, w, h, `keypoints` (n, 51) = 17 normalised (x, y) pairs then 17 visibilities
(0 or 1) and `area` (n,) the segment area divided by the image area.
"""
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import model
from train_det import batch_index, denoising_matches, match_all, matched, mean_over_ranks

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


class DETRPoseHungarianMatcher(nn.Module):
    """One-to-one assignment of queries to persons (DETR's bipartite matching).

    For an image with Q queries and T persons, query i and person j cost

        C_ij = λ_cls · cost_cls(p_i[c_j]) + λ_kpt · Σ_k v_jk |z_ik − ẑ_jk| + λ_oks · (1 − OKS(z_i, ẑ_j))

    where p_i = sigmoid(logits_i), c_j the person's class, z and ẑ the predicted and true
    normalised keypoints, v_jk the visibilities (the L1 term sums |Δx| + |Δy| of visible keypoints). The
    class cost is the sigmoid focal loss at the person's class, positive minus negative (α = 0.25,
    γ = 2):

        cost_cls(p) = α (1 − p)^γ · (−log(p + 1e-8)) − (1 − α) p^γ · (−log(1 − p + 1e-8))

    ECPose weighs λ_cls = 2, λ_kpt = 10, λ_oks = 4. Per image, scipy's `linear_sum_assignment` picks
    the min(Q, T) pairs of least total cost.
    """

    def __init__(self, cost_class=1.0, cost_keypoints=1.0, cost_oks=0.01, focal_alpha=0.25):
        super().__init__()
        self.cost_class, self.cost_keypoints, self.cost_oks = cost_class, cost_keypoints, cost_oks
        self.alpha, self.gamma = focal_alpha, 2.0

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: pred_logits (B, Q, num_classes), pred_keypoints (B, Q, 2K). Returns B pairs (query
        indices, person indices), int64 CPU tensors, query indices ascending."""
        B, Q = outputs["pred_logits"].shape[:2]
        p = outputs["pred_logits"].flatten(0, 1).sigmoid()[:, torch.cat([t["labels"] for t in targets])]
        z = outputs["pred_keypoints"].flatten(0, 1)[:, None]  # (B*Q, 1, 2K)
        z_hat, v = split_keypoints(torch.cat([t["keypoints"] for t in targets]))
        area = torch.cat([t["area"] for t in targets])
        cost_pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        cost_neg = (1 - self.alpha) * p ** self.gamma * -(1 - p + 1e-8).log()
        cost_l1 = ((z - z_hat).abs() * v.repeat_interleave(2, 1)).sum(-1)
        cost_oks = 1 - keypoint_oks(z, z_hat, v, area)
        C = self.cost_class * (cost_pos - cost_neg) + self.cost_keypoints * cost_l1 + self.cost_oks * cost_oks
        sizes = [len(t["labels"]) for t in targets]
        C = C.view(B, Q, sum(sizes)).cpu()
        return [tuple(torch.as_tensor(x, dtype=torch.int64) for x in linear_sum_assignment(c[b]))
                for b, c in enumerate(C.split(sizes, -1))]


class DETRPoseCriterion(nn.Module):
    """The ECPose training loss: weighted terms, each normalised by the (DDP-averaged) number of
    persons or of matched queries.

    - VFL (varifocal loss): sigmoid BCE on every class logit, the target being the matched
      query's OKS with its person at the person's class, 0 elsewhere; unmatched entries weigh
      α p^γ (p = sigmoid(logit), α = 0.25, γ = 2), matched ones their target.
    - Keypoint L1 over visible keypoints, and 1 − OKS, on the matched queries.

    Every decoder layer (`_{i}`, the last unsuffixed), the first layer's regression (`_pre`) and
    the encoder's query selection (`_enc_0`) gets the terms; VFL uses each output's own matching,
    the keypoint terms the union of all their matchings (normalised by its size). Denoising queries
    (`_dn_{i}`, `_dn_pre`) are matched to the persons they were made from. Matching helpers are
    ECDet's (train_det).
    """

    def __init__(self, matcher, weight_dict, losses, num_classes, num_body_points=17, focal_alpha=0.25, gamma=2.0):
        super().__init__()
        unknown = set(losses) - {"vfl", "keypoints"}
        if unknown:
            raise ValueError(f"DETRPoseCriterion: losses {sorted(unknown)} are not implemented; the released models "
                             f"use ['vfl', 'keypoints']")
        if num_body_points != 17:
            raise ValueError(f"DETRPoseCriterion: num_body_points={num_body_points}; only COCO's 17 are implemented")
        self.matcher, self.weight_dict, self.losses = matcher, dict(weight_dict), list(losses)
        self.num_classes, self.alpha, self.gamma = num_classes, focal_alpha, gamma

    def loss_vfl(self, out, targets, indices, num_boxes):
        logits = out["pred_logits"]
        idx = batch_index(indices)
        z_hat, v = split_keypoints(matched(targets, indices, "keypoints"))
        oks = keypoint_oks(out["pred_keypoints"][idx], z_hat, v, matched(targets, indices, "area")).detach()
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = matched(targets, indices, "labels")
        onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        q = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        q[idx] = oks.to(logits.dtype)
        target = q[..., None] * onehot
        weight = self.alpha * logits.detach().sigmoid().pow(self.gamma) * (1 - onehot) + target
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_keypoints(self, out, targets, indices, num_boxes):
        z = out["pred_keypoints"][batch_index(indices)]
        z_hat, v = split_keypoints(matched(targets, indices, "keypoints"))
        l1 = F.l1_loss(z, z_hat, reduction="none") * v.repeat_interleave(2, 1)
        oks = keypoint_oks(z, z_hat, v, matched(targets, indices, "area"))
        return {"loss_keypoints": l1.sum() / num_boxes, "loss_oks": (1 - oks).sum() / num_boxes}

    def weighted_terms(self, out, targets, own, union, suffix):
        """All terms of one output, weighted, names suffixed. own and union: (indices, normaliser)
        for VFL and for the keypoint terms."""
        terms = {}
        if "vfl" in self.losses:
            terms.update(self.loss_vfl(out, targets, *own))
        if "keypoints" in self.losses:
            terms.update(self.loss_keypoints(out, targets, *union))
        return {k + suffix: v * self.weight_dict[k] for k, v in terms.items() if k in self.weight_dict}

    def forward(self, outputs, targets):
        """outputs: the network's training dict (see model.DETRTransformer): pred_logits (B, Q, C),
        pred_keypoints (B, Q, 2K), aux_outputs, pre_outputs, enc_aux_outputs and, with denoising,
        dn_outputs, dn_pre_outputs, dn_meta. Returns the weighted terms; their sum is the loss."""
        device = outputs["pred_logits"].device
        layers, pre, encoder = outputs["aux_outputs"], outputs["pre_outputs"], outputs["enc_aux_outputs"]
        indices, layer_indices, pre_indices, encoder_indices, union = match_all(self.matcher, outputs, targets)
        num_union = mean_over_ranks(sum(len(q) for q, _ in union), device)
        num_boxes = mean_over_ranks(sum(len(t["labels"]) for t in targets), device)

        groups = [("", outputs, indices), *[(f"_{i}", o, ix) for i, (o, ix) in enumerate(zip(layers, layer_indices))],
                  ("_pre", pre, pre_indices),
                  *[(f"_enc_{i}", o, ix) for i, (o, ix) in enumerate(zip(encoder, encoder_indices))]]
        losses = {}
        for suffix, out, ix in groups:
            losses.update(self.weighted_terms(out, targets, (ix, num_boxes), (union, num_union), suffix))

        if "dn_outputs" in outputs:
            dn = (denoising_matches(outputs["dn_meta"], targets), num_boxes * outputs["dn_meta"]["dn_num_group"])
            for suffix, out in [*[(f"_dn_{i}", o) for i, o in enumerate(outputs["dn_outputs"])],
                                ("_dn_pre", outputs["dn_pre_outputs"])]:
                losses.update(self.weighted_terms(out, targets, dn, dn, suffix))
        return losses


def build_criterion(cfg):
    """The ECPose criterion from a preset name ("ecpose_s", ...) or a config dict in the original's
    vocabulary: {'num_classes': 2, 'DETRPoseCriterion': {'weight_dict', 'losses', 'focal_alpha',
    'num_body_points', 'matcher': {'type', 'cost_class', 'cost_keypoints', 'cost_oks',
    'focal_alpha'}}} (the section's own num_classes, when present, wins, as in the original)."""
    if isinstance(cfg, str):
        cfg = model.preset_config(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"build_criterion takes a preset name or a config dict, got {type(cfg).__name__}")
    if "DETRPoseCriterion" not in cfg:
        raise ValueError(f"config has no section 'DETRPoseCriterion' (sections present: {sorted(cfg)})")
    section = dict(cfg["DETRPoseCriterion"])
    if "matcher" not in section:
        raise ValueError("config section 'DETRPoseCriterion' has no 'matcher'")
    matcher_cfg = dict(section.pop("matcher"))
    if matcher_cfg.pop("type", "DETRPoseHungarianMatcher") != "DETRPoseHungarianMatcher":
        raise ValueError("config section 'DETRPoseCriterion': matcher type must be 'DETRPoseHungarianMatcher'")
    if "num_classes" not in section:
        if "num_classes" not in cfg:
            raise ValueError("config has no 'num_classes' (neither in 'DETRPoseCriterion' nor at the top level)")
        section["num_classes"] = cfg["num_classes"]
    try:
        return DETRPoseCriterion(DETRPoseHungarianMatcher(**matcher_cfg), **section)
    except TypeError as e:
        raise ValueError(f"config section 'DETRPoseCriterion': {e}") from None
