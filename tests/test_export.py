"""export.py: ONNX export of the tiny ECDet / ECSeg / ECPose fixtures, checked against PyTorch; INT8 and
OpenVINO exports and their agreement with FP32; COCO AP of each deployment; the benchmark; its errors."""
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import load_fixture
from PIL import Image

import export
import model
import predict
import support
import train_det as td

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the optional openvino package is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The det/seg/pose fixtures as a user has them: a JSON config and a released-format checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    files = {}
    for name in ("det_tiny", "seg_tiny", "pose_tiny"):
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


def test_ecseg_exports_mask_logits(tiny, tmp_path):
    path = tmp_path / "seg.onnx"
    export.main(tiny["seg_tiny"] + ["--onnx", str(path), "--img-size", "256", "320"])
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert not ops & {"Constant", "Identity", "Shape"}  # a static graph keeps no constant arithmetic
    assert "ScatterND" not in ops  # in-place writes into slices export as scatters, slow in ONNX Runtime
    images, sizes = torch.randn(1, 3, 256, 320), torch.tensor([[500, 400]])
    got = run_onnx(path, images, sizes)
    assert got["masks"].shape == (1, 40, 64, 80)
    assert_matches_postprocess(got, eager("seg_tiny", images, sizes))
    with pytest.raises(Exception, match="orig_target_sizes"):  # a static export keeps batch 1
        run_onnx(path, images.repeat(2, 1, 1, 1), sizes.repeat(2, 1))


def fails_with(argv, capsys):
    """The one line export.main writes to stderr when it stops with exit code 2."""
    with pytest.raises(SystemExit) as error:
        export.main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case, args, message", [
    ("checkpoint of another model", ["--weights", "{seg_weights}"], "--weights .* does not match the model"),
    ("size not a multiple of 32", ["--img-size", "300"], "--img-size 300 300: .* multiples of 32"),
    ("output directory missing", ["--onnx", "{tmp}/missing/det.onnx"], "--onnx .*missing/det.onnx: cannot write"),
    ("output path is a directory", ["--onnx", "{tmp}"], "is a directory"),
    ("unknown preset", ["--model", "ecdet_xxl"], "neither a preset"),
    ("int8 without images", ["--int8"], "--int8 needs --calib-images DIR"),
    ("calibration folder missing", ["--int8", "--calib-images", "{tmp}/nowhere"], "nowhere: not a directory"),
    ("no readable image", ["--int8", "--calib-images", "{corrupt}"], "no readable image among its 2 files"),
    ("fewer usable images than calibration needs", ["--int8", "--calib-images", "{one}"],
     "{one}: 1 readable images, fewer than the 8 that calibration and the check against FP32 need"),
    ("too few calibration images asked for", ["--int8", "--calib-images", "{one}", "--calib-count", "4"],
     "--calib-count 4: calibration needs at least 8 images"),
    ("calibration images for nothing", ["--calib-images", "{one}"], "--calib-images serves --int8"),
    ("a list saved as the checkpoint", ["--weights", "{list}"], "--weights .*list.pth holds a list"),
    ("no timed runs", ["--runs", "0"], "--runs 0: must be at least 1"),
])
def test_bad_arguments_fail_with_a_clear_error(tiny, tmp_path, tmp_path_factory, capsys, case, args, message):
    corrupt, one = tmp_path_factory.mktemp("corrupt"), tmp_path_factory.mktemp("one")
    (corrupt / "a.jpg").write_bytes(b"not a jpeg")
    (corrupt / "notes.txt").write_text("hello")
    Image.new("RGB", (40, 30)).save(one / "a.png")
    seg_weights = tiny["seg_tiny"][3]
    args = [a.format(seg_weights=seg_weights, tmp=tmp_path, corrupt=corrupt, one=one, list=tiny["list"]) for a in args]
    base = tiny["det_tiny"] + ["--onnx", str(tmp_path / "det.onnx")]
    err = fails_with(base + args, capsys)
    assert re.search(message.format(one=one), err), err
    assert list(tmp_path.iterdir()) == []


def test_a_network_that_does_not_export_is_one_line_and_no_file(tiny, tmp_path, monkeypatch, capsys):
    def unsupported(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::frobnicate", 17, 99)

    monkeypatch.setattr(export.torch.onnx, "export", unsupported)
    err = fails_with(tiny["det_tiny"] + ["--onnx", str(tmp_path / "det.onnx")], capsys)
    assert re.search(r"export.py: error: the network does not export to ONNX \(opset 17\): .*aten::frobnicate", err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(predict.tensorrt_missing() is None, reason="TensorRT is usable on this machine")
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
    session = predict.ort_session(str(path))
    assert [o.name for o in session.get_outputs()] == ["labels", "scores", "keypoints"]
    labels, scores, keypoints = session.run(None, {"images": fx["images"].numpy(),
                                                   "orig_target_sizes": fx["orig_target_sizes"].long().numpy()})
    ref = fx["postprocess"][0]
    assert keypoints.shape == (1, 20, 17, 2) and labels.tolist()[0] == ref["labels"].tolist()
    np.testing.assert_allclose(keypoints[0], ref["keypoints"].view(20, 17, 3)[..., :2].numpy(), atol=1e-2)


def test_agreement_is_coco_ap_against_fp32s_confident_detections():
    ref = {"labels": np.array([[1, 2, 1]]), "scores": np.array([[0.9, 0.8, 0.1]]),
           "boxes": np.array([[[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]], dtype=np.float32)}
    assert export.agreement(ref, ref) == (pytest.approx(1.0), 0.0, 2)  # the third scores below 0.3: no truth
    lower = {**ref, "scores": ref["scores"] - 0.1}
    assert export.agreement(ref, lower) == (pytest.approx(1.0), pytest.approx(0.1), 2)  # same ranking
    relabelled = {**ref, "labels": np.array([[1, 3, 1]])}
    assert export.agreement(ref, relabelled)[0] == pytest.approx(0.5)  # label 2's object is missed
    shifted = {**ref, "boxes": ref["boxes"] + np.array([5, 0, 5, 0], dtype=np.float32)}
    assert export.agreement(ref, shifted)[0] < 0.2  # IoU 1/3 and 3/5: found at IoU 0.5 to 0.6 at best
    assert np.isnan(export.agreement(ref, ref, min_score=0.95)[0])  # nothing to judge by
    keypoints = np.random.default_rng(0).uniform(0, 100, (1, 1, 17, 2))  # ECPose's 17, by OKS
    pose = {"labels": np.array([[0]]), "scores": np.array([[0.5]]), "keypoints": keypoints}
    assert export.agreement(pose, pose)[0] == pytest.approx(1.0)
    assert export.agreement(pose, {**pose, "keypoints": keypoints + 1})[0] == pytest.approx(1.0)  # a pixel: OKS ~1
    assert export.agreement(pose, {**pose, "keypoints": keypoints + [0, 20]})[0] == 0  # a fifth of the person


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small COCO-format data set of coloured shapes: calibration images and labelled ones."""
    return support.make_synthetic_coco(str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=4, img_size=96, seed=3)


def ranked_alike(name, root):
    """Arguments for a seeded random network of a fixture's layout whose INT8 and FP32 outputs can be
    compared by rank. A random network's scores are nearly equal everywhere, so which (query, class)
    pairs make its top 10 is decided by differences smaller than INT8's rounding. At 64x64 with two
    classes, every one of the 84 anchors is a query and every (query, class) pair is output, so each
    FP32 detection has its twin in the INT8 output: what is left to compare is what INT8 changes in each.
    Every parameter gets a little noise, as in the parity fixtures, so that those the original
    initialises to zero do something; ECPose's more, or its 17 keypoint offsets (zero at first) keep
    each person within a few pixels, and the IoU of their extents would measure rounding."""
    cfg = dict(load_fixture(name)["config"], num_classes=2, eval_spatial_size=[64, 64])
    decoder = "DETRTransformer" if "DETRTransformer" in cfg else "ECTransformer"
    cfg[decoder]["num_queries"] = 8 * 8 + 4 * 4 + 2 * 2
    cfg["DETRPosePostProcessor" if "DETRTransformer" in cfg else "PostProcessor"] = \
        {"num_select" if "DETRTransformer" in cfg else "num_top_queries": 2 * cfg[decoder]["num_queries"]}
    torch.manual_seed(0)
    net = model.build_model(cfg)
    noise = 0.1 if decoder == "DETRTransformer" else 0.02
    sd = {k: v + noise * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    torch.save(sd, root / f"{name}.pth")
    return ["--model", str(root / f"{name}.json"), "--weights", str(root / f"{name}.pth"), "--threads", "1"]


@pytest.mark.parametrize("name", ["det_tiny", "seg_tiny", "pose_tiny"])
def test_int8_export_runs_in_onnx_runtime_and_agrees_with_fp32(shapes, tmp_path, capsys, name):
    calib = tmp_path / "calib"
    calib.mkdir()
    for image in sorted((pathlib.Path(shapes) / "train2017").iterdir()):
        (calib / image.name).write_bytes(image.read_bytes())
    (calib / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    path = tmp_path / f"{name}.onnx"
    export.main(ranked_alike(name, tmp_path) + ["--onnx", str(path), "--int8", "--calib-images", str(calib)])
    out, err = capsys.readouterr()
    assert "skipped 1 files that are not readable images (broken.jpg)" in err
    assert re.search(r"ONNX Runtime int8 against FP32 on 8 images: AP (1\.000|0\.9\d\d) \(limit >= 0.9\) on FP32's \d+ detections", out)
    int8 = tmp_path / f"{name}_int8.onnx"
    onnx.checker.check_model(str(int8))
    ops = [node.op_type for node in onnx.load(int8).graph.node]
    assert ops.count("DequantizeLinear") > 40
    images, sizes = export.read_images(f"{shapes}/val2017", [64, 64], 4)  # images the calibration never saw
    ref, got = (export.run_batches(export.OrtRunner(str(f)), images, sizes, 1) for f in (path, int8))
    assert list(got) == list(ref) and all(got[k].shape == ref[k].shape for k in ref)
    # Images the check never saw, judged as the check judges (a random network: its surest detections).
    ap, diff, n = export.agreement(ref, got, 0.5 * ref["scores"].max())
    assert n > 0 and ap >= 0.8 and diff <= export.MAX_SCORE_DIFF


def test_failed_int8_check_leaves_no_int8_file(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "MIN_CHECK_AP", 1.01)  # unreachable
    err = fails_with(ranked_alike("det_tiny", tmp_path) + ["--onnx", str(tmp_path / "det.onnx"), "--int8",
                                                            "--calib-images", f"{shapes}/train2017"], capsys)
    assert re.search(r"ONNX Runtime int8 against FP32 on 8 images: AP \d\.\d+ \(limit >= 1.01\).*disagrees", err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.onnx", "det_tiny.json", "det_tiny.pth"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A weak trained detector and images like those it learnt on: the EMA weights and config of
    `train_det.py --demo` (bbox AP 0.27 on its validation images), saved as tests/fixtures/demo_det.pt,
    and fresh images of the demo's kind."""
    root = tmp_path_factory.mktemp("trained")
    fx = load_fixture("demo_det")
    torch.save(fx, root / "demo.pth")
    data = support.make_synthetic_coco(str(root / "shapes"), num_train=16, num_val=1, img_size=160, seed=5)
    return ["--weights", str(root / "demo.pth"), "--threads", "1"], f"{data}/train2017"


def test_int8_of_a_weak_trained_network_passes_and_a_broken_one_is_refused(trained, tmp_path, monkeypatch, capsys):
    weights, calib = trained
    export.main(weights + ["--onnx", str(tmp_path / "demo.onnx"), "--int8", "--calib-images", calib])
    line = re.search(r"ONNX Runtime int8 against FP32 on 16 images: AP (\d\.\d+) .* mean score difference (\S+)",
                     capsys.readouterr().out)
    assert line and float(line[1]) >= export.MIN_CHECK_AP and float(line[2]) <= export.MAX_SCORE_DIFF
    assert (tmp_path / "demo_int8.onnx").exists()

    # Activations calibrated on one blank (mean-grey) image: their ranges fit nothing the network sees.
    quantize = export.quantize_int8
    monkeypatch.setattr(export, "quantize_int8", lambda fp32, int8, images, sizes, batch, bits: quantize(
        fp32, int8, np.zeros_like(images[:1]), sizes[:1], 1, bits))
    err = fails_with(weights + ["--onnx", str(tmp_path / "broken.onnx"), "--int8", "--calib-images", calib], capsys)
    assert re.search(r"ONNX Runtime int8 against FP32 on 16 images: AP \d\.\d+ \(limit >= 0.9\).*disagrees", err)
    assert not (tmp_path / "broken_int8.onnx").exists()


def has_vnni():
    flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else []
    return "avx512_vnni" in flags or "avx_vnni" in flags


@pytest.mark.skipif(has_vnni(), reason="needs an x86 CPU without VNNI (AVX2, or AVX-512 without VNNI), where 8-bit "
                                       "INT8 weights saturate")
def test_8_bit_weights_saturate_where_the_cpu_lacks_vnni(trained, tmp_path, capsys):
    """Why the weights are 7-bit: the same export with 8-bit weights fails the check on such a CPU."""
    weights, calib = trained
    err = fails_with(weights + ["--onnx", str(tmp_path / "demo.onnx"), "--int8", "--calib-images", calib,
                                "--weight-bits", "8"], capsys)
    assert "ONNX Runtime int8 against FP32 on 16 images" in err and "disagrees too much" in err


@needs_openvino
def test_openvino_ir_in_fp32_and_int8(shapes, tmp_path, capsys):
    ov = tmp_path / "ov"
    export.main(ranked_alike("det_tiny", tmp_path) + ["--onnx", str(tmp_path / "det.onnx"), "--int8", "--calib-images",
                                    f"{shapes}/train2017", "--openvino", str(ov)])
    out = capsys.readouterr().out
    assert "OpenVINO matches PyTorch" in out and re.search(r"OpenVINO int8(\+bf16)? against FP32 on 8 images", out)
    assert sorted(p.name for p in ov.iterdir()) == ["det.bin", "det.xml", "det_int8.bin", "det_int8.xml"]
    images, sizes = export.read_images(f"{shapes}/val2017", [64, 64], 4)
    ref = export.run_batches(export.OrtRunner(str(tmp_path / "det.onnx")), images, sizes, 1)
    fp32 = export.run_batches(export.OpenVINORunner(str(ov / "det.xml"), threads=1), images, sizes, 1)
    diff = export.differences(ref, fp32, sizes, 1e-4)
    assert diff["labels"] == 0 and diff["scores"] < 1e-4 and diff["boxes"] < 1e-4
    int8 = export.run_batches(export.OpenVINORunner(str(ov / "det_int8.xml"), threads=1), images, sizes, 1)
    assert export.agreement(ref, int8, 0.5 * ref["scores"].max())[0] >= export.MIN_CHECK_AP


def test_openvino_without_the_package_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    err = fails_with(tiny["det_tiny"] + ["--onnx", str(tmp_path / "det.onnx"), "--openvino", str(tmp_path / "ov")],
                     capsys)
    assert "--openvino needs the openvino package: pip install openvino" in err
    assert list(tmp_path.iterdir()) == []


def test_coco_ap_of_a_perfect_runner_is_1(shapes):
    """coco_ap feeds the evaluator what the exported graph outputs: pixel boxes in the original image."""
    ann = f"{shapes}/annotations/instances_val2017.json"
    coco = predict.load_coco(ann)
    to_label = {c: i for i, c in enumerate(sorted(coco.cats))}
    truth = iter(sorted(coco.imgs))

    def perfect(images, sizes):
        anns = coco.imgToAnns[next(truth)]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        return {"labels": np.array([[to_label[a["category_id"]] for a in anns]], np.int64),
                "boxes": boxes.reshape(1, -1, 4), "scores": np.ones((1, len(anns)), np.float32)}

    cfg = td.demo_config()
    stats = export.coco_ap(perfect, cfg, [64, 64], f"{shapes}/val2017", ann)
    assert stats["bbox"][0] == pytest.approx(1.0)


def test_benchmark_times_each_deployment_in_its_own_process_and_reports_ap(shapes, tmp_path, monkeypatch, capsys):
    cfg = dict(td.demo_config(), num_classes=3, eval_spatial_size=[96, 96])
    (tmp_path / "net.json").write_text(json.dumps(cfg))
    started, popen = [], subprocess.Popen
    monkeypatch.setattr(export.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])
    result = tmp_path / "bench.json"
    export.main(["--model", str(tmp_path / "net.json"), "--random-weights", "--onnx", str(tmp_path / "net.onnx"), "--threads", "1",
                 "--val-images", f"{shapes}/val2017",
                 "--val-ann", f"{shapes}/annotations/instances_val2017.json",
                 "--benchmark", "--rounds", "1", "--runs", "2", "--profile", "3", "--benchmark-json", str(result)])
    out = capsys.readouterr().out
    rows = json.loads(result.read_text())["rows"]
    assert [r["name"] for r in rows] == ["PyTorch eager fp32", "PyTorch eager bf16", "ONNX Runtime fp32"]
    assert len(started) == 3 and len({p.pid for p in started}) == 3 and all(p.returncode == 0 for p in started)
    for r in rows:
        assert len(r["times_ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert len(r["ap"]["bbox"]) == 12 and r["name"] in out
        assert f"{r['name']}, one profiled run" in out
    assert "file_mb" not in rows[0]
    assert rows[2]["file_mb"] == pytest.approx((tmp_path / "net.onnx").stat().st_size / 1e6)
    ap = {r["name"]: r["ap"]["bbox"] for r in rows}
    np.testing.assert_allclose(ap["ONNX Runtime fp32"], ap["PyTorch eager fp32"], atol=1e-3)
    fastest = min(rows, key=lambda r: r["median_ms"])
    assert json.loads(result.read_text())["fastest"] == fastest["name"]
    command = {"PyTorch eager fp32": f"--weights CHECKPOINT --model {tmp_path / 'net.json'} --device cpu --source",
               "PyTorch eager bf16": f"--weights CHECKPOINT --model {tmp_path / 'net.json'} --device cpu --precision bf16 "
                                     f"--source",
               "ONNX Runtime fp32": f"--weights {tmp_path / 'net.onnx'} --source"}[fastest["name"]]
    assert f"fastest on this CPU: {fastest['name']}, " in out and f"python predict.py {command} IMAGES" in out


def test_flops_as_the_paper_counts_them(capsys):
    """The paper's GFLOPs leave attention's products out (calflops cannot see the fused kernel)."""
    flops, attention = export.count_flops(model.build_model("ecdet_s").eval(), (640, 640))
    assert round((flops - attention) / 1e9) == 26  # the paper's ECDet-S
    assert 23e9 < attention < 25e9  # 12 ViT blocks of 1601 tokens, and the encoder's 400
    export.main(["--model", "ecdet_s", "--flops", "--img-size", "128"])  # 336 positions for 300 queries
    assert re.match(r"ecdet_s: 9,884,102 parameters \(9.88 M\), \d\.\d GFLOPs at 128x128 as the paper counts them",
                    capsys.readouterr().out)


def test_reference_needs_the_originals_checkout(tmp_path):
    with pytest.raises(ValueError, match="expected the original's ecdetseg/ folder"):
        export.reference_model(None, model.preset_config("ecdet_s"), str(tmp_path), (640, 640))
    (tmp_path / "engine" / "edgecrafter").mkdir(parents=True)
    (tmp_path / "engine" / "edgecrafter" / "modeling.py").write_text("")
    with pytest.raises(ValueError, match="not ECPose"):
        export.reference_model(None, model.preset_config("ecpose_s"), str(tmp_path), (640, 640))


def test_operator_times_names_where_the_time_goes():
    a = torch.randn(1024, 1024)
    run = lambda: (a @ a).sum()
    run()  # a first call pays for dispatch and allocation, which can outweigh the product on a loaded machine
    ops, total = export.operator_times(run, top=3)
    assert ops[0][0] == "aten::mm" and ops[0][1] == 1  # the product (1e9 multiply-adds) outweighs the sum (1e6 adds)
    assert all(0 < seconds <= total for _, _, seconds in ops)
