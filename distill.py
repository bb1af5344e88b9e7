"""Task-specialized distillation (EdgeCrafter, stage 2): the compact ECViT learns to reproduce the
patch tokens of the teacher's backbone on unlabeled images; EUPE's multi-teacher route through a
large proxy is the same loop run twice.

    python distill.py --teacher outputs/teacher/best.pth --images /coco/train2017 --student ecvitt
    torchrun --nproc_per_node 8 distill.py --teacher best.pth --images /coco/train2017 --student ecvits --amp
    python distill.py --teacher dinov3_vitb16.pth --images /data
    python distill.py --teacher det.pth --teacher seg.pth --proxy dinov3_vitl16 --images /data   # EUPE
    python train_det.py --model ecdet_s --backbone-weights outputs/distill/student.pth --data /coco

The result, `student.pth` in --output-dir, is the ViT's bare state dict: the released ecvit*.pth
format that train_det.py --backbone-weights and model.load_weights read.

Where each part comes from:
- EdgeCrafter ("Compact ViTs for Edge Dense Prediction via Task-Specialized Distillation", 2026): a
  DINOv3 ViT adapted to detection is the task-specialized teacher whose representations are
  distilled into the compact student backbone. We align the blocks each detector reads: the
  student's last two (its feature generator's interaction blocks) with the teacher's last two (its
  ECDet's), through a learned projection per block, student width -> teacher width.
- EUPE (Zhu et al., "Efficient Universal Perception Encoder", 2026; its abstract, and summaries of
  the paper): several domain-expert teachers are first distilled into one large proxy (scaling up),
  and only the proxy into the efficient student (scaling down); one trainable adapter per teacher
  maps the student's tokens into that teacher's space; teachers' features are normalised before the
  loss so that no teacher dominates. Without --proxy the teachers go straight into the student, the
  baseline EUPE improves on. EUPE also matches class tokens; we match patch tokens only, as the
  detectors read no class token.
- Our choices, where the papers' text gave no detail we could read: targets are the raw
  (un-normed) tokens the detectors use, standardised per teacher and channel with running
  statistics (as in UNIC and PHI-S's "standardize"); the loss is AM-RADIO's feature loss,
  0.9 (1 - cosine) + 0.1 smooth-L1; the student's token grid is resized bilinearly to the
  teacher's, so the two may see different resolutions; augmentation is one random resized crop,
  flip and colour jitter shared by teacher and student; AdamW with warm-up + cosine decay.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm

import model
import predict
import support
import teacher
import train_det

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# AdamW with DINOv2's starting weight decay, warm-up then cosine to 1% of the lr, DINOv2's gradient
# clipping and the scale range of its global crops.
TRAINING = dict(betas=(0.9, 0.999), weight_decay=0.04, min_lr_ratio=0.01, clip_max_norm=3.0, crop_scale=(0.32, 1.0))
LOSS_WEIGHTS = dict(cosine=0.9, smooth_l1=0.1)  # AM-RADIO's feature-matching weights
DEFAULTS = dict(epochs=30, lr=5e-4)  # of a new run; a resumed one keeps its own
OUTPUT_DIR = "outputs/distill"
# What a run writes to --output-dir, besides its temporary files.
RUN_FILES = ("proxy_last.pth", "proxy.pth", "student_last.pth", "student.pth", "log.jsonl")

# ---------------------------------------------------------------------------------------------
# Data: a folder of unlabeled images, one view for teacher and student
# ---------------------------------------------------------------------------------------------
def find_images(root, option):
    """Sorted paths of every image below `root`, recursively; an error when there is none, or none of
    them can be read."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{option} {root}: no such folder")
    paths = sorted(path for path in support.files_below(root) if path.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"{option} {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    if not any(read_image(path) for path in paths):  # stops at the first readable one
        raise ValueError(f"{option} {root}: none of its {len(paths)} image files can be read")
    return paths


def read_image(path):
    """The RGB image in file `path`, or None when it can't be read."""
    try:
        with Image.open(path) as file:
            return predict.to_rgb(file)
    except Exception:  # PIL raises many kinds on broken files; none should stop a run
        return None


class Views:
    """PIL image -> (student view (3, H, W), teacher view (3, H', W') or None when the sizes agree),
    ImageNet-normalised. Training: one random resized crop, horizontal flip and colour jitter,
    drawn once and shared, so both networks see the same content; evaluation: the whole image."""

    def __init__(self, size, teacher_size, train):
        self.size, self.teacher_size, self.train = tuple(size), tuple(teacher_size), train
        self.jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)

    def __call__(self, image):
        big = max(self.size, self.teacher_size, key=lambda s: s[0] * s[1])
        if self.train:
            top, left, h, w = T.RandomResizedCrop.get_params(image, TRAINING["crop_scale"], (3 / 4, 4 / 3))
            image = TF.resized_crop(image, top, left, h, w, list(big), antialias=True)
            if torch.rand(1).item() < 0.5:
                image = TF.horizontal_flip(image)
            image = self.jitter(image)
        else:
            image = TF.resize(image, list(big), antialias=True)
        view = lambda size: support.normalize(image if size == big else TF.resize(image, list(size), antialias=True))
        return view(self.size), None if self.teacher_size == self.size else view(self.teacher_size)


class UnlabeledImages(torch.utils.data.Dataset):
    """The images of a folder as (student view, teacher view, indices of the unreadable files
    passed over). An unreadable or corrupt file is replaced by the next readable one, so batches
    keep their size on every process; its index is reported for counting."""

    def __init__(self, paths, views):
        self.paths, self.views = paths, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        skipped = []
        for j in (k % len(self.paths) for k in range(i, i + min(len(self.paths), 100))):
            image = read_image(self.paths[j])
            if image is not None:
                return (*self.views(image), skipped)
            skipped.append(j)
        raise RuntimeError(f"{len(skipped)} unreadable images in a row from {self.paths[i]}; is this an image folder?")


def collate(batch):
    students, teachers, skipped = zip(*batch)
    return (torch.stack(students), None if teachers[0] is None else torch.stack(teachers),
            [j for s in skipped for j in s])


# ---------------------------------------------------------------------------------------------
# Backbones: the frozen teachers, the student (and proxy)
# ---------------------------------------------------------------------------------------------
def patch_tokens(vit, images, layers):
    """Raw patch tokens of blocks `layers`: a list of (B, h*w, D), and the grid (h, w)."""
    tokens = vit.get_intermediate_layers(images, n=layers, norm=False)
    return list(tokens), (images.shape[-2] // vit.patch_size, images.shape[-1] // vit.patch_size)


def from_adapter(adapter, what):
    """(ViT, the blocks its feature generator reads) of a ViTAdapter config section."""
    try:
        support.check_vit_keys(adapter)
        vit = model.build_vit(adapter)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None
    return vit, list(adapter.get("interaction_indexes", [len(vit.blocks) - 2, len(vit.blocks) - 1]))


def build_backbone(spec, what, hub=False):
    """A freshly initialised ViT and the blocks to align from an ECViT preset (model.ECVIT), with
    hub=True also a DINOv3 hub name, or a JSON model config / ViTAdapter section (file or inline)."""
    if spec in model.ECVIT:
        dim, heads, ffn_ratio, _ = model.ECVIT[spec]
        return from_adapter({"embed_dim": dim, "num_heads": heads, "ffn_ratio": ffn_ratio}, what)
    if hub and spec in model.DINOV3_HUB:
        return from_adapter({"dinov3": spec}, what)
    if spec.endswith(".json") or spec.lstrip().startswith("{"):
        try:
            if spec.lstrip().startswith("{"):
                cfg = json.loads(spec)
            else:
                with open(spec) as f:
                    cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{what} {spec}: cannot read the JSON config: {e}") from None
        return from_adapter(cfg.get("ViTAdapter", cfg), what)
    names = list(model.ECVIT) + (list(model.DINOV3_HUB) if hub else [])
    raise ValueError(f"{what} {spec!r}: unknown preset; expected one of {', '.join(names)}, "
                     f"or a JSON model config with a ViTAdapter section")


def load_teacher(path, arch):
    """(frozen ViT in eval mode, blocks to align) of a teacher checkpoint written by teacher.py or
    train_det.py (its ECDet's `backbone.backbone.*`, EMA weights when present), or of a DINOv3
    checkpoint (its last two blocks): model `arch`, or without it the one its names and shapes show."""
    what = f"--teacher {path}"
    ckpt = support.read_checkpoint(path, "--teacher")
    config = ckpt.get("config")
    if isinstance(config, dict) and "ViTAdapter" in config and ("model" in ckpt or "ema" in ckpt):
        vit, layers = from_adapter(config["ViTAdapter"], what)
        prefix = "backbone.backbone."
        sd = {k[len(prefix):]: v for k, v in support.checkpoint_state_dict(ckpt).items() if k.startswith(prefix)}
        try:
            model.load_weights(vit, sd)
        except ValueError as e:
            raise ValueError(f"{what}: its backbone does not fit its own config: {e}") from None
    elif arch or "cls_token" in ckpt:
        if not arch:
            try:
                arch = teacher.infer_dinov3(ckpt)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"{what}: DINOv3 {arch if isinstance(arch, str) else json.dumps(arch)} (from its names and "
                      f"shapes; --teacher-arch overrides)")
        vit = teacher.load_dinov3(ckpt, arch, what)
        layers = [len(vit.blocks) - 2, len(vit.blocks) - 1]
    else:
        raise ValueError(f"{what} is not a teacher checkpoint: expected one written by teacher.py or "
                         f"train_det.py ('config' with a ViTAdapter section, and 'model' or 'ema' weights), "
                         f"or a DINOv3 state dict; found the keys {sorted(ckpt)[:8]}")
    return vit.eval().requires_grad_(False), layers


# ---------------------------------------------------------------------------------------------
# Feature alignment: per-teacher projection heads, balanced targets, the loss
# ---------------------------------------------------------------------------------------------
def resize_tokens(tokens, grid, size):
    """(B, h*w, D) tokens on grid (h, w) -> (B, H*W, D) on grid `size`, bilinearly."""
    if tuple(grid) == tuple(size):
        return tokens
    B, _, D = tokens.shape
    x = tokens.transpose(1, 2).reshape(B, D, *grid)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)


def feature_loss(pred, target):
    """The distillation loss of one aligned block, AM-RADIO's feature loss (Ranzinger et al.,
    "AM-RADIO: Agglomerative Vision Foundation Model -- Reduce All Domains Into One", 2024), on the
    projected student tokens pred and the standardised teacher tokens target, both (B, N, D_t):

        L = 0.9 · (1 − (1 / BN) Σ_n cos(pred_n, target_n)) + 0.1 · (1 / BND) Σ smooth_L1(pred − target)

    with smooth_L1(d) = d² / 2 for |d| < 1, else |d| − 1/2. Returns L and the mean cosine (detached)."""
    cos = F.cosine_similarity(pred, target, dim=-1).mean()
    smooth_l1 = F.smooth_l1_loss(pred, target)
    return LOSS_WEIGHTS["cosine"] * (1 - cos) + LOSS_WEIGHTS["smooth_l1"] * smooth_l1, cos.detach()


class AlignHead(nn.Module):
    """One teacher's adapter (EUPE's per-teacher adapter): the student's aligned blocks -> that
    teacher's token space, and the loss, feature_loss averaged over the blocks.

    Each aligned block l has a linear projection D_s -> D_t. Targets are the teacher's tokens
    standardised per channel with running mean and variance (buffers: mean, var (L, D_t)), so every
    teacher's targets have unit scale whatever its activation statistics (the "standardize" of UNIC,
    Sariyildiz et al., 2024, and PHI-S, Ranzinger et al., 2024). Running statistics start as the
    cumulative average and become an exponential one with weight `momentum` per step.
    """

    def __init__(self, student_dim, teacher_dim, num_layers, momentum=0.01):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_layers))
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(num_layers, teacher_dim))
        self.register_buffer("var", torch.ones(num_layers, teacher_dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_statistics(self, targets):
        flat = torch.stack([t.float().flatten(0, 1) for t in targets])  # (L, B*N, D_t)
        mean, var = support.average_over_ranks(torch.cat([flat.mean(1), flat.var(1)])).chunk(2)  # (L, D_t) each
        self.updates += 1
        w = max(1.0 / self.updates.item(), self.momentum)
        self.mean.lerp_(mean, w)
        self.var.lerp_(var, w)

    def forward(self, student, grid, targets, teacher_grid):
        """student: per aligned block (B, h*w, D_s) on `grid`; targets: per block the teacher's
        (B, H*W, D_t) on `teacher_grid`. Returns the loss and the mean cosine similarity (scalars)."""
        if self.training:
            self.update_statistics(targets)
        losses, cosines = [], []
        for l, (s, t) in enumerate(zip(student, targets)):
            pred = self.proj[l](resize_tokens(s, grid, teacher_grid)).float()
            loss, cos = feature_loss(pred, (t.float() - self.mean[l]) / (self.var[l] + 1e-6).sqrt())
            losses.append(loss)
            cosines.append(cos)
        return torch.stack(losses).mean(), torch.stack(cosines).mean()


class Distiller(nn.Module):
    """The trained part: the student ViT and one AlignHead per teacher. The loss is the mean over
    the T teachers and the L aligned blocks, each teacher's targets already on a unit scale:

        L_distill = (1 / T) Σ_teachers (1 / L) Σ_blocks feature_loss(proj_l(student_l), standardised teacher_l)"""

    def __init__(self, student, layers, teacher_dims):
        super().__init__()
        self.student, self.layers = student, layers
        self.heads = nn.ModuleList(AlignHead(student.embed_dim, d, len(layers)) for d in teacher_dims)

    def forward(self, images, targets):
        """images (B, 3, H, W); targets: per teacher (tokens per block, grid). Returns the loss and
        the per-teacher cosine similarities (T,)."""
        tokens, grid = patch_tokens(self.student, images, self.layers)
        out = [head(tokens, grid, t, g) for head, (t, g) in zip(self.heads, targets)]
        return torch.stack([loss for loss, _ in out]).mean(), torch.stack([cos for _, cos in out])


# ---------------------------------------------------------------------------------------------
# The loop: AMP, DDP, warm-up + cosine, atomic checkpoints, resume
# ---------------------------------------------------------------------------------------------
def teacher_targets(teachers, images, teacher_images):
    with torch.no_grad():
        return [patch_tokens(vit, images if teacher_images is None else teacher_images, layers)
                for vit, layers in teachers]


@torch.no_grad()
def held_out_cosine(distiller, teachers, loader, args):
    """Mean cosine similarity (per teacher) of the projected student tokens with the standardised
    teacher tokens on the held-out images."""
    distiller.eval()
    total, count = 0, 0
    for images, teacher_images, _ in loader:
        images = images.to(args.device)
        teacher_images = None if teacher_images is None else teacher_images.to(args.device)
        with train_det.autocast(args):
            _, cosines = distiller(images, teacher_targets(teachers, images, teacher_images))
        total, count = total + cosines * len(images), count + len(images)
    distiller.train()
    summed = torch.cat([total, torch.tensor([count], dtype=total.dtype, device=total.device)])
    if dist.is_initialized():
        dist.all_reduce(summed)
    return [round(c, 4) for c in (summed[:-1] / summed[-1]).tolist()]


def make_loader(paths, train, args, rank, world):
    data = UnlabeledImages(paths, Views(args.img_size, args.teacher_size, train))
    sampler = (torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=args.seed, drop_last=True)
               if train else list(range(rank, len(data), world)))
    return torch.utils.data.DataLoader(data, args.batch_size // world, sampler=sampler, collate_fn=collate,
                                       num_workers=args.workers, drop_last=train,
                                       pin_memory=args.device.type == "cuda")


def distill(teachers, student, layers, name, epochs, args, rank, world, history):
    """Train `student` to match the frozen `teachers` ([(ViT, blocks)]) for `epochs` epochs,
    checkpointing {name}_last.pth each epoch, then rewriting log.jsonl from `history` (the earlier
    stages' log lines) and this stage's lines, which the checkpoint carries; at the end write
    {name}.pth (the bare ViT state dict). Returns (student, whether all epochs are done, the log)."""
    if len(layers) != len(teachers[0][1]) or any(len(t) != len(layers) for _, t in teachers):
        raise ValueError(f"{name} aligns {len(layers)} blocks but the teachers {[len(t) for _, t in teachers]}")
    distiller = Distiller(student, layers, [vit.embed_dim for vit, _ in teachers]).to(args.device)
    train_loader = make_loader(args.paths, True, args, rank, world)
    if len(train_loader) == 0:
        raise ValueError(f"--images {args.images}: {len(args.paths)} images, fewer than one batch of {args.batch_size}")
    val_loader = make_loader(args.val_paths, False, args, rank, world) if args.val_paths else None
    path, start, ckpt = os.path.join(args.output_dir, f"{name}_last.pth"), 0, None
    log = os.path.join(args.output_dir, "log.jsonl")
    if args.resume and os.path.exists(path):
        ckpt = support.read_checkpoint(path, "--resume")
        try:
            model.load_weights(distiller, ckpt["distiller"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"--resume: {path} does not fit this run's {name} and teachers: {e}") from None
        start = ckpt["epoch"]
        if epochs < start:
            raise ValueError(f"--resume: {path} has done {start} epochs, more than the {epochs} asked for")
    optimizer, scaler = train_det.make_optimizer(train_det.param_groups(distiller, args.lr, args.lr, args.weight_decay),
                                                 TRAINING["betas"], args, ckpt)
    if ckpt is not None:
        for what, now, before in (("epochs", epochs, ckpt.get("epochs")), ("lr", args.lr, ckpt.get("lr"))):
            if before is not None and now != before and rank == 0:
                print(f"--resume: {name} {what} {now} (so far {before}) applies from epoch {start + 1} on")
        history = support.restore_log(ckpt, log, lambda line: line.get("stage") != name or line["epoch"] <= start)
    net = support.distributed(distiller, args.device, world)
    steps = len(train_loader)
    total, warmup = epochs * steps, min(args.warmup_epochs * steps, epochs * steps)
    schedule = lambda step, lr: train_det.flat_cosine(step, total, warmup, warmup, 0, lr, lr * TRAINING["min_lr_ratio"])
    if rank == 0:
        print(f"{name}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters, {len(teachers)} "
              f"teacher(s), {len(args.paths)} images, {world} process(es) on {args.device}, batch {args.batch_size}, "
              f"{epochs} epochs" + (f", resuming after epoch {start}" if start else ""))
    skipped, board = set(), support.TensorBoard(args.output_dir, rank)
    stop = min(epochs, args.stop_after or epochs)
    for epoch in range(start, stop):
        t0 = time.time()
        train_det.set_epoch(train_loader, epoch, args.seed, rank)
        net.train()
        sums, count = torch.zeros(1 + len(teachers), device=args.device), 0
        bar = tqdm(train_loader, desc=f"{name} epoch {epoch + 1}/{epochs}", disable=rank != 0, dynamic_ncols=True)
        for i, (images, teacher_images, passed_over) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = schedule(epoch * steps + i, group["initial_lr"])
            images = images.to(args.device, non_blocking=True)
            teacher_images = None if teacher_images is None else teacher_images.to(args.device, non_blocking=True)
            with train_det.autocast(args):
                loss, cosines = net(images, teacher_targets(teachers, images, teacher_images))
            terms = {"loss": loss, **{f"cosine_{t}": c for t, c in enumerate(cosines)}}
            train_det.optimise(loss, terms, net, optimizer, scaler, TRAINING["clip_max_norm"], f"{name} ", epoch, i, path)
            sums += torch.cat([loss.detach()[None], cosines])
            count += 1
            skipped.update(passed_over)
            bar.set_postfix(loss=f"{loss.item():.4f}", cos=f"{cosines.mean().item():.3f}")
        support.average_over_ranks(sums)
        if dist.is_initialized():
            gathered = [None] * world
            dist.all_gather_object(gathered, skipped)
            skipped = set().union(*gathered)
        metrics = {"stage": name, "epoch": epoch + 1, "loss": sums[0].item() / count,
                   "cosine": [round(c, 4) for c in (sums[1:] / count).tolist()], "unreadable_images": len(skipped)}
        if val_loader is not None:
            metrics["held_out_cosine"] = held_out_cosine(distiller, teachers, val_loader, args)
        metrics["time"] = round(time.time() - t0, 1)
        # The last step's update may still have broken the weights: a checkpoint never holds NaN.
        if not all(torch.isfinite(p).all() for p in distiller.parameters()):
            raise support.diverged(f"{name} weights", epoch, steps - 1, terms, path)
        history = history + [metrics]
        if rank == 0:
            support.save_checkpoint({"distiller": distiller.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scaler": scaler.state_dict(), "epoch": epoch + 1, "stage": name,
                                       "epochs": epochs, "lr": args.lr, "log": history}, path)
            support.write_log(history, log)
            board.add({f"Loss/{name}": metrics["loss"],
                       **{f"Lr/{name}_pg_{j}": g["lr"] for j, g in enumerate(optimizer.param_groups)},
                       **{f"Cosine/{name}_{t}": c for t, c in enumerate(metrics["cosine"])},
                       **{f"Test/{name}_held_out_cosine_{t}": c for t, c in enumerate(metrics.get("held_out_cosine", []))}},
                      epoch + 1)
            print(f"{name} epoch {epoch + 1}: loss {metrics['loss']:.4f}, cosine {metrics['cosine']}"
                  + (f", held-out cosine {metrics['held_out_cosine']}" if val_loader else ""))
            if skipped:
                print(f"warning: {len(skipped)} unreadable image(s) passed over so far, "
                      f"e.g. {args.paths[min(skipped)]}")
    done = stop == epochs
    if rank == 0 and done:
        support.save_checkpoint(student.state_dict(), os.path.join(args.output_dir, f"{name}.pth"))
    elif rank == 0:
        print(f"{name}: stopped after epoch {stop} of {epochs}; continue with --resume")
    return student, done, history


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="distill.py", description="Distil teacher backbones into a compact ECViT.",
                                     formatter_class=support.HelpFormatter)
    parser.add_argument("--teacher", action="append", required=True, help="a checkpoint of teacher.py or "
                        "train_det.py, or a DINOv3 checkpoint; repeat for several teachers")
    parser.add_argument("--teacher-arch", action="append", help="the DINOv3 model (hub name or JSON kwargs) of "
                        "--teacher files that are DINOv3 checkpoints, in place of the one their names and shapes "
                        "show; once for all, or once per --teacher")
    parser.add_argument("--images", required=True, help="a folder of unlabeled images, searched recursively")
    parser.add_argument("--val-images", help="held-out images: the aligned features' cosine similarity every epoch")
    parser.add_argument("--student", default="ecvitt", help=f"{', '.join(model.ECVIT)}, or a JSON model config")
    parser.add_argument("--proxy", help="EUPE: distil the teachers into this large ViT first, then it into the "
                        "student (a DINOv3 hub name, an ECViT preset, or a JSON model config)")
    parser.add_argument("--epochs", type=int, help=f"default: {DEFAULTS['epochs']}, or the resumed run's")
    parser.add_argument("--proxy-epochs", type=int, help="default: --epochs")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up of the learning rate")
    parser.add_argument("--batch-size", type=int, default=128, help="total over all processes")
    parser.add_argument("--lr", type=float, help=f"default: {DEFAULTS['lr']}, or the resumed run's")
    parser.add_argument("--weight-decay", type=float, default=TRAINING["weight_decay"], help="AdamW's")
    parser.add_argument("--img-size", type=int, nargs="+", default=[640], help="the student's input H [W]")
    parser.add_argument("--teacher-size", type=int, nargs="+", help="the teachers' input H [W] (default: --img-size)")
    parser.add_argument("--output-dir", help=f"refused when it holds a run ({', '.join(RUN_FILES)}), unless --resume "
                        f"or --overwrite; default: {OUTPUT_DIR}, or the folder of --resume")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its student_last.pth (or "
                        "proxy_last.pth), in that file's folder; --epochs, --proxy-epochs and --lr default to the "
                        "run's and, given, apply from the next epoch")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a run, "
                        "deleting its files")
    parser.add_argument("--stop-after", type=int, help="stop a stage after this many epochs (continue with --resume)")
    parser.add_argument("--amp", action="store_true", help="bf16 where supported, else fp16 with a gradient scaler")
    parser.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available, else cpu")
    parser.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    parser.add_argument("--seed", type=int, default=0, help="of the initial weights, shuffling and augmentation")
    args = parser.parse_args(argv)
    for option, value, least in (("--epochs", args.epochs, 1), ("--proxy-epochs", args.proxy_epochs, 1),
                                 ("--warmup-epochs", args.warmup_epochs, 0), ("--stop-after", args.stop_after, 1),
                                 ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                 ("--seed", args.seed, 0)):
        if value is not None and value < least:
            parser.error(f"{option} must be at least {least}, got {value}")
    if args.lr is not None and not 0 <= args.lr < math.inf:  # NaN too
        parser.error(f"--lr must be a finite number, 0 or more, got {args.lr}")
    for option, size in (("--img-size", args.img_size), ("--teacher-size", args.teacher_size or [16])):
        if len(size) > 2 or any(s <= 0 or s % 16 for s in size):
            parser.error(f"{option} {' '.join(map(str, size))}: expected H [W], positive multiples of 16 (the patch size)")
    args.img_size = tuple(args.img_size * 2 if len(args.img_size) == 1 else args.img_size)
    args.teacher_size = tuple(args.teacher_size * 2 if len(args.teacher_size) == 1 else args.teacher_size) \
        if args.teacher_size else args.img_size
    if args.teacher_arch and len(args.teacher_arch) not in (1, len(args.teacher)):
        parser.error(f"--teacher-arch: give it once, or once per --teacher ({len(args.teacher)})")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite replaces it: give one of them")
    if args.resume:  # a distillation run continues where its checkpoints are, with its log
        folder = os.path.dirname(os.path.abspath(args.resume))
        if args.output_dir and os.path.abspath(args.output_dir) != folder:
            parser.error(f"--resume {args.resume} continues the run in {folder}; leave out --output-dir or give that folder")
        if os.path.basename(args.resume) not in ("student_last.pth", "proxy_last.pth"):
            parser.error(f"--resume {args.resume}: expected a run's student_last.pth or proxy_last.pth")
        args.output_dir = folder
    args.output_dir = args.output_dir or OUTPUT_DIR
    return args


def main(argv=None):
    support.run_script("distill.py", run, parse_args(argv))


def run(args):
    rank, world = support.start_run(args)
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f"--resume {args.resume} does not exist")
    support.check_output_dir(args, RUN_FILES)
    stages = ["proxy", "student"] if args.proxy else ["student"]
    if args.resume:
        found = [s for s in reversed(stages) if os.path.exists(os.path.join(args.output_dir, f"{s}_last.pth"))]
        if not found:
            raise ValueError(f"--resume: no {' or '.join(s + '_last.pth' for s in stages)} in {args.output_dir}")
        for stage in found:  # the options not given again are the run's
            saved = support.read_checkpoint(os.path.join(args.output_dir, f"{stage}_last.pth"), "--resume", mmap=True)
            option = "proxy_epochs" if stage == "proxy" else "epochs"
            for key, value in ((option, saved.get("epochs")), ("lr", saved.get("lr"))):
                if getattr(args, key) is None:
                    setattr(args, key, value)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.paths = find_images(args.images, "--images")
    args.val_paths = find_images(args.val_images, "--val-images") if args.val_images else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    student, student_layers = build_backbone(args.student, "--student")
    if args.proxy:
        proxy, proxy_layers = build_backbone(args.proxy, "--proxy", hub=True)
    arches = [teacher.parse_arch(a, "--teacher-arch") for a in args.teacher_arch or [None]]
    arches = arches * len(args.teacher) if len(arches) == 1 else arches
    teachers = [load_teacher(path, arch) for path, arch in zip(args.teacher, arches)]
    teachers = [(vit.to(args.device), layers) for vit, layers in teachers]
    support.clean_output_dir(args, RUN_FILES)
    history = []
    if args.proxy:  # EUPE's route: the teachers into the large proxy first, then the proxy alone into the student
        epochs = args.proxy_epochs or args.epochs
        proxy, done, history = distill(teachers, proxy, proxy_layers, "proxy", epochs, args, rank, world, history)
        if not done:
            return
        teachers = [(proxy.eval().requires_grad_(False), proxy_layers)]
    student, done, _ = distill(teachers, student, student_layers, "student", args.epochs, args, rank, world, history)
    if done and rank == 0:
        print(f"wrote {os.path.join(args.output_dir, 'student.pth')}: the student ViT in the released ecvit*.pth "
              f"format, for train_det.py --backbone-weights")


if __name__ == "__main__":
    main()
