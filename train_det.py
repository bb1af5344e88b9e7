"""ECDet detection training: the loss (matching and the ECDet criterion).

The data pipeline and the training loop join this file later; this section only defines the
Hungarian matcher, the ECDet criterion and `build_criterion(cfg)`.
"""

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, box_iou, generalized_box_iou

import model
from model import weighting_function


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
        indices = self.matcher(outputs, targets)
        layer_indices = [self.matcher(o, targets) for o in layers]
        pre_indices = self.matcher(pre, targets)
        encoder_indices = [self.matcher(o, targets) for o in encoder]
        union = union_of_matches([indices, *layer_indices, pre_indices, *encoder_indices])
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
