"""Training data pipeline throughput per DataLoader worker: this project's ECDet pipeline against the original's.

    # the original's code, checked out anywhere; its engine imports PyYAML, tensorboard and calflops: if the
    # environment lacks them, pip install --no-deps --target DIR pyyaml tensorboard tensorboard-data-server
    # markdown, add DIR/calflops/__init__.py defining calculate_flops (unused here), and set PYTHONPATH=DIR
    PYTHONPATH=/work/scratch/pydeps python benchmarks/data_pipeline.py \
        --original /work/scratch/EdgeCrafter/ecdetseg --profile
    python benchmarks/data_pipeline.py --profile      # without --original: the project alone, and its stages

Both pipelines read the same synthetic COCO-format JPEGs (sides 400-640 px, written once into --data) and
run the ECDet-S training recipe at epoch 0: Mosaic (p 0.75), photometric distortion, zoom-out and IoU
crop on non-mosaic samples, flip, resize to 640 x 640, normalisation, then batch collation with MixUp
(p 0.75). What is timed is the work one DataLoader worker does: the data set's __getitem__ for every
image of a batch plus the collate function, in one process with one thread (DataLoader workers run
torch with one thread). Each pipeline runs in its own process and the two take turns, round after
round; the table gives each round's rate and the medians, so a neighbour's load spreads over both.
"""
import argparse
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0


# ---- The two pipelines, as each code base builds them for ECDet-S ----

def project_pipeline(data_dir, batch):
    sys.path.insert(0, ROOT)
    import train_det
    recipe = train_det.RECIPES["ecdet_s"]
    transforms = train_det.DetTransforms(True, 640, mosaic_prob=recipe["mosaic_prob"],
                                         mosaic_epoch=recipe["mosaic_epoch"], stop_epoch=recipe["stop_epoch"])
    data = train_det.CocoDetection(f"{data_dir}/train2017", f"{data_dir}/annotations/instances_train2017.json",
                                   transforms)
    collate = train_det.BatchImageCollate(recipe["mosaic_prob"], recipe["mosaic_epoch"])
    return data, collate


def original_pipeline(data_dir, batch, original):
    """Built by the original's own code from its configs/ecdet/ecdet_s.yml, with only the data paths,
    the batch size and the worker count overridden."""
    sys.path.insert(0, original)
    os.chdir(original)  # its YAML includes are relative
    from engine.core import YAMLConfig
    cfg = YAMLConfig("configs/ecdet/ecdet_s.yml", train_dataloader=dict(
        dataset=dict(img_folder=f"{data_dir}/train2017", ann_file=f"{data_dir}/annotations/instances_train2017.json"),
        total_batch_size=batch, num_workers=0))
    loader = cfg.train_dataloader
    loader.dataset.set_epoch(0)
    loader.collate_fn.set_epoch(0)
    return loader.dataset, loader.collate_fn


# ---- Timing one pipeline (run in a child process) ----

class Stages:
    """Wall time per named stage; `wrap` replaces a callable by a timed one."""

    def __init__(self):
        self.seconds = collections.Counter()

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


def instrument(data, collate, stages):
    """Time the project's pipeline stage by stage. Stages nest (mosaic's resize and affine are also
    inside mosaic); the report subtracts them."""
    import support
    import train_det
    t = data.transforms
    data.load = stages.wrap(data.load, "decode + target")
    t.mosaic.resize = stages.wrap(t.mosaic.resize, "mosaic: resize to 320")
    t.mosaic.affine = stages.wrap(t.mosaic.affine, "mosaic: random affine")
    t.mosaic = stages.wrap(t.mosaic, "mosaic")
    t.photometric = stages.wrap(t.photometric, "photometric distort")
    t.zoom_out = stages.wrap(t.zoom_out, "zoom out")
    t.iou_crop = stages.wrap(t.iou_crop, "IoU crop")
    names = ["sanitize", "flip", "resize to 640", "sanitize"]
    t.flip_resize.transforms = [stages.wrap(op, name) for op, name in zip(t.flip_resize.transforms, names)]
    train_det.normalised_cxcywh = stages.wrap(train_det.normalised_cxcywh, "boxes to cx, cy, w, h")
    support.normalize = stages.wrap(support.normalize, "to float + normalise")
    return stages.wrap(collate, "collate + mixup")


def run_pipeline(which, data_dir, batch, batches, warmup, original, profile, seed):
    torch.set_num_threads(1)
    data, collate = original_pipeline(data_dir, batch, original) if which == "original" else \
        project_pipeline(data_dir, batch)
    stages = Stages()
    if profile:
        collate = instrument(data, collate, stages)
    random.seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    items = [order[i % len(order)] for i in range((warmup + batches) * batch)]
    for b in range(warmup + batches):
        if b == warmup:  # the mosaic cache has filled a little; start the clock
            stages.seconds.clear()
            start = time.perf_counter()
        images, targets = collate([data[i] for i in items[b * batch:(b + 1) * batch]])
        assert images.shape == (batch, 3, 640, 640), images.shape
    seconds = time.perf_counter() - start
    n = batches * batch
    return dict(images_per_s=n / seconds, stages={k: v / n for k, v in stages.seconds.items()})


def child(which, args, seed, profile=False):
    """Run one pipeline in a fresh process; its result is the last line it prints. Both pipelines of a
    round get the same seed, each round another: the code bases draw their random numbers differently,
    so which augmentations a run meets varies, and the rounds average over it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--data", args.data, "--batch", str(args.batch),
           "--batches", str(args.batches), "--warmup", str(args.warmup), "--seed", str(seed)]
    cmd += ["--original", args.original] if args.original else []
    cmd += ["--profile"] if profile else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- Reports ----

def print_profile(result):
    s = dict(result["stages"])
    for part in ("mosaic: resize to 320", "mosaic: random affine"):
        s["mosaic"] -= s[part]
    s["mosaic: paste 4 tiles"] = s.pop("mosaic")
    total = 1 / result["images_per_s"]
    s["other (sampling, loops)"] = total - sum(s.values())
    print(f"\nwhere the project's time goes, ms per image (one worker, {total * 1e3:.1f} ms in all):")
    for name, sec in sorted(s.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {sec * 1e3:7.2f}  {100 * sec / total:5.1f} %")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", help="the original's ecdetseg/ folder; without it only the project runs")
    p.add_argument("--data", help="where the synthetic data set is (written if missing); default a temporary folder")
    p.add_argument("--images", type=int, default=64, help="images in the synthetic data set")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=8, help="images per batch (the collate's MixUp pairs them)")
    p.add_argument("--batches", type=int, default=16, help="timed batches per round and pipeline")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--profile", action="store_true", help="also time the project's stages, in one more run")
    p.add_argument("--child", choices=["project", "original"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_pipeline(args.child, args.data, args.batch, args.batches, args.warmup,
                                      args.original and os.path.abspath(args.original), args.profile, args.seed)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.data = os.path.abspath(args.data or os.path.join(tmp, "coco640"))
        if not os.path.isfile(os.path.join(args.data, "annotations", "instances_train2017.json")):
            sys.path.insert(0, ROOT)
            import support
            support.make_synthetic_coco(args.data, num_train=args.images, num_val=1, img_size=640, seed=SEED)
        sides = ["project"] + (["original"] if args.original else [])
        rates = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate who goes first
                rates[side].append(child(side, args, seed=r)["images_per_s"])
            print(f"round {r + 1}: " + ", ".join(f"{s} {rates[s][-1]:.2f} images/s" for s in sides), flush=True)
        profile = child("project", args, SEED, profile=True) if args.profile else None  # apart: timers cost a little
    print(f"\nimages/s per DataLoader worker (one thread, batch {args.batch}, ECDet-S recipe at epoch 0, 640 x 640), "
          f"{args.rounds} rounds, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"  {'pipeline':10s} {'median':>8s}   rounds")
    for side in sides:
        print(f"  {side:10s} {statistics.median(rates[side]):8.2f}   " + " ".join(f"{x:.2f}" for x in rates[side]))
    if args.original:
        ratios = [a / b for a, b in zip(rates["project"], rates["original"])]
        print(f"  project / original: {statistics.median(ratios):.2f} x (median of per-round ratios; "
              f"rounds {' '.join(f'{x:.2f}' for x in ratios)})")
    if args.profile:
        print_profile(profile)


if __name__ == "__main__":
    main()
