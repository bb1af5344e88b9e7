"""What every stage needs but the paper does not, in sections: files written whole and only inside
the run folder, one run per folder, checkpoints, logs and resume; weights checked before use, released
ones downloaded; the networks' input conventions and COCO's classes; configs and annotation files
checked whole; data sets in the layouts people have them, synthetic demo data (shapes, stick figures);
process groups and devices; the command line and a training stage's set-up (its data, recipe, config,
initial weights, the demo); optional packages, TensorBoard and drawing.

Library functions raise ordinary exceptions (ValueError, OSError) with a message that names the
argument or file; each script's main() turns them into one line `SCRIPT: error: ...` and exit
code 2 (run_script). This module imports only the standard library, numpy, torch, torchvision, PIL
and pycocotools: the stage files import it, never the other way round.
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import glob
import http.client
import importlib.util
import io
import json
import math
import os
import re
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils


# ---- Writing files: atomically, inside the run folder ----
# The temporary files of atomic writes carry this prefix, which nothing else writes, so that the
# start-of-run clean-up removes a killed run's leftovers and never a user's own file.
TMP_PREFIX = ".edgecrafter-tmp"


def temporary_path(path):
    """Where an atomic write of `path` goes first: the same folder (os.replace is atomic only within
    one file system), a hidden name of this project, and path's own suffix (PIL, ONNX Runtime and
    FFmpeg choose the format by it)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}.{name}")


class WriteError(OSError):
    """A failed write, already named: an atomic write around another passes it on unchanged."""


def write_error(path, e):
    """The WriteError `cannot write PATH: CAUSE` for a failed write of `path`; CAUSE is 'disk full' for a
    full disk, else the system's reason (permission denied, read-only file system, ...).
    torch's zip writer reports a failed write as a RuntimeError without errno: a full disk is then
    recognised by the free space left."""
    if isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = e.strerror or str(e)
    else:
        try:
            full = os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
        except OSError:
            full = False
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    return WriteError(f"cannot write {path}: {'disk full (no space left on device)' if full else reason}")


def is_write_failure(e):
    """Whether RuntimeError `e` is torch's report of a failed file write (its zip writer's)."""
    return "PytorchStreamWriter" in str(e) or "file write failed" in str(e)


@contextlib.contextmanager
def atomic_path(path, companions=(), commit_on_interrupt=False):
    """A temporary path next to `path` to write to; when the block succeeds the file is synced to
    disk and renamed over `path`, so a killed or failed run leaves the old file or the new one, never
    half of one, and never writes through a symbolic link at `path`. A failed write raises
    write_error's WriteError (an OSError) and leaves no temporary file. `companions`: suffixes of files written
    beside it under the same stem (OpenVINO's .bin), moved with it, the file that names them last.
    commit_on_interrupt: on Ctrl-C keep what was written (a file of whole lines)."""
    tmp = temporary_path(path)
    stem = os.path.splitext(os.fspath(path))[0]
    pairs = [(tmp, os.fspath(path))] + [(os.path.splitext(tmp)[0] + s, stem + s) for s in companions]

    def commit():
        for src, _ in pairs:
            if os.path.isfile(src):
                with open(src, "rb+") as f:
                    os.fsync(f.fileno())
        for src, dst in reversed(pairs):
            os.replace(src, dst)

    try:
        try:
            yield tmp
        except KeyboardInterrupt:
            if commit_on_interrupt and os.path.exists(tmp):
                commit()
            raise
        commit()
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from None
    except RuntimeError as e:
        if not is_write_failure(e):
            raise
        raise write_error(path, e) from None
    finally:
        for src, _ in pairs:
            if os.path.lexists(src):
                os.remove(src)


def remove_temporary_files(folder):
    """Remove what atomic writes of killed runs left in `folder` (TMP_PREFIX files only)."""
    for path in glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}[0-9]*")):
        os.remove(path)


def inside(path, folder):
    """Whether `path` lies inside `folder` once symbolic links and `..` are resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def relative_name(path, root):
    """`path` relative to `root`, as a name that cannot leave the folder it is joined to: `..` steps
    (a path outside root, an absolute one) become `__`."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.join(*["__" if part == ".." else part for part in rel.split(os.sep)])


def files_below(root, skip=None):
    """Every file below folder `root`, following symbolic links but entering each real folder once
    (a link loop is not followed round and round), and not the folder `skip` (where outputs go)."""
    seen = {os.path.realpath(root)} | ({os.path.realpath(skip)} if skip else set())
    paths = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        paths += [os.path.join(folder, name) for name in names]
        unseen = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                unseen.append(name)
        subfolders[:] = unseen  # os.walk enters only these
    return paths


# ---- One run per folder at a time ----
LOCK_NAME = ".edgecrafter.lock"
# The run folders this process holds: real path -> (the open lock file, the folders it created).
_held = {}


def claim_folder(folder, flag="--output-dir"):
    """Create `folder` when missing and hold it for this process: another run into the same folder
    is refused (ValueError) until this one ends. The lock is flock(2) on LOCK_NAME in the folder,
    which the kernel releases when the process ends, also on kill -9: it never stays stuck.
    Claiming a folder this process holds again does nothing."""
    real = os.path.realpath(folder)
    if real in _held:
        return
    created, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ValueError(f"{flag} {folder} is in use by another run (process {holder}): wait for it to end, "
                             f"or choose another folder") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        lock.close()  # the run before removed the file as we opened it: lock the one there now
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held[real] = (lock, created)


def release_folders(failed=False):
    """Let other runs into the folders this process holds, and remove their lock files. failed: the
    run stopped before its work, so the folders it created are removed again when empty."""
    for real, (lock, created) in list(_held.items()):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(real, LOCK_NAME))  # while still held, so claim_folder sees it gone
        lock.close()
        for path in created if failed else ():  # the deepest first
            with contextlib.suppress(OSError):  # not empty: it holds something else
                os.rmdir(path)
        del _held[real]


# ---- Run folders: claimed, checked and cleaned; checkpoints and logs written whole; resume ----
def write_atomically(path, write):
    """Call write(file) on a temporary file that then replaces `path` (atomic_path), so that a
    killed run leaves the old file or the new one, never half of one. A failed write leaves no
    temporary file behind and names the file, and a full disk as the cause."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a Python file: a failed write raises OSError
        write(f)


def save_checkpoint(obj, path):
    write_atomically(path, lambda f: torch.save(obj, f))


def write_log(lines, path):
    """A run's log.jsonl: one JSON line per entry of `lines`, written whole and atomically."""
    write_atomically(path, lambda f: f.write("".join(json.dumps(line) + "\n" for line in lines).encode()))


def read_log(path, keep):
    """The lines of the log.jsonl at `path` for which keep(line) holds; [] when there is none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in map(json.loads, filter(str.strip, f)) if keep(line)]


def check_output_dir(args, run_files=("last.pth", "best.pth", "log.jsonl")):
    """Make args.output_dir ready before any work: a folder that takes files, held by this run alone
    (claim_folder: another run into it is refused until this one ends), not holding `run_files`
    of an earlier run unless args.resume continues it (or --eval-only, which writes nothing there, only
    reads) or args.overwrite replaces it. Nothing is deleted here: clean_output_dir does that once the
    run has passed its checks."""
    folder = args.output_dir
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--output-dir {folder} is a file, not a folder")
    reads_only = getattr(args, "eval_only", False)
    if reads_only:
        return
    try:
        if int(os.environ.get("RANK", 0)) == 0:  # the other ranks write nothing of their own
            claim_folder(folder)
        else:
            os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OSError(f"--output-dir {folder}: cannot write there ({e.strerror or e})") from None
    found = [name for name in run_files if os.path.exists(os.path.join(folder, name))]
    if found and not (args.resume or args.overwrite):
        raise ValueError(f"--output-dir {folder} already holds a run ({', '.join(found)}): continue it with "
                         f"--resume, or replace it with --overwrite")



def clean_output_dir(args, run_files=("last.pth", "best.pth", "log.jsonl")):
    """Once a run has passed its checks, before its first write: remove what atomic writes of killed
    runs left in args.output_dir (support's temporary files only) and, with --overwrite, the earlier
    run's `run_files` and its TensorBoard events."""
    if int(os.environ.get("RANK", 0)) != 0 or getattr(args, "eval_only", False):
        return
    remove_temporary_files(args.output_dir)
    events = [name for name in os.listdir(args.output_dir) if name.startswith("events.out.tfevents.")]
    for name in [*run_files, *events] if args.overwrite else ():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.output_dir, name))


def resume_checkpoint(args):
    """The training checkpoint of --resume, refused when it would roll back the output folder's
    last.pth (DIR/best.pth of an earlier epoch, say). --epochs, --lr and --backbone-lr not given
    take the run's values; given, they apply from the next epoch, and the change is reported."""
    ckpt = read_checkpoint(args.resume, "--resume")
    if not {"model", "ema", "optimizer", "scaler", "epoch", "best"} <= set(ckpt):
        raise ValueError(f"--resume {args.resume} is not a training checkpoint of this project (use --tune)")
    ema = ckpt["ema"].get("module") if isinstance(ckpt["ema"], dict) else ckpt["ema"]
    for what, sd in (("model", ckpt["model"]), ("ema", ema)):
        check_state_dict(sd, f"--resume {args.resume} ({what})")
    if not (is_int(ckpt["epoch"]) and isinstance(ckpt["best"], (int, float))):
        raise ValueError(f"--resume {args.resume}: its epoch and best AP are not numbers")
    last = os.path.join(args.output_dir, "last.pth")
    if not args.eval_only and os.path.exists(last) and not os.path.samefile(last, args.resume):
        newer = checkpoint_epoch(last)
        if newer > ckpt["epoch"]:
            raise ValueError(f"--resume {args.resume} is epoch {ckpt['epoch']}, but {last} is epoch {newer}, which "
                             f"resuming would roll back: resume from {last}, or continue epoch {ckpt['epoch']} "
                             f"in another --output-dir")
    for key, before in ((k, ckpt.get("args", {}).get(k)) for k in ("epochs", "lr", "backbone_lr")):
        if getattr(args, key) is None:
            setattr(args, key, before)
        elif before is not None and getattr(args, key) != before and not args.eval_only:
            print(f"--resume: --{key.replace('_', '-')} {getattr(args, key)} (so far {before}) applies from epoch "
                  f"{ckpt['epoch'] + 1} on")
    if args.epochs is not None and args.epochs <= ckpt["epoch"] and not args.eval_only:
        raise ValueError(f"--resume {args.resume} has done {ckpt['epoch']} epochs already; give --epochs above that "
                         f"to train on")
    return ckpt


def checkpoint_epoch(path):
    """The epoch of a checkpoint file, without reading its tensors."""
    return read_checkpoint(path, "checkpoint", mmap=True).get("epoch", 0)


def restore_run_files(args, ckpt):
    """Bring the output folder in line with the checkpoint a run resumes from, whatever instant a kill
    came at: log.jsonl holds exactly its epochs' lines, and best.pth its best epoch: the resumed one
    when that was the best (a kill between writing last.pth and best.pth), else the best.pth beside
    --resume (a run continued in another folder). Returns the log lines."""
    best = os.path.join(args.output_dir, "best.pth")
    history = restore_log(ckpt, os.path.join(args.output_dir, "log.jsonl"), lambda line: line["epoch"] <= ckpt["epoch"])
    if int(os.environ.get("RANK", 0)) == 0:
        resumed_is_best = ckpt.get("best_epoch") == ckpt["epoch"]
        source = args.resume if resumed_is_best else os.path.join(os.path.dirname(args.resume), "best.pth")
        if (not os.path.exists(best) or checkpoint_epoch(best) != ckpt.get("best_epoch")) and \
                os.path.exists(source) and checkpoint_epoch(source) == ckpt.get("best_epoch"):
            save_checkpoint(ckpt if resumed_is_best else read_checkpoint(source), best)
    return history


def restore_log(ckpt, path, keep):
    """The log lines `ckpt` carries (an older one: those of `path` where keep(line)), rewritten to `path`."""
    history = ckpt["log"] if "log" in ckpt else read_log(path, keep)
    if int(os.environ.get("RANK", 0)) == 0:
        write_log(history, path)
    return list(history)


def restore_optimizer(optimizer, scaler, ckpt):
    """Load the optimiser's and the scaler's saved state but keep this run's learning rates (each group's
    initial_lr, which the schedule scales): a --resume's new --lr and --backbone-lr apply from here on."""
    initial = [group["initial_lr"] for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # torch's kinds for a state of another shape
        raise ValueError(f"the checkpoint's optimizer state does not fit this run: {e!r}") from None
    for group, lr in zip(optimizer.param_groups, initial):
        group["initial_lr"] = lr


def restart_from_best(path, net, ema, optimizer, scaler, rank):
    """The original's last phase: when strong augmentation ends (stop_epoch), training goes on from
    the best checkpoint so far (weights, EMA, optimiser and scaler), not from the last epoch's."""
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written it
    if not os.path.exists(path):  # no epoch had AP above 0 (the original stops with an error here)
        return
    ckpt = read_checkpoint(path)
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    restore_optimizer(optimizer, scaler, ckpt)
    if rank == 0:
        print(f"strong augmentation off: continuing from {path} (epoch {ckpt['epoch']}, AP {ckpt['best']:.4f})")


def load_matching(net, state, what, require_all=False):
    """Load the entries of `state` whose names and shapes fit `net` (fine-tuning on other classes).
    Refused (ValueError) when they hold less than half of the network's numbers, as then `state` is
    of another model, and with require_all when any tensor stays at its initial value."""
    own = net.state_dict()
    items = state.items() if isinstance(state, Mapping) else []
    fits = {k: v for k, v in items if k in own and torch.is_tensor(v) and own[k].shape == v.shape}
    check_finite(fits.items(), what)
    skipped = sorted(set(own) - set(fits))
    share = sum(v.numel() for v in fits.values()) / sum(v.numel() for v in own.values())
    if share < 0.5 or (require_all and skipped):
        why = "--eval-only evaluates the network as it is" if require_all else "is it a checkpoint of this model?"
        raise ValueError(f"{what} fits {len(fits)} of the model's {len(own)} tensors ({share:.0%} of its numbers; "
                         f"not e.g. {', '.join(skipped[:3])}): {why}")
    net.load_state_dict(fits, strict=False)
    print(f"{what}: loaded {len(fits)} of {len(own)} tensors" + (f"; kept initial values of {len(skipped)}, "
          f"e.g. {', '.join(skipped[:3])}" if skipped else ""))


# ---- Weights: tensors of finite numbers only ----
def named_tensors(obj, prefix=""):
    """(name, tensor) for every tensor in a checkpoint's nested dicts and lists."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))


# Tensors that hold inf by design: the decoder's anchors outside the image (never selected).
INF_BY_DESIGN = ("anchors",)


def check_finite(named, what, exported=False):
    """Refuse (ValueError) weights with NaN or inf: `named` holds (name, tensor or numpy array)
    pairs. A network with them predicts nothing, or garbage, and trains on garbage. exported: the
    constants of an exported graph, where the anchors are folded into constants of other names, so
    that only NaN is refused (a checkpoint's inf is refused when it is exported)."""
    bad = []
    for name, v in named:
        v = torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) and v.dtype.kind in "fc" else v  # a writable copy
        if not (torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())):
            continue
        inf_allowed = exported or name.rsplit(".", 1)[-1] in INF_BY_DESIGN
        if v.isnan().any() if inf_allowed else not torch.isfinite(v).all():
            bad.append(name)
    if bad:
        raise ValueError(f"{what} holds non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. "
                         f"{', '.join(bad[:3])}: refused")


def check_state_dict(sd, what):
    """Refuse (ValueError) a state dict that is not a mapping of names to tensors of finite numbers."""
    if not isinstance(sd, Mapping):
        raise ValueError(f"{what}: expected a state dict (names to tensors), found a {type(sd).__name__}")
    wrong = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not torch.is_tensor(v)]
    if wrong:
        raise ValueError(f"{what}: {len(wrong)} entries of its state dict are not tensors, e.g. {', '.join(wrong[:3])}")
    check_finite(sd.items(), what)


# ---- Checkpoint files: read with weights_only, checked against the network; released weights, in torch hub's cache ----
def checkpoint_state_dict(ckpt):
    """The network's state dict inside a checkpoint: EMA weights when present, else the model's."""
    if "ema" in ckpt and isinstance(ckpt["ema"], dict) and ckpt["ema"]:
        ema = ckpt["ema"]
        return ema["module"] if "module" in ema else ema
    if "model" in ckpt:
        return ckpt["model"]
    return ckpt


def read_checkpoint(path, what="checkpoint", mmap=False):
    """The dict in checkpoint file `path`, as torch.load reads it with weights_only (tensors only);
    `what` names it in errors. With mmap, tensors are read only when used (to look at a large
    checkpoint's epoch)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except Exception as e:  # torch raises many kinds for files that are not checkpoints, some without a message
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        reason = "the file is empty (0 bytes)" if empty else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read {what} {path}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint (a dict)")
    if not mmap:  # every tensor: weights, EMA, optimizer state
        check_finite(named_tensors(ckpt), f"{what} {path}")
    return ckpt


def check_same_layout(own, sd):
    """Raise a ValueError naming the missing, unexpected and wrongly shaped entries of state dict `sd`
    against `own` (a state dict; meta tensors will do, only names and shapes are compared)."""
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint holds no state dict (names to tensors) where expected, but a {type(sd).__name__}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"  # other entries: check_state_dict
              for k in own if k in sd and torch.is_tensor(sd[k]) and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        show = lambda xs: ", ".join(xs[:5]) + (f" ... ({len(xs)} in all)" if len(xs) > 5 else "")
        problems = [f"{what}: {show(xs)}" for what, xs in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if xs]
        raise ValueError("checkpoint does not match the model; " + "; ".join(problems))


def weights_for(own, source):
    """The state dict that `source` holds for a network whose own state dict is `own`: `source` is a
    released checkpoint ({"ema": {"module": sd}} or {"model": sd}), a bare state dict or one of this
    project's checkpoints, a path or a mapping. Strict: every name and shape must match `own`'s, and
    every entry be a tensor of finite numbers (ValueError)."""
    sd = checkpoint_state_dict(source if isinstance(source, dict) else read_checkpoint(source))
    check_same_layout(own, sd)
    check_state_dict(sd, "checkpoint")
    return sd


def vit_size(sd, vits):
    """A ViT state dict's size in words: the ECViT preset it matches ("ecvitt (192 wide, 12 blocks)"),
    else its width and depth; None if it is no ECViT. vits: the ECViT presets, name -> (embed_dim,
    num_heads, ffn_ratio, proj_dim) (model.ECVIT)."""
    if "patch_embed.proj.weight" not in sd or "rope_embed.periods" not in sd or "blocks.0.mlp.fc1.weight" not in sd:
        return None
    width, depth = sd["patch_embed.proj.weight"].shape[0], len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads, ffn_ratio = width // (4 * len(sd["rope_embed.periods"])), sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    name = next((n for n, (d, h, r, _) in vits.items() if (d, h, r, 12) == (width, heads, ffn_ratio, depth)), "a ViT")
    return f"{name} ({width} wide, {depth} blocks)"


def load_vit(vit, sd, source, vits):
    """Load a ViT state dict in the released ecvit*.pth format into the network's ViT `vit`
    (net.backbone.backbone), strictly; an ECViT of another size is reported by the sizes held and
    needed (`vit_size`, with the ECViT presets `vits`). source: the file or URL, for the errors."""
    try:
        check_same_layout(vit.state_dict(), sd)
    except ValueError as e:
        held, needed = vit_size(sd, vits), vit_size(vit.state_dict(), vits)
        if held and held != needed:
            raise ValueError(f"{source} holds {held}; the model needs {needed}") from None
        raise ValueError(f"{source} does not fit this model's ViT: {e}") from None
    check_state_dict(sd, source)
    vit.load_state_dict(sd)


RELEASE_URL = "https://github.com/capsule2077/edgecrafter/releases/download/edgecrafterv1/"


def released_backbone(cfg, vits):
    """The URL of the released ECViT that a config's ViTAdapter names ("ecvitt", "ecseg_vitt", ...),
    as the original downloads it when it builds the network; None when the section sets
    skip_load_backbone or describes a ViT of another width, depth or FFN (no released weights fit). vits: the
    ECViT presets, name -> (embed_dim, num_heads, ffn_ratio, proj_dim) (model.ECVIT)."""
    adapter = cfg["ViTAdapter"]
    name = adapter.get("name", "")
    preset = "ec" + name.rpartition("_")[2].removeprefix("ec")  # ecseg_vitt and ecpose_vitt are ecvitt's size
    if adapter.get("skip_load_backbone") or "dinov3" in adapter or preset not in vits:
        return None
    dim, heads, ffn_ratio, _ = vits[preset]
    if (adapter.get("embed_dim", 192), adapter.get("num_heads", 3), adapter.get("ffn_ratio", 4), adapter.get("depth", 12)) \
            != (dim, heads, ffn_ratio, 12):
        return None
    return f"{RELEASE_URL}{name}.pth"


def released_checkpoint(name, presets):
    """The released model `name` ("ecdet_s" ... "ecpose_x"), downloaded once into torch hub's cache:
    the checkpoint as torch.load returns it (weights under ["ema"]["module"] or ["model"])."""
    check_name(name, presets, "released model")
    return download(f"{RELEASE_URL}{name}.pth", f"download it elsewhere and pass the file instead of {name!r}")


def download(url, hint):
    """torch.load of the file at `url`, cached as torch hub caches checkpoints (TORCH_HOME/hub/
    checkpoints). The file is written under a temporary name and renamed when complete, so a failed
    download leaves nothing in the cache; a cached file that does not load is fetched again once.
    `hint` ends the error raised when the URL cannot be reached: what the user can do instead."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    for attempt in range(2):
        if not os.path.exists(path):
            fetch(url, path, hint)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if attempt:
                raise ValueError(f"{path}, downloaded again from {url}, does not load: {e}") from None
            print(f"the cached {path} does not load ({e}); downloading it again")
            os.remove(path)


def fetch(url, path, hint):
    """Download `url` to `path` through a temporary file in the same folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.partial"
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            expected = response.headers.get("Content-Length")
            while chunk := response.read(1 << 20):
                f.write(chunk)
            got = f.tell()
        if expected is not None and got != int(expected):
            raise ConnectionError(f"the connection ended after {got} of {expected} bytes")
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts and cut connections alike
        raise ConnectionError(f"cannot download {url} ({getattr(e, 'reason', e)}); {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- The networks' conventions: ImageNet-normalised inputs, COCO's classes, keypoints and skeleton ----
# The released networks' input and output conventions. Inputs: RGB in [0, 1] normalised with
# ImageNet's mean and std. Outputs: ECDet and ECSeg's labels 0..79 stand for COCO's 80 categories,
# whose ids run from 1 to 90 with gaps; ECPose's labels are the category ids themselves (person = 1),
# its 17 keypoints COCO's, joined by COCO's skeleton (its 1-based pairs, here 0-based).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
COCO_IDS = tuple(i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
                  "left_knee", "right_knee", "left_ankle", "right_ankle")
SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
            (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


def normalize(image):
    """An RGB PIL image -> float (3, H, W): [0, 1], then normalised with the ImageNet mean and std
    (IMAGENET_MEAN, IMAGENET_STD), the networks' input convention."""
    # TF.to_dtype's and TF.normalize's arithmetic (x * (1 / 255) - mean) / std, but on one contiguous float
    # copy updated in place: a training DataLoader worker spends a tenth of its time here at 640 x 640.
    tensor = TF.pil_to_tensor(image).to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
    return tensor.sub_(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(3, 1, 1))


def preprocess(image, size):
    """An RGB PIL image -> the network's input (3, H, W) for `size` (H, W): stretched bilinearly
    (antialiased, as torchvision's Resize does for training's validation) and normalised."""
    return normalize(TF.resize(image, list(size)))


def default_classes(num_classes, pose=False):
    """(names, category ids), each by label, for a network that does not carry its own (a released
    checkpoint): COCO's for 80 classes, person = 1 for ECPose; otherwise the label itself."""
    if pose:
        return ["person" if c == 1 else "" for c in range(num_classes)], list(range(num_classes))
    if num_classes == len(COCO_NAMES):
        return list(COCO_NAMES), list(COCO_IDS)
    return [str(label) for label in range(num_classes)], list(range(num_classes))


# ---- Configs and inputs: checked against what the released models implement ----
def check_name(name, names, what):
    """Refuse (ValueError) a `what` ("preset", "activation", ...) that is not one of `names`, naming them."""
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(names)}")


def check_targets(targets):
    """Refuse (ValueError) a training step with denoising queries but without the targets they are made from."""
    if targets is None:
        raise ValueError("training with denoising queries needs the targets: call model(images, targets)")


def check_images(images):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % 32 or W % 32:
        raise ValueError(f"input size {H}x{W} is not a multiple of 32 (the stride of the coarsest level); "
                         f"resize or pad to e.g. {(H + 31) // 32 * 32}x{(W + 31) // 32 * 32}")


def check_input_size(cfg, size, flag="--img-size"):
    """Refuse (ValueError) an input size (H, W) that the network of config `cfg` cannot take: sides
    that are positive multiples of 32 (the stride of the coarsest level) giving at least as many
    positions over the three levels (strides 8, 16, 32) as the decoder selects queries among them."""
    h, w = size
    if min(h, w) <= 0 or h % 32 or w % 32:
        raise ValueError(f"{flag} {h} {w}: both sides must be positive multiples of 32 (the stride of the coarsest "
                         f"feature map)")
    queries = (cfg.get("ECTransformer") or cfg.get("DETRTransformer") or {}).get("num_queries", 300)
    positions = sum((h // s) * (w // s) for s in (8, 16, 32))
    if positions < queries:
        raise ValueError(f"{flag} {h} {w}: too small for this network, whose decoder selects {queries} queries among "
                         f"the {positions} positions of its feature maps")


def same_width(section):  # the encoder and the decoder keep one width, hidden_dim (256 if unset), at every level
    return [section.get("hidden_dim", 256)] * 3


# Settings that every released model has and that this code implements only so, per config section
# (a function of the section where the value depends on another key). config_section checks them and
# drops them, so the constructors take only what they use. A key left out takes the original's
# default: for UNRELEASED_DEFAULTS one that was never released, so such a config is refused.
RELEASED_ONLY = {
    "ViTAdapter": {"num_levels": 3, "embed_layer": "ConvPyramidPatchEmbed", "patch_size": 16},
    "HybridEncoder": {"in_channels": same_width, "feat_strides": [8, 16, 32], "csp_type": "csp2", "fuse_op": "sum"},
    "ECTransformer": {"feat_channels": same_width, "feat_strides": [8, 16, 32], "num_levels": 3, "layer_scale": 1,
                      "cross_attn_method": "default", "query_select_method": "default", "aux_loss": True,
                      "learn_query_content": False},
    "DETRTransformer": {"num_feature_levels": 3, "feat_strides": [8, 16, 32], "dec_n_points": 4,
                        "num_body_points": 17, "learnable_tgt_init": True, "two_stage_type": "standard",
                        "aux_loss": True, "dec_pred_class_embed_share": False, "dec_pred_pose_embed_share": False,
                        "two_stage_class_embed_share": False, "two_stage_bbox_embed_share": False,
                        "cls_no_bias": False},
}
UNRELEASED_DEFAULTS = {"DETRTransformer": {"num_feature_levels": 1, "learnable_tgt_init": False, "two_stage_type": "no",
                                           "two_stage_class_embed_share": True, "two_stage_bbox_embed_share": True}}
# Keys that do nothing, in the original too.
IGNORED = {"DETRTransformer": ("normalize_before", "return_intermediate_dec", "enc_n_points")}


def config_section(cfg, name):
    """cfg[name] without its RELEASED_ONLY settings, once they are checked, and its IGNORED keys."""
    if name not in cfg:
        raise ValueError(f"config has no section {name!r} (sections present: {sorted(cfg)})")
    section = {k: v for k, v in cfg[name].items() if k not in IGNORED.get(name, ())}
    for key, released in RELEASED_ONLY.get(name, {}).items():
        released = released(section) if callable(released) else released
        value = section.pop(key, UNRELEASED_DEFAULTS.get(name, {}).get(key, released))
        value = list(value) if isinstance(value, tuple) else value
        if value != released:
            raise ValueError(f"{name} {key}={value!r} is not implemented; the released models use {released!r}")
    return section


def make_section(cls, cfg, name, **shared):
    """Build `cls(**config_section(cfg, name), **shared)`; a bad key gets an error naming the section."""
    try:
        return cls(**{**config_section(cfg, name), **shared})
    except (TypeError, AssertionError) as e:  # AssertionError: torch's checks, e.g. widths that heads don't divide
        raise ValueError(f"config section {name!r}: {e}") from None


# The top-level keys of a config: the network's sections and settings, the postprocessors', and the
# loss sections of the training files (train_det, train_seg: ECCriterion; train_pose: DETRPoseCriterion).
CONFIG_KEYS = {"task", "model", "ViTAdapter", "HybridEncoder", "ECTransformer", "DETRTransformer", "PostProcessor",
               "DETRPosePostProcessor", "eval_spatial_size", "num_classes", "use_focal_loss", "ECCriterion",
               "DETRPoseCriterion"}
# The keys of a ViTAdapter section (its RELEASED_ONLY ones aside): ECViT's size (model.ViT's kwargs), or
# `dinov3`, a DINOv3 hub name or kwargs that name the whole ViT (model.build_vit).
ECVIT_KEYS = ("embed_dim", "num_heads", "depth", "ffn_ratio", "ffn_layer")
FFN_LAYERS = ("mlp", "swiglu")  # model.ViT's: GeluFFN, SwiGLU
VIT_ADAPTER_KEYS = {"name", "weights_path", "skip_load_backbone", "interaction_indexes", "proj_dim", "dinov3",
                    *ECVIT_KEYS}


def check_config(cfg):
    """Refuse (TypeError, ValueError) a network config that model.build_model cannot build as the user
    means it: not a dict, without num_classes or ViTAdapter, with an unknown top-level key (a misspelt
    section would silently take the defaults), an unknown or unimplemented ViTAdapter key, or both a
    DINOv3 ViT and ECViT keys."""
    if not isinstance(cfg, dict):
        raise TypeError(f"build_model takes a preset name or a config dict, got {type(cfg).__name__}")
    for key in ("num_classes", "ViTAdapter"):
        if key not in cfg:
            raise ValueError(f"config is missing {key!r} (see model.preset_config('ecdet_s') for a complete one)")
    if set(cfg) - CONFIG_KEYS:
        raise ValueError(f"config: unknown top-level keys {sorted(set(cfg) - CONFIG_KEYS)}; known: {sorted(CONFIG_KEYS)}")
    adapter = config_section(cfg, "ViTAdapter")
    if set(adapter) - VIT_ADAPTER_KEYS:
        raise ValueError(f"config section 'ViTAdapter': unknown keys {sorted(set(adapter) - VIT_ADAPTER_KEYS)}")
    check_vit_keys(adapter)


def check_vit_keys(adapter):
    """Refuse (ValueError) a ViTAdapter section that names DINOv3's ViT and sets ECViT keys too, or an ECViT that
    model.ViT cannot build: an unknown FFN, or heads whose width 2-D RoPE cannot split in four (model.ViT's
    defaults: 192 wide, 3 heads)."""
    ecvit = sorted(k for k in adapter if k in ECVIT_KEYS)
    if "dinov3" in adapter and ecvit:
        raise ValueError(f"ViTAdapter: 'dinov3' names the whole ViT; drop the ECViT keys {ecvit}")
    if adapter.get("ffn_layer", "mlp") not in FFN_LAYERS:
        raise ValueError(f"ViTAdapter: unknown ffn_layer {adapter['ffn_layer']!r}; expected 'mlp' or 'swiglu'")
    head_dim = adapter.get("embed_dim", 192) // adapter.get("num_heads", 3)
    if head_dim % 4:
        raise ValueError(f"ViTAdapter: 2-D RoPE needs a head dimension divisible by 4, got {head_dim}")


# DinoVisionTransformer's keyword arguments and their defaults (dinov3/models/vision_transformer.py).
DINOV3_DEFAULTS = dict(
    img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None,
    pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None,
    pos_embed_rope_jitter_coords=None, pos_embed_rope_rescale_coords=None, pos_embed_rope_dtype="bf16",
    embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, layerscale_init=None,
    norm_layer="layernorm", ffn_layer="mlp", ffn_bias=True, proj_bias=True, n_storage_tokens=0, mask_k_bias=False,
    untie_cls_and_patch_norms=False, untie_global_and_local_cls_norm=False, device=None)
# The settings model.ViT implements; any other value of these kwargs is refused, not approximated.
DINOV3_FIXED = dict(
    in_chans=3, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None, pos_embed_rope_max_period=None,
    pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None, pos_embed_rope_jitter_coords=None,
    pos_embed_rope_dtype="fp32", qkv_bias=True, drop_path_rate=0.0, ffn_bias=True, proj_bias=True,
    untie_cls_and_patch_norms=False, untie_global_and_local_cls_norm=False)


def dinov3_kwargs(cfg, hub, common):
    """The full DinoVisionTransformer kwargs of a hub name or of a (partial) kwargs dict. hub: the hub
    models, name -> the kwargs of its size, which complete `common` (model.DINOV3_HUB, model.HUB_COMMON)."""
    if isinstance(cfg, str):
        if cfg not in hub:
            raise ValueError(f"unknown DINOv3 model {cfg!r}; expected one of {', '.join(hub)} or a kwargs dict")
        cfg = {**common, **hub[cfg]}
    if not isinstance(cfg, dict):
        raise TypeError(f"a DINOv3 config is a hub name or a kwargs dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DINOV3_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown DINOv3 kwargs {unknown}; DinoVisionTransformer takes {sorted(DINOV3_DEFAULTS)}")
    return {**DINOV3_DEFAULTS, **cfg}


def check_dinov3_kwargs(kw, norm_layers):
    """Refuse (ValueError, naming each) full DINOv3 kwargs that model.ViT does not implement.
    norm_layers: the norm layers it implements (model.NORM_EPS)."""
    refused = [f"{k}={kw[k]!r} (implemented: {v!r})" for k, v in DINOV3_FIXED.items() if kw[k] != v]
    if kw["norm_layer"] not in norm_layers:
        refused.append(f"norm_layer={kw['norm_layer']!r} (implemented: {sorted(norm_layers)})")
    if kw["ffn_layer"] not in FFN_LAYERS:
        refused.append(f"ffn_layer={kw['ffn_layer']!r} (implemented: 'mlp', 'swiglu')")
    if kw["n_storage_tokens"] < 1:
        refused.append("n_storage_tokens=0 (implemented: 1 or more, as in every hub model)")
    if kw["embed_dim"] // kw["num_heads"] % 4:
        refused.append(f"embed_dim / num_heads = {kw['embed_dim'] // kw['num_heads']} (implemented: a multiple of 4, "
                       f"as 2-D RoPE needs)")
    if refused:
        raise ValueError("DINOv3 settings that model.ViT does not implement: " + "; ".join(refused))


# ---- Annotation files: checked whole before training or evaluation ----
def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_coco_ids(data, path):
    """Refuse (ValueError naming the file and the ids) a COCO annotation dict whose image,
    annotation or category ids are not integers or repeat, or whose annotations refer to images or
    categories by anything but an integer: pycocotools indexes by id, so a repeated id silently gives
    one image the other's objects, and an object is counted twice or not at all by COCOeval."""
    show = lambda values: ", ".join(map(repr, values[:5])) + (f" ... ({len(values)} in all)" if len(values) > 5 else "")
    for key, what in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        entries = data[key]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"COCO annotation file {path}: '{key}' must be a list of objects")
        ids = [e.get("id") for e in entries]
        wrong = [i for i in ids if not is_int(i)]
        if wrong:
            kinds = sorted({type(i).__name__ for i in wrong})
            raise ValueError(f"COCO annotation file {path}: {what} ids must be integers; found {len(wrong)} of type "
                             f"{', '.join(kinds)}: {show(wrong)}")
        repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"COCO annotation file {path}: {what} ids must be unique; repeated: {show(repeated)}")
    for ref in ("image_id", "category_id"):
        wrong = [a.get("id") for a in data["annotations"] if not is_int(a.get(ref))]
        if wrong:
            raise ValueError(f"COCO annotation file {path}: the {ref} of annotations {show(wrong)} is not an integer")


def check_coco_entries(coco, path):
    """Refuse (ValueError naming the file) a COCO data set (pycocotools COCO) with a category without a
    name, or an image without a file name or a positive width and height."""
    for c, cat in coco.cats.items():
        if not isinstance(cat.get("name"), str):
            raise ValueError(f"COCO annotation file {path}: category {c} has no 'name'")
    for image_id, info in coco.imgs.items():
        for key in ("file_name", "width", "height"):
            value = info.get(key)
            if not (isinstance(value, str) if key == "file_name" else isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"COCO annotation file {path}: image {image_id} has no valid '{key}' (found {value!r})")


def usable_boxes(coco, path, cat_to_label):
    """The training targets of a COCO data set (pycocotools COCO of file `path`): {image_id: [(annotation,
    label, [x1, y1, x2, y2] clipped to the image)]}, and the number of dropped boxes per reason (a Counter),
    each reason warned about. Crowd regions are no targets. Boxes with a non-finite coordinate, of zero or
    negative size after clipping, or mostly (more than half) outside the image are dropped from the ground
    truth too (COCOeval matches any detection to a NaN box); a malformed annotation is refused."""
    instances, dropped, kept = {}, collections.Counter(), []
    for ann in coco.dataset["annotations"]:
        try:
            crowd = ann.get("iscrowd", 0)
            if not crowd and ann["category_id"] not in cat_to_label:
                raise ValueError(f"unknown category_id {ann['category_id']}")
            info = coco.imgs[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            ident = ann.get("id") if isinstance(ann, dict) else ann
            raise ValueError(f"COCO annotation file {path}: annotation {ident} is malformed: {e!r}") from e
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, info["width"]), min(y + h, info["height"])
        if not all(map(math.isfinite, (x, y, w, h))):
            dropped["with a non-finite coordinate"] += 1
        elif crowd:
            kept.append(ann)
        elif x2 <= x1 or y2 <= y1:
            dropped["of zero or negative size"] += 1
        elif (x2 - x1) * (y2 - y1) < 0.5 * w * h:
            dropped["mostly outside their image"] += 1
        else:
            kept.append(ann)
            instances.setdefault(ann["image_id"], []).append((ann, cat_to_label[ann["category_id"]], [x1, y1, x2, y2]))
    if dropped:
        coco.dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    for reason, n in sorted(dropped.items()):
        warnings.warn(f"{n} boxes {reason} in {path}; dropped from training and evaluation")
    return instances, dropped


# ---- Data sets as they come: COCO, Roboflow, YOLO ----
#
# Every layout ends as what the stages already read: an image folder and a COCO-format annotation
# file per split, so that one code path trains, and pycocotools (which needs a COCO ground truth)
# evaluates. A YOLO data set is converted into COCO JSON files written into the run folder.

ROBOFLOW_JSON = "_annotations.coco.json"
ROBOFLOW_SPLITS = {"train": "train", "val": "valid"}  # our split -> Roboflow's folder
YOLO_IMAGES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the picture by 90 degrees: width and height swap


def data_splits(data, splits, coco_names, labels, out_dir, num_keypoints=None):
    """{split: (image folder, COCO annotation file)} for `splits` ("train", "val") of the data set at `data`:
      - the original's COCO layout: coco_names[split] (annotations/..._{split}2017.json) and {split}2017/;
      - a Roboflow COCO export: train/ and valid/, each with _annotations.coco.json beside its images;
      - a YOLO data set: data.yaml or its folder, converted (every split checked before any file is
        written) into out_dir/yolo_{split}.json. `labels` is what the rows must carry: "boxes",
        "polygons" or "keypoints" (num_keypoints per row, from kpt_shape).
    Anything else raises ValueError (bad input) or FileNotFoundError saying what was looked for."""
    if os.path.isdir(data) and os.path.isdir(os.path.join(data, "annotations")):
        return {s: (os.path.join(data, f"{s}2017"), os.path.join(data, coco_names[s])) for s in splits}
    roboflow = [os.path.join(data, folder, ROBOFLOW_JSON) for folder in ROBOFLOW_SPLITS.values()]
    if os.path.isdir(data) and any(map(os.path.isfile, roboflow)):
        found = {}
        for split in splits:
            folder = os.path.join(data, ROBOFLOW_SPLITS[split])
            if not os.path.isfile(os.path.join(folder, ROBOFLOW_JSON)):
                raise FileNotFoundError(f"--data {data}: a Roboflow COCO export, but {folder} has no {ROBOFLOW_JSON} "
                                        f"(expected one in train/ and valid/, beside the images)")
            found[split] = (folder, os.path.join(folder, ROBOFLOW_JSON))
        return found
    yaml_file = data if data.endswith((".yaml", ".yml")) else os.path.join(data, "data.yaml")
    if os.path.isfile(yaml_file):
        converted = {s: yolo_to_coco(yaml_file, s, labels, num_keypoints) for s in splits}
        os.makedirs(out_dir, exist_ok=True)
        found = {}
        for split, (root, coco) in converted.items():
            path = os.path.join(out_dir, f"yolo_{split}.json")
            write_json(coco, path)
            found[split] = (root, path)
        return found
    raise FileNotFoundError(f"--data {data}: not a data set layout this project reads; looked for "
                            f"{coco_names['val']} (COCO), {ROBOFLOW_SPLITS['train']}/{ROBOFLOW_JSON} "
                            f"(Roboflow COCO export) and data.yaml (YOLO)")


def write_json(obj, path):
    """Write `obj` as JSON through a temporary file, so that readers see the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_yaml(path):
    """The subset of YAML that data.yaml files use: top-level `key: value` with scalars, flow lists
    and maps ([a, b], {0: a}), and indented blocks of `- item` or `key: value` lines. (PyYAML is not a
    dependency of this project.)"""
    result, key = {}, None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        text = _strip_comment(line).rstrip()
        if not text.strip() or text.strip() == "---":
            continue
        if not line[0].isspace():
            key, sep, value = text.partition(":")
            if not sep:
                raise ValueError(f"{path}, line {number}: expected 'key: value', found {text.strip()!r}")
            key, value = key.strip().strip("'\""), value.strip()
            result[key] = _yaml_value(value) if value else None
        elif key is not None:  # a line of the block under `key`
            item = text.strip()
            if item.startswith("- "):
                result[key] = (result[key] if isinstance(result[key], list) else []) + [_yaml_value(item[2:].strip())]
            elif ":" in item:
                k, _, v = item.partition(":")
                block = result[key] if isinstance(result[key], dict) else {}
                block[_yaml_value(k.strip())] = _yaml_value(v.strip()) if v.strip() else None
                result[key] = block
    return result


def _strip_comment(line):
    """`line` without a `#` comment (a `#` inside quotes stays)."""
    quote = None
    for i, c in enumerate(line):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _split_flow(text):
    """The items of a flow list or map's inside, split at commas outside quotes."""
    items, quote, start = [], None, 0
    for i, c in enumerate(text + ","):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "," and quote is None:
            items.append(text[start:i].strip())
            start = i + 1
    return [item for item in items if item]


def _yaml_value(text):
    if text.startswith("[") and text.endswith("]"):
        return [_yaml_value(item) for item in _split_flow(text[1:-1])]
    if text.startswith("{") and text.endswith("}"):
        return {_yaml_value(k.strip()): _yaml_value(v.strip()) for k, _, v in
                (item.partition(":") for item in _split_flow(text[1:-1]))}
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("null", "~", ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def yolo_names(cfg, yaml_file):
    """The class names of a data.yaml: `names` as a list, or as a map from 0..N-1 to names."""
    names = cfg.get("names")
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{yaml_file}: expected `names`, a list of class names or a map 0: name, 1: name, ...")
    return [str(name) for name in names]


def yolo_root(cfg, yaml_file):
    """The folder the data.yaml's split paths are relative to: `path` (itself relative to the yaml's
    folder, else to the working directory), else the yaml's folder."""
    here = os.path.dirname(os.path.abspath(yaml_file))
    path = cfg.get("path")
    if not path:
        return here
    path = os.path.expanduser(str(path))
    beside = os.path.join(here, path)
    return os.path.normpath(beside if os.path.isabs(path) or os.path.exists(beside) else os.path.abspath(path))


def yolo_images(cfg, split, root, yaml_file):
    """The image paths of a data.yaml's `train` or `val` entry: a folder (searched recursively), a .txt
    list of images, an image, or a list of those."""
    entry = cfg.get(split)
    if not entry:
        raise ValueError(f"{yaml_file}: no `{split}:` entry (the folder of the {split} images)")
    images = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = os.path.join(root, str(item))
        # Roboflow's YOLO export writes ../train/images beside the yaml; Ultralytics reads it so too.
        if not os.path.exists(path) and str(item).startswith("../"):
            path = os.path.join(root, str(item)[3:])
        if os.path.isdir(path):
            images += sorted(os.path.join(folder, name) for folder, _, names in os.walk(path, followlinks=True)
                             for name in names if name.lower().endswith(YOLO_IMAGES))
        elif os.path.isfile(path) and path.endswith(".txt"):
            with open(path) as f:
                listed = [line.strip() for line in f if line.strip()]
            images += [os.path.normpath(os.path.join(os.path.dirname(path), p)) for p in listed]
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise FileNotFoundError(f"{yaml_file}: {split}: {item} does not exist (looked for {os.path.normpath(path)})")
    if not images:
        raise FileNotFoundError(f"{yaml_file}: {split}: no images ({' '.join(YOLO_IMAGES)}) in {entry}")
    return images


def yolo_label_path(image_path):
    """Where YOLO keeps an image's labels: the last `images` folder of its path becomes `labels`, and
    the file ends in .txt (dataset/images/train/a.jpg -> dataset/labels/train/a.txt)."""
    parts = os.path.normpath(image_path).split(os.sep)
    folders = [i for i, part in enumerate(parts[:-1]) if part == "images"]
    if folders:
        parts[folders[-1]] = "labels"
    return os.path.splitext(os.sep.join(parts))[0] + ".txt"


def upright_size(path):
    """(w, h) of an image as viewers show it: EXIF orientations 5-8 swap the stored sides. None when
    PIL cannot open it."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except OSError:
        return None
    return (h, w) if turned else (w, h)


def yolo_to_coco(yaml_file, split, labels, num_keypoints=None):
    """(image root, COCO-format dict) of the `split` of a YOLO data set. Rows of labels/*.txt are
    normalised to the upright image (as Ultralytics reads them):
        boxes:      class cx cy w h (a polygon row is taken as its bounding box)
        polygons:   class x1 y1 x2 y2 x3 y3 ... (at least 3 points)
        keypoints:  class cx cy w h px1 py1 [v1] ... (kpt_shape [K, 2 or 3] in data.yaml)
    Category ids are the class indices, except for keypoints: 1 + index, as COCO's person is 1. An
    image without a label file has no objects. A bad row raises ValueError naming file and line."""
    cfg = read_yaml(yaml_file)
    names = yolo_names(cfg, yaml_file)
    root = yolo_root(cfg, yaml_file)
    dims = None
    if labels == "keypoints":
        shape = cfg.get("kpt_shape")
        if not (isinstance(shape, list) and len(shape) == 2 and shape[1] in (2, 3) and isinstance(shape[0], int)):
            raise ValueError(f"{yaml_file}: expected kpt_shape: [K, 2 or 3] for keypoint labels, found {shape!r}")
        if num_keypoints is not None and shape[0] != num_keypoints:
            raise ValueError(f"{yaml_file}: kpt_shape {shape}: the model predicts {num_keypoints} keypoints")
        dims = shape[1]
        num_keypoints = shape[0]
    first_id = 1 if labels == "keypoints" else 0
    coco = {"images": [], "annotations": [],
            "categories": [{"id": first_id + i, "name": name} for i, name in enumerate(names)]}
    if labels == "keypoints":
        coco["categories"][0]["keypoints"] = [str(k) for k in range(num_keypoints)]
    for path in yolo_images(cfg, split, root, yaml_file):
        size = upright_size(path)
        if size is None:
            warnings.warn(f"skipping image {path}: PIL cannot open it")
            continue
        image_id = len(coco["images"]) + 1  # ids from 1: COCOeval takes 0 for "unmatched"
        coco["images"].append({"id": image_id, "file_name": os.path.relpath(path, root), "width": size[0],
                               "height": size[1]})
        label_file = yolo_label_path(path)
        if not os.path.isfile(label_file):
            continue
        with open(label_file) as f:
            rows = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
        for number, row in rows:
            where = f"{label_file}, line {number}"
            try:
                values = [float(v) for v in row]
            except ValueError:
                raise ValueError(f"{where}: expected numbers, found {' '.join(row)!r}") from None
            cls = values[0]
            if cls != int(cls) or not 0 <= cls < len(names):
                raise ValueError(f"{where}: class {row[0]}, but {yaml_file} names {len(names)} classes "
                                 f"(0..{len(names) - 1})")
            ann = yolo_annotation(values[1:], labels, size, num_keypoints, dims, where)
            ann.update(id=len(coco["annotations"]) + 1, image_id=image_id, category_id=first_id + int(cls), iscrowd=0)
            coco["annotations"].append(ann)
    return root, coco


def yolo_annotation(values, labels, size, num_keypoints, dims, where):
    """A COCO annotation (bbox, area, and segmentation or keypoints) in pixels from one row's numbers
    after the class, normalised to an image of `size` (w, h)."""
    w, h = size
    if labels == "keypoints":
        expected = 4 + num_keypoints * dims
        if len(values) != expected:
            raise ValueError(f"{where}: {len(values) + 1} numbers; expected {expected + 1} (class cx cy w h and "
                             f"{num_keypoints} keypoints of {dims} numbers, kpt_shape [{num_keypoints}, {dims}])")
    elif labels == "polygons":
        if len(values) < 6 or len(values) % 2:
            raise ValueError(f"{where}: {len(values) + 1} numbers; expected class x1 y1 x2 y2 x3 y3 ... (a polygon of "
                             f"at least 3 points, normalised)")
    elif len(values) != 4 and (len(values) < 6 or len(values) % 2):
        raise ValueError(f"{where}: {len(values) + 1} numbers; expected 5 (class cx cy w h, normalised) or a polygon "
                         f"(class x1 y1 x2 y2 x3 y3 ...)")
    coords = values[:4] if labels == "keypoints" else values
    if any(not -0.01 <= v <= 1.01 for v in coords):
        raise ValueError(f"{where}: coordinates outside [0, 1]; YOLO rows are normalised by the image's width and height")
    if labels == "keypoints" or len(values) == 4:
        cx, cy, bw, bh = values[0] * w, values[1] * h, values[2] * w, values[3] * h
        ann = {"bbox": [cx - bw / 2, cy - bh / 2, bw, bh], "area": bw * bh}
    else:
        xy = np.array(values, dtype=np.float64).reshape(-1, 2) * (w, h)
        (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
        # the shoelace formula: the polygon's area, which COCOeval's area ranges use
        area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
        ann = {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "segmentation": [xy.flatten().tolist()]}
        ann["bbox"] = [float(v) for v in ann["bbox"]]
    if labels == "keypoints":
        points = np.array(values[4:], dtype=np.float64).reshape(num_keypoints, dims)
        keypoints = []
        for p in points:
            # COCO's visibility: 0 not labelled, 1 labelled but hidden, 2 visible
            v = (2 if p[2] >= 1.5 else 1 if p[2] > 0 else 0) if dims == 3 else (2 if p[0] or p[1] else 0)
            keypoints += [float(p[0] * w), float(p[1] * h), v] if v else [0, 0, 0]
        ann.update(keypoints=keypoints, num_keypoints=sum(v > 0 for v in keypoints[2::3]))
    return ann


# ---- Synthetic demo data: coloured shapes in the COCO layout ----
# Non-contiguous category ids, as in COCO, so the label remap is exercised.
SYNTHETIC_CATEGORIES = {1: "circle", 3: "square", 7: "triangle"}
# Shapes the generator can draw: points and the inner radius as a fraction of the outer (1: a
# regular polygon of that many corners; less: a star of that many points).
SHAPES = {"circle": (32, 1.0), "square": (4, 1.0), "triangle": (3, 1.0), "hexagon": (6, 1.0), "star": (5, 0.45),
          "sparkle": (4, 0.4)}


def _background(rng, w, h):
    """(h, w, 3) uint8: a colour ramp between two dark colours plus Gaussian noise."""
    a, b = rng.uniform(0, 140, size=(2, 3))
    ramp = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    return np.clip(a + (b - a) * ramp + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _synthetic_image(rng, img_size, image_id, ann_id, split_dir, shapes=SYNTHETIC_CATEGORIES, sizes=(0.625, 1.0),
                     gray=0.0):
    """Draw one image, save it, return its COCO image entry and annotations. shapes: category id ->
    a SHAPES name; sizes: the range of each side as a fraction of img_size; gray: the fraction of
    images saved as grayscale."""
    w, h = (int(img_size * s) for s in rng.uniform(*sizes, size=2))
    canvas = Image.fromarray(_background(rng, w, h))
    draw = ImageDraw.Draw(canvas)
    placed, annotations = [], []
    for _ in range(rng.choice(5, p=[0.05, 0.25, 0.3, 0.25, 0.15])):
        for _ in range(20):  # retry until the shape's square hull overlaps no earlier one
            r = rng.uniform(0.08, 0.22) * min(w, h)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(abs(cx - px) > r + pr or abs(cy - py) > r + pr for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = int(rng.choice(list(shapes)))
        n, inner = SHAPES[shapes[cat]]
        corners = n if inner == 1 else 2 * n  # a star alternates outer and inner corners
        angle = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(corners) / corners
        radius = r * np.where(np.arange(corners) % 2 == 1, inner, 1.0)
        poly = np.round(np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], 1), 2)
        colour = rng.integers(60, 256, size=3)
        colour[rng.integers(3)] = 255  # one saturated channel keeps shapes brighter than the background
        draw.polygon([tuple(p) for p in poly.tolist()], fill=tuple(colour.tolist()))
        (x1, y1), (x2, y2) = poly.min(0), poly.max(0)
        segmentation = [poly.ravel().tolist()]
        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))))
        annotations.append(dict(id=ann_id + len(annotations), image_id=image_id, category_id=cat, iscrowd=0, area=area,
                                bbox=[float(x1), float(y1), float(x2 - x1), float(y2 - y1)], segmentation=segmentation))
    if gray and rng.random() < gray:
        canvas = canvas.convert("L")
    file_name = f"{image_id:012d}.jpg"
    canvas.save(os.path.join(split_dir, file_name), quality=90)
    return dict(id=image_id, file_name=file_name, width=w, height=h), annotations


def make_synthetic_coco(root, num_train=200, num_val=50, img_size=128, seed=0,
                        draw=_synthetic_image, categories=None, ann_prefix="instances"):
    """Write a small COCO-format data set of coloured shapes on noisy backgrounds; returns root.

    Layout: root/train2017/*.jpg, root/val2017/*.jpg, root/annotations/instances_{train,val}2017.json.
    Each image has sides drawn from [0.625, 1] * img_size pixels and 0-4 non-overlapping regular
    polygons (circle = 32 corners, square, triangle; category ids 1, 3, 7), each annotated with bbox
    (x, y, w, h pixels), area (of the polygon's mask), iscrowd 0 and a polygon segmentation.
    The same seed writes the same files. Other stages write their own data in this layout by
    passing draw (as _synthetic_image), their categories (COCO category dicts) and ann_prefix.
    """
    rng = np.random.default_rng(seed)
    categories = categories or [dict(id=c, name=name, supercategory="shape") for c, name in SYNTHETIC_CATEGORIES.items()]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        split_dir = os.path.join(root, split)
        os.makedirs(split_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            # ids from 1: COCOeval takes a matched-annotation id of 0 for "unmatched"
            image, anns = draw(rng, img_size, image_id, len(annotations) + 1, split_dir)
            images.append(image)
            annotations += anns
        data = dict(info=dict(description="EdgeCrafter synthetic shapes"), images=images,
                    annotations=annotations, categories=categories)
        with open(os.path.join(root, "annotations", f"{ann_prefix}_{split}.json"), "w") as f:
            json.dump(data, f)
    return root


# ---- Synthetic demo data for ECPose: stick figures with COCO's 17 keypoints ----
PERSON = dict(id=1, name="person", supercategory="person", keypoints=list(KEYPOINT_NAMES),
              skeleton=[[a + 1, b + 1] for a, b in SKELETON])
LIMBS = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]


def _stick_figure(rng, u, pelvis):
    """(17, 2) keypoints of a figure u pixels tall facing the camera (its left on the image's right),
    pelvis at `pelvis`, leaning a little, arms and legs at random angles."""
    lean = rng.normal(0, 0.15)
    down = lambda a: np.array([np.sin(lean + a), np.cos(lean + a)])  # a: radians from down toward image right
    up, side = -down(0), np.array([np.cos(lean), -np.sin(lean)])  # side: toward the figure's left
    kp = np.zeros((17, 2))
    neck = pelvis + 0.3 * u * up
    kp[0] = head = neck + 0.12 * u * up  # the nose, at the centre of the head
    for s, (eye, ear, shoulder, elbow, wrist, hip, knee, ankle) in ((1, range(1, 17, 2)), (-1, range(2, 17, 2))):
        kp[eye], kp[ear] = head + (0.035 * s * side + 0.02 * up) * u, head + 0.075 * s * u * side
        kp[shoulder], kp[hip] = neck + 0.11 * s * u * side, pelvis + 0.07 * s * u * side
        arm, leg = rng.uniform(0.1, 2.8), rng.uniform(-0.1, 0.6)
        kp[elbow] = kp[shoulder] + 0.16 * u * down(s * arm)
        kp[wrist] = kp[elbow] + 0.14 * u * down(s * (arm + rng.uniform(-0.3, 1.8)))
        kp[knee] = kp[hip] + 0.23 * u * down(s * leg)
        kp[ankle] = kp[knee] + 0.23 * u * down(s * (leg + rng.uniform(-0.6, 0.2)))
    return kp


def _draw_figure(draw, kp, u, fill):
    """Torso, limbs and head. PIL's pixel i covers [i, i + 1), so a point p is drawn at p - 0.5."""
    p = [tuple(q) for q in (kp - 0.5).tolist()]
    draw.polygon([p[5], p[6], p[12], p[11]], fill=fill)
    for a, b in LIMBS:
        draw.line([p[a], p[b]], fill=fill, width=max(round(0.06 * u), 1))
    r = 0.08 * u
    draw.ellipse([p[0][0] - r, p[0][1] - r, p[0][0] + r, p[0][1] + r], fill=fill)


def _stick_figure_image(rng, img_size, image_id, ann_id, split_dir):
    """Draw one image of 1, 2 or 3 figures (probability 0.2, 0.4, 0.4; a figure that finds no place
    apart from the others in four tries is left out), save it, return its COCO image entry and
    annotations.

    Keypoints outside the image, and each ear with probability 0.3, are not labelled (v = 0, x = y =
    0, as COCO); with probability 0.3 a rectangle hides part of the image and the keypoints under it
    are labelled occluded (v = 1). bbox and area are those of the figure's pixels."""
    w, h = (int(img_size * s) for s in rng.uniform(0.625, 1.0, size=2))
    canvas = Image.fromarray(_background(rng, w, h))
    draw, placed, figures = ImageDraw.Draw(canvas), [], []
    wanted = rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])
    for _ in range(4 * wanted):
        if len(placed) == wanted:
            break
        u = rng.uniform(0.45, 0.9) * h
        pelvis = rng.uniform([0.05 * w, 0.45 * u], [0.95 * w, h - 0.25 * u])
        if any(abs(pelvis[0] - x) < 0.2 * (u + v) for x, v in placed):
            continue  # too close to an earlier figure: another place, up to four tries per figure
        placed.append((pelvis[0], u))
        kp = _stick_figure(rng, u, pelvis)
        mask = Image.new("1", (w, h))
        _draw_figure(ImageDraw.Draw(mask), kp, u, 1)
        colour = rng.integers(60, 256, size=3)
        colour[rng.integers(3)] = 255  # one saturated channel keeps figures brighter than the background
        _draw_figure(draw, kp, u, tuple(colour.tolist()))
        for x, y in kp[1:3] - 0.5:  # dark eyes show which way the figure faces
            r = max(0.015 * u, 0.6)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(20, 20, 20))
        v = np.where(((kp >= 0) & (kp < [w, h])).all(1), 2, 0)
        v[[3, 4]] *= rng.random(2) >= 0.3
        figures.append((kp, v, np.asarray(mask)))
    if rng.random() < 0.3:
        x1, y1 = rng.uniform(0, [w, h])
        x2, y2 = np.array([x1, y1]) + rng.uniform(0.15, 0.3, size=2) * [w, h]
        draw.rectangle([x1, y1, x2, y2], fill=tuple(rng.integers(0, 256, size=3).tolist()))
        for kp, v, _ in figures:
            v[(v == 2) & (kp[:, 0] >= x1) & (kp[:, 0] <= x2) & (kp[:, 1] >= y1) & (kp[:, 1] <= y2)] = 1
    annotations = []
    for kp, v, mask in figures:
        ys, xs = np.nonzero(mask)
        keypoints = np.concatenate([np.where(v[:, None] > 0, kp.round(2), 0), v[:, None]], 1)
        annotations.append(dict(id=ann_id + len(annotations), image_id=image_id, category_id=1, iscrowd=0,
                                area=float(mask.sum()), num_keypoints=int((v > 0).sum()),
                                bbox=[float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())],
                                keypoints=[float(x) if i % 3 < 2 else int(x) for i, x in enumerate(keypoints.ravel())]))
    file_name = f"{image_id:012d}.jpg"
    canvas.save(f"{split_dir}/{file_name}", quality=90)
    return dict(id=image_id, file_name=file_name, width=w, height=h), annotations


def make_synthetic_pose(root, num_train=200, num_val=50, img_size=128, seed=0):
    """Write a small COCO keypoints data set of stick figures on noisy backgrounds; returns root.

    make_synthetic_coco's layout, with annotations/person_keypoints_{train,val}2017.json:
    images with sides in [0.625, 1] * img_size pixels and 1-3 figures each (see _stick_figure_image),
    category 1 "person" with COCO's keypoint names and skeleton. The same seed writes the same files.
    """
    return make_synthetic_coco(root, num_train, num_val, img_size, seed, draw=_stick_figure_image,
                               categories=[PERSON], ann_prefix="person_keypoints")


# ---- Processes and devices: torchrun's process group, tensors moved and averaged; user errors in one line ----
def setup_distributed(spec):
    """(rank, world size, device) from the environment torchrun provides; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = device(spec)
    if dev.type == "cuda" and (world > 1 or dev.index is None):  # torchrun: each process its own GPU
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return rank, world, dev


def start_run(args):
    """(rank, world size), and args.device, device_type and amp_dtype: with --amp bf16 on CPUs and on GPUs
    that support it, else fp16 (with make_optimizer's gradient scaler)."""
    rank, world, device = setup_distributed(args.device)
    args.device, args.device_type = device, device.type
    args.amp_dtype = None
    if args.amp:
        args.amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is the total over {world} processes; make it a multiple")
    return rank, world


def distributed(net, device, world):
    """`net` as the training step sees it: with several processes, DDP (BatchNorm synchronised on GPUs)."""
    if world == 1:
        return net
    if device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def mean_over_ranks(n, device):
    """n averaged over the DDP ranks when torch.distributed is initialised, at least 1, a float."""
    return average_over_ranks(torch.as_tensor([n], dtype=torch.float, device=device)).clamp(min=1).item()


def average_over_ranks(x):
    """Float tensor x, in place, averaged over the DDP ranks when torch.distributed is initialised."""
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def to_device(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def to_float(outputs):
    """Autocast outputs in float32: the loss runs in full precision, as in the original."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float(v) for v in outputs)
    return outputs


# The exceptions that mean bad input (or a diverged run) rather than a bug: scripts report them in one line.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def run_script(script, fn, *args, **kwargs):
    """fn(*args, **kwargs), a user error leaving as argparse's do: one line `SCRIPT: error: ...` on stderr, exit code 2.
    Either way the run's folder is let go; a refused run removes the empty folder it created."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        release_folders(failed=True)
        print(f"{script}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        release_folders()


def diverged(what, epoch, step, terms, checkpoint):
    """The error that stops a run at its first non-finite loss or gradient: where, each loss term,
    and what is on disk (nothing of the current epoch has been written)."""
    kept = f"{checkpoint} is unchanged" if os.path.exists(checkpoint) else "no checkpoint was written"
    values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
    return FloatingPointError(f"non-finite {what} at epoch {epoch + 1}, step {step}: {values}. Stopped; {kept}")


# ---- The command line: one way to say things in every script ----
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default: argparse's `(default: X)` unless the help says it already,
    `(default: none)` for an option that is off unless given; flags and required options show none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default is False or action.nargs == 0:
            return text
        if action.default is None:
            return f"{text} (default: none)".strip()
        return super()._get_help_string(action)


def device(spec=None):
    """The torch.device of a --device value: cpu, cuda or cuda:N; None (the default everywhere) means
    CUDA when torch sees a GPU, else the CPU. A GPU that is not there raises ValueError."""
    try:
        found = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {spec}: {e}; expected cpu, cuda or cuda:N") from None
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec}: expected cpu, cuda or cuda:N")
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is visible to torch here")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: torch sees {torch.cuda.device_count()} GPU(s) here")
    return found


def cpu_cores():
    """The cores this process may run on (its affinity where the OS tells it, else all): the default of
    every thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# ---- A training stage's set-up: its command line, data, recipe, config, initial weights; the demo ----
def training_parser(script, name, default_model, batch_size, description=None, model_option=True):
    """The command line every training stage shares (train_det.py, train_seg.py, train_pose.py, teacher.py),
    --batch-size defaulting to `batch_size` (the recipe's total); a stage that sets the network itself
    (teacher.py) leaves out --model."""
    description = description or (f"Train {default_model.split('_')[0].upper()} ({name}) on a data set in the COCO, "
                                  f"Roboflow COCO or YOLO layout.")
    parser = argparse.ArgumentParser(prog=script, description=description, formatter_class=HelpFormatter)
    parser.set_defaults(task=name)
    if model_option:
        parser.add_argument("--model", default=default_model, help="preset name or a JSON config in the original's "
                            "vocabulary")
    else:
        parser.set_defaults(model=None)
    parser.add_argument("--data", help="a data set: COCO root (annotations/, train2017/, val2017/), Roboflow COCO export "
                        "(train/ and valid/ with _annotations.coco.json), or YOLO data.yaml (or its folder)")
    for option in ("--train-images", "--train-ann", "--val-images", "--val-ann"):
        parser.add_argument(option, help="an image folder or COCO annotation file; default: --data's")
    parser.add_argument("--recipe", help="training recipe (epochs, learning rates, augmentation schedule) by "
                        "preset name; default: the --model preset's")
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="total over all processes")
    parser.add_argument("--lr", type=float, help="default: the recipe's")
    parser.add_argument("--backbone-lr", type=float, help="the ViT's; default: the recipe's (--lr for a random ViT)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[640], help="H [W], multiples of 32")
    parser.add_argument("--output-dir", default=f"outputs/{name}", help="refused when it holds a run (last.pth, "
                        "best.pth, log.jsonl), unless --resume or --overwrite")
    parser.add_argument("--resume", help="continue a run from its last.pth (or from a checkpoint that is not older "
                        "than --output-dir's last.pth); --epochs, --lr and --backbone-lr default to the run's and, "
                        "given, apply from the next epoch")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a run, "
                        "deleting its last.pth, best.pth and log.jsonl")
    parser.add_argument("--stop-after", type=int, help="stop after this many epochs (to train in chunks with --resume)")
    parser.add_argument("--tune", help="start from these weights (a released or own checkpoint, or a preset name for "
                        "the released model, downloaded; unmatched tensors stay as initialised; refused when less than "
                        "half the network's numbers fit, and with --eval-only when any tensor does not)")
    parser.add_argument("--backbone-weights", help="a distilled ECViT in the released ecvit*.pth format; default: "
                        "the released ECViT the model names (downloaded); 'none': random weights, trained at --lr")
    parser.add_argument("--amp", action="store_true", help="mixed precision: bf16 where supported, else fp16 with a gradient scaler")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available, else cpu")
    parser.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    parser.add_argument("--seed", type=int, default=0, help="of the initial weights, shuffling and augmentation")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights of --resume or --tune")
    parser.add_argument("--demo", action="store_true", help="train a small model on a synthetic data set on the CPU")
    return parser


def parse_training_args(parser, argv, presets):
    """The checked arguments of a training_parser (one a stage may have extended); --model may name only
    the presets (of `presets`) of the parser's default model's family."""
    args = parser.parse_args(argv)
    for option, value, least in (("--epochs", args.epochs, 1), ("--stop-after", args.stop_after, 1),
                                 ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                 ("--seed", args.seed, 0)):
        if value is not None and value < least:
            parser.error(f"{option} must be at least {least}, got {value}")
    for option, value in (("--lr", args.lr), ("--backbone-lr", args.backbone_lr)):
        if value is not None and not 0 <= value < math.inf:  # NaN too; 0 keeps the weights as they are
            parser.error(f"{option} must be a finite number, 0 or more, got {value}")
    if len(args.img_size) > 2 or any(s <= 0 or s % 32 for s in args.img_size):
        parser.error(f"--img-size {' '.join(map(str, args.img_size))}: expected H [W], positive multiples of 32 (the "
                     f"stride of the coarsest feature map)")
    args.img_size = args.img_size * 2 if len(args.img_size) == 1 else args.img_size
    family = (parser.get_default("model") or "").partition("_")[0]
    if family and args.model in presets and not args.model.startswith(family + "_"):
        parser.error(f"--model {args.model} is not a {args.task} model; {parser.prog} trains "
                     f"{', '.join(p for p in presets if p.startswith(family + '_'))} (or a JSON config of one)")
    if args.eval_only and not (args.resume or args.tune):
        parser.error("--eval-only needs weights: --resume or --tune")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite replaces it: give one of them")
    return args


def dataset_paths(args, iou_types):
    """(train images, train annotations, val images, val annotations) from --data (data_splits: COCO,
    Roboflow or YOLO layout) or the explicit options, which take precedence. Keypoint stages read COCO's
    person_keypoints_*.json, the others instances_*.json."""
    explicit = [args.train_images, args.train_ann, args.val_images, args.val_ann]
    if args.data:
        splits = ("val",) if args.eval_only else ("train", "val")
        labels = {"bbox": "boxes", "segm": "polygons", "keypoints": "keypoints"}[iou_types[-1]]
        prefix = "person_keypoints" if labels == "keypoints" else "instances"
        found = data_splits(args.data, splits, {s: os.path.join("annotations", f"{prefix}_{s}2017.json")
                            for s in ("train", "val")}, labels, args.output_dir, len(KEYPOINT_NAMES))
        default = [*found.get("train", (None, None)), *found["val"]]
        return [e or d for e, d in zip(explicit, default)]
    if not all(explicit[2:]) or (not args.eval_only and not all(explicit[:2])):
        raise ValueError("give --data ROOT (COCO layout) or --train-images, --train-ann, --val-images and --val-ann")
    return explicit


def training_recipe(args, recipes, defaults):
    """--recipe's (default: the --model preset's, else the first of `recipes`, the stage's default model's)
    over `defaults`, with --epochs, --lr and --backbone-lr, which it sets in args (saved with the run)."""
    name = args.recipe or (args.model if args.model in recipes else next(iter(recipes)))
    if name not in recipes:
        raise ValueError(f"--recipe {name!r} is unknown; expected one of {', '.join(recipes)}")
    base = recipes[name]
    recipe = {**defaults, **base}
    recipe.update({k: getattr(args, k) for k in ("epochs", "lr", "backbone_lr") if getattr(args, k) is not None})
    # Another length keeps the recipe's shape: mosaic for the same share of epochs, and the same
    # number of final epochs without strong augmentation.
    recipe["mosaic_epoch"] = round(base["mosaic_epoch"] * recipe["epochs"] / base["epochs"])
    recipe["stop_epoch"] = max(recipe["epochs"] - (base["epochs"] - base["stop_epoch"]), 0)
    args.epochs, args.lr, args.backbone_lr = recipe["epochs"], recipe["lr"], recipe["backbone_lr"]
    args.clip_max_norm = recipe["clip_max_norm"]
    return recipe


def model_config(args, preset_config, num_classes):
    """The network's configuration: --model's preset (preset_config(name), the loss section included) or JSON
    file, with this data set's classes and image size."""
    if args.model.endswith(".json"):
        try:
            with open(args.model) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--model {args.model}: cannot read the JSON config: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"--model {args.model}: expected a JSON object (a model config), found a {type(cfg).__name__}")
    else:
        try:
            cfg = preset_config(args.model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
    cfg = {**cfg, "num_classes": num_classes, "eval_spatial_size": list(args.img_size)}
    check_input_size(cfg, args.img_size)
    return cfg


def initial_backbone(net, cfg, args, rank, vits, backbone_lr_given=False):
    """Start the ViT from --backbone-weights FILE or, without that option, from the released ECViT
    the config names (of `vits`, model.ECVIT; downloaded by rank 0, as the original does when it builds
    the network). Returns False, after saying so, when the ViT keeps its random weights: --backbone-weights
    none, or a config that no released ECViT fits."""
    url = released_backbone(cfg, vits) if args.backbone_weights is None else None
    if args.backbone_weights in (None, "none") and url is None:
        why = "--backbone-weights none" if args.backbone_weights else f"no released ECViT fits {args.model}"
        rate = f"--backbone-lr {args.backbone_lr}" if backbone_lr_given else "the head's learning rate"
        if rank == 0:
            print(f"backbone: random initial weights ({why}), trained at {rate}")
        return False
    hint = "pass a local copy with --backbone-weights FILE, or --backbone-weights none to train the ViT from random weights"
    wait = url is not None and dist.is_initialized()
    if wait and rank != 0:
        dist.barrier()  # rank 0 fills the cache first
    state = download(url, hint) if url else read_checkpoint(args.backbone_weights, "--backbone-weights")
    if wait and rank == 0:
        dist.barrier()
    load_vit(net.backbone.backbone, state, url or f"--backbone-weights {args.backbone_weights}", vits)
    if rank == 0:
        print(f"backbone: {url or args.backbone_weights}")
    return True


def tune_weights(net, args, presets, class_heads, num_classes, rank):
    """Load --tune's weights (a file, or a preset name: the released model, downloaded) into `net` where
    names and shapes fit. On a data set of other classes, the class heads (`class_heads`, their tensor
    names) start afresh and the rest from --tune, which is said in one line."""
    released = args.tune in presets and not os.path.exists(args.tune)
    tune = released_checkpoint(args.tune, presets) if released else read_checkpoint(args.tune, "--tune")
    state, own = checkpoint_state_dict(tune), net.state_dict()
    differ = {k for k, v in own.items() if isinstance(state, Mapping) and torch.is_tensor(state.get(k))
              and state[k].shape != v.shape}
    fresh = sorted(differ & class_heads)
    if fresh and rank == 0 and not args.eval_only:
        print(f"--tune {args.tune}: {min(state[k].shape[0] for k in fresh)} classes there, {num_classes} "
              f"in this data set: the ViT, encoder and decoder start from its weights, the class heads afresh "
              f"({', '.join(fresh[:2])}, ...)")
    load_matching(net, state, f"--tune {args.tune}", require_all=args.eval_only)


def demo(args, train, cfg, make_data=None, num_train=256, num_val=32, img_size=160, batch_size=16, lr=None):
    """The README's first command for a stage: a synthetic data set (make_data, default make_synthetic_coco),
    a short CPU training run of network `cfg` by train(args) on the recipe "demo", COCO AP and a picture of
    predictions, all under --output-dir. `lr`: a stage's own rate, for the heads and the random ViT alike."""
    check_output_dir(args)
    root = os.path.join(args.output_dir, "demo_data")
    if not os.path.exists(os.path.join(root, "annotations")):
        (make_data or make_synthetic_coco)(root, num_train=num_train, num_val=num_val, img_size=img_size)
    config = os.path.join(args.output_dir, "demo_model.json")
    args.data, args.model, args.recipe, args.device, args.workers = root, config, "demo", "cpu", 0
    args.img_size, args.batch_size = [img_size] * 2, batch_size
    write_atomically(config, lambda f: f.write(json.dumps(cfg, indent=1).encode()))
    if lr is not None:
        args.lr, args.backbone_lr = args.lr or lr, args.backbone_lr or lr
    metrics = train(args)
    last = os.path.join(args.output_dir, "last.pth")
    if os.path.exists(last):  # the config as the run built it (its classes, its size): export.py and predict.py take it
        built = read_checkpoint(last)["config"]
        write_atomically(config, lambda f: f.write(json.dumps(built, indent=1).encode()))
    kind = [k for k, v in metrics.items() if k.startswith("coco_") and isinstance(v, list)][-1]  # not *_per_class
    print(f"demo: {kind[5:]} AP {metrics[kind][0]:.3f}, AP50 {metrics[kind][1]:.3f} after {metrics['epoch']} epochs; "
          f"predictions drawn in {os.path.join(args.output_dir, 'predictions.png')}")
    return metrics


def criterion_sections(cfg, matcher, criterion):
    """The keyword arguments of `matcher` and `criterion` (classes, train_det's or a stage's) from a config's
    loss section, checked: the section their `section` names, their `config_keys` present, the matcher's
    `type` theirs, the focal class cost on; the section's num_classes, else the config's."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"build_criterion takes a preset name or a config dict, got {type(cfg).__name__}")
    name = criterion.section
    if name not in cfg:
        raise ValueError(f"config has no section '{name}' (sections present: {sorted(cfg)})")
    section = {k: v for k, v in cfg[name].items() if k not in criterion.unused_keys}
    matcher_cfg = dict(section.get("matcher", {}))
    for keys, where, found in ((criterion.config_keys, f"'{name}'", section),
                               (matcher.config_keys, f"'{name}.matcher'", matcher_cfg)):
        for key in keys:
            if key not in found:
                raise KeyError(f"criterion config: {where} has no '{key}'")
    section.pop("matcher")
    if matcher_cfg.pop("type", matcher.config_type) != matcher.config_type:
        raise ValueError(f"criterion config: '{name}.matcher.type' must be '{matcher.config_type}'")
    if not cfg.get("use_focal_loss", True):
        raise ValueError("criterion config: the matcher uses the focal class cost; use_focal_loss must be true")
    if "num_classes" not in section:
        if "num_classes" not in cfg:
            raise KeyError("criterion config: the config has no 'num_classes'")
        section["num_classes"] = cfg["num_classes"]
    return matcher_cfg, section


# ---- Optional packages: imported where a command needs them ----
def optional_import(name, what, pip=None):
    """The module `name`, imported when `what` (a command or option) first needs it, so that every other
    command runs without it. Missing, it raises ValueError in one line with the pip install that brings it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"{what} needs the {name} package: pip install {pip or name}") from None


# ---- TensorBoard: a run's numbers per epoch, when the package is installed ----
class TensorBoard:
    """Scalars as TensorBoard events in a run folder (torch.utils.tensorboard), written by rank 0 when the
    tensorboard package is installed; otherwise every call does nothing, so a run is the same without it."""

    def __init__(self, folder, rank=0):
        self.folder, self.writer = folder, None
        self.enabled = rank == 0 and importlib.util.find_spec("tensorboard") is not None

    def add(self, scalars, step):
        """Write {tag: number} at `step` (the epoch, from 1), flushed so that a killed run keeps it. The
        events file is opened at the first call: a run stopped before its first epoch leaves none."""
        if not self.enabled:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.folder)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()


def epoch_scalars(losses, optimizer, stats):
    """A training epoch's numbers under the original's tags: Loss/total and Loss/<term> (the epoch's
    means), Lr/pg_<j> (each parameter group's rate at its end), Test/coco_eval_<iou type>_<i> (the 12
    COCO numbers; ECPose's 10)."""
    scalars = {"Loss/total": sum(losses.values()), **{f"Loss/{k}": v for k, v in losses.items()}}
    scalars.update({f"Lr/pg_{j}": group["lr"] for j, group in enumerate(optimizer.param_groups)})
    scalars.update({f"Test/coco_eval_{kind}_{i}": v for kind, numbers in stats.items() if isinstance(numbers, list)
                    for i, v in enumerate(numbers)})
    return scalars


# ---- Drawing: the palette of every picture, a run's curves ----
PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (255, 178, 29), (207, 210, 49),
           (26, 147, 52), (0, 212, 187), (52, 69, 147), (132, 56, 255), (255, 55, 199), (255, 112, 31)]


def draw_curves(panels, path, size=(480, 320)):
    """Save a PNG of line charts side by side, one per (title, {label: [value per epoch]}) in `panels`;
    None values are gaps. Returns path."""
    font = ImageFont.load_default(12)
    w, h = size
    left, right, top, bottom = 52, 12, 24, 28  # margins for the axes' labels and the title
    image = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, series) in enumerate(panels):
        x0, y0, x1, y1 = p * w + left, top, (p + 1) * w - right, h - bottom
        values = [v for ys in series.values() for v in ys if v is not None]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        epochs = max((len(ys) for ys in series.values()), default=1)
        to_xy = lambda i, v: (x0 + (x1 - x0) * (i / max(epochs - 1, 1)), y1 - (y1 - y0) * (v - lo) / (hi - lo))
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text(((x0 + x1) / 2, 4), title, fill="black", font=font, anchor="ma")
        for v in (lo, (lo + hi) / 2, hi):
            draw.text((x0 - 4, to_xy(0, v)[1]), f"{v:.3g}", fill="black", font=font, anchor="rm")
        for i in sorted({0, (epochs - 1) // 2, epochs - 1}):
            draw.text((to_xy(i, lo)[0], y1 + 4), str(i + 1), fill="black", font=font, anchor="ma")
        draw.text(((x0 + 3 * x1) / 4, h - 4), "epoch", fill="black", font=font, anchor="md")
        for k, (label, ys) in enumerate(series.items()):
            colour = PALETTE[k % len(PALETTE)]
            points = [to_xy(i, v) if v is not None else None for i, v in enumerate(ys)]
            for a, b in zip(points, points[1:]):
                if a is not None and b is not None:
                    draw.line([a, b], fill=colour, width=2)
            for pt in points:
                if pt is not None:
                    draw.ellipse([pt[0] - 2, pt[1] - 2, pt[0] + 2, pt[1] + 2], fill=colour)
        for k, label in enumerate(series):  # the legend over the lines
            draw.rectangle(draw.textbbox((x1 - 6, y0 + 4 + 14 * k), label, font=font, anchor="ra"), fill="white")
            draw.text((x1 - 6, y0 + 4 + 14 * k), label, fill=PALETTE[k % len(PALETTE)], font=font, anchor="ra")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp)
    return path


def draw_log(log_file, path):
    """curves.png of a run from its log.jsonl: the loss terms (each summed over the decoder layers,
    the encoder's and the denoising outputs, with their total) and every COCO AP and AP50 per epoch."""
    with open(log_file) as f:
        log = [json.loads(line) for line in f if line.strip()]
    terms = {"total": [entry["loss"] for entry in log]}
    for i, entry in enumerate(log):
        for name, v in entry["losses"].items():
            base = re.sub(r"(_(aux|enc|dn)_\d+|_dn_pre|_pre)$", "", name)
            terms.setdefault(base, [0.0] * len(log))[i] += v
    ap = {}
    for key in log[-1]:
        if key.startswith("coco_") and not key.endswith("_per_class"):
            ap[f"{key[5:]} AP"] = [entry.get(key, [None])[0] for entry in log]
            ap[f"{key[5:]} AP50"] = [entry.get(key, [None, None])[1] for entry in log]
    return draw_curves([("loss", terms), ("COCO AP", ap)], path)
