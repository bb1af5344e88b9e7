"""The ECDet loss: matcher optimality, parity with the original criterion, edge cases."""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_det
from conftest import load_fixture
from model import build_model, distance2bbox, load_weights, weighting_function
from support import mean_over_ranks
from train_det import HungarianMatcher, build_criterion, cxcywh_to_xyxy, fgl_targets, union_of_matches

# Outputs of the original ECDet in train mode (det_tiny weights, and two batches with denoising
# and without targets) and the original criterion's losses on exactly them; see the file's 'source'.
FIXTURE = torch.load(Path(__file__).parent / 'fixtures' / 'det_tiny_train_outputs.pt',
                     map_location='cpu', weights_only=True)
CONFIG = FIXTURE['config']
# DDF is a KL between nearly equal distributions: it cancels about four digits, so a last-bit
# change in the corners moves it by ~1e-4 relative (the original itself, run with 1 to 32 threads,
# lands 1e-4 to 3e-4 from det_tiny.pt). It is ~1e-5 of the total.
DDF_RTOL = 1e-3


def assert_terms_close(ours, reference, rtol=1e-6):
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        ref = float(ref)
        tol = DDF_RTOL if name.startswith('loss_ddf') else rtol
        assert abs(ours[name].item() - ref) <= tol * abs(ref), (name, ours[name].item(), ref)


# ---- matcher ----

def random_problem(g, B, Q, K, sizes):
    outputs = {'pred_logits': torch.randn(B, Q, K, generator=g),
               'pred_boxes': torch.rand(B, Q, 4, generator=g) * 0.5 + 0.1}
    targets = [{'labels': torch.randint(0, K, (n,), generator=g),
                'boxes': torch.rand(n, 4, generator=g) * 0.5 + 0.1} for n in sizes]
    return outputs, targets


def test_matcher_finds_the_cheapest_assignment():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher({'cost_class': 2, 'cost_bbox': 5, 'cost_giou': 2}, alpha=0.25, gamma=2.0)
    for _ in range(30):
        Q = int(torch.randint(1, 7, (1,), generator=g))
        sizes = [0] + torch.randint(0, 5, (2,), generator=g).tolist()
        outputs, targets = random_problem(g, 3, Q, 5, sizes)
        C = matcher.cost(outputs, targets).view(3, Q, -1).split(sizes, -1)
        for b, ((q, o), n) in enumerate(zip(matcher(outputs, targets), sizes)):
            c = C[b][b]
            assert len(q) == len(o) == min(Q, n)
            assert len(set(q.tolist())) == len(q) and len(set(o.tolist())) == len(o)
            if Q >= n:  # every object gets a query
                best = min((sum(c[qi, j] for j, qi in enumerate(p)) for p in itertools.permutations(range(Q), n)), default=0)
            else:  # every query gets an object
                best = min(sum(c[i, oj] for i, oj in enumerate(p)) for p in itertools.permutations(range(n), Q))
            assert math.isclose(float(c[q, o].sum()), float(best), rel_tol=1e-6, abs_tol=1e-6)


def test_matcher_cost_is_the_documented_formula():
    g = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher({'cost_class': 2, 'cost_bbox': 5, 'cost_giou': 2}, alpha=0.25, gamma=2.0)
    outputs, targets = random_problem(g, 1, 3, 4, [2])
    C = matcher.cost(outputs, targets)
    for i, j in [(0, 0), (2, 1)]:
        p = outputs['pred_logits'][0, i, targets[0]['labels'][j]].sigmoid().item()
        cls = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
        b, t = outputs['pred_boxes'][0, i].tolist(), targets[0]['boxes'][j].tolist()
        l1 = sum(abs(x - y) for x, y in zip(b, t))
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = cxcywh_to_xyxy(torch.tensor([b, t])).tolist()
        inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
        giou = inter / union - (hull - union) / hull
        assert math.isclose(C[i, j].item(), 2 * cls + 5 * l1 - 2 * giou, rel_tol=1e-5)


def test_union_of_matches_takes_each_querys_most_frequent_object():
    def m(q, o):
        return (torch.tensor(q), torch.tensor(o))
    layers = [[m([0, 1], [0, 1]), m([], [])],
              [m([0, 2], [0, 1]), m([], [])],
              [m([0, 2], [1, 1]), m([], [])]]
    (q, o), (q_empty, o_empty) = union_of_matches(layers)
    assert dict(zip(q.tolist(), o.tolist())) == {0: 0, 1: 1, 2: 1}
    assert q.tolist()[-1] == 1  # matched once, so after the twice-matched queries
    assert len(q_empty) == len(o_empty) == 0


def test_inverted_boxes_collapse_to_zero_size():
    # FDR can put an edge past the opposite one; the box then counts as a line, as in the original
    xyxy = cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, -0.2, 0.1], [0.5, 0.5, 0.2, 0.1]]))
    assert torch.allclose(xyxy[0], torch.tensor([0.5, 0.45, 0.5, 0.55]))
    assert torch.allclose(xyxy[1], torch.tensor([0.4, 0.45, 0.6, 0.55]))


# ---- FGL targets ----

def test_fgl_targets_interpolate_each_edge_between_two_bins():
    g = torch.Generator().manual_seed(2)
    reg_max, up, reg_scale = 32, torch.tensor([0.5]), torch.tensor([4.0])
    ref = torch.rand(50, 4, generator=g) * 0.3 + 0.35
    boxes = cxcywh_to_xyxy(ref + (torch.rand(50, 4, generator=g) - 0.5) * 0.2 * ref[:, 2:].repeat(1, 2))
    left, w_left, w_right = fgl_targets(ref, boxes, reg_max, up, reg_scale)
    W = weighting_function(reg_max, up, reg_scale)
    assert ((w_left >= 0) & (w_right >= 0)).all() and torch.allclose(w_left + w_right, torch.ones(200))
    distance = (w_left * W[left] + w_right * W[left + 1]).view(50, 4)
    assert torch.allclose(cxcywh_to_xyxy(distance2bbox(ref, distance, reg_scale)), boxes, atol=1e-5)

    far = torch.tensor([[0.5, 0.5, 0.01, 0.01]])  # edges far beyond W's range: the end bins
    left, w_left, w_right = fgl_targets(far, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), reg_max, up, reg_scale)
    assert left.tolist() == [reg_max - 1] * 4 and w_right.tolist() == [1.0] * 4


# ---- parity with the original criterion ----

@pytest.mark.parametrize('case', ['det_tiny', 'with_dn', 'no_targets'])
def test_criterion_matches_the_original_on_the_same_outputs(case):
    data = FIXTURE[case]
    losses = build_criterion(CONFIG)(data['outputs'], data['targets'])
    assert_terms_close(losses, data['original_losses'])


def test_det_tiny_parity():
    """Our network's training outputs through our criterion give det_tiny.pt's losses."""
    fx = load_fixture('det_tiny')
    net = load_weights(build_model(fx['config']), fx['state_dict']).train()
    targets = fx['train']['targets']
    losses = build_criterion(fx['config'])(net(fx['images'], targets), targets)
    assert_terms_close(losses, fx['train']['losses'], rtol=1e-5)
    total = sum(losses.values()).item()
    assert abs(total - fx['train']['total']) <= 1e-4 * fx['train']['total']


# ---- edge cases ----

def synthetic_outputs(g, sizes, Q=10, K=6, layers=3, reg_max=8, num_denoising=True):
    """Training outputs in the model's format from leaf tensors (returned for gradient checks)."""
    B = len(sizes)
    G = 2 if num_denoising and max(sizes) > 0 else 0
    D = 2 * max(sizes) * G  # denoising queries: G groups of max(sizes) positives then negatives
    leaves = {'logits': torch.randn(layers, B, D + Q, K, generator=g),
              'boxes': torch.randn(layers, B, D + Q, 4, generator=g),
              'corners': torch.randn(layers, B, D + Q, 4 * (reg_max + 1), generator=g)}
    for t in leaves.values():
        t.requires_grad_()
    logits, corners = leaves['logits'], leaves['corners']
    boxes = leaves['boxes'].sigmoid() * 0.5 + 0.1
    ref = torch.rand(B, D + Q, 4, generator=g) * 0.5 + 0.1

    def layer(i, q):
        return {'pred_logits': logits[i][:, q], 'pred_boxes': boxes[i][:, q], 'pred_corners': corners[i][:, q],
                'ref_points': ref[:, q], 'teacher_corners': corners[-1][:, q], 'teacher_logits': logits[-1][:, q]}

    match, dn = slice(D, None), slice(None, D)
    out = {k: v for k, v in layer(-1, match).items() if not k.startswith('teacher')}
    out.update(up=torch.tensor([0.5]), reg_scale=torch.tensor([4.0]),
               aux_outputs=[layer(i, match) for i in range(layers - 1)],
               pre_outputs={'pred_logits': logits[0][:, match] * 0.9, 'pred_boxes': boxes[0][:, match]},
               enc_aux_outputs=[{'pred_logits': logits[0][:, match] * 1.1, 'pred_boxes': boxes[0][:, match] * 0.9}])
    if num_denoising:
        M = max(sizes)
        out.update(dn_outputs=[layer(i, dn) for i in range(layers)],
                   dn_pre_outputs={'pred_logits': logits[0][:, dn] * 0.9, 'pred_boxes': boxes[0][:, dn]},
                   dn_meta={'dn_num_group': G, 'dn_num_split': [D, Q],
                            'dn_positive_idx': [torch.tensor([2 * M * k + j for k in range(G) for j in range(n)],
                                                             dtype=torch.int64) for n in sizes]})
    targets = [{'labels': torch.randint(0, K, (n,), generator=g),
                'boxes': torch.rand(n, 4, generator=g) * 0.4 + 0.2} for n in sizes]
    return out, targets, leaves


def criterion_for(K=6, reg_max=8):
    cfg = {**CONFIG, 'num_classes': K, 'ECCriterion': {**CONFIG['ECCriterion'], 'reg_max': reg_max}}
    return build_criterion(cfg)


@pytest.mark.parametrize('sizes, num_denoising', [([3, 0, 2], True), ([3, 0, 2], False),
                                                  ([0, 0], True), ([0, 0], False)])
def test_edge_cases_give_finite_losses_and_gradients(sizes, num_denoising):
    g = torch.Generator().manual_seed(3)
    outputs, targets, leaves = synthetic_outputs(g, sizes, num_denoising=num_denoising)
    keys_before = {k: set(v) for k, v in outputs.items() if isinstance(v, dict)}
    losses = criterion_for()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {k for k, v in outputs.items() if isinstance(v, dict)} == set(keys_before)
    assert all(set(outputs[k]) == v for k, v in keys_before.items())  # outputs are not mutated
    assert any(k.startswith('loss_mal_dn') for k in losses) == num_denoising
    assert 'loss_ddf_aux_1' in losses and 'loss_fgl_pre' not in losses and 'loss_giou_enc_0' in losses

    sum(losses.values()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())
    assert leaves['logits'].grad.abs().sum() > 0 and leaves['corners'].grad.abs().sum() > 0
    assert (leaves['boxes'].grad.abs().sum() > 0) == (max(sizes) > 0)  # boxes learn only from matches


def test_each_term_reaches_its_prediction():
    g = torch.Generator().manual_seed(4)
    outputs, targets, leaves = synthetic_outputs(g, [2, 1], num_denoising=False)
    losses = criterion_for()(outputs, targets)
    reaches = {'loss_mal': 'logits', 'loss_bbox': 'boxes', 'loss_giou': 'boxes', 'loss_fgl': 'corners',
               'loss_ddf_aux_0': 'corners'}
    for term, leaf in reaches.items():
        grad, = torch.autograd.grad(losses[term], leaves[leaf], retain_graph=True)
        assert grad.abs().sum() > 0, term


# ---- normalisation across DDP ranks ----

def _ranks_agree(rank, init_file, result_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        value = mean_over_ranks([3, 6][rank], torch.device('cpu'))
        torch.save(value, f'{result_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_number_of_boxes_is_averaged_over_ranks(tmp_path):
    assert mean_over_ranks(0, torch.device('cpu')) == 1.0  # never divide by zero
    mp.start_processes(_ranks_agree, args=(str(tmp_path / 'init'), str(tmp_path / 'n')), nprocs=2, start_method='fork')
    assert [torch.load(tmp_path / f'n.{r}') for r in range(2)] == [4.5, 4.5]


# ---- configuration ----

def test_build_criterion_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown preset 'ecdet_q'"):
        build_criterion('ecdet_q')
    with pytest.raises(TypeError, match='preset name or a config dict'):
        build_criterion(3)
    assert build_criterion('ecdet_s').weight_dict['loss_bbox'] == 5
    with pytest.raises(KeyError, match='num_classes'):
        build_criterion({'ECCriterion': CONFIG['ECCriterion']})
    no_gamma = {k: v for k, v in CONFIG['ECCriterion']['matcher'].items() if k != 'gamma'}
    with pytest.raises(KeyError, match="matcher' has no 'gamma'"):
        build_criterion({**CONFIG, 'ECCriterion': {**CONFIG['ECCriterion'], 'matcher': no_gamma}})
    with pytest.raises(ValueError, match='vfl'):
        build_criterion({**CONFIG, 'ECCriterion': {**CONFIG['ECCriterion'], 'losses': ['vfl', 'boxes']}})
    criterion = build_criterion(CONFIG)
    assert isinstance(criterion, train_det.ECCriterion) and criterion.matcher.cost_class == 2
