"""What every stage needs but the paper does not, in sections: files written whole and only inside
the run folder, one run per folder, annotation files checked whole, weights checked before use; data
sets in the layouts people have them, devices, optional packages and TensorBoard.

Library functions raise ordinary exceptions (ValueError, OSError) with a message that names the
argument or file; each script's main() turns them into one line `SCRIPT: error: ...` and exit
code 2 (train_det.run_script). This module imports only the standard library, numpy, torch and PIL:
the stage files import it, never the other way round.
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import glob
import importlib.util
import json
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

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
