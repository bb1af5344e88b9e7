"""The GPU paths, as far as a CPU can check them: the attention dtype under autocast, predict.py's
--cuda-graph (refused without CUDA; on a CUDA machine the graph against eager), and a smoke run of
benchmarks/gpu.py."""
import json
import subprocess
import sys

import pytest
import torch

import model
import predict
import train_det as td
from conftest import ROOT

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- autocast: float32 attention on the CPU only ----

def test_attention_dtype_policy():
    assert model.attention_dtype("cpu") is None and model.attention_dtype("cuda") is None  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.attention_dtype("cpu") == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        # CUDA's autocast state is a flag per thread, which can be set without a GPU
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        try:
            assert model.attention_dtype("cuda") == dtype
        finally:
            torch.set_autocast_enabled("cuda", False)


def test_cpu_autocast_runs_attention_in_float32(monkeypatch):
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v))
    attention, x = model.Attention(32, 2), torch.randn(1, 5, 32)
    rope = model.RoPE2D(16)(2, 2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(x, rope)
    attention(x, rope)
    assert seen == [torch.float32, torch.float32] and y.dtype == torch.bfloat16  # the projection stays in autocast


# ---- predict.py --cuda-graph ----

def test_reference_point_cells_are_made_once_per_size_and_mode():
    """ECPose's deformable attention keeps its cell sizes (no host-to-device copy per forward, which a
    CUDA graph cannot capture); those made under inference mode never reach autograd."""
    attention, shapes = model.MSDeformableAttention(32, 2, (2, 2, 2), box_reference=False), [[4, 4], [2, 2], [1, 1]]
    query, ref = torch.randn(1, 5, 32), torch.rand(1, 5, 1, 2)
    values = model.split_values(torch.randn(1, 21, 32), shapes, 2)
    with torch.inference_mode():
        expected = attention(query, ref, values, shapes)
        attention(query, ref, values, shapes)
    got = attention(query.requires_grad_(), ref, values, shapes)
    got.sum().backward()
    assert torch.allclose(got, expected) and query.grad is not None and len(attention.cells) == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = td.demo_config()
    cfg["num_classes"], cfg["eval_spatial_size"] = 3, [64, 64]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("graph") / "det.pth"
    torch.save({"model": model.build_model(cfg).eval().state_dict(), "config": cfg}, path)
    return str(path)


def test_cuda_graph_needs_a_cuda_device(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        predict.Predictor(checkpoint, device="cpu", cuda_graph=True)
    image = tmp_path / "a.jpg"
    td.Image.new("RGB", (80, 60)).save(image)
    with pytest.raises(SystemExit) as exit:
        predict.main(["--weights", checkpoint, "--source", str(image), "--output-dir", str(tmp_path / "out"),
                      "--cuda-graph"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and "CUDA device" in err[0]


@cuda
def test_cuda_graph_matches_eager(checkpoint):
    eager = predict.Predictor(checkpoint, device="cuda", conf=0.0, batch_size=2)
    graph = predict.Predictor(checkpoint, device="cuda", conf=0.0, batch_size=2, cuda_graph=True)
    images = [td.Image.effect_noise((96, 72), 60).convert("RGB") for _ in range(3)]  # a full batch, then one image
    for a, b in zip(eager(images), graph(images)):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.allclose(a["scores"], b["scores"], atol=1e-4)


# ---- benchmarks/gpu.py ----

def test_gpu_benchmark_smoke_run(tmp_path):
    """Every row that runs without a GPU runs (the project's training and eager latency); the others say why not."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(tmp_path / "r.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["project bf16"]["images_per_s"] > 0 and results["project bf16"]["peak_gib"] is None
    assert results["latency"]["eager fp32"] > 0 and results["latency"]["eager bf16 autocast"] > 0
    assert results["original fp16"] == {"skipped": "no --original"}
    if not torch.cuda.is_available():
        assert results["compiled"] == results["project fp16"] == {"skipped": "needs CUDA"}
    assert "training project bf16" in out.stdout
