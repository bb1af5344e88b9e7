"""What every stage needs but the paper does not: files written whole and only inside the run
folder, one run per folder, annotation files checked whole, weights checked before use.

Library functions raise ordinary exceptions (ValueError, OSError) with a message that names the
argument or file; each script's main() turns them into one line `SCRIPT: error: ...` and exit
code 2 (train_det.run_script). This module imports only the standard library, numpy and torch:
the stage files import it, never the other way round.
"""
import collections
import contextlib
import errno
import fcntl
import glob
import os
from collections.abc import Mapping

import numpy as np
import torch

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
