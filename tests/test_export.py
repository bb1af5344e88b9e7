"""export.py: ONNX export of the tiny ECDet / ECSeg fixtures, checked against PyTorch, and its errors."""
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import load_fixture

import export
import model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The det/seg fixtures as a user has them: a JSON config and a released-format checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for name in ("det_tiny", "seg_tiny"):
        fx = load_fixture(name)
        (root / f"{name}.json").write_text(json.dumps(fx["config"]))
        torch.save({"ema": {"module": fx["state_dict"]}}, root / f"{name}.pth")
        files[name] = ["--model", str(root / f"{name}.json"), "--weights", str(root / f"{name}.pth"),
                       "--threads", "1"]
    torch.save([torch.zeros(3)], root / "list.pth")
    files["list"] = str(root / "list.pth")
    return files


def eager(name, images, sizes):
    """What model.postprocess gives in PyTorch, per image, with mask logits (not resized)."""
    fx = load_fixture(name)
    net = model.load_weights(model.build_model(fx["config"]), fx["state_dict"]).eval()
    with torch.no_grad():
        outputs = net(images)
    return model.postprocess(outputs, sizes, fx["config"]["PostProcessor"]["num_top_queries"], resize_masks=False)


def run_onnx(path, images, sizes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))


def assert_matches_postprocess(got, ref):
    for i, r in enumerate(ref):
        assert np.array_equal(got["labels"][i], r["labels"].numpy())
        np.testing.assert_allclose(got["scores"][i], r["scores"].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["boxes"][i], r["boxes"].numpy(), atol=1e-2, rtol=0)  # pixels
        if "masks" in r:
            np.testing.assert_allclose(got["masks"][i], r["masks"].numpy(), atol=1e-3, rtol=0)


def test_ecdet_dynamic_batch_matches_pytorch_postprocess(tiny, tmp_path, capsys):
    path = tmp_path / "det.onnx"
    export.main(tiny["det_tiny"] + ["--onnx", str(path), "--img-size", "320", "--dynamic-batch", "--opset", "18"])
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version == 18
    assert [i.name for i in graph.graph.input] == ["images", "orig_target_sizes"]
    assert [o.name for o in graph.graph.output] == ["labels", "boxes", "scores"]
    images, sizes = torch.randn(3, 3, 320, 320), torch.tensor([[640, 480], [320, 320], [500, 375]])
    got = run_onnx(path, images, sizes)  # exported at batch 1, run at batch 3
    assert got["boxes"].shape == (3, 40, 4) and got["labels"].dtype == np.int64
    assert_matches_postprocess(got, eager("det_tiny", images, sizes))


def test_ecseg_exports_mask_logits_and_benchmarks(tiny, tmp_path, capsys):
    path = tmp_path / "seg.onnx"
    export.main(tiny["seg_tiny"] + ["--onnx", str(path), "--img-size", "256", "320", "--benchmark", "--runs", "2"])
    out = capsys.readouterr().out
    for row in ("PyTorch eager, eval model", "PyTorch eager, deployed", "ONNX Runtime CPU"):
        assert row in out
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert not ops & {"Constant", "Identity", "Shape"}  # a static graph keeps no constant arithmetic
    assert "ScatterND" not in ops  # in-place writes into slices export as scatters, slow in ONNX Runtime
    images, sizes = torch.randn(1, 3, 256, 320), torch.tensor([[500, 400]])
    got = run_onnx(path, images, sizes)
    assert got["masks"].shape == (1, 40, 64, 80)
    assert_matches_postprocess(got, eager("seg_tiny", images, sizes))
    with pytest.raises(Exception, match="orig_target_sizes"):  # a static export keeps batch 1
        run_onnx(path, images.repeat(2, 1, 1, 1), sizes.repeat(2, 1))


@pytest.mark.parametrize("case, args, message", [
    ("checkpoint of another model", ["--weights", "{seg_weights}"], "--weights .* does not match the model"),
    ("size not a multiple of 32", ["--img-size", "300"], "--img-size 300 300: .* multiples of 32"),
    ("output directory missing", ["--onnx", "{tmp}/missing/det.onnx"], "--onnx .*missing/det.onnx: cannot write"),
    ("output path is a directory", ["--onnx", "{tmp}"], "is a directory"),
    ("unknown preset", ["--model", "ecdet_xxl"], "neither a preset"),
    ("a list saved as the checkpoint", ["--weights", "{list}"], "--weights .*list.pth: the checkpoint holds a list"),
    ("no timed runs", ["--runs", "0"], "--runs must be at least 1, got 0"),
])
def test_bad_arguments_fail_with_a_clear_error(tiny, tmp_path, capsys, case, args, message):
    seg_weights = tiny["seg_tiny"][3]
    args = [a.format(seg_weights=seg_weights, tmp=tmp_path, list=tiny["list"]) for a in args]
    base = tiny["det_tiny"] + ["--onnx", str(tmp_path / "det.onnx")]
    with pytest.raises(SystemExit) as error:
        export.main(base + args)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line, where it prints one
    assert error.value.code == 2 and err.startswith("export.py: error: ") and re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(export.tensorrt_missing() is None, reason="TensorRT is usable on this machine")
def test_tensorrt_request_without_tensorrt_names_the_trtexec_command(tiny, tmp_path, capsys):
    onnx_path, engine = tmp_path / "det.onnx", tmp_path / "det.engine"
    with pytest.raises(SystemExit):
        export.main(tiny["det_tiny"] + ["--onnx", str(onnx_path), "--trt", str(engine), "--fp16", "--dynamic-batch"])
    message = capsys.readouterr().err
    assert f"trtexec --onnx={onnx_path} --saveEngine={engine}" in message
    assert "--maxShapes=images:16x3x320x320,orig_target_sizes:16x2 --fp16" in message
    assert onnx_path.exists() and not engine.exists()  # the verified ONNX file is what trtexec needs


def test_failed_verification_leaves_no_file(tiny, tmp_path, monkeypatch, capsys):
    path = tmp_path / "det.onnx"
    path.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, is now too large
    with pytest.raises(SystemExit):
        export.main(tiny["det_tiny"] + ["--onnx", str(path)])
    message = capsys.readouterr().err
    assert "ONNX Runtime differs from PyTorch" in message
    assert "scores: max |diff|" in message and "px on the 640-pixel side" in message
    assert path.read_bytes() == b"an earlier export"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_comparison_pairs_near_tied_detections_and_catches_wrong_labels():
    ref = {"labels": np.array([[3, 5, 7, 1]]), "scores": np.array([[0.9, 0.5, 0.4999999, 0.1]]),
           "boxes": np.array([[[0, 0, 64, 48], [10, 10, 20, 20], [30, 30, 40, 40], [0, 0, 1, 1]]], dtype=np.float32)}
    swapped = {k: v[:, [0, 2, 1, 3]] for k, v in ref.items()}  # the near-tie ranked the other way
    sizes = np.array([[640, 480]])
    diff = export.differences(ref, swapped, sizes, 1e-3)
    assert diff["labels"] == 0 and diff["boxes"] == 0 and diff["scores"] < 1e-6
    wrong = {**ref, "labels": np.array([[3, 6, 7, 1]])}
    assert export.differences(ref, wrong, sizes, 1e-3)["labels"] == 1
    moved = {**ref, "boxes": ref["boxes"] + np.array([1.28, 0, 0, 0], dtype=np.float32)}
    assert export.differences(ref, moved, sizes, 1e-3)["boxes"] == pytest.approx(1.28 / 640)


def test_ecpose_exports_with_keypoints(tmp_path):
    fx = load_fixture("pose_tiny")
    path = tmp_path / "pose.onnx"
    torch.save(fx["state_dict"], tmp_path / "pose.pth")
    (tmp_path / "pose.json").write_text(json.dumps(fx["config"]))
    export.main(["--model", str(tmp_path / "pose.json"), "--weights", str(tmp_path / "pose.pth"),
                 "--onnx", str(path), "--img-size", "320"])
    session = export.ort_session(str(path))
    assert [o.name for o in session.get_outputs()] == ["labels", "scores", "keypoints"]
    labels, scores, keypoints = session.run(None, {"images": fx["images"].numpy(),
                                                   "orig_target_sizes": fx["orig_target_sizes"].long().numpy()})
    ref = fx["postprocess"][0]
    assert keypoints.shape == (1, 20, 17, 2) and labels.tolist()[0] == ref["labels"].tolist()
    np.testing.assert_allclose(keypoints[0], ref["keypoints"].view(20, 17, 3)[..., :2].numpy(), atol=1e-2)
