"""Export ECDet / ECSeg / ECPose for edge devices (ONNX in FP32 and INT8, OpenVINO IR, TensorRT),
verify every file against PyTorch, measure its COCO AP on labelled data, and benchmark it.

    python export.py --model ecdet_s --weights ecdet_s.pth --onnx ecdet_s.onnx
    python export.py --weights outputs/detection/best.pth --onnx det.onnx   # the config inside the checkpoint
    python export.py --model ecseg_s --weights ecseg_s.pth --onnx ecseg_s.onnx --dynamic-batch
    python export.py --model ecdet_s --weights ecdet_s.pth --int8 --calib-images coco/train2017 --openvino ov/
    python export.py --model ecdet_s --weights ecdet_s.pth --trt ecdet_s.engine --fp16
    python export.py --model ecdet_s --weights ecdet_s.pth --int8 --calib-images DIR --val-images coco/val2017 \\
        --val-ann coco/annotations/instances_val2017.json        # COCO AP of every precision
    python export.py --model ecdet_s --benchmark --reference EdgeCrafter/ecdetseg   # random weights time alike
    python export.py --model ecdet_s --flops                 # parameters and GFLOPs

The graph is the deployed network (`net.deploy()`: BatchNorms folded, RepVGG branches merged)
followed by the postprocessing of `model.select_top`, the same code that `model.postprocess` runs:
  inputs   images             (B, 3, H, W) float32, ImageNet-normalised, H and W multiples of 32
           orig_target_sizes  (B, 2) int64, each original image's (w, h)
  outputs  labels (B, K) int64, boxes (B, K, 4) float32 pixel x1, y1, x2, y2 in the original image,
           scores (B, K) float32: the top K = num_top_queries (query, class) pairs;
           ECSeg also masks (B, K, H/4, W/4) float32 mask logits: resize each to the original
           (h, w) bilinearly and threshold at 0, as `model.postprocess` does;
           ECPose has keypoints (B, K, 17, 2) float32 pixel x, y instead of boxes (K = num_select).
  metadata_props   config (JSON), names and category_ids (JSON lists by label), read by predict.py
Every FP32 file is checked (onnx.checker, then ONNX Runtime or OpenVINO on the inputs PyTorch ran,
within 1e-3); INT8 files and BF16 inference are checked for agreement with FP32 on real images.
Only a file that passes lands under the requested name.

INT8 is ONNX Runtime's static post-training quantisation in QDQ form (weights per channel, activations
calibrated on the user's images), which OpenVINO and TensorRT read as well; what it leaves in FP32 is
in KEEP_FP32. OpenVINO and TensorRT are optional: imported only where used.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime import quantization
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou

import model
import predict
import support
import train_det

# Largest difference allowed between PyTorch and an exported FP32 model, per output kind: scores and
# mask probabilities absolutely; boxes relative to the image size, so 1e-3 is the same error as
# 1e-3 on the network's normalised coordinates (0.64 px on a 640-pixel side).
TOLERANCE = 1e-3
TOLERANCE_FP16 = 2e-2  # twenty rounding steps of fp16 (2**-10), for errors that add up through the layers
# How each output is compared.
OUTPUT_KINDS = {"labels": "labels", "boxes": "pixels", "scores": "scores", "masks": "mask logits",
                "keypoints": "pixels"}
OPSETS = range(17, 21)  # torch's TorchScript exporter writes opsets up to 20

# INT8 and BF16 deployments are judged against FP32 on real images by what a user of the model would
# notice, not by rank order: FP32's detections scoring at least CHECK_SCORE are taken as the ground
# truth, and the other deployment's detections are COCO-evaluated against them (AP over IoU 0.5:0.95,
# pycocotools). A weak but correctly quantised network keeps its few confident detections where they
# were; a broken quantisation moves, drops or relabels them. Where FP32's best score on the check images
# is below twice CHECK_SCORE, half of that best score is the threshold instead, so that a network that
# is still unsure of everything is judged on the detections it is surest of.
CHECK_SCORE = 0.3
MIN_CHECK_AP = 0.9
MAX_SCORE_DIFF = 0.05  # mean |score difference| of the pairs matched at IoU >= 0.5 with the same label
CHECK_IMAGES = 32  # calibration images the deployments are checked on
MIN_CALIB_IMAGES = 8  # fewer calibrate activation ranges on too little to trust

# 7-bit weights by default (the quantiser's reduce_range). CPUs without VNNI (AVX2, AVX-512 without VNNI)
# multiply uint8 activations by int8 weights with an instruction (vpmaddubsw) that adds pairs of products
# into 16 bits and saturates: with 8-bit weights the sums overflow, most on efficient networks with GELU
# and other non-ReLU activations (ONNX Runtime's and OpenVINO's quantisation guides describe it). A file
# written on one CPU runs on others, so 7 bits is the default; on the demo's detector it cost 0.2 AP points
# where the arithmetic is exact (VNNI), and kept the INT8 file within the check on this Zen 3, where 8-bit
# weights failed it (docs/deployment.md). --weight-bits 8 is for files that only VNNI CPUs will run.
WEIGHT_BITS = 7

# INT8 quantises the convolutions and the matrix products with weights of the ViT and the encoder.
# In FP32 stay (ONNX node names carry the module path): attention's products of activations, QK^T and
# softmax(.)V, so that softmax runs in float between them (ONNX Runtime's quantised softmax took 2.8
# times as long as the float one, and quantised attention longer than float attention), and the whole
# decoder (query selection, deformable sampling, box and score heads, the FDR integral): a few per cent
# of the time, and the outputs. Quantising those too moved AP on labelled data by under 0.2 points
# (see the README), so the choice is speed's.
KEEP_FP32 = ("attn/MatMul", "self_attn/MatMul_", "/net/decoder/")
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


def export_onnx(deployed, inputs, path, opset, dynamic_batch, names, props):
    """Trace `deployed` on `inputs` into an ONNX file with outputs `names`, constants folded and the
    metadata_props `props` (str -> str)."""
    axes = {n: {0: "batch"} for n in ["images", "orig_target_sizes", *names]} if dynamic_batch else None
    # The TorchScript exporter (dynamo=False) rather than the torch.export one: it traces this
    # model in a seventh of the time, needs no onnxscript, and keeps the batch dynamic from a batch-1
    # example. Its warnings are its deprecation notice and the (static) input-shape checks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        try:
            torch.onnx.export(deployed, inputs, path, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=["images", "orig_target_sizes"], output_names=names, dynamic_axes=axes)
        except Exception as e:  # the tracer's and the exporter's own exception types, many
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"the network does not export to ONNX (opset {opset}): {cause}") from e
    # torch's folding leaves what is computed from parameters and static shapes (the FDR bin values,
    # RoPE tables, shape arithmetic: 3695 nodes for ECDet-S, 1418 after). ONNX Runtime's basic
    # optimisations fold it into standard ONNX ops; its own opset imports, unused, are dropped.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = path
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(path)
    used = [o for o in graph.opset_import if o.domain in {"", *(n.domain for n in graph.graph.node)}]
    del graph.opset_import[:]
    graph.opset_import.extend(used)
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, path)
    onnx.checker.check_model(path, full_check=True)


def differences(ref, got, sizes, tol):
    """Max difference per output between two runs (dicts of (B, K, ...) numpy arrays) on the same input.

    Scores are compared as the sorted lists they are. Other outputs are compared per detection: each
    reference detection is paired with the other run's detection of the same label closest in box
    and score, since near-equal scores may be ranked differently by the two runtimes. Pixel outputs
    are measured in units of the image size. Detections within `tol` of the K-th score may
    legitimately fall out of the other run's top K and are left out.
    """
    scale = sizes.astype(np.float64)[:, None, None, :]  # (B, 1, 1, 2) as (w, h)
    norm = {k: v.reshape(*v.shape[:2], -1, 2) / scale for k, v in ref.items() if OUTPUT_KINDS[k] == "pixels"}
    got_norm = {k: got[k].reshape(*got[k].shape[:2], -1, 2) / scale for k in norm}
    dist = np.abs(ref["scores"][:, :, None] - got["scores"][:, None])  # (B, K, K)
    for k in norm:
        dist = np.maximum(dist, np.abs(norm[k][:, :, None] - got_norm[k][:, None]).max((-1, -2)))
    dist[ref["labels"][:, :, None] != got["labels"][:, None]] = np.inf
    pair = dist.argmin(-1)[..., None]  # (B, K, 1): the paired detection of `got`
    clear = ref["scores"] > ref["scores"][:, -1:] + tol
    out = {"scores": np.abs(np.sort(ref["scores"]) - np.sort(got["scores"])).max()}
    out["labels"] = np.isinf(np.take_along_axis(dist, pair, -1)[..., 0])[clear].sum()
    take = lambda v: np.take_along_axis(v, pair.reshape(pair.shape + (1,) * (v.ndim - 3)), 1)
    for k in norm:
        out[k] = np.abs(norm[k] - take(got_norm[k]))[clear].max(initial=0)
    sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))
    for k in (k for k in ref if OUTPUT_KINDS[k] == "mask logits"):
        out[k] = np.abs(sigmoid(ref[k]) - take(sigmoid(got[k])))[clear].max(initial=0)
    return out


def verify(ref, got, sizes, tol, what):
    """Raise with the max difference of every output when any exceeds `tol`; else print them."""
    side = int(sizes.max())
    describe = {"labels": lambda d: f"{d} detections without a same-label partner (limit 0)",
                "scores": lambda d: f"max |diff| {d:.2g} (limit {tol:g})",
                "pixels": lambda d: f"max |diff| {d:.2g} of the image size = {d * side:.3g} px on the {side}-pixel "
                                    f"side (limit {tol:g} of the image size = {tol * side:.3g} px)",
                "mask logits": lambda d: f"max |diff| of the mask probabilities {d:.2g} (limit {tol:g})"}
    lines, failed = [], False
    for k, d in differences(ref, got, sizes, tol).items():
        too_large = d > (0 if OUTPUT_KINDS[k] == "labels" else tol)
        lines.append(f"  {k}: {describe[OUTPUT_KINDS[k]](d)}{'  <-- too large' if too_large else ''}")
        failed |= too_large
    if failed:
        raise RuntimeError(f"{what} differs from PyTorch:\n" + "\n".join(lines))
    print(f"{what} matches PyTorch:\n" + "\n".join(lines))


def example_inputs(size, batch):
    """Seeded normalised images (B, 3, H, W) and original sizes (B, 2) as (w, h) unlike the input size,
    so the verification also checks the rescaling of boxes."""
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[640, 480], [1280, 720], [500, 375], [333, 500]] * batch, dtype=torch.int64)[:batch]
    return images, sizes


# ---------------------------------------------------------------------------------------------
# Runners: every deployment as a function (images, orig_target_sizes) -> outputs, on numpy arrays
# ---------------------------------------------------------------------------------------------
class TorchRunner:
    """A PyTorch network in eager mode with `model.select_top` (predict.Deployed), in float32 or bf16."""

    def __init__(self, net, num_top_queries, bf16=False):
        self.deployed = predict.Deployed(net, num_top_queries, bf16)

    def __call__(self, images, sizes):
        with torch.inference_mode():
            top = self.deployed(torch.from_numpy(images), torch.from_numpy(sizes))
        return {k: v.numpy() for k, v in top.items()}

    def profile(self, images, sizes, top):
        with torch.inference_mode():
            return operator_times(lambda: self(images, sizes), top)


class OrtRunner(predict.OrtRunner):
    """predict.OrtRunner with a profile."""

    def profile(self, images, sizes, top):
        """ONNX Runtime's profiler over the second of two runs: kernel time per operator type."""
        with tempfile.TemporaryDirectory() as tmp:
            session = predict.ort_session(self.path, self.threads, profile_prefix=os.path.join(tmp, "ort"))
            for _ in range(2):
                session.run(self.names, {"images": images, "orig_target_sizes": sizes})
            events = json.loads(pathlib.Path(session.end_profiling()).read_text())
        last = [e for e in events if e.get("name") == "model_run"][-1]
        ops = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last["ts"]:
                calls, us = ops.get(e["args"]["op_name"], (0, 0))
                ops[e["args"]["op_name"]] = calls + 1, us + e["dur"]
        return top_operators(ops, last["dur"] / 1e6, top)


def top_operators(ops, total, top):
    """{name: (calls, microseconds)} -> the `top` names by time as (name, calls, seconds), and `total`."""
    ranked = sorted(ops.items(), key=lambda item: -item[1][1])[:top]
    return [(name, calls, us / 1e6) for name, (calls, us) in ranked], total


def run_batches(runner, images, sizes, batch):
    """The runner's outputs on all `images` (N, 3, H, W), `batch` at a time, concatenated."""
    parts = [runner(images[i:i + batch], sizes[i:i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# INT8: calibration images, static quantisation, agreement with FP32
# ---------------------------------------------------------------------------------------------
def read_images(folder, size, count):
    """Up to `count` images of `folder` (by file name), resized to `size` (H, W) and normalised as the
    validation transform does: (N, 3, H, W) float32 and their sizes (N, 2) int64 as (w, h). Files that
    do not decode as images are skipped and counted."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calib-images {folder}: not a directory")
    images, sizes, skipped = [], [], []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        if len(images) == count:
            break
        try:
            with Image.open(path) as im:
                im = predict.to_rgb(im)  # decodes the whole file, so broken ones fail here
        except OSError:
            skipped.append(path.name)
            continue
        images.append(support.preprocess(im, size).numpy())
        sizes.append(im.size)
    named = f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})"
    if not images:
        raise ValueError(f"--calib-images {folder}: no readable image among its {len(files)} files {named}")
    if skipped:
        print(f"--calib-images {folder}: skipped {len(skipped)} files that are not readable images {named}",
              file=sys.stderr)
    return np.stack(images), np.array(sizes, dtype=np.int64)


class CalibrationBatches(quantization.CalibrationDataReader):
    def __init__(self, images, sizes, batch):
        self.feeds = iter([{"images": images[i:i + batch], "orig_target_sizes": sizes[i:i + batch]}
                           for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.feeds, None)


def quantize_int8(fp32_path, int8_path, images, sizes, batch, weight_bits=WEIGHT_BITS):
    """Static INT8 quantisation of the ONNX file `fp32_path` into `int8_path`, in QDQ form: weights
    per output channel (int8, symmetric, in `weight_bits` 7 or 8), activations per tensor (uint8) with
    ranges calibrated on `images`; the nodes KEEP_FP32 names stay in float."""
    graph = onnx.load(fp32_path).graph
    exclude = [n.name for n in graph.node if any(k in n.name for k in KEEP_FP32)]
    logging.disable(logging.WARNING)  # its advice to pre-process: the graph is already optimised
    try:
        quantization.quantize_static(
            fp32_path, int8_path, CalibrationBatches(images, sizes, batch), quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=exclude, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax, reduce_range=weight_bits == 7)
    finally:
        logging.disable(logging.NOTSET)
    int8 = onnx.load(int8_path)  # the quantiser drops the predict.metadata that predict.py reads
    onnx.helper.set_model_props(int8, {p.key: p.value for p in onnx.load(fp32_path).metadata_props})
    onnx.save(int8, int8_path)


def detection_boxes(outputs):
    """(B, K, 4) pixel boxes of the detections: ECPose's are its keypoints' extents."""
    if "boxes" in outputs:
        return outputs["boxes"]
    return np.concatenate([outputs["keypoints"].min(-2), outputs["keypoints"].max(-2)], -1)


def agreement(ref, got, min_score=CHECK_SCORE):
    """How well `got` reproduces the detections of `ref` (dicts of (B, K, ...) select_top outputs on the
    same images): (COCO AP of all of `got`'s detections with `ref`'s scoring at least `min_score` as the
    ground truth: box AP, ECPose's keypoint (OKS) AP; mean |score difference| over the ground-truth
    detections that `got` finds at box IoU >= 0.5 with the same label (its best overlap); number of
    ground-truth detections). AP is NaN without any."""
    pose = "keypoints" in ref
    ref_boxes, got_boxes = (torch.from_numpy(detection_boxes(x)).double() for x in (ref, got))
    truth, results, diffs = [], [], []
    for b in range(len(ref["scores"])):
        keep = ref["scores"][b] >= min_score
        boxes, labels = ref_boxes[b][keep], ref["labels"][b][keep]
        for i, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            truth.append(dict(id=len(truth) + 1, image_id=b, category_id=label, bbox=[x1, y1, x2 - x1, y2 - y1],
                              area=(x2 - x1) * (y2 - y1), iscrowd=0))
            if pose:  # every keypoint visible (v = 2)
                xy = ref["keypoints"][b][keep][i]
                truth[-1].update(keypoints=np.concatenate([xy, np.full_like(xy[:, :1], 2)], 1).ravel().tolist(),
                                 num_keypoints=len(xy))
        result = dict(labels=torch.from_numpy(got["labels"][b]), scores=torch.from_numpy(got["scores"][b]),
                      boxes=got_boxes[b])
        if pose:
            xy = torch.from_numpy(got["keypoints"][b]).double()
            result["keypoints"] = torch.cat([xy, torch.ones_like(xy[..., :1])], -1).flatten(1)
        results.append(result)
        iou = box_iou(boxes, got_boxes[b])
        iou[torch.from_numpy(labels[:, None] != got["labels"][b][None])] = 0
        best, partner = iou.max(1) if iou.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        found = (best >= 0.5).numpy()
        diffs += np.abs(ref["scores"][b][keep][found] - got["scores"][b][partner.numpy()[found]]).tolist()
    if not truth:
        return float("nan"), 0.0, 0
    labels = sorted({t["category_id"] for t in truth} | {int(x) for x in np.unique(got["labels"])})
    coco = COCO()
    coco.dataset = dict(images=[dict(id=b) for b in range(len(results))], annotations=truth,
                        categories=[dict(id=c, name=str(c)) for c in labels])
    kind = "keypoints" if pose else "bbox"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines and tables
        coco.createIndex()
        evaluator = predict.CocoEvaluator(coco, {c: c for c in labels}, (kind,))
        evaluator.update(range(len(results)), results)
        ap = evaluator.summarize()[kind][0]
    return ap, float(np.mean(diffs)) if diffs else 1.0, len(truth)


def check_agreement(ref, got, what, count, enforce=True):
    """Raise when `got` (outputs on `count` images) reproduces the FP32 `ref` less well than the limits
    allow. Not `enforce`d on random weights: their scores are nearly equal everywhere, and which
    detections stand out is decided by differences smaller than INT8's rounding (the files still time alike)."""
    best = float(ref["scores"].max()) if ref["scores"].size else 0.0
    threshold = min(CHECK_SCORE, best / 2)
    ap, diff, n = agreement(ref, got, threshold)
    line = (f"{what} against FP32 on {count} images: AP {ap:.3f} (limit >= {MIN_CHECK_AP}) on FP32's {n} detections "
            f"scoring >= {threshold:.2f}, mean score difference {diff:.4f} (limit <= {MAX_SCORE_DIFF})")
    if not ap >= MIN_CHECK_AP or diff > MAX_SCORE_DIFF:
        if enforce:
            raise RuntimeError(f"{line}: disagrees too much")
        line += ": not enforced on random weights"
    print(line)


# ---------------------------------------------------------------------------------------------
# OpenVINO: IR converted from the verified ONNX files, run on the CPU plugin
# ---------------------------------------------------------------------------------------------
def export_openvino(onnx_path, xml_path):
    """OpenVINO IR (xml + bin, weights kept in float32) of an ONNX file; an INT8 QDQ file becomes INT8 IR."""
    ov = predict.import_openvino()
    ov.save_model(ov.convert_model(onnx_path), xml_path, compress_to_fp16=False)


class OpenVINORunner(predict.OpenVINORunner):
    """predict.OpenVINORunner with a profile."""

    def profile(self, images, sizes, top):
        """OpenVINO's performance counters over the second of two runs: time per layer type and the
        kernel that ran it (ref_* kernels are its slow reference fallbacks)."""
        request = self.compile(PERF_COUNT=True)
        for _ in range(2):
            start = time.perf_counter()
            request.infer({"images": images, "orig_target_sizes": sizes})
            total = time.perf_counter() - start
        ops = {}
        for info in request.get_profiling_info():
            name = f"{info.node_type} ({info.exec_type})"
            calls, us = ops.get(name, (0, 0))
            ops[name] = calls + 1, us + info.real_time.total_seconds() * 1e6
        return top_operators(ops, total, top)


# ---------------------------------------------------------------------------------------------
# TensorRT: built with its Python API where it is importable and a CUDA GPU is present
# ---------------------------------------------------------------------------------------------
def trtexec_command(onnx_path, engine_path, fp16, int8, size, max_batch):
    """The trtexec command that builds the engine that `build_engine` would build."""
    cmd = f"trtexec --onnx={onnx_path} --saveEngine={engine_path}"
    if max_batch:
        shapes = lambda b: f"images:{b}x3x{size[0]}x{size[1]},orig_target_sizes:{b}x2"
        cmd += f" --minShapes={shapes(1)} --optShapes={shapes(1)} --maxShapes={shapes(max_batch)}"
    cmd += " --int8" if int8 else ""  # the Q/DQ nodes of the file set the scales
    return cmd + (" --fp16    (TensorRT 10; TensorRT 11: ModelOpt AutoCast the ONNX file instead)" if fp16 else "")


def build_engine(onnx_path, engine_path, fp16, int8, size, max_batch):
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 builds strongly typed networks only
            raise RuntimeError(f"TensorRT {trt.__version__} has no fp16 builder flag: convert {onnx_path} to fp16 "
                               f"with ModelOpt AutoCast (python -m modelopt.onnx.autocast) and build that instead")
        config.set_flag(trt.BuilderFlag.FP16)
    if int8 and hasattr(trt.BuilderFlag, "INT8"):  # explicit quantisation: the file's Q/DQ scales; 11 needs no flag
        config.set_flag(trt.BuilderFlag.INT8)
    if max_batch:
        profile = builder.create_optimization_profile()
        profile.set_shape("images", (1, 3, *size), (1, 3, *size), (max_batch, 3, *size))
        profile.set_shape("orig_target_sizes", (1, 2), (1, 2), (max_batch, 2))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    pathlib.Path(engine_path).write_bytes(engine)


# ---------------------------------------------------------------------------------------------
# Deployments: what this run produced, each with the runner that runs it
# ---------------------------------------------------------------------------------------------
def deployment(name, runtime, precision, path=None):
    return dict(name=name, runtime=runtime, precision=precision, path=path and os.path.abspath(path))


def make_runner(d, net_spec, threads):
    """The runner of deployment `d`. `net_spec`: what builds the PyTorch networks, a dict of the
    --model and --weights arguments, the input size and the --reference folder."""
    if d["runtime"] == "ONNX Runtime":
        return OrtRunner(d["path"], threads)
    if d["runtime"] == "OpenVINO":
        return OpenVINORunner(d["path"], threads, "bf16" if "bf16" in d["precision"] else "f32")
    if d["runtime"] == "TensorRT":
        return predict.TensorRTRunner(d["path"])
    net, cfg, _, _ = predict.load_network(net_spec["model"], net_spec["weights"])
    if d["runtime"] == "the original, PyTorch eager":
        return TorchRunner(reference_model(net, cfg, net_spec["reference"], net_spec["size"]),
                           model.num_top_queries(cfg))
    return TorchRunner(net.deploy(), model.num_top_queries(cfg), bf16=d["precision"] == "bf16")


# ---------------------------------------------------------------------------------------------
# Accuracy on labelled data: COCO AP of each deployment, with train_det's evaluator
# ---------------------------------------------------------------------------------------------
def coco_ap(runner, cfg, size, images_dir, ann_file):
    """{iou_type: the 12 (keypoints: 10) COCO numbers} of `runner` on a COCO-format data set, its
    images stretched to `size` as in validation."""
    import train_pose
    import train_seg
    dataset, transforms, iou_types = (
        (train_pose.CocoKeypoints, train_pose.PoseTransforms, ("keypoints",)) if "DETRTransformer" in cfg else
        (train_seg.CocoSegmentation, train_det.DetTransforms, ("bbox", "segm")) if cfg.get("model") == "ECSeg" else
        (train_det.CocoDetection, train_det.DetTransforms, ("bbox",)))
    loader_args = argparse.Namespace(img_size=list(size), batch_size=1, workers=0, device_type="cpu")
    no_augmentation = dict(mosaic_prob=0.0, mosaic_epoch=0, stop_epoch=0)
    try:
        loader = train_det.make_loader(dataset, transforms, images_dir, ann_file, False, loader_args, no_augmentation, 0, 1)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--val-images/--val-ann: {e}") from None
    data = loader.dataset
    evaluator = predict.CocoEvaluator(data.coco, data.label_to_cat, iou_types)
    for images, targets in loader:
        sizes = torch.stack([t["orig_size"] for t in targets])
        top = runner(images.numpy(), sizes.numpy())
        evaluator.update([t["image_id"] for t in targets],
                         model.per_image({k: torch.from_numpy(v) for k, v in top.items()}, sizes))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' tables, one per deployment
        stats = evaluator.summarize()
    return {t: stats[t] for t in iou_types}


# ---------------------------------------------------------------------------------------------
# Benchmark: each deployment in a process of its own, taking turns
# ---------------------------------------------------------------------------------------------
def count_flops(net, size):
    """FLOPs (two per multiply-add) of one eval forward on the CPU at `size`, via torch's counter:
    (all of them, those of attention's softmax(QK^T)V). The paper's GFLOPs (calflops, which cannot
    see the fused attention kernel) are the difference: ECDet-S 50.0 - 24.0 = 26.0 at 640x640."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # F.scaled_dot_product_attention here
    formula = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping={fused: formula}) as counter:
        net(torch.zeros(1, 3, *size))
    return counter.get_total_flops(), counter.get_flop_counts()["Global"].get(fused, 0)


def reference_model(net, cfg, root, size):
    """The original implementation's ECDet or ECSeg for `cfg` at input `size` (H, W), with the weights
    of `net` (built from `cfg` here), from a checkout of Intellindust-AI-Lab/EdgeCrafter (`root`: its
    ecdetseg/ folder), to time against this project. Only its network code is imported: its `engine`
    package is entered bare, with stand-ins for the registry and the distributed helpers, so that
    its training dependencies are not needed."""
    import importlib
    import types
    engine = os.path.join(root, "engine")
    if not os.path.isfile(os.path.join(engine, "edgecrafter", "modeling.py")):
        raise ValueError(f"--reference {root}: expected the original's ecdetseg/ folder, with engine/edgecrafter/")
    if cfg.get("model") not in ("ECDet", "ECSeg"):
        raise ValueError(f"--reference builds the original's ECDet and ECSeg, not {cfg.get('model')}")
    for name, attrs in {"engine": dict(__path__=[engine]), "engine.core": dict(register=lambda *a, **k: lambda c: c),
                        "engine.misc": dict(__path__=[]), "engine.misc.dist_utils": dict(
                            get_world_size=lambda: 1, is_dist_available_and_initialized=lambda: False)}.items():
        vars(sys.modules.setdefault(name, types.ModuleType(name))).update(attrs)
    original = importlib.import_module("engine.edgecrafter")
    size = dict(eval_spatial_size=list(size))  # it precomputes its encoder's position embedding for this size
    backbone = original.ViTAdapter(**{k: v for k, v in cfg["ViTAdapter"].items() if k != "weights_path"},
                                   skip_load_backbone=True)
    encoder = original.HybridEncoder(**cfg["HybridEncoder"], **size)
    decoder = original.ECTransformer(**cfg["ECTransformer"], num_classes=cfg["num_classes"], **size)
    reference = getattr(original, cfg["model"])(backbone, encoder, decoder)
    # The same names; the decoder's anchors stay those the original made for `size`.
    own = {k: v for k, v in net.state_dict().items() if k not in ("decoder.anchors", "decoder.valid_mask")}
    reference.load_state_dict({**reference.state_dict(), **own})
    return reference.eval()


def measure_latency(run, runs):
    """Seconds of each of `runs` calls of `run` (a callable without arguments)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def operator_times(run, top=5):
    """Where one call of `run` spends its time: the `top` operators by self time as (name, calls,
    seconds), and the total over all operators, from the PyTorch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in events[:top]], \
        sum(e.self_cpu_time_total for e in events) / 1e6


def benchmark_child(d, net_spec, threads):
    """The process of one deployment in --benchmark: builds its runner, then answers the parent's
    commands on stdin, one JSON line each on stdout: "time N" (seconds of N runs), "profile N" (the
    top N operators of one run). Whatever the libraries print goes to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(threads)
    runner = make_runner(d, net_spec, threads)
    images, sizes = (x.numpy() for x in example_inputs(net_spec["size"], 1))
    print(json.dumps("ready"), file=protocol, flush=True)
    for line in sys.stdin:
        command, n = line.split()
        if command == "time":
            answer = measure_latency(lambda: runner(images, sizes), int(n))
        else:
            answer = runner.profile(images, sizes, int(n))
        print(json.dumps(answer), file=protocol, flush=True)


class Child:
    """A benchmark_child process and the lines it answers."""

    def __init__(self, d, net_spec, threads):
        self.name, self.log = d["name"], tempfile.TemporaryFile("w+")
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys, json; sys.path.insert(0, {here!r}); import export; "
                f"export.benchmark_child(*json.loads(sys.argv[1]))")
        self.process = subprocess.Popen([sys.executable, "-c", code, json.dumps([d, net_spec, threads])],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.receive()

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def receive(self):
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"--benchmark: the process of {self.name} ended (exit code {self.process.returncode}):"
                               f"\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def benchmark(deployments, net_spec, threads, rounds, runs, warmup, profile):
    """{name: seconds of every timed run}, {name: median of each round}, {name: profile}. Every
    deployment runs in its own process; the processes take turns, `runs` calls each per round, so that
    load from elsewhere falls on all of them alike, and only one computes at a time."""
    children = []
    try:
        for d in deployments:  # one at a time: their set-up would compete with each other
            children.append(Child(d, net_spec, threads))
            children[-1].ask(f"time {warmup}")
        times = {c.name: [] for c in children}
        medians = {c.name: [] for c in children}
        for _ in range(rounds):
            for c in children:
                ts = c.ask(f"time {runs}")
                times[c.name] += ts
                medians[c.name].append(statistics.median(ts))
        profiles = {c.name: c.ask(f"profile {profile}") for c in children} if profile else {}
    finally:
        for c in children:
            c.close()
    return times, medians, profiles


def benchmark_rows(deployments, times, medians, reference, ap):
    """The table of the benchmark as dicts: times in ms, spread, ratio to the original, AP, file size."""
    rows = []
    for d in deployments:
        ts = [t * 1e3 for t in times[d["name"]]]
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
        row = dict(d, times_ms=ts, median_ms=statistics.median(ts), q1_ms=q1, q3_ms=q3, min_ms=min(ts), max_ms=max(ts))
        if reference:  # per round, as the deployments took turns
            ratios = [a / b for a, b in zip(medians[d["name"]], medians[reference])]
            row["ratio_to_original"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        if d["path"]:
            weights = pathlib.Path(d["path"]).with_suffix(".bin")  # OpenVINO's, beside its .xml
            files = [d["path"]] + ([weights] if d["runtime"] == "OpenVINO" else [])
            row["file_mb"] = sum(os.path.getsize(f) for f in files) / 1e6
        if d["name"] in ap:
            row["ap"] = ap[d["name"]]
        rows.append(row)
    return rows


def cpu_name():
    """This CPU's model name and the instruction sets that decide which deployment is fastest on it."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    sets = {"AVX2": {"avx2"}, "AVX-512": {"avx512f"}, "VNNI": {"avx512_vnni", "avx_vnni"}, "BF16": {"avx512_bf16"},
            "AMX": {"amx_bf16", "amx_int8"}}
    have = [s for s, names in sets.items() if flags & names]
    return f"{name or platform.processor()} ({', '.join(have) or 'no AVX2'}{'' if 'VNNI' in have else ', no VNNI'})"


def predict_command(d, args):
    """The predict.py command that runs deployment `d` of this run."""
    command = ["python", "predict.py", "--weights", d["path"] or args.weights or "CHECKPOINT"]
    if not d["path"] and args.model:
        command += ["--model", args.model]
    if d["runtime"] == "PyTorch eager":
        command += ["--device", "cpu"]  # as measured (predict.py's default is a GPU where there is one)
    if d["runtime"] in ("PyTorch eager", "OpenVINO") and "bf16" in d["precision"]:
        command += ["--precision", "bf16"]
    if d["runtime"] == "TensorRT":
        command += ["--device", "cuda"]
    return shlex.join(command + ["--source", "IMAGES"])


def print_table(rows, title):
    print(title)
    print(f"  {'':34s} {'median':>7s} {'IQR':>13s} {'min':>7s} {'max':>7s} (ms)  {'/ original':>17s} {'file MB':>8s}")
    for r in rows:
        ratio = r.get("ratio_to_original")
        ratio = f"{ratio['median']:.3f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""
        size = f"{r['file_mb']:.1f}" if "file_mb" in r else ""
        spread = f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f}"
        print(f"  {r['name']:34s} {r['median_ms']:7.1f} {spread:>13s} {r['min_ms']:7.1f} "
              f"{r['max_ms']:7.1f}       {ratio:>17s} {size:>8s}")


def print_profile(name, ops, total):
    print(f"{name}, one profiled run: {total * 1e3:.0f} ms, of which")
    for op, calls, seconds in ops:
        print(f"  {op:56s} {calls:4d} calls {seconds * 1e3:7.1f} ms  {seconds / total:4.0%}")


def print_flops(net, name, size):
    params = sum(p.numel() for p in net.parameters())
    flops, attention = count_flops(net, size)
    print(f"{name}: {params:,} parameters ({params / 1e6:.2f} M), {(flops - attention) / 1e9:.1f} GFLOPs at "
          f"{size[0]}x{size[1]} as the paper counts them, {flops / 1e9:.1f} with attention's products")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=support.HelpFormatter)
    parser.add_argument("--model", help="preset (ecdet_s ... ecpose_x) or a JSON config file in the original's "
                                        "vocabulary (default: the config inside a --weights of this project)")
    parser.add_argument("--weights", help="checkpoint: one of this project's, a released one (with --model), a "
                        "state dict, or a preset name (ecdet_s ...) for the released model, downloaded")
    parser.add_argument("--random-weights", action="store_true", help="export and benchmark a network of random "
                        "weights (in place of --weights)")
    parser.add_argument("--onnx", help="output ONNX file (default: <model>.onnx)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N",
                        help="input size H [W], multiples of 32 (default: the config's eval_spatial_size)")
    parser.add_argument("--dynamic-batch", action="store_true", help="let the batch size vary at run time")
    parser.add_argument("--opset", type=int, default=17, choices=OPSETS, metavar="{17..20}",
                        help="ONNX operator set")
    parser.add_argument("--int8", action="store_true", help=(
        f"also write <onnx>_int8.onnx, static INT8 calibrated on --calib-images (and INT8 OpenVINO IR and TensorRT "
        f"engines with --openvino and --trt), weights in --weight-bits, activations in 8 bits. INT8 and "
        f"BF16 deployments are checked against FP32 on up to {CHECK_IMAGES} of those images: with FP32's detections "
        f"scoring at least {CHECK_SCORE} as ground truth, their COCO AP must be at least {MIN_CHECK_AP} and the mean "
        f"score difference of matched detections at most {MAX_SCORE_DIFF} (reported, not enforced, for random "
        f"weights)"))
    parser.add_argument("--weight-bits", type=int, choices=(7, 8), default=WEIGHT_BITS, help="bits of the INT8 "
                        "weights: 7 runs accurately on every CPU; 8 saturates on CPUs without VNNI (AVX2, AVX-512 without "
                        "VNNI) and is for files only VNNI CPUs will run (0.2 AP points better on the demo's detector)")
    parser.add_argument("--calib-images", metavar="DIR", help="folder of images like those the model will see, to "
                        f"calibrate INT8 and to check INT8 and BF16 against FP32 on (every file that decodes as an "
                        f"image, by name, at least {MIN_CALIB_IMAGES}; any size: each is resized to the input size)")
    parser.add_argument("--calib-count", type=int, default=256, help="calibration images used at most")
    parser.add_argument("--openvino", metavar="DIR", help="also write OpenVINO IR there: <model>.xml/.bin (FP32; "
                        "run it in BF16 with the inference precision hint) and, with --int8, <model>_int8.xml/.bin "
                        "(checked and timed with the BF16 hint for what stays in float, where the CPU has BF16)")
    parser.add_argument("--trt", help="also build a TensorRT engine here (needs tensorrt and a CUDA GPU; from the "
                                      "INT8 file with --int8)")
    parser.add_argument("--fp16", action="store_true", help="build the TensorRT engine in half precision")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch of a --dynamic-batch engine")
    parser.add_argument("--val-images", metavar="DIR", help="report the COCO AP of every deployment on these "
                        "labelled images (with --val-ann)")
    parser.add_argument("--val-ann", metavar="JSON", help="their COCO-format annotations")
    parser.add_argument("--flops", action="store_true", help="print the parameters and GFLOPs, and export nothing")
    parser.add_argument("--benchmark", action="store_true", help="time every deployment of this run, PyTorch eager "
                        "FP32 and BF16 too, each in a process of its own, taking turns")
    parser.add_argument("--threads", type=int, default=support.cpu_cores(), help="CPU threads of every runtime "
                        "(default: this machine's cores)")
    parser.add_argument("--rounds", type=int, default=5, help="turns of the benchmark")
    parser.add_argument("--runs", type=int, default=4, help="timed runs per deployment and turn")
    parser.add_argument("--reference", metavar="DIR", help="--benchmark the original implementation too (ECDet, ECSeg): "
                        "the ecdetseg/ folder of a checkout of Intellindust-AI-Lab/EdgeCrafter")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="with --benchmark, print the N operators "
                        "each deployment spends most time in (each runtime's own profiler)")
    parser.add_argument("--benchmark-json", metavar="FILE", help="with --benchmark, write its table there")
    args = parser.parse_args(argv)
    fail = lambda message: parser.exit(2, f"export.py: error: {message}\n")
    if args.img_size and len(args.img_size) > 2:
        fail(f"--img-size takes H or H W, got {len(args.img_size)} numbers")
    if args.fp16 and not args.trt:
        fail("--fp16 sets the precision of the TensorRT engine: give --trt too")
    if args.int8 and not args.calib_images:
        fail("--int8 needs --calib-images DIR: a folder of images to calibrate the INT8 ranges on")
    if args.weight_bits != WEIGHT_BITS and not args.int8:
        fail(f"--weight-bits {args.weight_bits} sets the INT8 weights: give --int8 too")
    if args.calib_images and not (args.int8 or args.openvino):
        fail("--calib-images serves --int8 and the BF16 check of --openvino: give one of them")
    if not (args.weights or args.random_weights or args.flops):
        fail("give --weights (a checkpoint or a preset name), or --random-weights to export a network of random "
             "weights (for benchmarks)")
    if args.weights and args.random_weights:
        fail("--weights and --random-weights exclude each other: give one of them")
    if bool(args.val_images) != bool(args.val_ann):
        fail("--val-images and --val-ann go together")
    if (args.benchmark_json or args.profile) and not args.benchmark:
        fail("--benchmark-json and --profile belong to --benchmark: give it too")
    if args.calib_count < MIN_CALIB_IMAGES:
        fail(f"--calib-count {args.calib_count}: calibration needs at least {MIN_CALIB_IMAGES} images")
    for flag, value in (("--threads", args.threads), ("--rounds", args.rounds),
                        ("--runs", args.runs), ("--max-batch", args.max_batch)):
        if value < 1:
            fail(f"{flag} {value}: must be at least 1")
    try:
        run(args)
    except (ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as e:
        fail(e)


def run(args):
    torch.set_num_threads(args.threads)
    net, cfg, name, classes = predict.load_network(args.model, args.weights)
    if args.random_weights and not args.flops:
        print("--random-weights: fine for benchmarking, useless for inference", file=sys.stderr)
    size = args.img_size or cfg.get("eval_spatial_size") or [640, 640]
    size = [size[0], size[-1]]
    support.check_input_size(cfg, size)
    if args.flops or args.benchmark:  # counted before deploy() merges the RepVGG branches, as the paper counts
        print_flops(net, name, size)
    if args.flops:
        return
    onnx_path = args.onnx or f"{name}.onnx"
    int8_path = str(pathlib.Path(onnx_path).with_name(f"{pathlib.Path(onnx_path).stem}_int8.onnx"))
    ov_dir = pathlib.Path(args.openvino) if args.openvino else None
    inputs = [p for p in (args.weights, args.model, args.val_ann) if p and os.path.isfile(p)]
    for flag, path in (("--onnx", onnx_path), ("--int8", args.int8 and int8_path), ("--trt", args.trt),
                       ("--benchmark-json", args.benchmark_json)):
        if path:
            predict.check_writable(path, flag)
            if any(os.path.exists(path) and os.path.samefile(path, p) for p in inputs):
                raise ValueError(f"{flag} {path}: that is an input of this export; choose another file")
    if ov_dir:
        predict.import_openvino()
        if ov_dir.exists() and not ov_dir.is_dir():
            raise ValueError(f"--openvino {ov_dir}: not a directory")
        if not ov_dir.parent.is_dir():
            raise ValueError(f"--openvino {ov_dir}: its parent {ov_dir.parent}/ does not exist")
    batch = 2 if args.dynamic_batch else 1  # a dynamic graph is checked on a batch it was not traced with
    calib = None
    if args.calib_images:
        calib = read_images(args.calib_images, size, args.calib_count)
        if len(calib[0]) < MIN_CALIB_IMAGES:
            raise ValueError(f"--calib-images {args.calib_images}: {len(calib[0])} readable images, fewer than the "
                             f"{MIN_CALIB_IMAGES} that calibration and the check against FP32 need")
    net_spec = dict(model=os.path.abspath(args.model) if args.model and os.path.isfile(args.model) else args.model,
                    weights=args.weights and (os.path.abspath(args.weights) if os.path.exists(args.weights)
                                              else args.weights), size=size,
                    reference=args.reference and os.path.abspath(args.reference))

    deployed = predict.Deployed(net.deploy(), model.num_top_queries(cfg)).eval()
    images, sizes = example_inputs(size, batch)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in deployed(images, sizes).items()}
    images, sizes = images.numpy(), sizes.numpy()
    deployments = [deployment("PyTorch eager fp32", "PyTorch eager", "fp32"),
                   deployment("PyTorch eager bf16", "PyTorch eager", "bf16")]

    with predict.atomic_output(onnx_path, "--onnx") as tmp:
        export_onnx(deployed, (torch.from_numpy(images[:1]), torch.from_numpy(sizes[:1])), tmp, args.opset,
                    args.dynamic_batch, list(ref), predict.metadata(cfg, classes))
        fp32 = OrtRunner(tmp)
        verify(ref, fp32(images, sizes), sizes, TOLERANCE, "ONNX Runtime")
    print(f"wrote {onnx_path} (opset {args.opset}, {'dynamic batch' if args.dynamic_batch else 'batch 1'}, "
          f"{size[0]}x{size[1]})")
    deployments.append(deployment("ONNX Runtime fp32", "ONNX Runtime", "fp32", onnx_path))

    if calib:
        check = tuple(x[:CHECK_IMAGES // batch * batch] for x in calib)
        fp32_outputs = run_batches(OrtRunner(onnx_path), *check, batch)
        checked = lambda runner, what: check_agreement(fp32_outputs, run_batches(runner, *check, batch), what,
                                                       len(check[0]), enforce=args.weights is not None)
    if args.int8:
        with predict.atomic_output(int8_path, "--int8") as tmp:
            quantize_int8(onnx_path, tmp, *calib, batch, args.weight_bits)
            checked(OrtRunner(tmp), "ONNX Runtime int8")
        print(f"wrote {int8_path} (calibrated on {len(calib[0])} images of {args.calib_images})")
        deployments.append(deployment("ONNX Runtime int8", "ONNX Runtime", "int8", int8_path))

    if ov_dir:
        ov_dir.mkdir(exist_ok=True)
        xml = ov_dir / f"{pathlib.Path(onnx_path).stem}.xml"
        with predict.atomic_output(xml, "--openvino", companions=[".bin"]) as tmp:
            export_openvino(onnx_path, tmp)
            verify(ref, OpenVINORunner(tmp)(images, sizes), sizes, TOLERANCE, "OpenVINO")
            if not predict.bf16_supported():
                print("OpenVINO bf16: this CPU has no BF16; not checked, not timed")
            elif calib:
                checked(OpenVINORunner(tmp, precision="bf16"), "OpenVINO bf16")
            else:
                print("OpenVINO bf16: not checked against FP32 (give --calib-images to check it on real images)")
        print(f"wrote {xml} and its .bin")
        deployments.append(deployment("OpenVINO fp32", "OpenVINO", "fp32", xml))
        if predict.bf16_supported():
            deployments.append(deployment("OpenVINO bf16", "OpenVINO", "bf16", xml))
        if args.int8:  # what stays in float runs in BF16 where the CPU has it: the fastest deployment here
            xml = ov_dir / f"{pathlib.Path(int8_path).stem}.xml"
            precision = "int8+bf16" if predict.bf16_supported() else "int8"
            with predict.atomic_output(xml, "--openvino", companions=[".bin"]) as tmp:
                export_openvino(int8_path, tmp)
                hint = "bf16" if "bf16" in precision else "f32"
                checked(OpenVINORunner(tmp, precision=hint), f"OpenVINO {precision}")
            print(f"wrote {xml} and its .bin")
            deployments.append(deployment(f"OpenVINO {precision}", "OpenVINO", precision, xml))

    if args.trt:
        precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
        source = int8_path if args.int8 else onnx_path
        max_batch = args.max_batch if args.dynamic_batch else None
        reason = predict.tensorrt_missing()
        if reason:
            raise RuntimeError(f"cannot build --trt {args.trt} here: {reason}. Build it from {source} on the "
                               f"target machine with:\n  " + trtexec_command(source, args.trt, args.fp16, args.int8,
                                                                              size, max_batch))
        with predict.atomic_output(args.trt, "--trt") as tmp:
            build_engine(source, tmp, args.fp16, args.int8, size, max_batch)
            engine = predict.TensorRTRunner(tmp)
            if args.int8:
                checked(engine, "TensorRT int8")
            else:
                verify(ref, engine(images, sizes), sizes, TOLERANCE_FP16 if args.fp16 else TOLERANCE,
                       f"TensorRT ({precision})")
        print(f"wrote {args.trt}")
        deployments.append(deployment(f"TensorRT {precision}", "TensorRT", precision, args.trt))

    ap = {}
    if args.val_images:
        for d in deployments:
            ap[d["name"]] = coco_ap(make_runner(d, net_spec, args.threads), cfg, size, args.val_images, args.val_ann)
        print(f"COCO AP on {args.val_images} at {size[0]}x{size[1]}:")
        for name_, stats in ap.items():
            print(f"  {name_:28s} " + "   ".join(f"{kind} AP {s[0]:.4f}, AP50 {s[1]:.4f}" for kind, s in stats.items()))

    if args.benchmark:
        if args.reference:
            deployments.insert(0, deployment("the original, PyTorch eager fp32", "the original, PyTorch eager", "fp32"))
        times, medians, profiles = benchmark(deployments, net_spec, args.threads, args.rounds, args.runs, 3,
                                             args.profile)
        reference = deployments[0]["name"] if args.reference else None
        rows = benchmark_rows(deployments, times, medians, reference, ap)
        print_table(rows, f"{name} at {size[0]}x{size[1]}, batch 1, {args.threads} threads, each in its own process, "
                          f"{args.rounds} rounds of {args.runs} runs after 3 warm-up runs, on {cpu_name()} (load "
                          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
        for name_, (ops, total) in profiles.items():
            print_profile(name_, ops, total)
        fastest = min((r for r in rows if r["runtime"] != "the original, PyTorch eager"), key=lambda r: r["median_ms"])
        print(f"fastest on this CPU: {fastest['name']}, {fastest['median_ms']:.1f} ms; predict.py runs it with\n"
              f"  {predict_command(fastest, args)}")
        if args.benchmark_json:
            result = dict(model=name, size=size, threads=args.threads, rounds=args.rounds, runs=args.runs,
                          cpu=cpu_name(), load_average=os.getloadavg(), fastest=fastest["name"], rows=rows)
            with predict.atomic_output(args.benchmark_json, "--benchmark-json") as tmp:
                pathlib.Path(tmp).write_text(json.dumps(result, indent=1))
            print(f"wrote {args.benchmark_json}")


if __name__ == "__main__":
    main()
