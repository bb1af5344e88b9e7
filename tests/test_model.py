"""model.py: weight compatibility and numerical parity with the original implementation."""
import copy

import pytest
import torch
from conftest import COCO_IDS, load_fixture, load_schema

import model
import train_det
import train_pose
import train_seg


@pytest.mark.parametrize("name", model.PRESETS)
def test_preset_matches_released_schema(name):
    schema = load_schema(name)
    net = model.build_model(name)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == schema["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == schema["num_parameters"]
    backbone = {k: list(v.shape) for k, v in net.backbone.backbone.state_dict().items()}
    assert backbone == schema["backbone_weights_file_state_dict"]
    released = copy.deepcopy(schema["config"])
    for key in ("weights_path", "skip_load_backbone"):
        released["ViTAdapter"].pop(key)
    criterion = {"ecdet": train_det.ECCriterion, "ecseg": train_seg.ECSegCriterion, "ecpose": train_pose.DETRPoseCriterion}
    assert criterion[name.split("_")[0]].preset_config(name) == released


def test_parameter_counts_quoted_in_the_issue():
    assert sum(p.numel() for p in model.build_model("ecdet_s").parameters()) == 9_884_102
    assert sum(p.numel() for p in model.build_model("ecdet_x").parameters()) == 49_941_982


def tiny(name):
    fx = load_fixture(name)
    net = model.load_weights(model.build_model(fx["config"]), fx["state_dict"])
    return fx, net


@pytest.mark.parametrize("name", ["det_tiny", "seg_tiny"])
def test_eval_outputs_match_fixture(name):
    fx, net = tiny(name)
    with torch.no_grad():
        out = net.eval()(fx["images"])
    assert set(out) == set(fx["eval"])
    for key, ref in fx["eval"].items():
        torch.testing.assert_close(out[key], ref, atol=1e-4, rtol=0)

    results = model.postprocess(out, fx["orig_target_sizes"], fx["config"]["PostProcessor"]["num_top_queries"])
    ref = fx["postprocess"][0]
    assert [COCO_IDS[i] for i in results[0]["labels"]] == ref["labels"].tolist()
    torch.testing.assert_close(results[0]["scores"], ref["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(results[0]["boxes"], ref["boxes"], atol=1e-3, rtol=0)  # pixels
    if "mask_areas" in ref:
        assert torch.equal(results[0]["masks"].flatten(1).sum(1), ref["mask_areas"].to(torch.int64))

    with torch.no_grad():
        deployed = net.deploy()(fx["images"])
    for key, ref in fx["eval"].items():
        torch.testing.assert_close(deployed[key], ref, atol=1e-4, rtol=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_train_mode_without_denoising_gives_the_criterion_inputs():
    fx, net = tiny("det_tiny")
    assert fx["config"]["ECTransformer"]["num_denoising"] == 0
    out = net.train()(fx["images"], fx["train"]["targets"])
    assert "dn_outputs" not in out
    assert len(out["aux_outputs"]) == fx["config"]["ECTransformer"]["num_layers"] - 1
    assert out["pred_corners"].shape == (1, 40, 4 * 33)
    assert out["pre_outputs"]["pred_boxes"].shape == (1, 40, 4)
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (1, 40, 80)


def test_train_mode_with_denoising_splits_groups():
    cfg = load_fixture("seg_tiny")["config"]
    cfg["ECTransformer"]["num_denoising"] = 10
    net = model.build_model(cfg).train()
    targets = [{"labels": torch.tensor([1, 2, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]] * 3)},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.3, 0.6, 0.1, 0.1]])}]
    out = net(torch.randn(2, 3, 128, 96), targets)
    meta = out["dn_meta"]
    assert meta["dn_num_group"] == 3 and meta["dn_num_split"] == [18, 40]
    assert [len(i) for i in meta["dn_positive_idx"]] == [9, 3]
    assert out["dn_outputs"][-1]["pred_boxes"].shape == (2, 18, 4)
    assert out["dn_outputs"][-1]["pred_masks"].shape == (2, 18, 32, 24)
    assert out["pred_logits"].shape == (2, 40, 80)
    with pytest.raises(ValueError, match="targets"):
        net(torch.randn(1, 3, 64, 64))


def test_denoising_attention_mask_separates_groups():
    embed = torch.nn.Embedding(6, 4)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    _, boxes, mask, meta = model.denoising_queries(targets, 5, 3, embed, 8, 0.5, 1.0)
    N = 2 * 2 * meta["dn_num_group"]
    assert mask.shape == (N + 3, N + 3) and boxes.shape == (1, N, 4)
    assert mask[N:, :N].all() and not mask[:, N:].any()
    group = torch.arange(N) // 4
    assert torch.equal(mask[:N, :N], group[:, None] != group[None, :])


@pytest.mark.parametrize("size,batch", [((320, 320), 2), ((256, 384), 1), ((384, 224), 3)])
def test_any_multiple_of_32_and_batches(size, batch):
    fx, net = tiny("seg_tiny")
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        out = net.eval()(images)
        single = net(images[:1])
    assert out["pred_boxes"].shape == (batch, 40, 4)
    assert out["pred_masks"].shape == (batch, 40, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(out["pred_logits"][:1], single["pred_logits"], atol=1e-4, rtol=0)
    sizes = torch.tensor([[640, 480]] * batch)
    res = model.postprocess(out, sizes, num_top_queries=10)
    assert res[0]["masks"].shape == (10, 480, 640) and res[0]["boxes"].shape == (10, 4)


def test_released_checkpoint_formats_load(tmp_path):
    fx, net = tiny("det_tiny")
    sd = net.state_dict()
    for i, ckpt in enumerate([{"ema": {"module": sd, "updates": 10}, "model": {}}, {"model": sd}, sd]):
        torch.save(ckpt, tmp_path / f"ckpt{i}.pth")
        fresh = model.build_model(fx["config"])
        model.load_weights(fresh, tmp_path / f"ckpt{i}.pth")
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        model.load_weights(model.build_model(load_fixture("det_tiny")["config"]), tmp_path / "evil.pth")


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'ecdet_q'.*ecdet_s"):
        model.build_model("ecdet_q")
    cfg = load_fixture("det_tiny")["config"]
    broken = copy.deepcopy(cfg)
    del broken["HybridEncoder"]
    with pytest.raises(ValueError, match="no section 'HybridEncoder'"):
        model.build_model(broken)
    broken = copy.deepcopy(cfg)
    broken["ECTransformer"]["hiden_dim"] = 64
    with pytest.raises(ValueError, match="ECTransformer.*hiden_dim"):
        model.build_model(broken)
    broken = copy.deepcopy(cfg)
    del broken["num_classes"]
    with pytest.raises(ValueError, match="num_classes"):
        model.build_model(broken)

    net = model.build_model(cfg)
    sd = net.state_dict()
    wrong_name = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(sd.items())}
    with pytest.raises(ValueError, match="missing: backbone.backbone.register_token.*unexpected: x.backbone"):
        model.load_weights(net, wrong_name)
    wrong_shape = dict(sd, **{"decoder.enc_score_head.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"wrong shape: decoder.enc_score_head.bias: checkpoint \(3,\)"):
        model.load_weights(net, wrong_shape)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        model.load_weights(net, tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="330x320 is not a multiple of 32"):
        net.eval()(torch.zeros(1, 3, 330, 320))
