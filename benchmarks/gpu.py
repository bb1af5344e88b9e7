"""ECDet-S on a GPU in one run: training images/s and peak memory against the original's, and batch-1 latency.

On a lent GPU (the device tool copies the working tree, not ignored folders: carry the original's code
with it, e.g. a checkout under shared/ or a folder named in `carry`):

    python benchmarks/gpu.py --original shared/EdgeCrafter/ecdetseg --json $OUT/gpu.json
    python benchmarks/gpu.py --smoke                   # a tiny CPU run of every step that needs no GPU

The original's engine imports PyYAML, tensorboard and calflops: if the environment lacks them,
pip install --no-deps --target DIR pyyaml tensorboard tensorboard-data-server markdown, add
DIR/calflops/__init__.py defining calculate_flops (unused here), and set PYTHONPATH=DIR (--no-deps:
copies of numpy or Pillow in DIR would shadow the environment's).

Measured, each in its own process, the rows printed as they come:
  training   ECDet-S at --batch images per step and 640 x 640, random weights, the real training step
             (the data loader with the ECDet-S augmentation on synthetic COCO-format JPEGs, forward,
             criterion, backward, clipping, AdamW, EMA): this project with bf16 autocast (its --amp on
             GPUs that have bf16) and with fp16 plus the gradient scaler (the original's AMP), and the
             original's own train_one_epoch (fp16 autocast, GradScaler) built from its configs/ecdet/ecdet_s.yml.
             images/s over --steps steps after --warmup; peak memory is torch.cuda.max_memory_allocated.
  latency    the deployed network plus its top-300 selection at batch 1, input already on the GPU,
             median of --runs calls: eager fp32, eager under bf16 autocast, predict.py's --cuda-graph
             path (CUDAGraphRunner) in fp32 and under bf16 autocast, torch.compile(mode="reduce-overhead"),
             the original's eager fp32 and bf16; TensorRT fp16 built by export.py when tensorrt imports
             (that row includes the host-device copies of predict.TensorRTRunner).
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model  # noqa: E402
import predict  # noqa: E402
import support  # noqa: E402
import train_det  # noqa: E402

SEED = 0
SOURCE_IMAGES = 64  # distinct JPEGs; the annotation file lists each many times (see write_data)


# ---- Data: synthetic COCO-format JPEGs, listed often enough for every step ----

def write_data(root, size, count):
    """A synthetic data set (support.make_synthetic_coco) whose training annotation file lists its
    SOURCE_IMAGES images over and over as `count` images, so that one epoch covers the whole run
    without drawing `count` pictures."""
    support.make_synthetic_coco(root, num_train=SOURCE_IMAGES, num_val=1, img_size=size, seed=SEED)
    path = os.path.join(root, "annotations", "instances_train2017.json")
    with open(path) as f:
        data = json.load(f)
    images, annotations = [], []
    for i in range(count):
        image = data["images"][i % len(data["images"])]
        images.append(dict(image, id=i + 1))
        own = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        annotations += [dict(a, id=len(annotations) + k + 1, image_id=i + 1) for k, a in enumerate(own)]
    with open(path, "w") as f:
        json.dump(dict(data, images=images, annotations=annotations), f)
    return root


# ---- Timing helpers ----

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Notes when each training step starts (or ends): the time between two notes is one whole step,
    waiting for the data loader included. Used as the project's lr schedule (returns each group's lr
    unchanged) and as the original's self-stepping lr scheduler."""

    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, step, lr):
        if step not in self.times:
            synchronize(self.device)
            self.times[step] = time.perf_counter()
        return lr

    def step(self, step, optimizer):
        self(step, None)
        return optimizer

    def images_per_s(self, batch, warmup):
        times = [self.times[k] for k in sorted(self.times)][warmup:]
        return batch * (len(times) - 1) / (times[-1] - times[0])


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def latency_ms(fn, images, sizes, runs, warmup):
    """Median milliseconds of fn(images, sizes), synchronised."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            synchronize(images.device)
            start = time.perf_counter()
            fn(images, sizes)
            synchronize(images.device)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[warmup:])


def bf16(fn):
    """fn under bf16 autocast; no weight-cast cache, which a CUDA graph must not capture."""
    def run(images, sizes):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return fn(images, sizes)
    return run


# ---- The measurements, each run in a child process ----

def project_config(args):
    """ECDet-S's config (with its loss section); --smoke: the CPU demo's network (50 queries), 80 classes."""
    cfg = train_det.demo_config() if args.smoke else train_det.ECCriterion.preset_config("ecdet_s")
    cfg["num_classes"], cfg["eval_spatial_size"] = 80, [args.size, args.size]
    return cfg


def train_project(args, device, amp_dtype):
    """This project's training loop (train_det.train_one_epoch) on ECDet-S."""
    torch.manual_seed(SEED)
    cfg = project_config(args)
    recipe = {**train_det.TRAINING, **train_det.RECIPES["ecdet_s"]}
    run = types.SimpleNamespace(img_size=[args.size] * 2, batch_size=args.batch, workers=args.workers, seed=SEED,
                                device=device, device_type=device.type, amp_dtype=amp_dtype, epochs=1,
                                clip_max_norm=recipe["clip_max_norm"], output_dir=args.data)
    loader = train_det.make_loader(train_det.CocoDetection, train_det.DetTransforms, f"{args.data}/train2017",
                                   f"{args.data}/annotations/instances_train2017.json", True, run, recipe, 0, 1)
    train_det.set_epoch(loader, 0, SEED, 0)
    net = model.build_model(cfg).to(device)
    optimizer, scaler = train_det.make_optimizer(
        train_det.param_groups(net, recipe["lr"], recipe["backbone_lr"], recipe["weight_decay"]), recipe["betas"], run)
    ema = train_det.ModelEMA(net, recipe["ema_decay"], recipe["ema_warmups"])
    clock = StepClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_det.train_one_epoch(net, train_det.build_criterion(cfg).to(device), loader, optimizer, scaler, ema, clock, 0,
                              run, 0)
    return dict(images_per_s=clock.images_per_s(args.batch, args.warmup), peak_gib=peak_memory(device))


def original_config(args, device):
    sys.path.insert(0, args.original)
    os.chdir(args.original)  # its YAML includes are relative
    from engine.core import YAMLConfig
    # --smoke: 64 px has 84 anchors, too few for 300 queries
    smoke = dict(ECTransformer=dict(num_queries=50), PostProcessor=dict(num_top_queries=50)) if args.smoke else {}
    return YAMLConfig("configs/ecdet/ecdet_s.yml", ViTAdapter=dict(skip_load_backbone=True),  # no download
                      eval_spatial_size=[args.size, args.size], use_amp=True, train_dataloader=dict(
                          dataset=dict(img_folder=f"{args.data}/train2017",
                                       ann_file=f"{args.data}/annotations/instances_train2017.json"),
                          total_batch_size=args.batch, num_workers=args.workers), **smoke)


def train_original(args, device):
    """The original's train_one_epoch on its ECDet-S, as its solver sets it up."""
    cfg = original_config(args, device)
    from engine.solver.ec_engine import train_one_epoch
    torch.manual_seed(SEED)
    net = cfg.model.to(device)
    criterion, optimizer, ema, scaler = cfg.criterion.to(device), cfg.optimizer, cfg.ema, cfg.scaler
    loader = cfg.train_dataloader
    loader.dataset.set_epoch(0)
    loader.collate_fn.set_epoch(0)
    clock = StepClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines
        train_one_epoch(True, clock, net, criterion, loader, optimizer, device, 0, max_norm=cfg.clip_max_norm,
                        print_freq=10 ** 9, ema=ema, scaler=scaler)
    return dict(images_per_s=clock.images_per_s(args.batch, args.warmup), peak_gib=peak_memory(device))


def latency_inputs(args, device):
    return torch.randn(1, 3, args.size, args.size, device=device), torch.tensor([[args.size] * 2], device=device)


def project_network(args, device):
    cfg = project_config(args)
    torch.manual_seed(SEED)
    net = model.build_model(cfg).eval()
    return predict.Deployed(net.deploy(), model.num_top_queries(cfg)).to(device)


def latency_project(args, device):
    deployed, (images, sizes) = project_network(args, device), latency_inputs(args, device)
    rows = {"eager fp32": deployed, "eager bf16 autocast": bf16(deployed)}
    if device.type == "cuda":
        size = [args.size] * 2
        rows["CUDA graph fp32 (--cuda-graph)"] = predict.CUDAGraphRunner(deployed, 1, size, device)
        rows["CUDA graph bf16 autocast"] = predict.CUDAGraphRunner(bf16(deployed), 1, size, device, tolerance=0.05)
    return {name: latency_ms(fn, images, sizes, args.runs, args.warmup_runs) for name, fn in rows.items()}


def latency_compiled(args, device):
    deployed, (images, sizes) = project_network(args, device), latency_inputs(args, device)
    start = time.perf_counter()
    compiled = torch.compile(deployed, mode="reduce-overhead")
    with torch.inference_mode():
        for _ in range(3):  # compiles, then records its CUDA graph
            compiled(images, sizes)
    return {"torch.compile reduce-overhead fp32": latency_ms(compiled, images, sizes, args.runs, args.warmup_runs),
            "compile_s": time.perf_counter() - start}


def latency_original(args, device):
    cfg = original_config(args, device)
    net, post = cfg.model.deploy().to(device), cfg.postprocessor.deploy().to(device)
    images, sizes = latency_inputs(args, device)
    fn = lambda x, s: post(net(x), s)  # noqa: E731
    return {"original eager fp32": latency_ms(fn, images, sizes, args.runs, args.warmup_runs),
            "original eager bf16 autocast": latency_ms(bf16(fn), images, sizes, args.runs, args.warmup_runs)}


def latency_tensorrt(args, device):
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, engine = os.path.join(tmp, "ecdet_s.onnx"), os.path.join(tmp, "ecdet_s.engine")
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--model", "ecdet_s", "--onnx", onnx_path,
                        "--img-size", str(args.size), "--trt", engine, "--fp16"], check=True, stdout=sys.stderr)
        runner = predict.TensorRTRunner(engine)  # numpy arrays in and out, as predict.py runs it
        images, sizes = latency_inputs(args, torch.device("cpu"))
        fn = lambda x, s: runner(x.numpy(), s.numpy())  # noqa: E731
        return {"TensorRT fp16 (export.py --trt --fp16)": latency_ms(fn, images, sizes, args.runs, args.warmup_runs)}


def measure(name, args):
    device = torch.device(args.device)
    if name == "project bf16":
        return train_project(args, device, torch.bfloat16)
    if name == "project fp16":
        return train_project(args, device, torch.float16)
    if name == "original fp16":
        return train_original(args, device)
    return {"latency": latency_project, "compiled": latency_compiled, "original latency": latency_original,
            "tensorrt": latency_tensorrt}[name](args, device)


# ---- The run: children in turn, one table ----

def child(name, args):
    """measure(name) in a fresh process: its result (the last line it prints), or its error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + args.passed
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(args, device):
    """(child name, why it is skipped or None) in the order they run: what matters most first."""
    cuda = None if device.type == "cuda" else "needs CUDA"
    trt = cuda or predict.tensorrt_missing()
    original = None if args.original else "no --original"
    return [("project bf16", None), ("project fp16", cuda), ("original fp16", original), ("latency", None),
            ("original latency", original), ("compiled", cuda), ("tensorrt", trt)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", help="the original's ecdetseg/ folder (its training and latency rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--warmup", type=int, default=10, help="training steps before the clock starts")
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="DataLoader workers")
    p.add_argument("--runs", type=int, default=200, help="timed calls per latency row")
    p.add_argument("--warmup-runs", type=int, default=30)
    p.add_argument("--data", help="the synthetic data set's folder (written if missing); default a temporary one")
    p.add_argument("--skip", nargs="*", default=[], help="child names to leave out, e.g. compiled tensorrt")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny and quick, on the CPU: the demo's network (the "
                   "original's ECDet-S with 50 queries) at 64 px, batch 2, a few steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.batch, args.warmup, args.steps, args.workers = "cpu", 64, 2, 1, 2, 0
        args.runs, args.warmup_runs = 3, 1
    args.original = args.original and os.path.abspath(args.original)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    device = torch.device(args.device)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{'--smoke: the demo network' if args.smoke else 'ECDet-S'} on {what}, torch {torch.__version__}; training "
          f"batch {args.batch} at {args.size} px, {args.steps} steps after {args.warmup}, {args.workers} loader "
          f"workers; latency batch 1, median of {args.runs}")
    results = {"device": what, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        args.data = os.path.abspath(args.data or os.path.join(tmp, "coco"))
        if not os.path.isdir(os.path.join(args.data, "train2017")):
            write_data(args.data, args.size, args.batch * (args.warmup + args.steps + 1))
        args.passed = ["--smoke"] if args.smoke else []
        args.passed += ["--device", args.device, "--batch", str(args.batch), "--size", str(args.size), "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--workers", str(args.workers), "--runs",
                       str(args.runs), "--warmup-runs", str(args.warmup_runs), "--data", args.data]
        args.passed += ["--original", args.original] if args.original else []
        for name, skipped in plan(args, device):
            skipped = skipped or ("--skip" if name in args.skip else None)
            start = time.perf_counter()
            result = {"skipped": skipped} if skipped else child(name, args)
            results[name] = result
            for row in table_rows(name, result):
                print(f"  {row}  ({time.perf_counter() - start:.0f} s)" if not skipped else f"  {row}", flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    return results


def table_rows(name, result):
    if "error" in result or "skipped" in result:
        why = f"skipped: {result['skipped']}" if "skipped" in result else f"failed: {result['error']}"
        return [f"{name:40s} {why}"]
    if "images_per_s" in result:
        memory = f", peak {result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else ""
        return [f"{'training ' + name:40s} {result['images_per_s']:8.1f} images/s{memory}"]
    return [f"{k:40s} {v:8.2f} ms" if k != "compile_s" else f"{'  (compiling took)':40s} {v:8.1f} s"
            for k, v in result.items()]


if __name__ == "__main__":
    main()
