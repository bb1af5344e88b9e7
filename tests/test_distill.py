"""distill.py: distillation into ECViT on generated images, resume, several teachers, the proxy route,
and clear errors for bad input."""
import json
import os
import re

import pytest
import torch
from conftest import load_fixture, load_schema
from PIL import Image

import distill
import model
import support
import teacher

STUDENT = '{"embed_dim": 64, "depth": 3, "num_heads": 2}'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image folders (train: 16 shape pictures plus grayscale, palette and CMYK files, a corrupt
    one and a text file, in subfolders; val: 4 pictures), a teacher checkpoint in train_det's
    format with the DINOv3 fixture as backbone, and that DINOv3 as a bare state dict."""
    root = tmp_path_factory.mktemp("distill")
    data = support.make_synthetic_coco(str(root / "coco"), num_train=16, num_val=4, img_size=64, seed=2)
    train = root / "coco" / "train2017"
    (train / "more" / "deeper").mkdir(parents=True)
    first = Image.open(next(train.glob("*.jpg")))
    first.convert("L").save(train / "more" / "gray.png")
    first.convert("P").save(train / "more" / "palette.BMP")
    first.convert("CMYK").save(train / "more" / "deeper" / "cmyk.jpeg")
    (train / "more" / "deeper" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    (train / "more" / "notes.txt").write_text("not an image")

    fx = load_fixture("dinov3_tiny")
    cfg = teacher.demo_teacher_config()
    cfg["ViTAdapter"].update(dinov3=fx["config"], interaction_indexes=[2, 3])
    net = model.build_model(cfg)
    net.backbone.backbone.load_state_dict(fx["state_dict"])
    torch.save({"model": net.state_dict(), "config": cfg, "epoch": 1}, root / "teacher.pth")
    torch.save(fx["state_dict"], root / "dinov3.pth")
    (root / "arch.json").write_text(json.dumps(fx["config"]))
    return dict(root=root, train=str(train), val=f"{data}/val2017", teacher=str(root / "teacher.pth"),
                dinov3=str(root / "dinov3.pth"), arch=str(root / "arch.json"))


def run(files, out, *extra, teachers=None):
    argv = [a for t in teachers or [files["teacher"]] for a in ("--teacher", t)]
    argv += ["--images", files["train"], "--student", STUDENT, "--img-size", "64", "--batch-size", "4",
             "--warmup-epochs", "0", "--lr", "2e-3", "--workers", "0", "--device", "cpu", "--output-dir", str(out)]
    distill.main(argv + list(extra))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_distillation_lowers_the_loss_and_writes_a_backbone_model_py_loads(files, tmp_path):
    log = run(files, tmp_path, "--epochs", "6", "--val-images", files["val"])
    assert [m["unreadable_images"] for m in log] == [1] * 6  # broken.jpg, counted once
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert log[-1]["held_out_cosine"][0] > log[0]["held_out_cosine"][0] + 0.1
    vit = model.build_vit(json.loads(STUDENT))
    model.load_weights(vit, tmp_path / "student.pth")
    sd = torch.load(tmp_path / "student.pth", weights_only=True)
    assert list(sd) == list(vit.state_dict())  # the bare ViT state dict, no wrapper


def test_distillation_writes_tensorboard_events(files, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = run(files, tmp_path, "--epochs", "1", "--val-images", files["val"])
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"Loss/student", "Lr/student_pg_0", "Cosine/student_0", "Test/student_held_out_cosine_0"} <= \
        set(events.Tags()["scalars"])
    assert events.Scalars("Loss/student")[0].value == pytest.approx(log[0]["loss"])


def test_preset_student_is_written_in_the_released_ecvit_format(files, tmp_path):
    # The teacher sees 128 px (an 8x8 grid), the student 64 px (4x4): grids aligned by interpolation.
    run(files, tmp_path, "--student", "ecvitt", "--teacher-size", "128", "--epochs", "1")
    sd = torch.load(tmp_path / "student.pth", weights_only=True)
    assert {k: list(v.shape) for k, v in sd.items()} == load_schema("ecdet_s")["backbone_weights_file_state_dict"]
    net = model.build_model("ecdet_s")
    net.backbone.backbone.load_state_dict(sd)  # what train_det.py --backbone-weights does


def test_resume_repeats_the_uninterrupted_run(files, tmp_path):
    run(files, tmp_path / "whole", "--epochs", "2")
    run(files, tmp_path / "parts", "--epochs", "2", "--stop-after", "1")
    assert not (tmp_path / "parts" / "student.pth").exists()
    (tmp_path / "parts" / "log.jsonl").write_text("")  # as a kill between the checkpoint and its log line leaves it
    log = run(files, tmp_path / "parts", "--epochs", "2", "--resume", str(tmp_path / "parts" / "student_last.pth"))
    assert [m["epoch"] for m in log] == [1, 2]
    whole = torch.load(tmp_path / "whole" / "student.pth", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "student.pth", weights_only=True)
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=1e-6, msg=k)


def test_several_teachers_directly_and_through_a_proxy(files, tmp_path):
    both = [files["teacher"], files["dinov3"]]
    log = run(files, tmp_path / "direct", "--epochs", "1", teachers=both)  # the DINOv3 model from its shapes
    assert len(log[0]["cosine"]) == 2
    heads = torch.load(tmp_path / "direct" / "student_last.pth", weights_only=True)["distiller"]
    assert heads["heads.0.proj.1.weight"].shape == heads["heads.1.proj.1.weight"].shape == (64, 64)

    proxy = '{"embed_dim": 96, "depth": 3, "num_heads": 2}'
    log = run(files, tmp_path / "proxy", "--teacher-arch", files["arch"], "--proxy", proxy, "--epochs", "1",
              teachers=both)
    assert [(m["stage"], len(m["cosine"])) for m in log] == [("proxy", 2), ("student", 1)]
    model.load_weights(model.build_vit(json.loads(proxy)), tmp_path / "proxy" / "proxy.pth")
    student = torch.load(tmp_path / "proxy" / "student_last.pth", weights_only=True)["distiller"]
    assert student["heads.0.proj.0.weight"].shape == (96, 64) and "heads.1.proj.0.weight" not in student


def test_standardised_targets_give_every_teacher_the_same_weight():
    torch.manual_seed(0)
    distiller = distill.Distiller(model.ViT(embed_dim=32, depth=2, num_heads=2), [0, 1], [48, 48])
    distiller.heads[1].load_state_dict(distiller.heads[0].state_dict())
    student, grid = distill.patch_tokens(distiller.student, torch.randn(2, 3, 64, 64), [0, 1])
    tokens = [torch.randn(2, 64, 48) for _ in range(2)]
    loud = [1000 * t + 7 for t in tokens]  # the same features on another scale and offset
    (quiet_loss, quiet_cos), (loud_loss, loud_cos) = [head(student, grid, t, (8, 8))
                                                      for head, t in zip(distiller.heads, [tokens, loud])]
    torch.testing.assert_close(loud_loss, quiet_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(loud_cos, quiet_cos, rtol=1e-4, atol=0)
    flat = torch.stack([t.flatten(0, 1) for t in tokens])  # the first update takes the batch's statistics
    torch.testing.assert_close(distiller.heads[0].mean, flat.mean(1))
    torch.testing.assert_close(distiller.heads[0].var, flat.var(1))


def test_token_grids_resize_bilinearly():
    tokens = torch.arange(4.0).reshape(1, 4, 1).expand(1, 4, 3)  # a 2x2 grid
    out = distill.resize_tokens(tokens, (2, 2), (4, 4))
    assert out.shape == (1, 16, 3) and out[0, 0, 0] == 0 and out[0, -1, 0] == 3
    assert distill.resize_tokens(tokens, (2, 2), (2, 2)) is tokens


def test_bad_input_gets_one_clear_error(files, tmp_path, capsys):
    def error(*extra, out=tmp_path, teachers=None):
        with pytest.raises(SystemExit) as exit_info:
            run(files, out, *extra, teachers=teachers)
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip()

    assert re.fullmatch(r"distill.py: error: --images .*nowhere: no such folder", error("--images", str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures")
    assert re.fullmatch(r"distill.py: error: --images .*empty: no images \(.jpg, .jpeg, .png, .webp, .bmp\) in it or "
                        r"its subfolders", error("--images", str(tmp_path / "empty")))
    assert error("--student", "ecvitq").startswith("distill.py: error: --student 'ecvitq': unknown preset; expected "
                                                   "one of ecvitt, ecvittplus")
    torch.save(model.ViT(embed_dim=64, depth=2, num_heads=2).state_dict(), tmp_path / "ecvit.pth")
    assert re.match(r"distill.py: error: --teacher .*ecvit.pth is not a teacher checkpoint: expected one written by "
                    r"teacher.py", error(teachers=[str(tmp_path / "ecvit.pth")]))
    sd = torch.load(files["dinov3"], weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("qkv.bias")}, tmp_path / "no_bias.pth")
    assert re.match(r"distill.py: error: --teacher .*no_bias.pth: found width 64, depth 4, 2 heads, patch 16, 4 "
                    r"storage tokens, mlp FFN of hidden width 256, qkv bias no, .*missing: blocks.0.attn",
                    error(teachers=[str(tmp_path / "no_bias.pth")]))
    assert re.match(r"distill.py: error: --teacher .*dinov3.pth is not a dinov3_vitb16 checkpoint: .*wrong shape",
                    error("--teacher-arch", "dinov3_vitb16", teachers=[files["dinov3"]]))
    assert re.match(r"distill.py: error: --resume .*fresh/student_last.pth does not exist",
                    error("--resume", str(tmp_path / "fresh" / "student_last.pth"), out=tmp_path / "fresh"))
    assert re.match(r"distill.py: error: --resume .*fresh/last.pth: expected a run's student_last.pth",
                    error("--resume", str(tmp_path / "fresh" / "last.pth"), out=tmp_path / "fresh").splitlines()[-1])


def test_a_diverging_distillation_stops_before_writing_anything(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(files, tmp_path, "--lr", "1e6", "--epochs", "2")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and re.match(r"distill.py: error: non-finite student (loss|gradient norm) at epoch 1, "
                                                  r"step \d: loss \S+, cosine_0 \S+.*Stopped; no checkpoint was written", line)
    assert os.listdir(tmp_path) == []
