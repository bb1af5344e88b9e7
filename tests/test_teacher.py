"""teacher.py: DINOv3 parity with the original, the released hub layouts, and the teacher ECDet stage."""
import json
import re

import pytest
import torch
from conftest import load_fixture, load_schema

import model
import support
import teacher
import train_det as td

RELEASED = list(load_schema("dinov3"))  # the hub models whose released files' names and shapes are at hand


def tiny_dinov3():
    fx = load_fixture("dinov3_tiny")
    vit = teacher.build_dinov3(fx["config"])  # the parity API's name (../shared/parity/README.md)
    vit.load_state_dict(fx["state_dict"], strict=True)
    return fx, vit.eval()


def test_dinov3_matches_the_original_on_the_fixture():
    fx, vit = tiny_dinov3()
    assert isinstance(vit, model.ViT) and vit.dinov3
    with torch.no_grad():
        last2 = vit.get_intermediate_layers(fx["images"], n=2, return_class_token=True)
        raw = vit.get_intermediate_layers(fx["images"], n=[0, len(vit.blocks) - 1], norm=False)
        features = vit.forward_features(fx["images"])
    for (patches, cls), ref_patches, ref_cls in zip(last2, fx["last2_normed_patch_tokens"], fx["last2_normed_cls"]):
        torch.testing.assert_close(patches, ref_patches, atol=1e-4, rtol=0)
        torch.testing.assert_close(cls, ref_cls, atol=1e-4, rtol=0)
    for ours, ref in zip(raw, fx["first_and_last_raw_patch_tokens"], strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        torch.testing.assert_close(features[key], fx[key], atol=1e-4, rtol=0)
    reshaped = vit.get_intermediate_layers(fx["images"], n=1, reshape=True)[0]
    assert reshaped.shape == (1, 64, 14, 14)


@pytest.mark.parametrize("name", RELEASED)
def test_hub_models_match_the_released_layout(name):
    schema = load_schema("dinov3")[name]
    with torch.device("meta"):
        vit = model.build_dinov3(name)
    assert {k: list(v.shape) for k, v in vit.state_dict().items()} == schema["state_dict"]
    assert sum(p.numel() for p in vit.parameters()) == schema["num_parameters"]
    assert vit.rope_embed.rescale == 2 and vit.blocks[0].norm1.eps == 1e-5


def meta(shapes):
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_the_hub_model_of_a_state_dict_follows_from_its_names_and_shapes():
    for name, schema in load_schema("dinov3").items():
        assert teacher.infer_dinov3(meta(schema["state_dict"])) == name
    assert set(model.DINOV3_HUB) == {*RELEASED, "dinov3_vith16plus"}
    with torch.device("meta"):
        vith = model.build_dinov3("dinov3_vith16plus")
    assert teacher.infer_dinov3(vith.state_dict()) == "dinov3_vith16plus"
    # The DINOv3 paper's ViT-H+ has 840 M parameters; a SwiGLU of 5120 hidden units
    assert sum(p.numel() for p in vith.parameters()) == 840_633_600 and vith.blocks[0].mlp.w1.out_features == 5120


def test_another_dinov3_size_gives_its_kwargs_and_loads():
    fx = load_fixture("dinov3_tiny")
    kwargs = teacher.infer_dinov3(fx["state_dict"])
    shown = ("embed_dim", "depth", "num_heads", "ffn_ratio", "ffn_layer", "patch_size", "n_storage_tokens",
             "mask_k_bias", "layerscale_init")
    assert {k: kwargs[k] for k in shown} == {k: fx["config"][k] for k in shown}
    model.build_dinov3(kwargs).load_state_dict(fx["state_dict"], strict=True)
    swiglu = model.dinov3_shapes({**fx["config"], "embed_dim": 96, "num_heads": 3, "ffn_layer": "swiglu",
                                    "ffn_ratio": 5, "n_storage_tokens": 1, "layerscale_init": None})
    kwargs = teacher.infer_dinov3(swiglu)
    assert (kwargs["num_heads"], kwargs["ffn_ratio"], kwargs["n_storage_tokens"], kwargs["layerscale_init"]) == (3, 5, 1, None)


def test_a_state_dict_that_fits_no_dinov3_names_what_it_holds():
    # vit7b16's kind: no qkv bias, a SwiGLU aligned to 64, an untied class-token norm
    sd = {k: v for k, v in model.dinov3_shapes("dinov3_vits16plus").items() if not k.endswith("qkv.bias")}
    sd["local_cls_norm.weight"] = torch.empty(384, device="meta")
    with pytest.raises(ValueError, match=r"^found width 384, depth 12, 6 heads, patch 16, 4 storage tokens, swiglu "
                                         r"FFN of hidden width 1536, qkv bias no, masked key bias yes, layer scale "
                                         r"yes, untied local_cls_norm: not a DINOv3 ViT .*dinov3_vith16plus.*missing: "
                                         r"blocks.0.attn.qkv.bias.*unexpected: local_cls_norm.weight"):
        teacher.infer_dinov3(sd)
    with pytest.raises(ValueError, match=r"found width 0, depth 2, unknown \(no RoPE periods\) heads"):
        teacher.infer_dinov3(model.ViT(embed_dim=64, depth=2, num_heads=2).state_dict())  # an ECViT


def test_unsupported_dinov3_settings_are_refused():
    base = load_fixture("dinov3_tiny")["config"]
    for change, message in [({"untie_cls_and_patch_norms": True}, "untie_cls_and_patch_norms=True"),
                            ({"norm_layer": "rmsnorm"}, "norm_layer='rmsnorm'"),
                            ({"ffn_layer": "swiglu64"}, "ffn_layer='swiglu64'"),
                            ({"pos_embed_rope_dtype": "bf16"}, "pos_embed_rope_dtype='bf16'"),
                            ({"qkv_bias": False}, "qkv_bias=False"),
                            ({"n_storage_tokens": 0}, "n_storage_tokens=0"),
                            ({"untie": True}, "unknown DINOv3 kwargs \\['untie'\\]")]:
        with pytest.raises(ValueError, match=message):
            model.build_dinov3({**base, **change})
    with pytest.raises(ValueError, match="unknown DINOv3 model 'dinov3_vitz16'.*dinov3_vitb16"):
        model.build_dinov3("dinov3_vitz16")


def test_a_dinov3_file_of_another_architecture_gets_one_clear_error(tmp_path):
    fx = load_fixture("dinov3_tiny")
    with pytest.raises(ValueError, match="x.pth is not a dinov3_vitb16 checkpoint: .*wrong shape: cls_token"):
        teacher.load_dinov3(fx["state_dict"], "dinov3_vitb16", "x.pth")
    vits = {k: torch.empty(v.shape) for k, v in model.dinov3_shapes("dinov3_vits16").items()}
    with pytest.raises(ValueError, match="not a dinov3_vits16plus checkpoint: .*it matches dinov3_vits16$"):
        teacher.check_dinov3(vits, "dinov3_vits16plus", "y.pth")
    torch.save(fx["state_dict"], tmp_path / "tiny.pth")
    vit = teacher.load_dinov3(str(tmp_path / "tiny.pth"), fx["config"])
    assert torch.equal(vit.cls_token, fx["state_dict"]["cls_token"])


def test_teacher_ecdet_has_a_dinov3_backbone_and_trains_every_parameter():
    cfg = teacher.teacher_config("dinov3_vitl16")
    assert cfg["ViTAdapter"] == {"dinov3": "dinov3_vitl16", "interaction_indexes": [22, 23], "proj_dim": 256}
    assert cfg["HybridEncoder"] == model.preset_config("ecdet_x")["HybridEncoder"]
    cfg = teacher.demo_teacher_config()
    cfg["ECTransformer"]["num_denoising"] = 0
    net = model.build_model(cfg)
    vit = net.backbone.backbone
    assert vit.dinov3 and len(vit.blocks) == 6 and net.backbone.interaction_indexes == [4, 5]
    images = torch.randn(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    losses = td.build_criterion(cfg)(net.train()(images, targets), targets)
    sum(losses.values()).backward()
    # DDP waits for a gradient of every trainable parameter: the unused final norm and mask token
    # must be frozen, everything else must receive one.
    no_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not vit.norm.weight.requires_grad and not vit.mask_token.requires_grad


def test_teacher_stage_loads_dinov3_weights_and_writes_a_checkpoint(tmp_path, capsys):
    fx = load_fixture("dinov3_tiny")
    torch.save(fx["state_dict"], tmp_path / "dinov3_tiny.pth")
    (tmp_path / "arch.json").write_text(json.dumps(fx["config"]))
    # 128 px: the teacher's ECDet-X decoder selects 300 queries among the 16^2 + 8^2 + 4^2 positions.
    data = support.make_synthetic_coco(str(tmp_path / "coco"), num_train=4, num_val=2, img_size=128)
    out = tmp_path / "out"
    common = ["--data", data, "--img-size", "128", "--batch-size", "2", "--epochs", "1", "--workers", "0",
              "--device", "cpu", "--output-dir", str(out)]
    # lr 0 keeps the weights as loaded, so the checkpoint shows what the run started from.
    teacher.main(["--dinov3", str(tmp_path / "dinov3_tiny.pth"), "--arch", str(tmp_path / "arch.json"),
                  "--lr", "0", "--backbone-lr", "0"] + common)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["config"]["ViTAdapter"]["dinov3"] == fx["config"] and ckpt["epoch"] == 1
    for k, v in fx["state_dict"].items():
        assert torch.equal(ckpt["model"][f"backbone.backbone.{k}"], v), k
    for arch, message in (("dinov3_vits16", "--dinov3 .*dinov3_tiny.pth is not a dinov3_vits16 checkpoint"),
                          ("dinov3_vitq16", "--arch dinov3_vitq16: unknown DINOv3 model")):
        with pytest.raises(SystemExit) as exit_info:
            teacher.main(["--dinov3", str(tmp_path / "dinov3_tiny.pth"), "--arch", arch] + common)
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the first run's progress bars
        assert exit_info.value.code == 2 and re.match(f"teacher.py: error: {message}", error), error


def test_demo_teacher_takes_another_dinov3(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(support, "demo", lambda args, train, cfg: seen.update(cfg=cfg, seed=args.seed))
    teacher.main(["--demo"])
    assert seen["cfg"]["ViTAdapter"] == {"dinov3": teacher.DEMO_DINOV3, "interaction_indexes": [4, 5], "proj_dim": 64}
    arch = {**teacher.DEMO_DINOV3, "embed_dim": 128, "depth": 4, "num_heads": 4}  # the EUPE evidence's second teacher
    (tmp_path / "b.json").write_text(json.dumps(arch))
    teacher.main(["--demo", "--arch", str(tmp_path / "b.json"), "--seed", "1"])
    assert seen["cfg"]["ViTAdapter"] == {"dinov3": arch, "interaction_indexes": [2, 3], "proj_dim": 64}
    assert seen["seed"] == 1
