"""Run ECDet, ECSeg or ECPose on images, folders and videos, from a checkpoint or an exported model,
and score it on labelled data.

    python predict.py --weights outputs/detection/best.pth --source photo.jpg
    python predict.py --weights ecdet_s.pth --model ecdet_s --source photos/ --conf 0.5
    python predict.py --weights ecdet_s.onnx --source clip.mp4
    python predict.py --weights best.pth --source /coco/val2017 --coco-ann /coco/annotations/instances_val2017.json
    python predict.py --weights best.pth --source clip.mp4 --device cuda --cuda-graph   # low latency on a GPU

The runtime follows from the file: checkpoints (.pth: this project's carry their config, a released
one needs --model) run in PyTorch, .onnx files from export.py in ONNX Runtime (INT8 ones too),
TensorRT engines (.engine, .plan) on a CUDA GPU, OpenVINO IR (.xml) with OpenVINO. Every image is
stretched to the network's square input size and normalised exactly as the training's validation
transform does, so any image size works; results are in the pixels of the original image.

Under --output-dir it writes each image with its detections drawn, each video re-encoded with them
(same name, frame count and rate), and predictions.jsonl, one line per image or video frame:
    {"source": path, "frame": i or null, "width": w, "height": h, "detections": [{"box": [x1, y1, x2, y2],
     "score": s, "label": l, "name": "...", "category_id": c, "keypoints": [x, y, s] * 17 (ECPose),
     "mask": COCO RLE (ECSeg)}]}
Each line is written whole and each picture renamed into place once complete, so an interrupted run
leaves complete files only. With --coco-ann it also writes COCO results files and prints COCO AP,
computed by the evaluator that training uses.

The file reads as the data flows: sources, images into the network's input, the runtimes, the
Predictor (the Python API), drawing, COCO results and AP, and the command line.
"""
import argparse
import contextlib
import fractions
import glob
import io
import itertools
import json
import os
import pathlib
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

import model
import support

# ---------------------------------------------------------------------------------------------
# Sources: images, folders, globs, videos
# ---------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Each video is re-encoded into its own container, with a codec that container takes.
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}


def is_video(path):
    return path.lower().endswith(tuple(VIDEO_CODECS))


def find_sources(source, skip=None):
    """(root, sorted paths) of the images and videos that `source` names: a file, a folder (searched
    recursively, each real folder once, so a symbolic-link loop is not followed round, and without
    the folder `skip`, where the outputs go) or a glob pattern. Outputs keep their paths relative to `root`."""
    if os.path.isdir(source):
        root, paths = source, support.files_below(source, skip)
    elif os.path.isfile(source):
        root, paths = os.path.dirname(source), [source]
    else:
        paths = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        if not paths:
            raise FileNotFoundError(f"--source {source}: no such file or folder, and no file matches it as a pattern")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    media = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) or is_video(p))
    if not media:
        raise FileNotFoundError(f"--source {source}: no image ({' '.join(IMAGE_EXTENSIONS)}) or video "
                                f"({' '.join(VIDEO_CODECS)}) there")
    return root, media


def read_video(path):
    """(frame rate, number of frames or None, (w, h), generator of RGB PIL frames) of a video file."""
    av = support.optional_import("av", f"--source {path} (a video)")
    try:
        container = av.open(path)
        stream = container.streams.video[0]
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"--source {path}: cannot decode it as a video: {e}") from None
    rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)

    def frames():
        with container:
            try:
                for frame in container.decode(stream):
                    yield frame.to_image()
            except av.FFmpegError as e:
                raise ValueError(f"--source {path}: the video stops decoding: {e}") from None

    return rate, stream.frames or None, (stream.codec_context.width, stream.codec_context.height), frames()


# ---------------------------------------------------------------------------------------------
# Images into the network: any PIL mode to RGB, stretched and normalised as in validation
# ---------------------------------------------------------------------------------------------
def to_rgb(image, upright=True):
    """An RGB PIL image from one in any mode, turned upright as viewers and annotation tools show it
    (its EXIF orientation applied; upright=False keeps the stored frame). Greys of more than 8 bits
    are scaled to 8 bits first: integer ones (16-bit PNGs, modes I;16* and I) from the 16-bit range,
    float ones (F) from [0, 1]; PIL's own convert clips them at 255, which turns most pixels white.
    Every other mode is PIL's conversion (alpha dropped, palettes looked up)."""
    if upright and image.getexif().get(support.EXIF_ORIENTATION, 1) != 1:  # else exif_transpose only copies
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        scale = 255.0 if image.mode == "F" else 255 / 65535
        grey = np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def load_image(image, upright=True):
    """A path, a PIL image or an (H, W, 3) uint8 RGB array -> an RGB PIL image, upright (to_rgb). A file
    that PIL cannot decode raises OSError (or ValueError for a mode it cannot convert)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return to_rgb(im, upright)  # converting decodes the whole file, so a truncated one fails here
    if isinstance(image, Image.Image):
        return to_rgb(image, upright)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    raise ValueError(f"expected an image path, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}"
                     + (f" {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else ""))


# ---------------------------------------------------------------------------------------------
# Networks and files shared with export.py: a checkpoint's network, its deployed form, an
# exported file's metadata, atomic output, and the runtimes' sessions
# ---------------------------------------------------------------------------------------------
class Deployed(nn.Module):
    """The network plus in-graph postprocessing: (images, orig_target_sizes) -> dict of outputs. With
    `bf16`, the network runs under autocast and the postprocessing on its outputs cast back to float32."""

    def __init__(self, net, num_top_queries, bf16=False):
        super().__init__()
        self.net, self.num_top_queries, self.bf16 = net, num_top_queries, bf16

    def forward(self, images, orig_target_sizes):
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.bf16):
            outputs = {k: v for k, v in self.net(images).items() if v is not None}  # the original's: pred_masks None
        if self.bf16:
            outputs = {k: v.float() for k, v in outputs.items()}
        return model.select_top(outputs, orig_target_sizes, self.num_top_queries)


def load_network(spec, weights):
    """(network in eval mode, config, name, classes) from a checkpoint and a preset name or JSON config.

    The config is `spec`'s when given, else the checkpoint's own: this project's checkpoints carry it
    (and their class names), a released one does not, so it needs `spec`. classes: (names, category
    ids), each a list by label, the checkpoint's or else support.default_classes (COCO's). weights: a
    file, a loaded checkpoint, or a preset name for the released model (downloaded; spec defaults to
    it). Without weights, seeded random ones, the same in every process.
    """
    ckpt = None
    if isinstance(weights, str) and weights in model.PRESETS and not os.path.exists(weights):
        # a preset name: the released model, downloaded once into torch hub's cache, on its preset's network
        spec, ckpt = spec or weights, support.released_checkpoint(weights, model.PRESETS)
    elif weights is not None:
        ckpt = weights if isinstance(weights, dict) else support.read_checkpoint(weights, "--weights")
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
    torch.manual_seed(0)
    try:
        net = model.build_model(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--model {spec or weights}: {e}") from None
    if ckpt is not None:
        try:
            model.load_weights(net, ckpt)
        except ValueError as e:
            raise ValueError(f"--weights {weights}: {e}") from None
    if ckpt is not None and "names" in ckpt:
        classes = ckpt["names"], ckpt["category_ids"]
    else:
        classes = support.default_classes(cfg["num_classes"], "DETRTransformer" in cfg)
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
def atomic_output(path, flag, companions=(), commit_on_interrupt=False):
    """A temporary file next to `path` that replaces `path` only when the block succeeds
    (support.atomic_path), so a failed export never leaves a half-written or unverified file under
    the requested name. `companions`: suffixes of files written beside it under the same stem
    (OpenVINO's .bin), moved with it."""
    path = check_writable(path, flag)
    with support.atomic_path(path, companions, commit_on_interrupt) as tmp:
        yield tmp


def ort_session(path, threads=None, profile_prefix=None):
    """An ONNX Runtime CPU session whose threads sleep between runs: spinning ones slow down whatever
    runs next on the same cores (PyTorch in the same process five- to seven-fold, measured)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def tensorrt_missing():
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):  # OSError: the package is there but its CUDA libraries are not
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


class TensorRTRunner:
    """Runs a serialized engine on CUDA, from and to numpy arrays on the host."""

    def __init__(self, engine_path):
        import tensorrt as trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # the runtime and its logger must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(pathlib.Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                        for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}

    def __call__(self, images, sizes):
        tensors = {"images": torch.from_numpy(images).cuda(), "orig_target_sizes": torch.from_numpy(sizes).cuda()}
        for name, t in tensors.items():
            self.context.set_input_shape(name, tuple(t.shape))
        outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=dtype, device="cuda")
                   for n, dtype in self.outputs.items()}
        for name, t in {**tensors, **outputs}.items():
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}


class CUDAGraphRunner:
    """`fn(images, sizes)` -> dict of tensors, replayed from one CUDA graph captured at a fixed input shape.

    At batch 1 a GPU waits on Python: the eager forward launches a few thousand kernels, each taking
    longer to launch than to run. A graph launches them all at once. Captured after warm-up runs on a side
    stream (cuDNN and cuBLAS pick their kernels and allocate workspace outside the graph), on static input
    buffers that every call copies into; a smaller batch fills the first rows. A forward that cannot be
    captured (one that copies from the host or reads values back to Python) is refused with a ValueError,
    and so is a graph whose outputs differ from eager ones on a random input, checked once.
    """

    def __init__(self, fn, batch, size, device, tolerance=1e-3):
        self.images = torch.randn(batch, 3, *size, device=device)
        self.sizes = torch.tensor([[size[1], size[0]]] * batch, device=device)
        with torch.inference_mode():
            expected = fn(self.images, self.sizes)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn(self.images, self.sizes)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.outputs = fn(self.images, self.sizes)
            except RuntimeError as e:
                raise ValueError(f"--cuda-graph: the network cannot be captured in a CUDA graph ({e})") from None
            got = self(self.images.clone(), self.sizes.clone())
        for k, v in expected.items():
            error = (got[k].double() - v.double()).abs().max().item() if v.numel() else 0.0
            if not error <= tolerance * (1 + v.double().abs().max().item()):
                raise ValueError(f"--cuda-graph: the CUDA graph's {k} differ from the eager network's by {error:.3g}; "
                                 f"run without --cuda-graph")

    @torch.inference_mode()
    def __call__(self, images, sizes):
        n = len(images)
        self.images[:n].copy_(images)
        self.sizes[:n].copy_(sizes)
        self.graph.replay()
        return {k: v[:n].clone() for k, v in self.outputs.items()}  # the next replay overwrites self.outputs


class OrtRunner:
    """An ONNX file in ONNX Runtime on the CPU."""

    def __init__(self, path, threads=None):
        self.path, self.threads = path, threads
        self.session = ort_session(path, threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images, sizes):
        return dict(zip(self.names, self.session.run(self.names, {"images": images, "orig_target_sizes": sizes})))


def import_openvino(what="--openvino"):
    return support.optional_import("openvino", what)


def bf16_supported():
    """Whether OpenVINO's CPU plugin computes in bfloat16 here (AVX-512 BF16 or AMX); elsewhere its bf16
    hint falls back to float32."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINORunner:
    """An IR on OpenVINO's CPU plugin, at inference precision "f32" or "bf16" (where the CPU has it).
    On CPUs with bf16 units (this one) OpenVINO computes in bf16 unless told: on the network of
    tests/test_predict.py its scores came out 2-4e-3 from the ONNX file's, 2e-5 in f32."""

    def __init__(self, path, threads=None, precision="f32"):
        self.path, self.config = path, {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.model = import_openvino().Core().read_model(path)
        self.request = self.compile()

    def compile(self, **extra):
        compiled = import_openvino().Core().compile_model(self.model, "CPU", {**self.config, **extra})
        self.names = [o.get_any_name() for o in compiled.outputs]
        return compiled.create_infer_request()

    def __call__(self, images, sizes):
        outputs = self.request.infer({"images": images, "orig_target_sizes": sizes})
        return {name: np.array(outputs[i]) for i, name in enumerate(self.names)}  # its buffers are reused


# ---------------------------------------------------------------------------------------------
# Runtimes: (images (B, 3, H, W), original sizes (B, 2) as (w, h)) -> model.select_top's outputs
# ---------------------------------------------------------------------------------------------
# Each runtime has `size` (H, W) of its input (a PyTorch network takes any multiple of 32),
# `batch` (the largest batch it takes; None: any), `names` and `category_ids` (by label).
RUNTIMES = {"torch": (".pth", ".pt"), "onnxruntime": (".onnx",), "tensorrt": (".engine", ".plan"),
            "openvino": (".xml",)}
# Precisions of the float parts: PyTorch (autocast) and OpenVINO (its inference precision hint, also for
# what an INT8 IR leaves in float). ONNX Runtime and TensorRT files carry their own.
PRECISIONS = ("fp32", "bf16")


def classes_from(props, what, pose):
    """(names, category ids) from an exported file's `metadata`, else COCO's."""
    if "names" in props and "category_ids" in props:
        return json.loads(props["names"]), json.loads(props["category_ids"])
    tqdm.write(f"warning: {what} carries no class names; taking COCO's", file=sys.stderr)
    return support.default_classes(2 if pose else 80, pose)


class TorchRuntime:
    """A checkpoint in PyTorch, deployed (Deployed: the network and model.select_top), in float32 or
    under bf16 autocast."""

    def __init__(self, weights, config, device, precision="fp32"):
        net, self.cfg, _, (self.names, self.category_ids) = load_network(config, weights)
        self.device = support.device(device)
        self.deployed = Deployed(net.deploy(), model.num_top_queries(self.cfg), precision == "bf16").to(self.device)
        self.forward = self.deployed
        self.size, self.batch, self.resizable = self.cfg.get("eval_spatial_size") or [640, 640], None, True

    def capture(self, batch, size):
        """Run the network from a CUDA graph (CUDAGraphRunner) at batch `batch` and input size (H, W)."""
        if self.device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device (--device cuda); this network runs on {self.device}")
        self.forward = CUDAGraphRunner(self.deployed, batch, size, self.device)
        self.size, self.batch, self.resizable = list(size), batch, False

    @torch.inference_mode()
    def __call__(self, images, sizes):
        return {k: v.cpu() for k, v in self.forward(images.to(self.device), sizes.to(self.device)).items()}


class ExportedRuntime:
    """An exported file on its runner (predict's and export's runners take and give numpy arrays)."""

    resizable = False

    def __call__(self, images, sizes):
        return {k: torch.from_numpy(v) for k, v in self.runner(images.numpy(), sizes.numpy()).items()}


class OnnxRuntime(ExportedRuntime):
    """An ONNX file of export.py's in ONNX Runtime, on the CPU."""

    def __init__(self, path):
        try:
            self.runner = OrtRunner(path)
        except Exception as e:  # ONNX Runtime's own exception types
            raise ValueError(f"--weights {path}: ONNX Runtime cannot load it: {e}") from None
        initializers = onnx.load(path).graph.initializer
        support.check_finite(((t.name, onnx.numpy_helper.to_array(t)) for t in initializers), f"--weights {path}",
                             exported=True)
        inputs = self.runner.session.get_inputs()
        if [i.name for i in inputs] != ["images", "orig_target_sizes"]:
            raise ValueError(f"--weights {path}: expected the inputs images and orig_target_sizes of an export.py "
                             f"file, found {[i.name for i in inputs]}")
        batch, _, *self.size = inputs[0].shape
        self.batch = batch if isinstance(batch, int) else None
        props = self.runner.session.get_modelmeta().custom_metadata_map
        self.names, self.category_ids = classes_from(props, path, "keypoints" in self.runner.names)


class TensorRTRuntime(ExportedRuntime):
    """A TensorRT engine (TensorRTRunner) on a CUDA GPU. An engine carries no metadata: the
    class names are read from the ONNX file of the same name beside it, which export.py builds it from."""

    def __init__(self, path):
        reason = tensorrt_missing()
        if reason:
            raise ValueError(f"--weights {path}: a TensorRT engine needs the tensorrt package and a CUDA GPU; "
                             f"here {reason}")
        self.runner = TensorRTRunner(path)
        engine = self.runner.engine
        batch, _, *self.size = engine.get_tensor_shape("images")
        # A dynamic batch (-1) is bounded by the engine's optimisation profile: (min, opt, max) shapes.
        self.batch = batch if batch > 0 else engine.get_tensor_profile_shape("images", 0)[2][0]
        onnx_path = pathlib.Path(path).with_suffix(".onnx")
        props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props} if onnx_path.is_file() else {}
        self.names, self.category_ids = classes_from(props, f"{path} (and {onnx_path})", "keypoints" in self.runner.outputs)


class OpenVINORuntime(ExportedRuntime):
    """An OpenVINO IR (.xml with its .bin) on the CPU; converted from export.py's ONNX file it keeps
    that file's metadata in rt_info under "framework"."""

    def __init__(self, path, precision="fp32"):
        import_openvino(f"--weights {path}")  # a missing package named for what needs it
        if precision == "bf16" and not bf16_supported():
            raise ValueError("--precision bf16: this CPU has no bfloat16 units (AVX-512 BF16 or AMX), on which "
                             "OpenVINO would run float32; use --precision fp32")
        try:
            self.runner = OpenVINORunner(path, precision={"fp32": "f32", "bf16": "bf16"}[precision])
        except RuntimeError as e:
            raise ValueError(f"--weights {path}: OpenVINO cannot load it: {e}") from None
        net = self.runner.model
        support.check_finite(((op.get_friendly_name(), op.get_data()) for op in net.get_ops()
                              if op.get_type_name() == "Constant"), f"--weights {path}", exported=True)
        shape = net.input("images").get_partial_shape()
        self.size = [shape[2].get_length(), shape[3].get_length()]
        self.batch = shape[0].get_length() if shape[0].is_static else None
        props = {k: net.get_rt_info(["framework", k]).astype(str) for k in ("names", "category_ids")
                 if net.has_rt_info(["framework", k])}
        self.names, self.category_ids = classes_from(props, path, "keypoints" in self.runner.names)


def open_runtime(weights, runtime=None, config=None, device="cpu", precision="fp32"):
    """The runtime for `weights`, chosen by its extension unless `runtime` (a RUNTIMES key) is given;
    `precision` (PRECISIONS) of PyTorch and OpenVINO. device None: CUDA when available for PyTorch
    (support.device), the CPU for ONNX Runtime and OpenVINO."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if runtime in (None, "torch") and weights in model.PRESETS and not os.path.exists(weights):
        return TorchRuntime(weights, config, device, precision)  # the released model (load_network)
    if runtime is None:
        runtime = next((r for r, ext in RUNTIMES.items() if str(weights).lower().endswith(ext)), None)
        if runtime is None:
            kinds = "; ".join(f"{' '.join(ext)} ({r})" for r, ext in RUNTIMES.items())
            raise ValueError(f"--weights {weights}: unknown kind of file {pathlib.Path(weights).suffix!r}; "
                             f"expected {kinds}, or give --runtime")
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime != "torch" and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights}: no such file")
    if config is not None and runtime != "torch":
        raise ValueError(f"--model describes a checkpoint's network; {weights} ({runtime}) carries its own")
    on_gpu = device is not None and support.device(device).type == "cuda"
    if runtime in ("onnxruntime", "openvino") and on_gpu:
        raise ValueError(f"--device {device}: {runtime} runs on the CPU here; on a GPU use the .pth or a TensorRT engine")
    if precision != "fp32" and runtime in ("onnxruntime", "tensorrt"):
        raise ValueError(f"--precision {precision}: {runtime} runs {weights} in the precision it was exported in; "
                         f"{precision} is for PyTorch and OpenVINO")
    if runtime == "tensorrt":
        return TensorRTRuntime(weights)
    if runtime == "onnxruntime":
        return OnnxRuntime(weights)
    if runtime == "openvino":
        return OpenVINORuntime(weights, precision)
    return TorchRuntime(weights, config, device, precision)


# ---------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------
def keypoint_boxes(keypoints):
    """(n, 3K) keypoints (pixel x, y, score) -> (n, 4) the extent of each person's keypoints, x1, y1,
    x2, y2: ECPose's box, as COCO's keypoint evaluation takes it."""
    xy = keypoints.unflatten(-1, (-1, 3))[..., :2]
    return torch.cat([xy.amin(1), xy.amax(1)], -1)


def select(result, keep):
    """The detections of one result dict where the (n,) bool `keep` is set."""
    return {k: v[keep] if torch.is_tensor(v) else [x for x, kept in zip(v, keep.tolist()) if kept]
            for k, v in result.items()}


class Predictor:
    """ECDet, ECSeg or ECPose from any weights file (module docstring), on images of any size.

        p = predict.Predictor("outputs/detection/best.pth", device="cpu", conf=0.4)
        results = p(["a.jpg", pil_image, rgb_array])

    p(images): a path, a PIL image (any mode), an (H, W, 3) uint8 RGB array, or a list of them -> a
    list with one dict per image of its detections scoring at least `conf`, highest first:
        boxes (n, 4) float pixel x1, y1, x2, y2 in the original image (ECPose: the keypoints' extent)
        scores (n,), labels (n,) int64, names [n str], category_ids [n int] (the COCO ids)
        masks (n, H, W) bool at the original size (ECSeg)
        keypoints (n, 51): per keypoint (support.KEYPOINT_NAMES) pixel x, y and a score (ECPose)
    config: a preset or JSON config for a released checkpoint (which carries none); img_size (H, W):
    the input size of a checkpoint's network (default: its eval_spatial_size); runtime: a RUNTIMES
    key, to override the file's extension; precision: "fp32" or "bf16" (PyTorch's autocast, OpenVINO's
    hint; an INT8 IR with "bf16" is the fastest CPU deployment measured on BF16 CPUs); cuda_graph: run a
    checkpoint's network on a CUDA device from a CUDA graph captured at batch_size and the input size
    (CUDAGraphRunner), for low latency. The steps
    prepare, infer and finish are p(images) in parts.
    """

    def __init__(self, weights, device="cpu", conf=0.4, config=None, img_size=None, runtime=None, batch_size=1,
                 precision="fp32", cuda_graph=False):
        if not 0 <= conf <= 1:  # NaN too
            raise ValueError(f"--conf {conf}: expected a score in [0, 1]")
        self.runtime = open_runtime(weights, runtime, config, device, precision)
        self.conf, self.batch_size = conf, batch_size
        self.names, self.category_ids = self.runtime.names, self.runtime.category_ids
        size = list(img_size) if img_size else list(self.runtime.size)
        if len(size) != 2 or min(size) <= 0 or size[0] % 32 or size[1] % 32:
            raise ValueError(f"--img-size {' '.join(map(str, size))}: expected H [W], positive multiples of 32")
        if size != list(self.runtime.size) and not self.runtime.resizable:
            raise ValueError(f"--img-size {' '.join(map(str, size))}: {weights} was exported for "
                             f"{self.runtime.size[0]}x{self.runtime.size[1]} input")
        if self.runtime.resizable:
            support.check_input_size(self.runtime.cfg, size)
        self.size = size
        if cuda_graph:
            if not isinstance(self.runtime, TorchRuntime):
                raise ValueError(f"--cuda-graph captures a checkpoint's PyTorch network; {weights} is not one")
            self.runtime.capture(batch_size, size)

    def __call__(self, images):
        images = images if isinstance(images, list) else [images]
        results = []
        for i in range(0, len(images), self.batch_size):
            batch, sizes = self.prepare([load_image(image) for image in images[i:i + self.batch_size]])
            results += self.finish(self.infer(batch, sizes), sizes)
        return results

    def prepare(self, images):
        """RGB PIL images -> (the network's input (B, 3, H, W), original sizes (B, 2) as (w, h))."""
        return torch.stack([support.preprocess(im, self.size) for im in images]), torch.tensor([im.size for im in images])

    def infer(self, batch, sizes):
        """The network and its top-K selection on a batch -> model.select_top's outputs, on the CPU."""
        step = self.runtime.batch or len(batch)
        parts = [self.runtime(batch[i:i + step], sizes[i:i + step]) for i in range(0, len(batch), step)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def finish(self, top, sizes, conf=None):
        """select_top's outputs -> the per-image dicts of p(images), of the detections scoring at
        least `conf` (default: the Predictor's); masks are resized only for those."""
        results = []
        for r, (w, h) in zip(model.per_image(top, sizes, resize_masks=False), sizes.tolist()):
            r = select(r, r["scores"] >= (self.conf if conf is None else conf))
            if "masks" in r:
                r["masks"] = model.masks_at_size(r["masks"], (h, w))
            if "keypoints" in r:
                r["boxes"] = keypoint_boxes(r["keypoints"])
            labels = r["labels"].tolist()
            # A file without class names gets COCO's: labels beyond them keep their number.
            r["names"] = [self.names[i] if i < len(self.names) else str(i) for i in labels]
            r["category_ids"] = [self.category_ids[i] if i < len(self.category_ids) else i for i in labels]
            results.append(r)
        return results


# ---------------------------------------------------------------------------------------------
# Drawing: boxes with class name and score, ECSeg masks, ECPose skeletons
# ---------------------------------------------------------------------------------------------


def draw(image, result, names, conf=0.0, skeleton=support.SKELETON):
    """A copy of RGB PIL `image` with the detections of `result` scoring at least `conf` drawn.

    result: labels (n,), scores (n,) and boxes (n, 4) pixel x1, y1, x2, y2 in `image`, each drawn
    in its class colour with its class name (`names` by label) and score; optionally masks (n, h, w)
    (resized to the image when of another size; ECSeg), blended in at half strength in the class
    colour, and keypoints (n, 3K) (pixel x, y, score) joined by the `skeleton`'s (i, j) pairs of
    keypoint indices, one colour per person (ECPose's persons are all of one class).
    Lines, points and text grow with the image so that they read alike at any size.
    """
    keep = result["scores"].detach().cpu() >= conf
    res = {k: v.detach().float().cpu()[keep] for k, v in result.items() if k in ("boxes", "scores", "masks", "keypoints")}
    labels = result["labels"].detach().cpu()[keep].tolist()
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).float()
    if "masks" in res and len(labels):
        masks = F.interpolate(res["masks"][:, None], size=pixels.shape[:2], mode="nearest")[:, 0].bool()
        for mask, label in zip(masks, labels):
            pixels[mask] = 0.5 * pixels[mask] + 0.5 * torch.tensor(support.PALETTE[label % len(support.PALETTE)], dtype=torch.float32)
    picture = Image.fromarray(pixels.round().byte().numpy())
    canvas = ImageDraw.Draw(picture)
    side = max(picture.size)
    width, font = max(2, round(side / 320)), ImageFont.load_default(max(10, round(side / 64)))
    # Lowest score first, so that where one query is reported with two classes the better one shows.
    for box, label, score in reversed(list(zip(res["boxes"].tolist(), labels, res["scores"].tolist()))):
        colour = support.PALETTE[label % len(support.PALETTE)]
        canvas.rectangle(box, outline=colour, width=width)
        text = f"{names[label] if label < len(names) else label} {score:.2f}"
        _, _, right, bottom = canvas.textbbox((0, 0), text, font=font)
        x = max(min(box[0], picture.width - right - 3), 0)  # the label inside the picture, above the box if it fits
        y = box[1] - (bottom + 2) if box[1] >= bottom + 2 else max(box[1], 0)
        canvas.rectangle([x, y, x + right + 3, y + bottom + 2], fill=colour)
        canvas.text((x + 2, y + 1), text, fill=(255, 255, 255), font=font)
    if "keypoints" in res:
        radius = 1.5 * width / 2
        for i, xy in enumerate(res["keypoints"].unflatten(-1, (-1, 3))[..., :2].tolist()):
            colour = support.PALETTE[i % len(support.PALETTE)]
            for a, b in skeleton:
                canvas.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=width)
            for x, y in xy:
                canvas.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return picture


def scale_result(result, scale):
    """A result of model.postprocess in pixels of another size: its boxes' and keypoints' x, y times
    scale (2,) = (sx, sy) (keypoint scores stay)."""
    out = dict(result)
    if "boxes" in out:
        out["boxes"] = out["boxes"] * scale.repeat(2)
    if "keypoints" in out:
        out["keypoints"] = (out["keypoints"].unflatten(-1, (-1, 3)) * torch.cat([scale, scale.new_ones(1)])).flatten(-2)
    return out


def draw_batch(images, targets, results, names, path, score_threshold=0.5, ncols=4):
    """Save a PNG grid of a training batch's images with their detections drawn by `draw`; returns path.

    images: (B, 3, H, W) ImageNet-normalised, as training's transforms make them; targets: theirs
    (orig_size brings the results, in the original image's pixels, to the tensor's size); results: per
    image, model.postprocess's; names: class name per label. Detections below score_threshold are not drawn.
    """
    mean, std = torch.tensor(support.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(support.IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for image, target, res in zip(images, targets, results):
        pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
        (h, w), (orig_w, orig_h) = image.shape[-2:], target["orig_size"].tolist()
        res = scale_result(res, torch.tensor([w / orig_w, h / orig_h], device=res["scores"].device))
        tiles.append(draw(Image.fromarray(pixels.permute(1, 2, 0).numpy()), res, names, score_threshold))
    if not tiles:
        raise ValueError("draw_batch() got no images")
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    tile_w, tile_h = tiles[0].size
    grid = Image.new("RGB", (ncols * tile_w, nrows * tile_h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % ncols) * tile_w, (i // ncols) * tile_h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with support.atomic_path(path) as tmp:
        grid.save(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# COCO results and AP (pycocotools), for --coco-ann and the training's evaluation
# ---------------------------------------------------------------------------------------------
def load_coco(ann_file):
    """Parse a COCO-format annotation file into a pycocotools COCO, with errors that name the file."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {ann_file} is not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"COCO annotation file {ann_file} lacks the top-level keys {missing}")
    support.check_coco_ids(data, ann_file)
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise ValueError(f"COCO annotation file {ann_file} has an entry without {e!r}") from e
    return coco


def encode_masks(masks):
    """(n, H, W) masks (bool, or probabilities cut at 0.5) -> n COCO RLEs with str counts (bytes don't
    survive JSON, or pickling to other tools)."""
    masks = masks.detach().cpu().reshape(-1, *masks.shape[-2:])
    masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class CocoEvaluator:
    """COCO AP (pycocotools) of postprocessed predictions, for iou_types "bbox", "segm", "keypoints".

    update(image_ids, results): results[i] belongs to image image_ids[i] and holds labels (n,)
    (mapped to category ids by label_to_cat, a dict or list by label), scores (n,), and per iou_type:
    "bbox" boxes (n, 4) pixel x1, y1, x2, y2 in the original image; "segm" masks (n, H, W) or
    (n, 1, H, W) at the original size (bool, or probabilities cut at 0.5); "keypoints" keypoints
    (n, 3K), per keypoint pixel x, y in the original image and a score (COCO's result format).
    summarize(): gathers every rank's results (torch.distributed, when initialised), evaluates on
    rank 0, prints the standard table and the per-class table, and returns on every rank
    {iou_type: the COCO stats (12; keypoints 10), iou_type + "_per_class": {name: [AP, AP50]}}. `results` holds the COCO result dicts: {image_id: {iou_type: [...]}}.
    An image passed to update() without detections counts as all-missed; images never passed are
    not evaluated (as the original). Use one evaluator per evaluation pass. Non-finite scores, boxes
    or keypoints are refused (FloatingPointError): COCOeval would count a NaN box as a match.
    """

    def __init__(self, coco_gt, label_to_cat, iou_types=("bbox",)):
        unknown = set(iou_types) - {"bbox", "segm", "keypoints"}
        if unknown:
            raise ValueError(f"iou_types must be among 'bbox', 'segm', 'keypoints'; got {sorted(unknown)}")
        self.coco_gt, self.label_to_cat, self.iou_types = coco_gt, label_to_cat, tuple(iou_types)
        self.results = {}  # image_id -> {iou_type: [COCO result dicts]}; a repeated image overwrites
        self.coco_eval = {}  # iou_type -> the evaluated COCOeval (rank 0)

    def update(self, image_ids, results):
        for image_id, res in zip(image_ids, results):
            image_id = int(image_id)
            if not all(torch.isfinite(res[k]).all() for k in ("scores", "boxes", "keypoints") if k in res):
                raise FloatingPointError(f"non-finite predictions (NaN or inf) for image {image_id}: the network "
                                         f"has diverged, and its predictions are not scored")
            cats = [self.label_to_cat[label] for label in res["labels"].tolist()]
            scores = res["scores"].float().tolist()
            entry = {}
            if "bbox" in self.iou_types:
                x1, y1, x2, y2 = res["boxes"].float().cpu().unbind(-1)
                xywh = torch.stack([x1, y1, x2 - x1, y2 - y1], -1).tolist()
                entry["bbox"] = [dict(image_id=image_id, category_id=c, bbox=b, score=s) for c, b, s in zip(cats, xywh, scores)]
            if "segm" in self.iou_types:
                entry["segm"] = [dict(image_id=image_id, category_id=c, segmentation=rle, score=s)
                                 for c, rle, s in zip(cats, encode_masks(res["masks"]), scores)]
            if "keypoints" in self.iou_types:
                entry["keypoints"] = [dict(image_id=image_id, category_id=c, keypoints=k, score=s)
                                      for c, k, s in zip(cats, res["keypoints"].float().cpu().tolist(), scores)]
            self.results[image_id] = entry

    def summarize(self):
        results = self.results
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)
            # DistributedSampler repeats images to even out ranks; keying by image id drops the repeats
            results = {image_id: entry for part in gathered for image_id, entry in part.items()}
        stats = None
        if not distributed or dist.get_rank() == 0:
            if not results:
                raise RuntimeError("CocoEvaluator.summarize() called before any update()")
            stats = {iou_type: self._evaluate(iou_type, results) for iou_type in self.iou_types}
            stats.update({f"{t}_per_class": per_class_ap(self.coco_eval[t]) for t in self.iou_types})
            print(per_class_table(stats, self.iou_types))
        if distributed:
            box = [stats]
            dist.broadcast_object_list(box, src=0)
            stats = box[0]
        return stats

    def _evaluate(self, iou_type, results):
        detections = [d for entry in results.values() for d in entry[iou_type]]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
            # loadRes fails on an empty list; an empty COCO makes every object a miss, AP 0
            coco_dt = self.coco_gt.loadRes(detections) if detections else COCO()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
            coco_eval.params.imgIds = sorted(results)
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"IoU metric: {iou_type}")
        coco_eval.summarize()
        self.coco_eval[iou_type] = coco_eval
        return [float(s) for s in coco_eval.stats]


def per_class_ap(coco_eval):
    """{category name: [AP, AP50]} of an evaluated and accumulated COCOeval, as the original's
    evaluator computes its class-wise table: precision over all object sizes at the largest number
    of detections, averaged over recall and IoU thresholds (AP) or at IoU 0.5 (AP50). A category
    without objects gets -1, as in COCO's own summary."""
    precision = coco_eval.eval["precision"][..., 0, -1]  # (IoU thresholds, recall thresholds, categories)
    mean = lambda p: float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return {coco_eval.cocoGt.cats[cat]["name"]: [mean(precision[:, :, k]), mean(precision[0, :, k])]
            for k, cat in enumerate(coco_eval.params.catIds)}


def per_class_table(stats, iou_types):
    """The class-wise table as the original prints it: a row per class, AP and AP50 in percent for
    each iou type (`stats` as CocoEvaluator.summarize returns it)."""
    columns = [["class", *stats[f"{iou_types[0]}_per_class"]]]
    for t in iou_types:
        values = stats[f"{t}_per_class"].values()
        columns += [[f"{t}-AP", *(f"{100 * ap:.2f}" for ap, _ in values)],
                    [f"{t}-AP50", *(f"{100 * ap50:.2f}" for _, ap50 in values)]]
    widths = [max(map(len, c)) + 2 for c in columns]
    rule = "+" + "+".join("-" * w for w in widths) + "+"
    rows = ["|" + "|".join(c[i].center(w) for c, w in zip(columns, widths)) + "|" for i in range(len(columns[0]))]
    return "\n".join(["\n### Class-wise Evaluation Metrics ###", rule, rows[0], rule, *rows[1:], rule])


def iou_types(top):
    """The COCO evaluations that a network's outputs (select_top's keys) take part in."""
    if "keypoints" in top:
        return ("keypoints",)
    return ("bbox", "segm") if "masks" in top else ("bbox",)


# ---------------------------------------------------------------------------------------------
# Command line: outputs written whole, a timing summary, COCO AP
# ---------------------------------------------------------------------------------------------
def detections_json(result):
    """One image's results -> predictions.jsonl's list of detections."""
    out = [dict(box=b, score=s, label=l, name=n, category_id=c) for b, s, l, n, c in
           zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist(), result["names"],
               result["category_ids"])]
    for d, k in zip(out, result["keypoints"].tolist() if "keypoints" in result else ()):
        d["keypoints"] = k
    for d, rle in zip(out, encode_masks(result["masks"]) if "masks" in result else ()):
        d["mask"] = rle
    return out


def save_picture(picture, path):
    """Write atomically (atomic_output): a killed run leaves the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_output(path, "--output-dir") as tmp:
        picture.save(tmp, quality=95) if path.lower().endswith((".jpg", ".jpeg")) else picture.save(tmp)


class VideoWriter:
    """A context that encodes drawn frames of `size` (w, h) into the video file `path` at `rate`
    (frames per second), with its container's codec of VIDEO_CODECS. 4:2:0 chroma needs even sides:
    an odd last row or column is left out."""

    def __init__(self, path, rate, size):
        self.av = av = support.optional_import("av", "writing videos")
        codec = VIDEO_CODECS[os.path.splitext(path)[1].lower()]
        if codec not in av.codecs_available:  # a PyAV built without x264 still has FFmpeg's own mpeg4
            codec = "mpeg4"
        self.container = av.open(path, "w")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.pix_fmt, self.stream.width, self.stream.height = "yuv420p", size[0] // 2 * 2, size[1] // 2 * 2

    def write(self, picture):
        pixels = np.asarray(picture)[:self.stream.height, :self.stream.width]
        self.container.mux(self.stream.encode(self.av.VideoFrame.from_ndarray(pixels, format="rgb24")))

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        if error is None:
            self.container.mux(self.stream.encode())  # the encoder's delayed frames
        self.container.close()


def output_paths(paths, root, output_dir):
    """{source path: where its drawn picture or video goes}: output_dir joined with the path relative
    to root (support.relative_name, so never outside output_dir). Refused (ValueError) when the
    sources lie inside output_dir (the pictures would land among the user's own files there), or an
    output would land on a source, leave output_dir by a symbolic link, or be shared by two sources."""
    if support.inside(root or ".", output_dir):
        raise ValueError(f"--output-dir {output_dir} holds --source's folder {root or '.'}: the drawn pictures could "
                         f"replace files there; choose an output folder outside it")
    outputs = {path: os.path.join(output_dir, support.relative_name(path, root)) for path in paths}
    sources = {os.path.realpath(path): path for path in paths}
    taken = {}
    for path, out in outputs.items():
        real = os.path.realpath(out)
        if real in sources:
            raise ValueError(f"--output-dir {output_dir}: the drawn picture of {path} would replace the source "
                             f"{sources[real]}; choose another folder")
        if not support.inside(out, output_dir):
            raise ValueError(f"--output-dir {output_dir}: the drawn picture of {path} would be written outside it, "
                             f"to {real} (a symbolic link in it); choose another folder")
        if real in taken:
            raise ValueError(f"--output-dir {output_dir}: {taken[real]} and {path} would both be drawn to {out}")
        taken[real] = path
    return outputs


def coco_images(ann_file, folder):
    """(COCO ground truth, {path: (image id, (w, h))}) for the images of `ann_file` found in `folder`."""
    coco = load_coco(ann_file)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--source {folder}: with --coco-ann it must be the folder of the annotated images")
    try:
        listed = {os.path.join(folder, info["file_name"]): (image_id, (info["width"], info["height"]))
                  for image_id, info in sorted(coco.imgs.items())}
    except KeyError as e:
        raise ValueError(f"COCO annotation file {ann_file} has an image without {e!r}") from None
    found = {path: v for path, v in listed.items() if os.path.isfile(path)}
    if not found:
        raise FileNotFoundError(f"--source {folder}: none of the {len(listed)} images of {ann_file} is there")
    if len(found) < len(listed):
        tqdm.write(f"warning: {len(listed) - len(found)} images of {ann_file} are not in {folder}; left out",
                   file=sys.stderr)
    return coco, found


def run(args):
    """Predict on every image and video frame of args.source; returns {"images": images and frames
    done, "skipped": images skipped, and with --coco-ann "coco": {iou_type: the COCO stats}}."""
    predictor = Predictor(args.weights, args.device, args.conf, args.model, args.img_size, args.runtime, args.batch_size,
                          args.precision, args.cuda_graph)
    if args.coco_ann:
        coco, annotated = coco_images(args.coco_ann, args.source)
        root, paths = args.source, list(annotated)
    else:
        root, paths = find_sources(args.source, skip=args.output_dir)
    output = output_paths(paths, root, args.output_dir).get
    if os.path.exists(os.path.join(args.output_dir, "predictions.jsonl")) and not args.overwrite:
        raise ValueError(f"--output-dir {args.output_dir} already holds predictions (predictions.jsonl): choose "
                         f"another folder, or replace them with --overwrite")
    support.claim_folder(args.output_dir)
    summary, evaluator = {"images": 0, "skipped": 0}, None
    times = dict.fromkeys(("decode+preprocess", "network", "postprocess+draw"), 0.0)

    @contextlib.contextmanager
    def timed(step):
        start = time.perf_counter()
        yield
        times[step] += time.perf_counter() - start

    def skip(path, why):
        summary["skipped"] += 1
        bar.update()
        tqdm.write(f"warning: skipping {path}: {why}; {summary['skipped']} skipped so far", file=sys.stderr)

    def read_image(path):
        """The RGB image at `path`, or None (skipped with a warning) when it can't be used."""
        try:
            image = load_image(path)
            if args.coco_ann and image.size != annotated[path][1] == image.size[::-1]:
                image = load_image(path, upright=False)  # annotated in the stored frame: read there, as training does
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return skip(path, f"not a readable image ({e})")
        if args.coco_ann and image.size != annotated[path][1]:  # as training's data set, which leaves it out
            return skip(path, f"{image.width}x{image.height} pixels, {'x'.join(map(str, annotated[path][1]))} "
                              f"in {args.coco_ann}")
        return image

    def predict_batch(items, keep):
        """items: (path, frame index or None, RGB image); keep(path, picture) stores each drawn picture."""
        nonlocal evaluator
        with timed("decode+preprocess"):
            inputs, sizes = predictor.prepare([image for _, _, image in items])
        with timed("network"):
            top = predictor.infer(inputs, sizes)
        with timed("postprocess+draw"):
            results = predictor.finish(top, sizes, 0.0 if args.coco_ann else None)
            if args.coco_ann:  # AP over every detection, as training's evaluation; the rest shows those over --conf
                evaluator = evaluator or CocoEvaluator(coco, predictor.category_ids, iou_types(top))
                evaluator.update([annotated[path][0] for path, _, _ in items], results)
                results = [select(r, r["scores"] >= args.conf) for r in results]
            for (path, frame, image), result in zip(items, results):
                keep(path, draw(image, result, predictor.names))
                line = dict(source=path, frame=frame, width=image.width, height=image.height,
                            detections=detections_json(result))
                jsonl.write((json.dumps(line) + "\n").encode())
        summary["images"] += len(items)
        bar.update(len(items))

    save = lambda path, picture: save_picture(picture, output(path))
    bar = tqdm(total=len(paths), unit="image", dynamic_ncols=True)
    # Unbuffered: each line goes to the file in one write, so an interrupted run keeps whole lines.
    with atomic_output(os.path.join(args.output_dir, "predictions.jsonl"), "--output-dir", commit_on_interrupt=True) \
            as tmp, open(tmp, "wb", buffering=0) as jsonl, bar:
        images = []
        for path in paths:
            if not is_video(path):
                with timed("decode+preprocess"):
                    image = read_image(path)
                images += [(path, None, image)] if image is not None else []
                if len(images) == args.batch_size:
                    predict_batch(images, save)
                    images = []
                continue
            if images:  # in order of the sources
                predict_batch(images, save)
                images = []
            with timed("decode+preprocess"):
                rate, count, size, frames = read_video(path)
            bar.total = bar.total - 1 + count if bar.total is not None and count else None
            os.makedirs(os.path.dirname(output(path)), exist_ok=True)
            with atomic_output(output(path), "--output-dir") as tmp, VideoWriter(tmp, rate, size) as video:
                for first in itertools.count(0, args.batch_size):
                    with timed("decode+preprocess"):
                        chunk = list(itertools.islice(frames, args.batch_size))
                    if not chunk:
                        if not first:  # raised inside, so that no empty video is left
                            raise ValueError(f"--source {path}: the video has no frames")
                        break
                    predict_batch([(path, first + i, frame) for i, frame in enumerate(chunk)],
                                  lambda _, picture: video.write(picture))
        if images:
            predict_batch(images, save)
        if not summary["images"]:  # raised inside, so that no empty predictions.jsonl is left
            raise ValueError(f"--source {args.source}: none of its {len(paths)} images could be read")
    n, total = summary["images"], sum(times.values())
    print(f"{n} images and frames in {total:.1f} s, {n / total:.2f} per second; per image: "
          + ", ".join(f"{step} {t / n * 1e3:.1f} ms" for step, t in times.items())
          + (f"; {summary['skipped']} skipped" if summary["skipped"] else "") + f"; written to {args.output_dir}")
    if evaluator is not None:
        summary["coco"] = evaluator.summarize()
        for iou_type in evaluator.iou_types:
            path = os.path.join(args.output_dir, f"coco_results_{iou_type}.json")
            with atomic_output(path, "--output-dir") as tmp:
                pathlib.Path(tmp).write_text(json.dumps([d for entry in evaluator.results.values() for d in entry[iou_type]]))
            print(f"COCO results ({iou_type}): {path}")
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=support.HelpFormatter)
    parser.add_argument("--weights", required=True, help="a checkpoint (.pth; a released one needs --model), an ONNX "
                        "file, a TensorRT engine (.engine, .plan) or an OpenVINO IR (.xml)")
    parser.add_argument("--source", required=True, help="an image, a folder (searched recursively), a glob pattern "
                        "or a video (.mp4 .avi .mov .mkv .webm)")
    parser.add_argument("--model", help="preset or JSON config of a released checkpoint's network (this project's "
                        "checkpoints and exported files carry theirs)")
    parser.add_argument("--output-dir", default="outputs/predict", help="refused when it holds predictions "
                        "(predictions.jsonl), unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output-dir that holds predictions, "
                        "replacing them")
    parser.add_argument("--conf", type=float, default=0.4, help="lowest score of a detection drawn and listed")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N", help="network input H [W], multiples of 32 "
                        "(default: the network's eval_spatial_size; an exported file has its own)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available, else cpu (PyTorch; "
                        "ONNX Runtime and OpenVINO run on the CPU, TensorRT on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1, help="images or frames per network call")
    parser.add_argument("--runtime", choices=list(RUNTIMES), help="default: from the --weights file's extension")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of PyTorch (bf16: autocast) and "
                        "OpenVINO (its inference precision hint, also for what an INT8 IR keeps in float; bf16 needs a "
                        "CPU with AVX-512 BF16 or AMX); ONNX Runtime and TensorRT run a file as exported")
    parser.add_argument("--cuda-graph", action="store_true", help="run a checkpoint's network from a CUDA graph "
                        "(--device cuda): one launch per batch instead of one per operator, for low latency")
    parser.add_argument("--coco-ann", help="a COCO annotation file of the images in --source: also write the COCO "
                        "results (every detection, whatever --conf) and print COCO AP")
    args = parser.parse_args(argv)
    if args.img_size and len(args.img_size) > 2:
        parser.error(f"--img-size takes H or H W, got {len(args.img_size)} numbers")
    if args.img_size:
        args.img_size = [args.img_size[0], args.img_size[-1]]
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected 1 or more")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        support.release_folders(failed=True)
        print(f"predict.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"predict.py: interrupted; the pictures and the lines of predictions.jsonl in {args.output_dir} "
              f"are complete", file=sys.stderr)
        sys.exit(130)
    finally:
        support.release_folders()


if __name__ == "__main__":
    main()
