"""ECPose: the DETRPose decoder in model.py and the loss in train_pose.py against the original."""
import copy
import itertools
import math
import re

import pytest
import torch
from conftest import load_fixture, load_schema

import model
import train_pose


@pytest.fixture(scope="module")
def pose_tiny():
    fx = load_fixture("pose_tiny")
    return fx, model.load_weights(model.build_model(fx["config"]), fx["state_dict"])


def person(n, visible=1.0):
    """n random persons in the target format, visibility `visible` for every keypoint."""
    xy = torch.rand(n, 34) * 0.6 + 0.2
    return {"labels": torch.ones(n, dtype=torch.int64), "boxes": torch.rand(n, 4) * 0.3 + 0.2,
            "keypoints": torch.cat([xy, torch.full((n, 17), visible)], 1), "area": torch.rand(n) * 0.1 + 0.01}


def test_ecpose_presets_are_the_released_ones():
    # test_model.py checks every preset in model.PRESETS against its schema (names, shapes, count, config).
    assert [p for p in model.PRESETS if p.startswith("ecpose")] == ["ecpose_s", "ecpose_m", "ecpose_l", "ecpose_x"]
    net = model.build_model("ecpose_s")
    assert sum(p.numel() for p in net.parameters()) == 9_989_871
    assert net.state_dict()["decoder.valid_mask"].sum() > 0  # the released name holds the invalid anchors
    schema = load_schema("ecpose_s")["config"]
    assert model.preset_config("ecpose_s")["DETRTransformer"] == schema["DETRTransformer"]
    assert model.preset_config("ecpose_m")["DETRTransformer"]["dim_feedforward"] == 512  # not ECDet-M's 1024


def test_eval_deploy_and_postprocess_match_fixture(pose_tiny):
    fx, net = pose_tiny
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        out = net(fx["images"])
        deployed = net.deploy()(fx["images"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for outputs in (out, deployed):
        assert set(outputs) == set(fx["eval"])
        for key, ref in fx["eval"].items():
            torch.testing.assert_close(outputs[key], ref, atol=1e-4, rtol=0)

    num_select = fx["config"]["DETRPosePostProcessor"]["num_select"]
    results, ref = model.postprocess(out, fx["orig_target_sizes"], num_select), fx["postprocess"][0]
    assert torch.equal(results[0]["labels"], ref["labels"])  # class indices, not remapped
    torch.testing.assert_close(results[0]["scores"], ref["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(results[0]["keypoints"], ref["keypoints"], atol=1e-3, rtol=0)  # pixels
    assert torch.equal(results[0]["keypoints"][:, 2::3], torch.ones(20, 17))


def test_train_loss_matches_fixture(pose_tiny):
    fx, net = pose_tiny
    outputs = net.train()(fx["images"])
    assert not any(k.startswith("dn_") for k in outputs)  # no targets, no denoising queries
    assert len(outputs["aux_outputs"]) == fx["config"]["DETRTransformer"]["num_decoder_layers"] - 1
    assert outputs["pre_outputs"]["pred_keypoints"].shape == (1, 20, 34)
    assert outputs["enc_aux_outputs"][0]["pred_logits"].shape == (1, 20, 2)

    losses = train_pose.build_criterion(fx["config"])(outputs, fx["train"]["targets"])
    # The original names the earlier decoder layers' terms `_{i}`; this project, as ECDet, `_aux_{i}`.
    ref = {re.sub(r"^(loss_(vfl|keypoints|oks))_(\d+)$", r"\1_aux_\3", k): v for k, v in fx["train"]["losses"].items()}
    assert set(losses) == set(ref)
    for key in ref:
        assert losses[key].item() == pytest.approx(float(ref[key]), rel=1e-4), key
    total = sum(losses.values())
    assert total.item() == pytest.approx(float(fx["train"]["total"]), rel=1e-4)
    total.backward()
    assert net.decoder.tgt_embed.weight.grad.abs().sum() > 0


def test_non_square_inputs_and_batches(pose_tiny):
    _, net = pose_tiny
    for size, batch in [((128, 192), 2), ((192, 96), 3)]:
        images = torch.randn(batch, 3, *size)
        with torch.no_grad():
            out = net.eval()(images)
            single = net(images[1:2])
        assert out["pred_logits"].shape == (batch, 20, 2) and out["pred_keypoints"].shape == (batch, 20, 34)
        torch.testing.assert_close(out["pred_keypoints"][1:2], single["pred_keypoints"], atol=1e-5, rtol=0)
        res = model.postprocess(out, torch.tensor([[640, 480]] * batch), num_top_queries=7)
        assert res[-1]["keypoints"].shape == (7, 51)
        assert res[-1]["keypoints"][:, 0::3].max() <= 640 * 1.5  # pixel x, scaled by the width


def oks_loop(pred, gt, visible, area):
    """COCO's OKS of one pose pair, term by term."""
    num = sum(visible[k] * math.exp(-((pred[2 * k] - gt[2 * k]) ** 2 + (pred[2 * k + 1] - gt[2 * k + 1]) ** 2)
                                    / (2 * area * (2 * model.COCO_SIGMAS[k].item()) ** 2)) for k in range(17))
    return max(num / (sum(visible) + 1e-6), 1e-6)


def test_oks_and_keypoint_l1_against_loops():
    torch.manual_seed(1)
    pred, gt = torch.rand(3, 34).double(), torch.rand(2, 34).double()
    visible, area = (torch.rand(2, 17) > 0.4).double(), torch.rand(2).double() * 0.2
    visible[1] = 0  # no visible keypoint: OKS bottoms out at 1e-6
    pairwise = train_pose.keypoint_oks(pred[:, None], gt[None], visible, area)
    for i, j in itertools.product(range(3), range(2)):
        assert pairwise[i, j].item() == pytest.approx(oks_loop(pred[i].tolist(), gt[j].tolist(), visible[j].tolist(),
                                                               area[j].item()), rel=1e-6)
    assert pairwise[:, 1].eq(1e-6).all()

    # The keypoint terms of one output, matched queries 2 and 0 to persons 0 and 1.
    criterion = train_pose.build_criterion("ecpose_s")
    out = {"pred_logits": torch.zeros(1, 3, 2), "pred_keypoints": pred[None].float()}
    target = {"labels": torch.ones(2, dtype=torch.int64), "keypoints": torch.cat([gt, visible], 1).float(),
              "area": area.float()}
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]
    losses = criterion.loss_keypoints(out, [target], indices, num_boxes=2.0)
    l1 = sum(visible[j, k] * (abs(pred[i, 2 * k] - gt[j, 2 * k]) + abs(pred[i, 2 * k + 1] - gt[j, 2 * k + 1]))
             for i, j in ((2, 0), (0, 1)) for k in range(17)) / 2
    assert losses["loss_keypoints"].item() == pytest.approx(l1.item(), rel=1e-5)
    oks = (1 - pairwise[2, 0]) + (1 - pairwise[0, 1])
    assert losses["loss_oks"].item() == pytest.approx(oks.item() / 2, rel=1e-5)


def test_matcher_finds_the_cheapest_assignment():
    torch.manual_seed(2)
    matcher = train_pose.DETRPoseHungarianMatcher(cost_class=2.0, cost_keypoints=10.0, cost_oks=4.0)
    outputs = {"pred_logits": torch.randn(2, 4, 2), "pred_keypoints": torch.rand(2, 4, 34)}
    targets = [person(2), person(3, visible=0.0)]
    targets[0]["keypoints"][0, 34:40] = 0
    for b, ((q, o), t) in enumerate(zip(matcher(outputs, targets), targets)):
        p = outputs["pred_logits"][b].sigmoid()

        def cost(i, j):
            pi = p[i, t["labels"][j]]
            focal = 0.25 * (1 - pi) ** 2 * -(pi + 1e-8).log() - 0.75 * pi ** 2 * -(1 - pi + 1e-8).log()
            v = t["keypoints"][j, 34:]
            l1 = ((outputs["pred_keypoints"][b, i] - t["keypoints"][j, :34]).abs() * v.repeat_interleave(2)).sum()
            oks = oks_loop(outputs["pred_keypoints"][b, i].tolist(), t["keypoints"][j, :34].tolist(), v.tolist(),
                           t["area"][j].item())
            return 2 * focal + 10 * l1 + 4 * (1 - oks)

        n = len(t["labels"])
        best = min(sum(cost(i, j) for j, i in enumerate(perm)) for perm in itertools.permutations(range(4), n))
        assert sorted(o.tolist()) == list(range(n))
        assert sum(cost(i, j) for i, j in zip(q.tolist(), o.tolist())).item() == pytest.approx(best.item(), rel=1e-5)


def test_denoising_queries_follow_the_original():
    torch.manual_seed(3)
    embed, pose_embed = torch.nn.Embedding(81, 8), torch.nn.Embedding(17, 8)
    targets = [person(3), {k: v[:0] for k, v in person(1).items()}, person(2)]
    targets[2]["keypoints"][:, 34:38] = 0
    content, ref, mask, meta = model.keypoint_denoising_queries(targets, 5, embed, pose_embed, (320, 320))
    G, groups = 3, 20 // 3
    N = 2 * G * groups
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [N, 5]
    assert content.shape == (3, N, 18, 8) and ref.shape == (3, N, 18, 2)
    assert torch.equal(meta["dn_positive_idx"][2], (2 * G * torch.arange(groups)[:, None] + torch.arange(2)).flatten())
    assert meta["dn_positive_idx"][1].numel() == 0
    group = torch.arange(N) // (2 * G)
    assert mask[N:, :N].all() and not mask[:, N:].any() and torch.equal(mask[:N, :N], group[:, None] != group[None, :])
    assert (ref[1] == 0.5).all() and (content[1] == 0).all()  # an image without persons has only empty slots

    t = targets[2]
    for copy_ in range(2 * groups):
        slots = ref[2, copy_ * G: copy_ * G + 2]
        centre = (t["boxes"][:, :2] + t["boxes"][:, 2:]) / 2  # the original's centre of a cx, cy, w, h box
        torch.testing.assert_close(slots[:, 0], centre)
        keypoints = t["keypoints"][:, :34].unflatten(-1, (17, 2))
        torch.testing.assert_close(slots[:, 1:5], keypoints[:, :4])  # invisible keypoints stay put
        assert (slots[:, 5:] >= keypoints[:, 4:] - 1e-6).all()  # the others move right and down only
        torch.testing.assert_close(content[2, copy_ * G, 1:], pose_embed.weight)


def test_empty_targets_and_invisible_persons_give_finite_losses(pose_tiny):
    fx, net = pose_tiny
    net = copy.deepcopy(net).train()
    criterion = train_pose.build_criterion(fx["config"])
    images = torch.randn(2, 3, 128, 96)
    invisible = person(2, visible=0.0)
    empty = {k: v[:0] for k, v in invisible.items()}
    for targets in ([empty, invisible], [empty, empty]):
        for given in (None, targets):
            outputs = net(images, given)
            assert ("dn_outputs" in outputs) == (given is not None and any(len(t["labels"]) for t in targets))
            losses = criterion(outputs, targets)
            if "dn_outputs" in outputs:
                assert {"loss_vfl_dn_0", "loss_oks_dn_pre", "loss_keypoints_dn_2"} <= set(losses)
            assert all(torch.isfinite(v) for v in losses.values())
            net.zero_grad()
            sum(losses.values()).backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_denoising_losses_pair_positives_with_their_persons(pose_tiny):
    fx, net = pose_tiny
    targets = [person(2), person(1)]
    torch.manual_seed(4)
    outputs = copy.deepcopy(net).train()(torch.randn(2, 3, 128, 128), targets)
    assert outputs["dn_outputs"][-1]["pred_keypoints"].shape == (2, 2 * 2 * 10, 34)
    criterion = train_pose.build_criterion(fx["config"])
    losses = criterion(outputs, targets)
    last = outputs["dn_outputs"][-1]
    positives = outputs["dn_meta"]["dn_positive_idx"]
    indices = [(q, torch.arange(len(t["labels"])).repeat(10)) for q, t in zip(positives, targets)]
    expected = criterion.loss_keypoints(last, targets, indices, num_boxes=3.0 * 10)["loss_keypoints"] * 10.0
    torch.testing.assert_close(losses["loss_keypoints_dn_2"], expected)


def test_bad_configs_get_clear_errors():
    cfg = load_fixture("pose_tiny")["config"]
    broken = copy.deepcopy(cfg)
    broken["DETRTransformer"]["num_querries"] = 5
    with pytest.raises(ValueError, match="DETRTransformer.*num_querries"):
        model.build_model(broken)
    broken = copy.deepcopy(cfg)
    del broken["DETRTransformer"]["two_stage_type"]  # the original's default 'no' was never released
    with pytest.raises(ValueError, match="two_stage_type='no' is not implemented"):
        model.build_model(broken)
    broken = copy.deepcopy(cfg)
    broken["DETRPoseCriterion"]["losses"] = ["vfl", "keypoints", "local"]
    with pytest.raises(ValueError, match="local"):
        train_pose.build_criterion(broken)
    broken = copy.deepcopy(cfg)
    broken["DETRPoseCriterion"]["matcher"]["cost_box"] = 1.0
    with pytest.raises(ValueError, match="DETRPoseCriterion.*cost_box"):
        train_pose.build_criterion(broken)
    with pytest.raises(ValueError, match="no section 'DETRPoseCriterion'"):
        train_pose.build_criterion(model.preset_config("ecdet_s"))
    with pytest.raises(ValueError, match="unknown preset"):
        train_pose.build_criterion("ecpose_q")
