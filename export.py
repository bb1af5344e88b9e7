"""Export ECDet / ECSeg / ECPose to ONNX and TensorRT for edge devices, verify the result against
PyTorch, and benchmark it.

    python export.py --model ecdet_s --weights ecdet_s.pth --onnx ecdet_s.onnx
    python export.py --weights outputs/detection/best.pth --onnx det.onnx   # the config inside the checkpoint
    python export.py --model ecseg_s --weights ecseg_s.pth --onnx ecseg_s.onnx --dynamic-batch
    python export.py --model ecdet_s --weights ecdet_s.pth --trt ecdet_s.engine --fp16
    python export.py --model ecdet_s --benchmark            # random weights are fine for timing

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
Every export is checked with onnx.checker and run by ONNX Runtime on the inputs PyTorch ran; only
a file that matches within the tolerance lands under the requested name.
"""
import argparse
import contextlib
import copy
import json
import os
import pathlib
import statistics
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

import model

# Largest difference allowed between PyTorch and an exported model, per output kind: scores and
# mask probabilities absolutely; boxes relative to the image size, so 1e-3 is the same error as
# 1e-3 on the network's normalised coordinates (0.64 px on a 640-pixel side).
TOLERANCE = 1e-3
TOLERANCE_FP16 = 2e-2  # twenty rounding steps of fp16 (2**-10), for errors that add up through the layers
# How each output is compared.
OUTPUT_KINDS = {"labels": "labels", "boxes": "pixels", "scores": "scores", "masks": "mask logits",
                "keypoints": "pixels"}
OPSETS = range(17, 21)  # torch's TorchScript exporter writes opsets up to 20


class Deployed(nn.Module):
    """The network plus in-graph postprocessing: (images, orig_target_sizes) -> dict of outputs."""

    def __init__(self, net, num_top_queries):
        super().__init__()
        self.net, self.num_top_queries = net, num_top_queries

    def forward(self, images, orig_target_sizes):
        return model.select_top(self.net(images), orig_target_sizes, self.num_top_queries)


def load_network(spec, weights):
    """(network in eval mode, config, name, classes) from a checkpoint and a preset name or JSON config.

    The config is `spec`'s when given, else the checkpoint's own: this project's checkpoints carry it
    (and their class names), a released one does not, so it needs `spec`. classes: (names, category
    ids), each a list by label, the checkpoint's or else model.default_classes (COCO's).
    """
    ckpt = None
    if weights is not None:
        try:
            ckpt = model.read_checkpoint(weights)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--weights: {e}") from None
        if not isinstance(ckpt, dict):
            raise ValueError(f"--weights {weights}: expected a checkpoint (a dict), got a {type(ckpt).__name__}")
    if spec is None:
        if ckpt is None:
            raise ValueError("give --model (a preset or a JSON config), --weights (a checkpoint of this project), or both")
        if not isinstance(ckpt.get("config"), dict):
            raise ValueError(f"--weights {weights} carries no network config (a released checkpoint?): give --model "
                             f"with its preset ({', '.join(model.PRESETS)}) or a JSON config file")
        cfg, name = ckpt["config"], pathlib.Path(weights).stem
    elif spec.endswith(".json") or os.path.isfile(spec):
        try:
            cfg = json.loads(pathlib.Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--model {spec}: cannot read the JSON config: {e}") from None
        name = pathlib.Path(spec).stem
    elif spec in model.PRESETS:
        cfg, name = model.preset_config(spec), spec
    else:
        raise ValueError(f"--model {spec!r}: neither a preset ({', '.join(model.PRESETS)}) nor a JSON config file")
    try:
        net = model.build_model(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--model {spec or weights}: {e}") from None
    if ckpt is None:
        print("warning: no --weights given: random weights (fine for benchmarking, useless for inference)",
              file=sys.stderr)
    else:
        try:
            model.load_weights(net, ckpt)
        except ValueError as e:
            raise ValueError(f"--weights {weights}: {e}") from None
    if ckpt is not None and "names" in ckpt:
        classes = ckpt["names"], ckpt["category_ids"]
    else:
        classes = model.default_classes(cfg["num_classes"], "DETRTransformer" in cfg)
    return net.eval(), cfg, name, classes


def metadata(cfg, classes):
    """What an exported file carries besides the graph (ONNX metadata_props, which OpenVINO keeps in
    its IR's rt_info under "framework"): the config, and class names and category ids by label."""
    names, category_ids = classes
    return {"config": json.dumps(cfg), "names": json.dumps(names), "category_ids": json.dumps(category_ids)}


def check_writable(path, flag):
    """`path` as a Path, or an error naming the argument when no file can be written there."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write there ({path.parent}/ is not a writable directory)")
    return path


@contextlib.contextmanager
def atomic_output(path, flag):
    """A temporary file next to `path` that replaces `path` only when the block succeeds, so a failed
    export never leaves a half-written or unverified file under the requested name."""
    path = check_writable(path, flag)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # ONNX Runtime goes by the suffix
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        torch.onnx.export(deployed, inputs, path, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=["images", "orig_target_sizes"], output_names=names, dynamic_axes=axes)
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


def ort_session(path, threads=None):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


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
# TensorRT: built with its Python API where it is importable and a CUDA GPU is present
# ---------------------------------------------------------------------------------------------
def tensorrt_missing():
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but its CUDA libraries are not
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def trtexec_command(onnx_path, engine_path, fp16, size, max_batch):
    """The trtexec command that builds the engine that `build_engine` would build."""
    cmd = f"trtexec --onnx={onnx_path} --saveEngine={engine_path}"
    if max_batch:
        shapes = lambda b: f"images:{b}x3x{size[0]}x{size[1]},orig_target_sizes:{b}x2"
        cmd += f" --minShapes={shapes(1)} --optShapes={shapes(1)} --maxShapes={shapes(max_batch)}"
    return cmd + (" --fp16    (TensorRT 10; TensorRT 11: ModelOpt AutoCast the ONNX file instead)" if fp16 else "")


def build_engine(onnx_path, engine_path, fp16, size, max_batch):
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
    if max_batch:
        profile = builder.create_optimization_profile()
        profile.set_shape("images", (1, 3, *size), (1, 3, *size), (max_batch, 3, *size))
        profile.set_shape("orig_target_sizes", (1, 2), (1, 2), (max_batch, 2))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    pathlib.Path(engine_path).write_bytes(engine)


class TensorRTRunner:
    """Runs a serialized engine on CUDA: (images, orig_target_sizes) -> dict of output tensors."""

    def __init__(self, engine_path):
        import tensorrt as trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # the runtime and its logger must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(pathlib.Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                        for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}

    def __call__(self, images, orig_target_sizes):
        tensors = {"images": images.cuda().contiguous(), "orig_target_sizes": orig_target_sizes.cuda().contiguous()}
        for name, t in tensors.items():
            self.context.set_input_shape(name, tuple(t.shape))
        outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=dtype, device="cuda")
                   for n, dtype in self.outputs.items()}
        for name, t in {**tensors, **outputs}.items():
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return outputs


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------
def print_table(times, title):
    print(title)
    print(f"  {'':36s} {'median':>7s} {'IQR':>15s} {'min':>7s} {'max':>7s}  (ms)")
    for name, ts in times.items():
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
        median, q1, q3, lo, hi = (t * 1e3 for t in (statistics.median(ts), q1, q3, min(ts), max(ts)))
        print(f"  {name:36s} {median:7.1f} {f'{q1:.1f}-{q3:.1f}':>15s} {lo:7.1f} {hi:7.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="preset (ecdet_s ... ecpose_x) or a JSON config file in the original's "
                                        "vocabulary (default: the config inside a --weights of this project)")
    parser.add_argument("--weights", help="checkpoint: one of this project's, a released one (with --model), or a "
                                          "state dict (default: random weights, for benchmarking)")
    parser.add_argument("--onnx", help="output ONNX file (default: <model>.onnx)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N",
                        help="input size H [W], multiples of 32 (default: the config's eval_spatial_size)")
    parser.add_argument("--dynamic-batch", action="store_true", help="let the batch size vary at run time")
    parser.add_argument("--opset", type=int, default=17, choices=OPSETS, metavar="{17..20}")
    parser.add_argument("--trt", help="also build a TensorRT engine here (needs tensorrt and a CUDA GPU)")
    parser.add_argument("--fp16", action="store_true", help="build the TensorRT engine in half precision")
    parser.add_argument("--max-batch", type=int, default=16, help="largest batch of a --dynamic-batch engine")
    parser.add_argument("--benchmark", action="store_true", help="time PyTorch, ONNX Runtime (and TensorRT)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of PyTorch and ONNX Runtime")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per runtime in --benchmark")
    parser.add_argument("--reference", metavar="DIR", help="--benchmark the original implementation too (ECDet, ECSeg): "
                        "the ecdetseg/ folder of a checkout of Intellindust-AI-Lab/EdgeCrafter")
    args = parser.parse_args(argv)
    for option, value in (("--threads", args.threads), ("--runs", args.runs), ("--max-batch", args.max_batch)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    if args.img_size and len(args.img_size) > 2:
        parser.error(f"--img-size takes H or H W, got {len(args.img_size)} numbers")
    if args.fp16 and not args.trt:
        parser.error("--fp16 sets the precision of the TensorRT engine: give --trt too")
    try:
        run(args)
    except (ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)  # argparse's format and exit code
        raise SystemExit(2) from None


def run(args):
    torch.set_num_threads(args.threads)
    net, cfg, name, classes = load_network(args.model, args.weights)
    onnx_path = args.onnx or f"{name}.onnx"
    for flag, path in (("--onnx", onnx_path), ("--trt", args.trt)):
        if path:
            check_writable(path, flag)
    size = args.img_size or cfg.get("eval_spatial_size") or [640, 640]
    size = [size[0], size[-1]]
    if size[0] % 32 or size[1] % 32 or min(size) <= 0:
        raise ValueError(f"--img-size {size[0]} {size[1]}: both sides must be positive multiples of 32 "
                         f"(the stride of the coarsest feature map)")
    eval_net = copy.deepcopy(net) if args.benchmark else None
    deployed = Deployed(net.deploy(), model.num_top_queries(cfg)).eval()
    # A dynamic graph is verified on a batch of 2, a batch size it was not traced with.
    images, sizes = example_inputs(size, 2 if args.dynamic_batch else 1)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in deployed(images, sizes).items()}

    with atomic_output(onnx_path, "--onnx") as tmp:
        export_onnx(deployed, (images[:1], sizes[:1]), tmp, args.opset, args.dynamic_batch, list(ref),
                    metadata(cfg, classes))
        outputs = ort_session(tmp).run(list(ref), {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
        verify(ref, dict(zip(ref, outputs)), sizes.numpy(), TOLERANCE, "ONNX Runtime")
    print(f"wrote {onnx_path} (opset {args.opset}, {'dynamic batch' if args.dynamic_batch else 'batch 1'}, "
          f"{size[0]}x{size[1]})")

    engine, precision = None, "fp16" if args.fp16 else "fp32"
    if args.trt:
        max_batch = args.max_batch if args.dynamic_batch else None
        reason = tensorrt_missing()
        if reason:
            raise RuntimeError(f"cannot build --trt {args.trt} here: {reason}. Build it from {onnx_path} on the "
                               f"target machine with:\n  " + trtexec_command(onnx_path, args.trt, args.fp16, size,
                                                                              max_batch))
        with atomic_output(args.trt, "--trt") as tmp:
            build_engine(onnx_path, tmp, args.fp16, size, max_batch)
            engine = TensorRTRunner(tmp)
            got = {k: v.cpu().numpy() for k, v in engine(images, sizes).items()}
            verify(ref, got, sizes.numpy(), TOLERANCE_FP16 if args.fp16 else TOLERANCE, f"TensorRT ({precision})")
        print(f"wrote {args.trt}")

    if args.benchmark:
        images, sizes = images[:1], sizes[:1]
        session = ort_session(onnx_path, args.threads)
        feed = {"images": images.numpy(), "orig_target_sizes": sizes.numpy()}
        eager = Deployed(eval_net, deployed.num_top_queries).eval()
        runners = {"PyTorch eager, eval model (fp32)": lambda: eager(images, sizes),
                   "PyTorch eager, deployed (fp32)": lambda: deployed(images, sizes),
                   "ONNX Runtime CPU (fp32)": lambda: session.run(None, feed)}
        if args.reference:
            original = model.reference_model(eval_net, cfg, args.reference, size)
            runners["the original, PyTorch eager (fp32)"] = lambda: original(images)
        if engine:
            on_gpu = images.cuda(), sizes.cuda()
            runners[f"TensorRT ({precision}, CUDA)"] = lambda: engine(*on_gpu)
        with torch.inference_mode():
            times = model.measure_latency(runners, args.runs, warmup=3)
        print_table(times, f"{name} at {size[0]}x{size[1]}, batch 1, {args.threads} threads, {args.runs} runs after 3 "
                           f"warm-up runs (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
        if args.reference:  # per run, as the runtimes took turns
            reference = times.pop("the original, PyTorch eager (fp32)")
            for name, ts in times.items():
                print(f"  {name} / the original: median {statistics.median(a / b for a, b in zip(ts, reference)):.3f}")


if __name__ == "__main__":
    main()
