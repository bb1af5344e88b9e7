"""The task-specialized teacher (EdgeCrafter, stage 1): a DINOv3 ViT (Siméoni et al., "DINOv3", 2025)
fine-tuned for detection as the backbone of an ECDet, whose features distill.py then distils into
the compact ECViT.

    python teacher.py --dinov3 dinov3_vitb16.pth --arch dinov3_vitb16 --data /coco
    torchrun --nproc_per_node 8 teacher.py --dinov3 dinov3_vitl16.pth --arch dinov3_vitl16 --data /coco --amp
    python teacher.py --demo       # a tiny DINOv3-layout teacher on the synthetic data set, on the CPU

The paper: "We first adapt a large DINOv3 pretrained ViT to object detection and use it as a
task-specialized teacher to distill rich representations into compact student backbones". The
authors did not release this stage; what follows is this project's reading of it.

- `model.build_dinov3` builds DINOv3's ViT as a preset of model.ViT (one class for ECViT and DINOv3), so
  the released hub checkpoints load with `load_state_dict(sd, strict=True)`. Hub configurations
  from dinov3/hub/backbones.py; the kwargs vocabulary is DinoVisionTransformer's.
- The teacher ECDet keeps ECDet's feature generator, hybrid encoder and decoder and swaps ECViT
  for the DINOv3 ViT; the generator reads its last two blocks, as ECDet reads ECViT's.
- Training is train_det's loop unchanged (recipe, EMA, AMP, DDP, checkpoints); the teacher
  checkpoint is train_det's `best.pth` / `last.pth`.
"""
import json
import os
import sys

import torch

import model
import support
import train_det

build_dinov3 = model.build_dinov3  # where ../shared/parity/README.md's API looks for it


def check_dinov3(sd, arch, what):
    """ValueError unless state dict `sd` is one of DINOv3 `arch` (names and shapes), naming the hub
    model it does match when there is one."""
    try:
        expected = model.dinov3_shapes(arch)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None
    try:
        support.check_same_layout(expected, sd)
    except ValueError as e:
        same = [name for name in model.DINOV3_HUB if {k: tuple(v.shape) for k, v in model.dinov3_shapes(name).items()}
                == {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}]
        hint = f"; it matches {' / '.join(same)}" if same else ""
        expected = arch if isinstance(arch, str) else f"the DINOv3 kwargs {arch}"
        raise ValueError(f"{what} is not a {expected} checkpoint: {e}{hint}") from None


def infer_dinov3(sd):
    """The DINOv3 model of state dict `sd`, from its names and shapes alone (meta tensors will do):
    a hub name when it is one of model.DINOV3_HUB, else DinoVisionTransformer kwargs. The weights show the
    width, depth, heads (through RoPE's D_head / 4 periods), patch size, storage tokens, FFN kind and
    width, layer scale and the masked key bias; what they do not show (norm eps, RoPE base, ...) is
    taken as in every hub model. ValueError, naming what was found, for a state dict that model.ViT
    cannot hold or that is no DINOv3 ViT."""
    shapes = {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}
    width, patch = shapes.get("cls_token", (0,))[-1], shapes.get("patch_embed.proj.weight", (0,))[-1]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    periods = shapes.get("rope_embed.periods", (0,))[0]
    heads = width // (4 * periods) if periods else 0
    storage = shapes.get("storage_tokens", (1, 0))[1]
    ffn = next((kind for kind, key in (("mlp", "fc1"), ("swiglu", "w1")) if f"blocks.0.mlp.{key}.weight" in shapes),
               None)
    hidden = shapes.get(f"blocks.0.mlp.{'w1' if ffn == 'swiglu' else 'fc1'}.weight", (0,))[0]
    has = lambda key: f"blocks.0.{key}" in shapes
    untied = sorted({k.split(".")[0] for k in shapes} & {"cls_norm", "local_cls_norm"})
    found = (f"found width {width}, depth {depth}, {heads or 'unknown (no RoPE periods)'} heads, patch {patch}, "
             f"{storage} storage tokens, {ffn or 'unknown'} FFN of hidden width {hidden}, "
             f"qkv bias {'yes' if has('attn.qkv.bias') else 'no'}, "
             f"masked key bias {'yes' if has('attn.qkv.bias_mask') else 'no'}, "
             f"layer scale {'yes' if has('ls1.gamma') else 'no'}" + (f", untied {' and '.join(untied)}" if untied else ""))
    implemented = f"not a DINOv3 ViT that model.ViT holds ({', '.join(model.DINOV3_HUB)} and other sizes of their kind)"
    if not (width and depth and heads and ffn):
        raise ValueError(f"{found}: {implemented}")
    # A SwiGLU of ratio r has 2/3 of r * width hidden units (rounded up to a multiple of 8).
    ratio = hidden / width * (1.5 if ffn == "swiglu" else 1)
    kwargs = {**model.HUB_COMMON, "embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": patch,
              "n_storage_tokens": storage, "ffn_layer": ffn, "ffn_ratio": int(ratio) if ratio == int(ratio) else ratio,
              "mask_k_bias": has("attn.qkv.bias_mask"),
              "layerscale_init": model.HUB_COMMON["layerscale_init"] if has("ls1.gamma") else None}
    arch = next((name for name, size in model.DINOV3_HUB.items() if {**model.HUB_COMMON, **size} == kwargs), kwargs)
    try:
        support.check_same_layout(model.dinov3_shapes(arch), sd)
    except ValueError as e:
        raise ValueError(f"{found}: {implemented}: {e}") from None
    return arch


def parse_arch(value, option):
    """A command line's DINOv3 model: a hub name as it is, or the DINOv3 kwargs in a JSON file."""
    if value is None or not value.endswith(".json"):
        return value
    try:
        with open(value) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{option} {value}: cannot read the DINOv3 kwargs: {e}") from None


def load_dinov3(source, arch, what="DINOv3 checkpoint"):
    """DINOv3 ViT `arch` with the weights of a released checkpoint (a path or a bare state dict)."""
    sd = support.read_checkpoint(source, what) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(sd, dict):
        raise ValueError(f"{what}: expected a DINOv3 state dict, found a {type(sd).__name__}")
    check_dinov3(sd, arch, what)
    vit = model.build_dinov3(arch)
    vit.load_state_dict(sd, strict=True)
    return vit


# ---------------------------------------------------------------------------------------------
# The teacher ECDet: DINOv3 in place of ECViT
# ---------------------------------------------------------------------------------------------
def teacher_config(arch, base="ecdet_x", proj_dim=256):
    """ECDet's configuration with DINOv3 `arch` (hub name or kwargs) as the ViT.

    Encoder and decoder are ECDet-X's: the teacher is never deployed, so it gets the largest
    released head (256 wide, the width of ECDet-L and -X), and proj_dim 256 projects all three
    levels to it, as in ECDet-L/X. The feature generator reads the last two blocks.
    """
    depth = support.dinov3_kwargs(arch, model.DINOV3_HUB, model.HUB_COMMON)["depth"]
    cfg = train_det.ECCriterion.preset_config(base)
    cfg["ViTAdapter"] = {"dinov3": arch, "interaction_indexes": [depth - 2, depth - 1], "proj_dim": proj_dim}
    cfg["HybridEncoder"]["in_channels"] = [proj_dim] * 3
    return cfg


# The --demo teacher: DINOv3's layout at 96 wide and 6 deep, on train_det's demo heads (64 wide),
# so that it is larger than the demo's student (a 64-wide, 4-deep ECViT) yet trains in minutes.
DEMO_DINOV3 = {**model.HUB_COMMON, "embed_dim": 96, "depth": 6, "num_heads": 3, "ffn_ratio": 4, "ffn_layer": "mlp"}


def demo_teacher_config(arch=DEMO_DINOV3):
    """The demo's teacher ECDet: train_det's demo heads on DINOv3 `arch` (kwargs or hub name), whose
    last two blocks the feature generator reads."""
    cfg = train_det.demo_config()
    width, depth = cfg["HybridEncoder"]["in_channels"][0], support.dinov3_kwargs(arch, model.DINOV3_HUB, model.HUB_COMMON)["depth"]
    cfg["ViTAdapter"] = {"dinov3": arch, "interaction_indexes": [depth - 2, depth - 1], "proj_dim": width}
    return cfg


def main(argv=None):
    parser = train_det.make_parser("teacher.py", "teacher", "ecdet_x", description="Fine-tune the task-specialized "
                                   "teacher (ECDet on a DINOv3 ViT) with train_det.py's options; the network is "
                                   "ECDet-X's heads on the --arch ViT.", model_option=False)
    parser.add_argument("--dinov3", help="a released DINOv3 checkpoint (bare state dict) to start from; default: "
                        "random weights")
    parser.add_argument("--arch", help=f"one of {', '.join(model.DINOV3_HUB)}, or a JSON file of DINOv3 kwargs "
                        f"(with --demo: in place of the demo's {DEMO_DINOV3['embed_dim']}-wide ViT)")
    args = train_det.parse_args(argv, parser)
    if not (args.demo or args.arch):
        parser.error("--arch is required (the DINOv3 model of --dinov3)")
    return support.run_script("teacher.py", train, args)


def train(args):
    """ECDet's stage (train_det.train, its recipe ECDet-X's, the one for the largest released backbone;
    --epochs, --lr and --backbone-lr override it) on the teacher ECDet of --arch (with --demo, the demo's
    on it), its ViT starting from --dinov3."""
    arch = parse_arch(args.arch, "--arch") or DEMO_DINOV3
    try:
        cfg = demo_teacher_config(arch) if args.demo else teacher_config(arch)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--arch {args.arch}: {e}") from None
    if args.demo:
        return support.demo(args, train_det.train, cfg)
    if args.dinov3:
        check_dinov3(support.read_checkpoint(args.dinov3, "--dinov3"), arch, f"--dinov3 {args.dinov3}")
        args.backbone_weights = args.dinov3  # a bare ViT state dict, as train_det's --backbone-weights expects
    elif not (args.resume or args.tune):
        print("warning: no --dinov3 weights; the teacher's ViT starts from random weights", file=sys.stderr)
    support.check_output_dir(args)  # before the config goes in
    args.model = os.path.join(args.output_dir, "teacher_model.json")
    args.recipe = args.recipe or "ecdet_x"
    support.write_atomically(args.model, lambda f: f.write(json.dumps(cfg, indent=1).encode()))
    return train_det.train(args)


if __name__ == "__main__":
    main()
