"""predict.py: the Predictor against the network, every runtime, --coco-ann against training's
evaluation, videos, image modes, and bad input."""
import importlib.util
import json
import os

import av
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import export
import model
import predict
import support
import train_det as td
import train_pose as tp
import train_seg as ts

SIZE = 64
NAMES, IDS = ["circle", "square", "triangle"], [1, 3, 7]

# pycocotools' mask decoder trips numpy 2's __array__ copy-keyword deprecation on every mask
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def save_tiny(path, stage, **meta):
    """A seeded demo-sized network of `stage` (train_det, train_seg or train_pose) at SIZE px, saved as this
    project's checkpoints are."""
    cfg = stage.demo_config()
    cfg["num_classes"], cfg["eval_spatial_size"] = (2 if stage is tp else 3), [SIZE, SIZE]
    torch.manual_seed(0)
    net = model.build_model(cfg).eval()
    torch.save({"model": net.state_dict(), "config": cfg, **meta}, path)
    return str(path), net, cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = support.make_synthetic_coco(str(root / "coco"), num_train=1, num_val=6, img_size=SIZE, seed=2)
    path, net, cfg = save_tiny(root / "det.pth", td, names=NAMES, category_ids=IDS)
    (root / "det.json").write_text(json.dumps(cfg))
    return dict(root=root, images=os.path.join(data, "val2017"), ckpt=path, net=net, cfg=cfg,
                config=str(root / "det.json"))


def cli(*args):
    """predict.main's summary, or SystemExit."""
    return predict.main([str(a) for a in args])


def stacked(results):
    """Per-image result dicts -> export.differences' (B, K, ...) numpy arrays."""
    return {k: np.stack([r[k].numpy() for r in results]) for k in ("labels", "scores", "boxes")}


def test_validation_transform_and_predictor_feed_the_network_alike(tiny):
    data = td.CocoDetection(tiny["images"], os.path.join(tiny["root"], "coco/annotations/instances_val2017.json"))
    image, target = data[0]
    expected, _ = td.DetTransforms(train=False, img_size=[SIZE, SIZE])(image, target)
    assert torch.equal(support.preprocess(predict.load_image(image), [SIZE, SIZE]), expected)


def test_detections_equal_postprocess_of_the_network(tiny):
    image = Image.open(sorted(os.scandir(tiny["images"]), key=lambda e: e.name)[0].path)
    p = predict.Predictor(tiny["ckpt"], conf=0.0)
    got = p(image)[0]
    with torch.no_grad():
        outputs = tiny["net"](support.preprocess(image.convert("RGB"), [SIZE, SIZE])[None])
    sizes = torch.tensor([image.size])
    ref = model.postprocess(outputs, sizes, model.num_top_queries(tiny["cfg"]))
    diff = export.differences(stacked(ref), stacked([got]), sizes.numpy(), 1e-5)
    assert diff["labels"] == 0 and diff["scores"] < 1e-5 and diff["boxes"] * max(image.size) < 1e-3, diff
    assert got["names"] == [NAMES[i] for i in got["labels"].tolist()]
    assert got["category_ids"] == [IDS[i] for i in got["labels"].tolist()]
    # --conf keeps the detections at or above it, highest first
    conf = got["scores"][5].item()
    kept = predict.Predictor(tiny["ckpt"], conf=conf)(np.asarray(image.convert("RGB")))[0]
    assert torch.equal(kept["scores"], got["scores"][:6]) and len(kept["names"]) == 6


def test_onnx_and_openvino_give_the_pytorch_detections(tiny, tmp_path, capsys):
    import openvino as ov
    onnx_path = tmp_path / "det.onnx"
    export.main(["--weights", tiny["ckpt"], "--onnx", str(onnx_path), "--threads", "1"])  # the checkpoint's config
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert json.loads(props["names"]) == NAMES and json.loads(props["category_ids"]) == IDS
    assert json.loads(props["config"]) == tiny["cfg"]
    xml_path = tmp_path / "det.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path))

    images = [os.path.join(tiny["images"], name) for name in sorted(os.listdir(tiny["images"]))[:3]]
    ref = predict.Predictor(tiny["ckpt"], conf=0.0)(images)
    for path in (onnx_path, xml_path):
        p = predict.Predictor(path, conf=0.0)
        assert (p.names, p.category_ids, p.size) == (NAMES, IDS, [SIZE, SIZE])
        for r, g, image in zip(ref, p(images), images):
            side = max(Image.open(image).size)
            diff = export.differences(stacked([r]), stacked([g]), np.array([Image.open(image).size]), 1e-3)
            assert diff["labels"] == 0 and diff["scores"] <= 1e-3 and diff["boxes"] * side <= 0.5, (path, diff)
            assert g["names"] == [NAMES[i] for i in g["labels"].tolist()]
    assert "carries no class names" not in capsys.readouterr().err


def has_bf16():
    """Whether OpenVINO computes in bfloat16 on this CPU (AVX-512 BF16 or AMX)."""
    return importlib.util.find_spec("openvino") is not None and predict.bf16_supported()


def test_pytorch_bf16_follows_fp32(tiny):
    """bf16 autocast on any CPU (PyTorch emulates it where the CPU lacks BF16 units): the confident
    detections stay where fp32 puts them."""
    images = [os.path.join(tiny["images"], name) for name in sorted(os.listdir(tiny["images"]))[:3]]
    fp32, bf16 = (predict.Predictor(tiny["ckpt"], conf=0.0, precision=p)(images) for p in ("fp32", "bf16"))
    for r, g in zip(fp32, bf16):
        assert g["scores"].dtype == torch.float32 and g["boxes"].shape == r["boxes"].shape
        assert (g["scores"] - r["scores"]).abs().max() < 0.05


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the optional openvino package is missing")
def test_openvino_bf16_needs_a_cpu_with_bf16(tiny, tmp_path, monkeypatch, capsys):
    """Any CPU: --precision bf16 for OpenVINO is refused in one line where the CPU has no BF16."""
    import openvino as ov
    export.main(["--weights", tiny["ckpt"], "--onnx", str(tmp_path / "det.onnx"), "--threads", "1"])
    ov.save_model(ov.convert_model(str(tmp_path / "det.onnx")), str(tmp_path / "det.xml"))
    capsys.readouterr()
    monkeypatch.setattr(predict, "bf16_supported", lambda: False)
    with pytest.raises(SystemExit) as error:
        cli("--weights", tmp_path / "det.xml", "--source", tiny["images"], "--output-dir", tmp_path / "out",
            "--precision", "bf16")
    assert error.value.code == 2
    assert capsys.readouterr().err.strip() == ("predict.py: error: --precision bf16: this CPU has no bfloat16 units "
                                               "(AVX-512 BF16 or AMX), on which OpenVINO would run float32; use "
                                               "--precision fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not has_bf16(), reason="needs a CPU with bfloat16 units (AVX-512 BF16 or AMX)")
def test_openvino_bf16_runs_where_the_cpu_has_it(tiny, tmp_path):
    import openvino as ov
    export.main(["--weights", tiny["ckpt"], "--onnx", str(tmp_path / "det.onnx"), "--threads", "1"])
    ov.save_model(ov.convert_model(str(tmp_path / "det.onnx")), str(tmp_path / "det.xml"))
    images = [os.path.join(tiny["images"], name) for name in sorted(os.listdir(tiny["images"]))[:3]]
    p = predict.Predictor(tmp_path / "det.xml", conf=0.0, precision="bf16")
    assert p.runtime.runner.config["INFERENCE_PRECISION_HINT"] == "bf16"
    fp32 = predict.Predictor(tmp_path / "det.xml", conf=0.0)(images)
    for r, g in zip(fp32, p(images)):
        assert (g["scores"] - r["scores"]).abs().max() < 0.05


def test_coco_ann_gives_the_ap_of_train_det_eval_only(tiny, tmp_path):
    # Ground truth made of the network's own three best boxes per image, one of them moved by a
    # pixel: AP lands between 0 and 1 and moves with any change of the boxes or their order.
    with open(os.path.join(tiny["root"], "coco/annotations/instances_val2017.json")) as f:
        images = json.load(f)["images"]
    p = predict.Predictor(tiny["ckpt"], conf=0.0)
    annotations = []
    for info in images:
        result = p(os.path.join(tiny["images"], info["file_name"]))[0]
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(result["boxes"][:3].tolist(), result["labels"].tolist())):
            x1 += k == 0
            annotations.append(dict(id=len(annotations) + 1, image_id=info["id"], category_id=IDS[label], iscrowd=0,
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1)))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(dict(images=images, annotations=annotations,
                                   categories=[dict(id=c, name=n) for c, n in zip(IDS, NAMES)])))
    summary = cli("--weights", tiny["ckpt"], "--source", tiny["images"], "--coco-ann", ann,
                  "--output-dir", tmp_path / "predict", "--batch-size", 4)
    written = json.loads((tmp_path / "predict" / "coco_results_bbox.json").read_text())
    assert len(written) == len(images) * model.num_top_queries(tiny["cfg"])  # every detection, whatever --conf
    metrics = td.train(td.parse_args(["--val-images", tiny["images"], "--val-ann", str(ann), "--eval-only",
                                    "--tune", tiny["ckpt"], "--model", tiny["config"], "--img-size", str(SIZE),
                                    "--batch-size", "2", "--workers", "0", "--device", "cpu",
                                    "--output-dir", str(tmp_path / "eval")]))
    assert 0.05 < summary["coco"]["bbox"][0] < 0.95, summary
    np.testing.assert_allclose(summary["coco"]["bbox"], metrics["coco_bbox"], atol=1e-3)


def write_video(path, frames, rate=12, size=(66, 50)):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[10:30, 5 + 5 * i:25 + 5 * i] = (255, 200, 0)  # a square moving right
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def test_video_keeps_its_frames_and_rate(tiny, tmp_path):
    write_video(tmp_path / "clip.mp4", frames=7)
    out = tmp_path / "out"
    summary = cli("--weights", tiny["ckpt"], "--source", tmp_path / "clip.mp4", "--output-dir", out, "--conf", 0.0,
                  "--batch-size", 3)
    assert summary["images"] == 7
    with av.open(str(out / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 12 and stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(stream)) == 7
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(7))
    assert {(line["source"], line["width"], line["height"]) for line in lines} == {(str(tmp_path / "clip.mp4"), 66, 50)}
    assert all(len(line["detections"]) == 50 for line in lines)


def test_every_pil_mode_is_read_as_rgb(tiny, tmp_path):
    rgb = Image.open(os.path.join(tiny["images"], sorted(os.listdir(tiny["images"]))[0])).convert("RGB")
    grey16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    assert grey16.mode == "I;16"
    # PIL's own convert would clip 16-bit greys at 255; to_rgb scales them to 8 bits
    assert np.array_equal(np.asarray(predict.to_rgb(grey16)), np.asarray(rgb.convert("L").convert("RGB")))
    images = {"L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "I;16": grey16, "P": rgb.convert("P"),
              "CMYK": rgb.convert("CMYK")}
    folder = tmp_path / "modes"
    folder.mkdir()
    for mode, image in images.items():
        image.save(folder / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}")
        assert Image.open(folder / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}").mode == mode
    results = predict.Predictor(tiny["ckpt"], conf=0.0)(list(images.values()))
    assert len(results) == 5 and all(len(r["scores"]) == 50 for r in results)
    summary = cli("--weights", tiny["ckpt"], "--source", folder, "--output-dir", tmp_path / "out")
    assert summary == {"images": 5, "skipped": 0}
    assert sorted(os.listdir(tmp_path / "out")) == ["CMYK.jpg", "I16.png", "L.png", "P.png", "RGBA.png",
                                                    "predictions.jsonl"]
    assert Image.open(tmp_path / "out" / "I16.png").mode == "RGB"


@pytest.mark.parametrize("stage", [ts, tp], ids=["ecseg", "ecpose"])
def test_masks_and_keypoints_are_written_and_drawn(stage, tiny, tmp_path):
    names, ids = (["", "person"], [0, 1]) if stage is tp else (NAMES, IDS)
    ckpt, _, _ = save_tiny(tmp_path / "net.pth", stage, names=names, category_ids=ids)
    images = [os.path.join(tiny["images"], name) for name in sorted(os.listdir(tiny["images"]))[:2]]
    result = predict.Predictor(ckpt, conf=0.0)(images[0])[0]
    w, h = Image.open(images[0]).size
    if stage is tp:
        top = tp.demo_config()["DETRPosePostProcessor"]["num_select"]  # the network's detections per image
        assert result["keypoints"].shape == (top, 51) and torch.equal(result["boxes"], predict.keypoint_boxes(result["keypoints"]))
    else:
        assert result["masks"].shape == (50, h, w) and result["masks"].dtype == torch.bool
    cli("--weights", ckpt, "--source", images[0], "--output-dir", tmp_path / "out", "--conf", 0.0)
    detection = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())["detections"][0]
    assert (detection["name"], detection["category_id"]) == (names[detection["label"]], ids[detection["label"]])
    if stage is tp:
        assert len(detection["keypoints"]) == 51
    else:
        assert detection["mask"]["size"] == [h, w] and isinstance(detection["mask"]["counts"], str)
    drawn = np.asarray(Image.open(tmp_path / "out" / os.path.basename(images[0]))).astype(int)
    assert np.abs(drawn - np.asarray(Image.open(images[0]).convert("RGB")).astype(int)).mean() > 5


# ---- bad input ----

def test_unreadable_images_are_skipped_and_counted(tiny, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    names = sorted(os.listdir(tiny["images"]))[:2]
    for name in names:
        (folder / name).write_bytes(open(os.path.join(tiny["images"], name), "rb").read())
    data = (folder / names[0]).read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "text.png").write_text("not a picture")
    summary = cli("--weights", tiny["ckpt"], "--source", folder, "--output-dir", tmp_path / "out")
    assert summary == {"images": 2, "skipped": 2}
    err = capsys.readouterr().err
    assert f"skipping {folder / 'sub' / 'truncated.jpg'}" in err and f"skipping {folder / 'text.png'}" in err
    assert "2 skipped so far" in err
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("case, args, message", [
    ("source missing", ["--source", "{tmp}/nowhere"], "--source {tmp}/nowhere: no such file or folder"),
    ("source without images", ["--source", "{tmp}/empty"], "--source {tmp}/empty: no image (.jpg"),
    ("unknown weights", ["--weights", "{tmp}/det.bin"], "--weights {tmp}/det.bin: unknown kind of file '.bin'"),
    ("released checkpoint without --model", ["--weights", "{tmp}/released.pth"],
     "--weights {tmp}/released.pth carries no network config (a released checkpoint?): give --model"),
    ("checkpoint unlike --model", ["--model", "ecdet_s"], "--weights {ckpt}: checkpoint does not match the model"),
    ("undecodable video", ["--source", "{tmp}/broken.mp4"], "--source {tmp}/broken.mp4: cannot decode it as a video"),
    ("ONNX Runtime on a GPU", ["--weights", "{tmp}/det.onnx", "--device", "cuda"], "--device cuda"),
    ("ONNX Runtime in bf16", ["--weights", "{tmp}/det.onnx", "--precision", "bf16"],
     "--precision bf16: onnxruntime runs {tmp}/det.onnx in the precision it was exported in"),
])
def test_bad_input_gets_one_line(tiny, tmp_path, capsys, case, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    (tmp_path / "det.bin").write_bytes(b"")
    (tmp_path / "det.onnx").write_bytes(b"")
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    torch.save({"ema": {"module": tiny["net"].state_dict()}}, tmp_path / "released.pth")
    fill = lambda s: s.format(tmp=tmp_path, ckpt=tiny["ckpt"])
    base = {"--weights": tiny["ckpt"], "--source": tiny["images"], "--output-dir": str(tmp_path / "out")}
    base.update(zip(args[::2], map(fill, args[1::2])))
    with pytest.raises(SystemExit) as error:
        cli(*[x for kv in base.items() for x in kv])
    assert error.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"predict.py: error: {fill(message)}"), lines
    assert "Traceback" not in "\n".join(lines)


def test_interrupted_run_leaves_complete_files(tiny, tmp_path, monkeypatch, capsys):
    draw, calls = predict.draw, []

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(predict, "draw", interrupt_third)
    write_video(tmp_path / "clip.mp4", frames=4)
    with pytest.raises(SystemExit) as error:
        cli("--weights", tiny["ckpt"], "--source", tiny["images"], "--output-dir", tmp_path / "images")
    assert error.value.code == 130 and "interrupted" in capsys.readouterr().err
    lines = (tmp_path / "images" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["detections"] is not None for line in lines)
    pictures = sorted(os.listdir(tmp_path / "images"))
    assert pictures == sorted(os.listdir(tiny["images"]))[:2] + ["predictions.jsonl"]  # no temporary files
    for name in pictures[:2]:
        Image.open(tmp_path / "images" / name).load()

    calls.clear()
    with pytest.raises(SystemExit):
        cli("--weights", tiny["ckpt"], "--source", tmp_path / "clip.mp4", "--output-dir", tmp_path / "video")
    assert os.listdir(tmp_path / "video") == ["predictions.jsonl"]  # the half-written video is removed
    assert len((tmp_path / "video" / "predictions.jsonl").read_text().splitlines()) == 2
