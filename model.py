"""EdgeCrafter's networks, in the order data flows through Figure 3 of the paper: ECViT (and DINOv3's ViT, the
teacher's), the multi-scale feature generator, the hybrid encoder, query selection, the decoder with fine-grained
distribution refinement (FDR) and its heads (ECSeg's mask head too), and ECPose's decoder as a variation on it; then
building them from a config and loading weights. Their parameter names equal the original implementation's, so the
released checkpoints load with `load_weights` and compute the same numbers. Each part names the paper that defines
it; where the code departs from a paper's math to reproduce the released checkpoints, a comment says so ("the
released models were trained so"). Parameters, GFLOPs and CPU latency of a preset:
`python export.py --model ecdet_s --flops` and `--benchmark`.
"""
import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import support


# ---- Configuration: presets in the original's vocabulary ----
# Sections are named after the original's classes (ViTAdapter, HybridEncoder, ECTransformer, ...)
# and use its key names, so a config of the original code works here unchanged.

# ECViT backbones: embed_dim, num_heads, ffn_ratio, proj_dim (None: only stride 32 is projected).
ECVIT = {
    "ecvitt": (192, 3, 4, None),
    "ecvittplus": (256, 4, 4, None),
    "ecvits": (384, 6, 4, 256),
    "ecvitsplus": (384, 6, 6, 256),
}
# Model sizes: backbone, encoder/decoder width, encoder and decoder FFN widths, CSP expansion and depth multiplier.
SIZES = {
    "s": ("ecvitt", 192, 512, 512, 0.34, 0.67),
    "m": ("ecvittplus", 256, 512, 1024, 0.75, 0.67),
    "l": ("ecvits", 256, 1024, 1024, 0.75, 1),
    "x": ("ecvitsplus", 256, 2048, 2048, 1.5, 1),
}
# ECPose's decoder (the original's DETRTransformer) in every size; hidden_dim, dim_feedforward and
# num_decoder_layers vary.
POSE_DECODER = {"dropout": 0.0, "nhead": 8, "num_queries": 60, "normalize_before": False,
                "return_intermediate_dec": True, "activation": "relu", "num_feature_levels": 3, "dec_n_points": 4,
                "learnable_tgt_init": True, "two_stage_type": "standard", "num_body_points": 17, "aux_loss": True,
                "dec_pred_class_embed_share": False, "dec_pred_pose_embed_share": False,
                "two_stage_class_embed_share": False, "two_stage_bbox_embed_share": False, "cls_no_bias": False,
                "feat_strides": [8, 16, 32], "reg_max": 32, "reg_scale": 4}
TASKS = {"ecdet": ("detection", "ECDet", ""), "ecseg": ("segmentation", "ECSeg", "ecseg_"),
         "ecpose": ("pose", "ECPose", "ecpose_")}


def preset_config(name):
    """The network and postprocessor configuration of a released model, e.g. "ecdet_s", in the original's
    vocabulary; the loss section comes from its training file (`ECCriterion.preset_config`)."""
    support.check_name(name, PRESETS, "preset")
    family, _, size = name.partition("_")
    task, model, prefix = TASKS[family]
    vit, hidden, enc_ffn, dec_ffn, expansion, depth_mult = SIZES[size]
    dim, heads, ffn_ratio, proj_dim = ECVIT[vit]
    width = proj_dim or dim
    adapter = {"name": prefix + vit.removeprefix("ec") if prefix else vit, "embed_dim": dim,
               "num_heads": heads, "interaction_indexes": [10, 11]}
    if proj_dim:
        adapter["proj_dim"] = proj_dim
    if ffn_ratio != 4:
        adapter["ffn_ratio"] = ffn_ratio
    decoder = {"feat_channels": [hidden] * 3, "feat_strides": [8, 16, 32], "hidden_dim": hidden, "num_levels": 3,
               "num_layers": 4, "eval_idx": -1, "num_queries": 300, "num_denoising": 100,
               "label_noise_ratio": 0.5, "box_noise_scale": 1.0, "reg_max": 32, "reg_scale": 4,
               "layer_scale": 1, "num_points": [3, 6, 3], "cross_attn_method": "default",
               "query_select_method": "default", "activation": "silu", "dim_feedforward": dec_ffn}
    if task == "segmentation":
        decoder["mask_downsample_ratio"] = 4
    heads = {"ECTransformer": decoder, "PostProcessor": {"num_top_queries": 300}}
    if task == "pose":  # its decoder FFN is as wide as the encoder's; S has 3 decoder layers
        heads = {"DETRTransformer": {**POSE_DECODER, "hidden_dim": hidden, "dim_feedforward": enc_ffn,
                                     "num_decoder_layers": 3 if size == "s" else 4},
                 "DETRPosePostProcessor": {"num_select": 60, "num_body_points": 17}}
    return {
        "task": task, "model": model, "ViTAdapter": adapter,
        "HybridEncoder": {"in_channels": [width] * 3, "feat_strides": [8, 16, 32], "hidden_dim": hidden,
                          "use_encoder_idx": [2], "num_encoder_layers": 1, "nhead": 8, "dim_feedforward": enc_ffn,
                          "dropout": 0.0, "expansion": expansion, "depth_mult": depth_mult, "act": "silu",
                          "csp_type": "csp2", "fuse_op": "sum"},
        **heads,
        # ECPose's classes are COCO category ids: person is 1, 0 is never a target.
        "eval_spatial_size": [640, 640], "num_classes": 2 if task == "pose" else 80, "use_focal_loss": True,
    }


PRESETS = [f"{family}_{size}" for family in TASKS for size in SIZES]


# ---- Building blocks ----
# In place, as in the original: every activation reads a fresh intermediate that nothing else
# keeps, and writing into it is faster on the CPU than into a new tensor.
ACTIVATIONS = {"silu": functools.partial(nn.SiLU, inplace=True), "relu": functools.partial(nn.ReLU, inplace=True),
               "gelu": nn.GELU}


def activation(name):
    if name is None:
        return nn.Identity()
    support.check_name(name, ACTIVATIONS, "activation")
    return ACTIVATIONS[name]()


def fuse_conv_bn(conv, bn):
    """Weight and bias of the single convolution equal to `bn(conv(x))` in eval mode (conv has no bias)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class ConvNorm(nn.Module):
    """Conv2d without bias, BatchNorm2d, activation: (B, Cin, H, W) -> (B, Cout, H/stride, W/stride)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))

    def fuse(self):
        """Fold the BatchNorm into the convolution (deploy())."""
        if isinstance(self.norm, nn.Identity):
            return
        weight, bias = fuse_conv_bn(self.conv, self.norm)
        c = self.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups)
        self.conv.weight.data, self.conv.bias.data = weight.detach(), bias.detach()
        self.norm = nn.Identity()


class MLPHead(nn.Module):
    """DETR's prediction MLP, (..., din) -> (..., dout): `num_layers` linear layers, activations between."""

    def __init__(self, din, dhidden, dout, num_layers, act="relu"):
        super().__init__()
        dims = [din] + [dhidden] * (num_layers - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation(act)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


# ---- Stem and ViT blocks: ECViT (EdgeCrafter, "Compact ViTs for Edge Dense Prediction via Task-Specialized
# Distillation", 2026): convolutional stem, ViT blocks with a register token, 2-D RoPE ----
class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch grid (B, D, H/16, W/16).

    ECViT replaces the 16x16 patchify convolution with a convolutional stem: three 3x3 stride-2
    conv+BN+ReLU stages widening to D/8, D/4, D/2, then a 3x3 stride-2 projection to D. DINOv3
    keeps the plain 16x16 projection (no stem stages).
    """

    def __init__(self, dim, conv_stem=True, patch_size=16):
        super().__init__()
        if conv_stem:
            widths = [3, dim // 8, dim // 4, dim // 2]
            self.convs = nn.Sequential(*[ConvNorm(a, b, 3, 2, act="relu") for a, b in zip(widths[:-1], widths[1:])])
            self.proj = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        else:
            self.convs = nn.Sequential()
            self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(self.convs(x))


class RoPE2D(nn.Module):
    """2-D rotary position embedding (RoFormer's rotation, Su et al., 2021) in DINOv3's form, shared
    by every block; ECViT takes it from DINOv3.

    Patch centres are normalised to [-1, 1] separately along y and x; each head's D_h channels
    rotate by angles 2*pi*coord/period with D_h/4 periods base^(2i/(D_h/2)) per axis. Returns sin
    and cos of shape (P + h*w, D_h), where the P prefix tokens get the identity rotation; the sin's
    first half is negated, the sign of rotate_half (see `apply_rope`).
    """

    def __init__(self, head_dim, base=100.0, rescale=None):
        super().__init__()
        self.register_buffer("periods", base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)))
        self.rescale = rescale  # DINOv3 trains with a random coordinate scale in [1/r, r]

    def forward(self, h, w, prefix):
        dd = {"device": self.periods.device, "dtype": torch.float32}
        ys, xs = torch.arange(0.5, h, **dd) / h, torch.arange(0.5, w, **dd) / w
        coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) - 1.0  # (hw, 2)
        if self.training and self.rescale is not None:
            coords = coords * torch.empty(1, **dd).uniform_(-math.log(self.rescale), math.log(self.rescale)).exp()
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).flatten(1, 2)  # (hw, D_h / 2)
        sin = angles.sin()
        zeros = angles.new_zeros(prefix, 2 * angles.shape[1])
        return torch.cat([zeros, torch.cat([-sin, sin], 1)]), torch.cat([zeros + 1, angles.cos().repeat(1, 2)])


def apply_rope(x, sin, cos):
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1] along the last dim, with the
    minus already in `sin` (RoPE2D's): three kernels instead of five."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], -1), sin)


def attention_dtype(device_type):
    """The dtype the ViT's attention computes in on `device_type` under autocast, None when autocast is off.

    CPU: float32. PyTorch's CPU attention kernel is slower in bfloat16 than in float32 on CPUs without AMX
    (ECDet-S at 640x640 under bfloat16 autocast: 0.66 CPU-seconds with float32 attention, 0.93 without).
    CUDA (and other accelerators): the autocast dtype, for which the fused flash / memory-efficient
    kernels are the fast path.
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim, num_heads, mask_k_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedKBiasLinear(dim, 3 * dim) if mask_k_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        qk = apply_rope(qkv[:2], *rope)  # queries and keys rotate together: rope is (sin, cos)
        if attention_dtype(x.device.type) == torch.float32:
            with torch.autocast(x.device.type, enabled=False):
                x = F.scaled_dot_product_attention(qk[0].float(), qk[1].float(), qkv[2].float())
        else:
            x = F.scaled_dot_product_attention(qk[0], qk[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class GeluFFN(nn.Module):
    """The ViT's feed-forward network: Linear, GELU, Linear on (B, N, D)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, dim, num_heads, ffn_ratio, ffn_layer, norm_eps, layerscale_init, mask_k_bias):
        super().__init__()
        scale = (lambda: LayerScale(dim, layerscale_init)) if layerscale_init else nn.Identity
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, mask_k_bias)
        self.ls1 = scale()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = {"mlp": GeluFFN, "swiglu": SwiGLU}[ffn_layer](dim, int(dim * ffn_ratio))
        self.ls2 = scale()

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """The plain ViT of ECViT and of DINOv3, one class for both layouts.

    ECViT (`dinov3=False`, EdgeCrafter): convolutional stem, one learned register token (Darcet et
    al., "Vision Transformers Need Registers", 2024), no final norm.
    DINOv3 (`dinov3=True`; Siméoni et al., "DINOv3", 2025): 16x16 patch embedding, class token and
    `n_storage_tokens` storage (register) tokens, layer scale, masked key bias, a final LayerNorm,
    and a (unused at inference) mask token.
    Tokens are laid out (B, P + h*w, D) with the P prefix tokens first.
    """

    def __init__(self, embed_dim=192, depth=12, num_heads=3, ffn_ratio=4.0, ffn_layer="mlp", dinov3=False,
                 patch_size=16, n_storage_tokens=0, layerscale_init=None, mask_k_bias=False, norm_eps=1e-6,
                 rope_rescale=None):
        super().__init__()
        self.embed_dim, self.num_heads, self.patch_size, self.dinov3 = embed_dim, num_heads, patch_size, dinov3
        self.patch_embed = PatchEmbed(embed_dim, conv_stem=not dinov3, patch_size=patch_size)
        if dinov3:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        else:
            self.register_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.n_prefix = 1 + n_storage_tokens if dinov3 else 1
        self.rope_embed = RoPE2D(embed_dim // num_heads, rescale=rope_rescale)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_ratio, ffn_layer, norm_eps, layerscale_init, mask_k_bias)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if dinov3 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.storage_tokens) if self.dinov3 else (self.register_token,):
            nn.init.trunc_normal_(p, std=0.02)

    def run_blocks(self, x, take):
        """Raw token tensors (B, P + h*w, D) after each block index in `take`, and the grid (h, w)."""
        patches = self.patch_embed(x)
        B, _, h, w = patches.shape
        prefix = torch.cat([self.cls_token, self.storage_tokens], 1) if self.dinov3 else self.register_token
        x = torch.cat([prefix.expand(B, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
        rope = self.rope_embed(h, w, self.n_prefix)
        outs = []
        for i, block in enumerate(self.blocks[:max(take) + 1]):
            x = block(x, rope)
            if i in take:
                outs.append(x)
        return outs, (h, w)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                return_extra_tokens=False, norm=True):
        """DINOv3's API: patch tokens (B, h*w, D) of the last `n` blocks (or of the block indices in
        list `n`), optionally normed, reshaped to (B, D, h, w), with the class / extra tokens."""
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else list(n)
        outs, (h, w) = self.run_blocks(x, take)
        if norm:
            outs = [self.norm(o) for o in outs]
        P = self.n_prefix
        patches = [o[:, P:] for o in outs]
        if reshape:
            patches = [p.transpose(1, 2).reshape(p.shape[0], -1, h, w) for p in patches]
        extras = [[o[:, 0]] * return_class_token + [o[:, 1:P]] * return_extra_tokens for o in outs]
        return tuple(tuple([p] + e) if e else p for p, e in zip(patches, extras))

    def forward_features(self, x):
        """DINOv3's API: the normed class, storage and patch tokens of the last block."""
        (x,), _ = self.run_blocks(x, [len(self.blocks) - 1])
        x_norm = self.norm(x)
        P = self.n_prefix
        return {"x_norm_clstoken": x_norm[:, 0], "x_storage_tokens": x_norm[:, 1:P],
                "x_norm_patchtokens": x_norm[:, P:], "x_prenorm": x, "masks": None}


# ---- DINOv3's layout of the same ViT (Siméoni et al., "DINOv3", 2025; the teacher's backbone, teacher.py):
# its own parts and hub models ----
class MaskedKBiasLinear(nn.Linear):
    """DINOv3's qkv projection: the key bias is multiplied by a stored 0 mask (`mask_k_bias`)."""

    def __init__(self, din, dout):
        super().__init__(din, dout)
        self.register_buffer("bias_mask", torch.ones(dout))
        self.bias_mask[dout // 3: 2 * dout // 3] = 0

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class SwiGLU(nn.Module):
    """DINOv3's SwiGLU FFN (Shazeer, "GLU Variants Improve Transformer", 2020); the hidden width is
    2/3 of `hidden`, rounded up to a multiple of 8."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % 8
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """DINOv3's learned per-channel scale of each residual branch (CaiT's LayerScale, Touvron et al.,
    2021): (..., D) * gamma."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


# DINOv3's norm layers (its norm_layer kwarg) and their LayerNorm eps.
NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}

# The hub models (dinov3/hub/backbones.py): shared settings, then each model's size.
HUB_COMMON = dict(patch_size=16, pos_embed_rope_base=100.0, pos_embed_rope_normalize_coords="separate",
                  pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", layerscale_init=1e-5,
                  norm_layer="layernormbf16", n_storage_tokens=4, mask_k_bias=True)
DINOV3_HUB = {
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, ffn_layer="mlp"),
    # No released file of this one was at hand: its layout follows from the hub's kwargs alone.
    "dinov3_vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"),
}
# dinov3_vit7b16 (4096 wide, 40 blocks) has no qkv bias, a SwiGLU aligned to 64 and untied class-token
# norms, none of which model.ViT implements; infer_dinov3 names what it finds in such a file.


def build_dinov3(cfg):
    """DINOv3's ViT from a hub name ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16",
    "dinov3_vitl16", "dinov3_vith16plus") or DinoVisionTransformer kwargs, as ViT(dinov3=True). Its state dict has
    the original's names and shapes; `get_intermediate_layers` / `forward_features` take
    (B, 3, H, W) images with H, W multiples of the patch size."""
    kw = support.dinov3_kwargs(cfg, DINOV3_HUB, HUB_COMMON)
    support.check_dinov3_kwargs(kw, NORM_EPS)
    return ViT(embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"], ffn_ratio=kw["ffn_ratio"],
               ffn_layer=kw["ffn_layer"], dinov3=True, patch_size=kw["patch_size"],
               n_storage_tokens=kw["n_storage_tokens"], layerscale_init=kw["layerscale_init"],
               mask_k_bias=kw["mask_k_bias"], norm_eps=NORM_EPS[kw["norm_layer"]],
               rope_rescale=kw["pos_embed_rope_rescale_coords"])


def dinov3_shapes(cfg):
    """The state dict of `build_dinov3(cfg)` as meta tensors: names and shapes, no memory."""
    with torch.device("meta"):
        return build_dinov3(cfg).state_dict()


# ---- Feature generator (EdgeCrafter, 2026; the original's ViTAdapter): ViT tokens -> a 3-level pyramid ----
class ViTAdapter(nn.Module):
    """EdgeCrafter's feature generator: single-scale ViT tokens -> a stride 8/16/32 pyramid.

    The patch tokens of the interaction blocks are averaged, laid out as a stride-16 map, and
    bilinearly resized to strides 8, 16 and 32; 1x1 conv+BN layers project all three levels to
    `proj_dim`, or, without `proj_dim`, only the stride-32 level (keeping the width).
    """

    def __init__(self, vit, interaction_indexes=(10, 11), proj_dim=None):
        super().__init__()
        self.backbone = vit
        self.interaction_indexes = list(interaction_indexes)
        dim = vit.embed_dim
        self.projector = nn.ModuleList(ConvNorm(dim, proj_dim or dim, 1) for _ in range(3 if proj_dim else 1))

    def forward(self, x):
        tokens = self.backbone.get_intermediate_layers(x, n=self.interaction_indexes, norm=False)
        fused = torch.stack(tokens).mean(0)
        B, _, D = fused.shape
        h, w = x.shape[2] // self.backbone.patch_size, x.shape[3] // self.backbone.patch_size
        fused = fused.transpose(1, 2).reshape(B, D, h, w)
        # Resizing to the same size is the identity, so stride 16 is used as it is.
        feats = [F.interpolate(fused, size=(2 * h, 2 * w), mode="bilinear", align_corners=False), fused,
                 F.interpolate(fused, size=(h // 2, w // 2), mode="bilinear", align_corners=False)]
        projected = [proj(f) for proj, f in zip(self.projector, feats[-len(self.projector):])]
        return feats[:3 - len(projected)] + projected


# ---- Encoder: RT-DETR's hybrid encoder (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", 2024): one
# transformer layer on stride 32 (AIFI), then CSP fusion top-down and bottom-up (CCFF) ----
class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer; the position embedding is added to queries and keys only."""

    def __init__(self, dim, nhead, dim_feedforward, dropout, act):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.act = activation(act)

    def forward(self, x, pos):
        q = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(self.act(self.linear1(x))))))


class RepVGG(nn.Module):
    """RepVGG's block (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", 2021):
    act(conv3x3+BN + conv1x1+BN); `fuse()` merges both branches into one 3x3 convolution."""

    def __init__(self, dim, act):
        super().__init__()
        self.conv1, self.conv2 = ConvNorm(dim, dim, 3), ConvNorm(dim, dim, 1)
        self.act = activation(act)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def fuse(self):
        """Merge both branches, BatchNorms folded, into the one equal 3x3 convolution (deploy())."""
        if hasattr(self, "conv"):
            return
        w3, b3 = fuse_conv_bn(self.conv1.conv, self.conv1.norm)
        w1, b1 = fuse_conv_bn(self.conv2.conv, self.conv2.norm)
        weight = w3 + F.pad(w1, [1, 1, 1, 1])
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, 1, 1)
        self.conv.weight.data, self.conv.bias.data = weight.detach(), (b3 + b1).detach()
        del self.conv1, self.conv2


class CSPRep(nn.Module):
    """Cross-stage partial layer (CSPNet) with RepVGG bottlenecks, RT-DETR's RepC3: split a 1x1
    conv's output in two halves a, b and return a + bottlenecks(b)."""

    def __init__(self, cin, cout, num_blocks, act):
        super().__init__()
        self.conv1 = ConvNorm(cin, 2 * cout, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVGG(cout, act) for _ in range(num_blocks)])

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, 1)
        return a + self.bottlenecks(b)


class RepNCSPELAN4(nn.Module):
    """GELAN fusion block (YOLOv9, Wang et al., 2024), as D-FINE's encoder has it: 1x1 conv to c3 channels split in
    halves y0, y1; y2 = cv2(y1), y3 = cv3(y2); a 1x1 conv maps concat(y0, y1, y2, y3) to c2 channels."""

    def __init__(self, c1, c2, c3, c4, num_blocks, act):
        super().__init__()
        self.cv1 = ConvNorm(c1, c3, 1, act=act)
        self.cv2 = nn.Sequential(CSPRep(c3 // 2, c4, num_blocks, act))
        self.cv3 = nn.Sequential(CSPRep(c4, c4, num_blocks, act))
        self.cv4 = ConvNorm(c3 + 2 * c4, c2, 1, act=act)

    def forward(self, x):
        ys = list(self.cv1(x).chunk(2, 1))
        ys.append(self.cv2(ys[-1]))
        ys.append(self.cv3(ys[-1]))
        return self.cv4(torch.cat(ys, 1))


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10, Wang et al., 2024): 1x1 conv, then a 3x3
    stride-2 depthwise conv."""

    def __init__(self, dim):
        super().__init__()
        self.cv1, self.cv2 = ConvNorm(dim, dim, 1), ConvNorm(dim, dim, 3, 2, groups=dim)

    def forward(self, x):
        return self.cv2(self.cv1(x))


class HybridEncoder(nn.Module):
    """Pyramid [(B, C, H/8, W/8), (B, C, H/16, W/16), (B, C, H/32, W/32)] -> the same shapes with
    C = hidden_dim: RT-DETR's intra-scale attention on stride 32 (AIFI), then its cross-scale fusion
    (CCFF), a top-down FPN and a bottom-up PAN whose inputs are fused by summation and refined by
    RepNCSPELAN4 blocks (as D-FINE's encoder has them)."""

    def __init__(self, hidden_dim=256, nhead=8, dim_feedforward=1024, dropout=0.0, use_encoder_idx=(2,),
                 num_encoder_layers=1, pe_temperature=10000, expansion=1.0, depth_mult=1.0, act="silu"):
        super().__init__()
        self.hidden_dim, self.use_encoder_idx, self.pe_temperature = hidden_dim, list(use_encoder_idx), pe_temperature
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, act)
        # AIFI: a stack of layers per level in use_encoder_idx, named as the original's TransformerEncoder's.
        stack = lambda: nn.ModuleList(copy.deepcopy(layer) for _ in range(num_encoder_layers))
        self.encoder = nn.ModuleList(nn.ModuleDict({"layers": stack()}) for _ in self.use_encoder_idx)
        c4, n = round(expansion * hidden_dim // 2), round(3 * depth_mult)
        fuse = RepNCSPELAN4(hidden_dim, hidden_dim, 2 * hidden_dim, c4, n, act)
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1) for _ in range(2))
        self.fpn_blocks = nn.ModuleList(copy.deepcopy(fuse) for _ in range(2))
        self.downsample_convs = nn.ModuleList(nn.Sequential(SCDown(hidden_dim)) for _ in range(2))
        self.pan_blocks = nn.ModuleList(copy.deepcopy(fuse) for _ in range(2))
        self._pos = {}

    def pos_embed(self, h, w, device):
        """Fixed 2-D sin-cos embedding (1, w*h, hidden_dim), made once per size. The original flattens the
        grid x-major (index x*h + y) while features flatten y-major; the released weights were trained that way."""
        key = (h, w, device)
        if key not in self._pos:
            gx, gy = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
            quarter = self.hidden_dim // 4
            omega = 1.0 / self.pe_temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
            ox, oy = gx.flatten()[:, None] @ omega[None], gy.flatten()[:, None] @ omega[None]
            self._pos[key] = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], 1)[None].to(device)
        return self._pos[key]

    def forward(self, feats):
        feats = list(feats)
        for encoder, idx in zip(self.encoder, self.use_encoder_idx):
            B, C, h, w = feats[idx].shape
            pos = self.pos_embed(h, w, feats[idx].device)
            tokens = feats[idx].flatten(2).transpose(1, 2)
            for layer in encoder["layers"]:
                tokens = layer(tokens, pos)
            feats[idx] = tokens.transpose(1, 2).reshape(B, C, h, w)
        # Top-down: lateral conv on the coarser map, upsample x2, add the finer map, fuse.
        top = feats[2]
        inner = []
        for lateral, block, finer in zip(self.lateral_convs, self.fpn_blocks, (feats[1], feats[0])):
            top = lateral(top)
            inner.insert(0, top)
            top = block(F.interpolate(top, scale_factor=2.0, mode="nearest") + finer)
        # Bottom-up: downsample the finer output, add the lateral map, fuse.
        outs = [top]
        for down, block, lateral in zip(self.downsample_convs, self.pan_blocks, inner):
            outs.append(block(down(outs[-1]) + lateral))
        return outs


# ---- Query selection: anchors, RT-DETR's top-k encoder positions, DN-DETR / DINO's denoising groups ----
def inverse_sigmoid(x, eps=1e-5):
    x = x.clip(0.0, 1.0)
    return torch.log(x.clip(min=eps) / (1 - x).clip(min=eps))


class QueryDecoder(nn.Module):
    """The scaffold of both decoders (ECTransformer, ECPose's DETRTransformer): FDR's constants `up`
    and `reg_scale`, and one anchor per feature-map cell, those of `eval_spatial_size` kept as buffers
    as in the released checkpoints. ECDet's anchors are boxes, ECPose's points, whose checkpoints
    hold the valid mask inverted (True where not valid)."""

    def __init__(self, reg_scale, eval_spatial_size, eps, boxes):
        super().__init__()
        self.eps, self.boxes = eps, boxes
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        self.shapes = [[eval_spatial_size[0] // s, eval_spatial_size[1] // s] for s in (8, 16, 32)] \
            if eval_spatial_size else None
        if self.shapes:
            anchors, valid = self.make_anchors(self.shapes)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid if boxes else ~valid)

    def make_anchors(self, shapes, device=None):
        """Anchors (1, L, 4 or 2) in inverse-sigmoid space, level after level: each cell's centre x, y
        and, for boxes, a width and height of 0.05 * 2^level (then inf where not valid: never selected);
        and the mask (1, L, 1) of those whose coordinates all lie in (eps, 1 - eps)."""
        anchors = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            xy = (torch.stack([xs, ys], -1) + 0.5) / torch.tensor([w, h], dtype=torch.float32, device=device)
            if self.boxes:
                xy = torch.cat([xy, torch.full_like(xy, 0.05 * 2.0 ** level)], -1)
            anchors.append(xy.reshape(1, h * w, -1))
        anchors = torch.cat(anchors, 1)
        valid = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
        anchors = torch.log(anchors / (1 - anchors))
        return anchors.masked_fill(~valid, torch.inf) if self.boxes else anchors, valid

    def memory_and_anchors(self, feats):
        """The encoder pyramid [(B, C, h_l, w_l)] -> memory (B, L, C) with L = sum h_l * w_l, the shapes
        [[h_l, w_l]], and the anchors (1, L, 4 or 2) and their valid mask (1, L, 1)."""
        shapes = [list(f.shape[-2:]) for f in feats]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        if shapes == self.shapes and not self.training:
            return memory, shapes, self.anchors, self.valid_mask if self.boxes else ~self.valid_mask
        return memory, shapes, *self.make_anchors(shapes, memory.device)


def top_k(logits, k):
    """The k positions of logits (B, L, classes) with the highest best-class logit, as a function
    that gathers them from any (B, L, D) tensor into (B, k, D)."""
    index = logits.max(-1).values.topk(k, dim=1).indices
    return lambda t: t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def select_queries(memory, anchors, valid, heads, num_queries):
    """ECDet's query selection, RT-DETR's top-k (RT-DETR makes it uncertainty-minimal by an IoU-aware loss; MAL plays
    that part here): the Q encoder positions with the highest class scores (enc_score_head) become the queries, the
    memory there their content, their anchor box moved by enc_bbox_head their reference. memory (B, L, C), anchors
    (1, L, 4) inverse sigmoid, valid (1, L, 1); heads: the ECTransformer -> content (B, Q, C) and inverse-sigmoid
    boxes (B, Q, 4), detached, and the encoder outputs `pred_logits` (B, Q, classes), `pred_boxes` (B, Q, 4)."""
    # Positions with out-of-range anchors are zeroed for the selection only; the decoder attends to the unmasked memory.
    selectable = valid.to(memory.dtype) * memory
    logits = heads.enc_score_head(selectable)
    gather = top_k(logits, num_queries)
    content = gather(selectable)
    boxes = heads.enc_bbox_head(content) + gather(anchors.expand(memory.shape[0], -1, -1))
    return content.detach(), boxes.detach(), {"pred_logits": gather(logits), "pred_boxes": boxes.sigmoid()}


def denoising_groups(counts, num_denoising, num_queries, device):
    """The layout of the denoising queries, boxes and keypoints alike (DN-DETR, Li et al., "DN-DETR: Accelerate DETR
    Training by Introducing Query DeNoising", 2022; DINO's contrastive groups, Zhang et al., "DINO: DETR with Improved
    DeNoising Anchor Boxes", 2023): each of max(num_denoising // G, 1) groups holds a positive and a negative copy of
    every image's G = max(counts) target slots, N = 2 * G * groups queries before the Q matching ones. Returns the
    number of groups, the self-attention mask (N + Q, N + Q), True = blocked (the matching queries must not see the
    answers; each group sees itself and the matching queries), and the meta data the criterion pairs positives by."""
    G = max(counts)
    groups = max(num_denoising // G, 1) if G else 0
    N = 2 * G * groups
    mask = torch.zeros(N + num_queries, N + num_queries, dtype=torch.bool, device=device)
    mask[N:, :N] = True
    group = torch.arange(N, device=device) // max(2 * G, 1)
    mask[:N, :N] = group[:, None] != group[None, :]
    positive = tuple((2 * G * torch.arange(groups, device=device)[:, None] + torch.arange(n, device=device)).flatten()
                     for n in counts)
    return groups, mask, {"dn_positive_idx": positive, "dn_num_group": groups, "dn_num_split": [N, num_queries]}


def denoising_queries(targets, num_classes, num_queries, class_embed, num_denoising, label_noise_ratio,
                      box_noise_scale):
    """ECDet's denoising queries, DINO's contrastive denoising: each group holds every ground-truth
    box twice, once lightly (positive) and once strongly (negative) jittered, with some labels flipped.

    Returns query content (B, N, C), inverse-sigmoid boxes (B, N, 4), and the attention mask and
    meta data of `denoising_groups`.
    """
    counts = [len(t["labels"]) for t in targets]
    device = class_embed.weight.device
    groups, mask, meta = denoising_groups(counts, num_denoising, num_queries, device)
    B, G = len(counts), max(counts)
    labels = torch.full((B, G), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(B, G, 4, device=device)
    real = torch.zeros(B, G, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        labels[i, :n], boxes[i, :n], real[i, :n] = t["labels"], t["boxes"], True
    labels, boxes, real = labels.tile(1, 2 * groups), boxes.tile(1, 2 * groups, 1), real.tile(1, 2 * groups)
    negative = torch.zeros(B, 2 * G, 1, device=device)
    negative[:, G:] = 1
    negative = negative.tile(1, groups, 1)

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        # Positives move each edge by less than half the box size, negatives by between one and two halves.
        xyxy = torchvision.ops.box_convert(boxes, "cxcywh", "xyxy")
        half = boxes[..., 2:].tile(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(boxes)
        part = (part + 1.0) * negative + part * (1 - negative)
        boxes = torchvision.ops.box_convert((xyxy + sign * part * half).clip(0.0, 1.0), "xyxy", "cxcywh").abs()
    return class_embed(labels), inverse_sigmoid(boxes), mask, meta


# ---- Decoder: D-FINE's fine-grained distribution refinement (FDR; Peng et al., "D-FINE: Redefine Regression Task in
# DETRs as Fine-grained Distribution Refinement", 2025) over deformable attention ----
def weighting_function(reg_max, up, reg_scale):
    """D-FINE's weighting function, FDR's non-uniform bin values W(n), n = 0..reg_max: (reg_max + 1,), symmetric around
    W = 0, nearly uniform near zero and growing geometrically towards the ends +-2*up*reg_scale."""
    bound = up.abs() * reg_scale.abs()  # (1,)
    step = (bound + 1) ** (2 / (reg_max - 2))
    right = [step ** i - 1 for i in range(1, reg_max // 2)]
    left = [-(step ** i) + 1 for i in range(reg_max // 2 - 1, 0, -1)]
    return torch.cat([-2 * bound, *left, torch.zeros_like(bound), *right, 2 * bound])


def distance2bbox(points, distance, reg_scale):
    """Reference boxes (..., 4) cx, cy, w, h and edge distances (..., 4) left, top, right, bottom
    in units of w/reg_scale, h/reg_scale -> boxes (..., 4) cx, cy, w, h."""
    reg_scale = reg_scale.abs()
    x1 = points[..., 0] - (0.5 * reg_scale + distance[..., 0]) * (points[..., 2] / reg_scale)
    y1 = points[..., 1] - (0.5 * reg_scale + distance[..., 1]) * (points[..., 3] / reg_scale)
    x2 = points[..., 0] + (0.5 * reg_scale + distance[..., 2]) * (points[..., 2] / reg_scale)
    y2 = points[..., 1] + (0.5 * reg_scale + distance[..., 3]) * (points[..., 3] / reg_scale)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


class MSDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale cross-attention (Zhu et al., "Deformable DETR: Deformable Transformers for
    End-to-End Object Detection", 2021) with `num_points[l]` sampling points per head on level l (a count per level, as
    RT-DETRv2 has it).

    With reference boxes (ECDet, ECSeg), offsets are scaled by the box size (and 1/num_points) so points spread inside
    the box; with reference points (ECPose, `box_reference=False`), offsets count cells of each level's feature map.
    There are no value or output projections (the encoder output is sampled directly).
    """

    def __init__(self, dim=256, num_heads=8, num_points=(3, 6, 3), offset_scale=0.5, box_reference=True):
        super().__init__()
        self.num_heads, self.num_points, self.offset_scale = num_heads, list(num_points), offset_scale
        total = sum(self.num_points)
        if box_reference:
            self.register_buffer("num_points_scale",
                                 torch.tensor([1 / n for n in self.num_points for _ in range(n)], dtype=torch.float32))
        self.cells = {}  # reference points' cell sizes per input size: see forward
        self.sampling_offsets = nn.Linear(dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(dim, num_heads * total)
        # Initial offsets point along num_heads directions, 1..n steps out on each level.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(num_heads, dtype=torch.float32) * (2 * math.pi / num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, n + 1) for n in self.num_points]).reshape(1, -1, 1)
        self.sampling_offsets.bias.data[:] = (grid[:, None, :] * steps).flatten()
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query, ref, values, shapes):
        """query (B, Lq, C); ref (B, Lq, 1, 4) boxes cx, cy, w, h or, without box_reference, (B, Lq, 1, 2)
        points x, y, both in [0, 1]; values from `split_values`, per level (B*heads, c, h_l, w_l) -> (B, Lq, heads*c):
        each head's values sampled bilinearly at its P = sum(num_points) locations (B, Lq, heads, P, 2), in [0, 1]
        image coordinates, and summed with the softmax weights (B, Lq, heads, P)."""
        B, Lq, _ = query.shape
        total = sum(self.num_points)
        offsets = self.sampling_offsets(query).reshape(B, Lq, self.num_heads, total, 2)
        weights = self.attention_weights(query).reshape(B, Lq, self.num_heads, total).softmax(-1)
        if ref.shape[-1] == 4:
            scale = self.num_points_scale.to(query.dtype).unsqueeze(-1)
            locations = ref[:, :, None, :, :2] + offsets * scale * ref[:, :, None, :, 2:] * self.offset_scale
        else:
            # Made once per input size: a tensor from Python numbers is a host-to-device copy on a GPU,
            # which a CUDA graph cannot capture (predict.CUDAGraphRunner captures after eager warm-up runs).
            # Inference mode's own: autograd refuses tensors made under it.
            key = (str(shapes), query.dtype, query.device, torch.is_inference_mode_enabled())
            if key not in self.cells:
                self.cells[key] = torch.tensor([[w, h] for (h, w), n in zip(shapes, self.num_points) for _ in range(n)],
                                               dtype=query.dtype, device=query.device)
            locations = ref[:, :, None] + offsets / self.cells[key]
        grids = (2 * locations - 1).permute(0, 2, 1, 3, 4).flatten(0, 1).split(self.num_points, dim=-2)
        # grid_sample runs 2-3x faster on the CPU from a contiguous grid; the copies are small.
        sampled = [F.grid_sample(v, g.contiguous(), mode="bilinear", padding_mode="zeros", align_corners=False)
                   for v, g in zip(values, grids)]  # per level (B*heads, c, Lq, num_points[l])
        weights = weights.permute(0, 2, 1, 3).reshape(B * self.num_heads, 1, Lq, total)
        return (torch.cat(sampled, -1) * weights).sum(-1).reshape(B, -1, Lq).transpose(1, 2)


def split_values(memory, shapes, num_heads):
    """Encoder memory (B, sum h*w, C) -> per level (B*heads, C/heads, h, w) for grid sampling."""
    B, _, C = memory.shape
    levels = memory.reshape(B, -1, num_heads, C // num_heads).permute(0, 2, 3, 1)
    return [v.reshape(B * num_heads, C // num_heads, h, w)
            for v, (h, w) in zip(levels.split([h * w for h, w in shapes], -1), shapes)]


class Gate(nn.Module):
    """D-FINE's gated fusion of the residual x1 and the cross-attention output x2: norm(g1*x1 + g2*x2)."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # sigmoid(0) = 0.5: both inputs weighted equally at start

    def forward(self, x1, x2):
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], -1))).chunk(2, -1)
        return self.norm(g1 * x1 + g2 * x2)


class LQE(nn.Module):
    """D-FINE's localization-quality estimator (after GFLv2's distribution-guided quality predictor, Li et al., 2021):
    adds to the class logits a score predicted from the top-k probabilities (and their mean) of each edge's
    distribution. ECPose's reads `groups` = 17 keypoints' sampled features instead (`quality`)."""

    def __init__(self, k, hidden, num_layers, reg_max, act, groups=4):
        super().__init__()
        self.k, self.reg_max = k, reg_max
        self.reg_conf = MLPHead(groups * (k + 1), hidden, 1, num_layers, act)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores, corners):
        return self.quality(scores, corners.unflatten(-1, (4, self.reg_max + 1)).softmax(-1))

    def quality(self, scores, values):
        """scores (B, L, K) plus the score of values (B, L, groups, N): each group's top k and their mean."""
        topk = values.topk(self.k, dim=-1).values
        return scores + self.reg_conf(torch.cat([topk, topk.mean(-1, keepdim=True)], -1).flatten(2))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention to the encoder (fused by a gate), FFN; post-norm."""

    def __init__(self, dim, nhead, dim_feedforward, dropout, act, num_points):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(dim, nhead, num_points)
        self.gateway = Gate(dim)
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.act, self.drop = activation(act), nn.Dropout(dropout)  # one stateless dropout for every place
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, ref_boxes, values, shapes, attn_mask, pos):
        q = x + pos
        x = self.norm1(x + self.drop(self.self_attn(q, q, x, attn_mask=attn_mask, need_weights=False)[0]))
        x = self.gateway(x, self.drop(self.cross_attn(x + pos, ref_boxes, values, shapes)))
        x = x + self.drop(self.linear2(self.drop(self.act(self.linear1(x)))))
        return self.norm2(x.clamp(-65504, 65504))  # stay inside the fp16 range


class TransformerDecoder(nn.Module):
    """The decoder layers with FDR: every layer predicts, for each query, a distribution over
    `reg_max + 1` bins per box edge; the residual sum of these logits across layers, integrated
    against W(n), moves the edges of the first layer's box (fine-grained distribution refinement)."""

    def __init__(self, layer, num_layers, eval_idx, up, reg_scale, reg_max, act, mask_head):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_heads, self.eval_idx = layer.cross_attn.num_heads, eval_idx
        self.up, self.reg_scale, self.reg_max = up, reg_scale, reg_max
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max, act) for _ in range(num_layers))
        if mask_head is not None:
            self.segmentation_head = mask_head

    def forward(self, x, ref_unact, memory, shapes, heads, attn_mask=None, spatial=None):
        """x (B, Q, C) query content; ref_unact (B, Q, 4) inverse-sigmoid reference boxes; memory (B, L, C); heads: the
        ECTransformer, which holds the prediction heads (as in the released checkpoints). Returns per-layer stacks of
        boxes, logits, corner logits and reference boxes (all layers in training, layer eval_idx at inference), the
        first layer's (pre) boxes and logits, and per-layer masks (or None)."""
        values = split_values(memory, shapes, self.num_heads)
        project = weighting_function(self.reg_max, self.up, self.reg_scale)
        ref = ref_unact.sigmoid()
        pos = heads.query_pos_head(ref).clamp(-10, 10)
        out_boxes, out_logits, out_corners, out_refs, out_hidden = [], [], [], [], []
        x_detach = corners_sum = 0
        for i, layer in enumerate(self.layers[:self.eval_idx + 1] if not self.training else self.layers):
            x = layer(x, ref.unsqueeze(2), values, shapes, attn_mask, pos)
            if i == 0:
                # The first layer regresses a plain box from the reference; FDR refines it afterwards.
                pre_boxes = torch.sigmoid(heads.pre_bbox_head(x) + inverse_sigmoid(ref))
                pre_logits = heads.dec_score_head[0](x)
                ref_initial = pre_boxes.detach()
            corners = heads.dec_bbox_head[i](x + x_detach) + corners_sum
            offsets = corners.unflatten(-1, (4, -1)).softmax(-1) @ project  # (B, Q, 4)
            boxes = distance2bbox(ref_initial, offsets, self.reg_scale)
            if self.training or i == self.eval_idx:
                out_logits.append(self.lqe_layers[i](heads.dec_score_head[i](x), corners))
                out_boxes.append(boxes)
                out_corners.append(corners)
                out_refs.append(ref_initial)
                out_hidden.append(x)
            corners_sum, ref, x_detach = corners, boxes.detach(), x.detach()
        masks = self.segmentation_head(spatial, out_hidden) if hasattr(self, "segmentation_head") else None
        return (torch.stack(out_boxes), torch.stack(out_logits), torch.stack(out_corners), torch.stack(out_refs),
                pre_boxes, pre_logits, masks)


# ---- Heads: the prediction heads and the decoder's outputs (the original's ECTransformer) ----
def per_layer(layers, teacher):
    """Stacked per-layer outputs {name: (layers, ...)} -> a list of per-layer dicts; with `teacher`, each also carries
    the last layer's corners and logits, which teach the earlier layers (FDR's decoupled distillation focal loss)."""
    last = {"teacher_corners": layers["pred_corners"][-1], "teacher_logits": layers["pred_logits"][-1]} \
        if teacher else {}
    return [{**{k: v[i] for k, v in layers.items()}, **last} for i in range(len(layers["pred_logits"]))]


def training_outputs(layers, pre, enc, dn_meta, teacher=False):
    """The criterion's inputs, in the original's names: the last layer's outputs, `aux_outputs` (the earlier layers),
    `pre_outputs` (the first layer's regression), `enc_aux_outputs` (the selected encoder queries) and, with denoising
    queries, `dn_outputs`, `dn_pre_outputs` and `dn_meta`. layers: per-layer stacks (layers, B, N + Q, ...); pre:
    (B, N + Q, ...), the N denoising queries first; enc: the encoder outputs (B, Q, ...)."""
    if dn_meta is not None:  # each output's part j along dim: the denoising queries' (0) or the matching ones' (1)
        part = lambda outs, dim, j: {k: None if v is None else v.split(dn_meta["dn_num_split"], dim)[j]
                                     for k, v in outs.items()}
        dn_layers, layers, dn_pre, pre = part(layers, 2, 0), part(layers, 2, 1), part(pre, 1, 0), part(pre, 1, 1)
    out = {k: v[-1] for k, v in layers.items()}
    out.update(aux_outputs=per_layer(layers, teacher)[:-1], pre_outputs=pre, enc_aux_outputs=[enc])
    if dn_meta is not None:
        out.update(dn_outputs=per_layer(dn_layers, teacher), dn_pre_outputs=dn_pre, dn_meta=dn_meta)
    return out


class ECTransformer(QueryDecoder):
    """Query selection from the encoder, then the FDR decoder and the prediction heads.

    Input: the encoder pyramid [(B, C, H/s, W/s) for s in 8, 16, 32]. Output at inference:
    `pred_logits` (B, Q, num_classes) and `pred_boxes` (B, Q, 4) normalised cx, cy, w, h (and
    `pred_masks` (B, Q, H/4, W/4) with a mask head); in training also the per-layer, encoder,
    pre-decoder and denoising outputs the criterion needs (`training_outputs`).
    """

    def __init__(self, num_classes=80, hidden_dim=256, num_queries=300, num_points=(3, 6, 3), nhead=8, num_layers=6,
                 dim_feedforward=1024, dropout=0.0, activation="silu", num_denoising=100, label_noise_ratio=0.5,
                 box_noise_scale=1.0, eval_spatial_size=None, eval_idx=-1, eps=1e-2, reg_max=32, reg_scale=4.0,
                 mask_downsample_ratio=None):
        super().__init__(reg_scale, eval_spatial_size, eps, boxes=True)
        if isinstance(num_points, int):
            num_points = [num_points] * 3
        self.num_queries, self.num_classes = num_queries, num_classes
        self.num_denoising, self.label_noise_ratio, self.box_noise_scale = num_denoising, label_noise_ratio, box_noise_scale
        self.eval_idx = eval_idx % num_layers
        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_points)
        mask_head = SegmentationHead(hidden_dim, num_layers, mask_downsample_ratio) if mask_downsample_ratio else None
        self.decoder = TransformerDecoder(layer, num_layers, self.eval_idx, self.up, self.reg_scale, reg_max,
                                          activation, mask_head)
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLPHead(hidden_dim, hidden_dim, 4, 3, activation)
        self.query_pos_head = MLPHead(4, hidden_dim, hidden_dim, 3, activation)
        self.pre_bbox_head = MLPHead(hidden_dim, hidden_dim, 4, 3, activation)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLPHead(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, activation)
                                           for _ in range(num_layers))
        prior = -math.log((1 - 0.01) / 0.01)  # class logits start at probability 0.01
        for head in [self.enc_score_head, *self.dec_score_head]:
            nn.init.constant_(head.bias, prior)
        for mlp in [self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, feats, targets=None):
        memory, shapes, anchors, valid = self.memory_and_anchors(feats)
        content, ref_unact, enc = select_queries(memory, anchors, valid, self, self.num_queries)
        dn_meta = attn_mask = None
        if self.training and self.num_denoising > 0:
            support.check_targets(targets)
            dn_content, dn_ref, attn_mask, dn_meta = denoising_queries(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed, self.num_denoising,
                self.label_noise_ratio, self.box_noise_scale)
            content, ref_unact = torch.cat([dn_content, content], 1), torch.cat([dn_ref, ref_unact], 1)
        boxes, logits, corners, refs, pre_boxes, pre_logits, masks = self.decoder(
            content, ref_unact, memory, shapes, self, attn_mask, feats[0])
        if not self.training:
            out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
            return out if masks is None else {**out, "pred_masks": masks[-1]}

        layers = {"pred_logits": logits, "pred_boxes": boxes, "pred_corners": corners, "ref_points": refs}
        if masks is not None:
            layers["pred_masks"] = torch.stack(masks)
        # The original pairs the pre-decoder output with the last layer's masks.
        pre = {"pred_logits": pre_logits, "pred_boxes": pre_boxes, "pred_masks": layers.get("pred_masks", [None])[-1]}
        return {**training_outputs(layers, pre, enc, dn_meta, teacher=True), "up": self.up, "reg_scale": self.reg_scale}


# ---- Heads: ECSeg's mask head, fed by the decoder's query features ----
class SegmentationHead(nn.Module):
    """ECSeg's mask head, RF-DETR's ("RF-DETR: Neural Architecture Search for Real-Time Detection
    Transformers", 2025): stride-8 features -> stride-4 mask features refined by depthwise-conv
    blocks; mask logits (B, Q, H/4, W/4) are dot products with MLP-transformed query features."""

    def __init__(self, dim, num_blocks, downsample_ratio=4):
        super().__init__()
        self.downsample_ratio = downsample_ratio
        self.blocks = nn.ModuleList(DepthwiseConvBlock(dim) for _ in range(num_blocks))
        self.spatial_features_proj = nn.Conv2d(dim, dim, 1)
        self.query_features_block = ResidualMLP(dim)
        self.query_features_proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, spatial, queries):
        """spatial (B, C, H/8, W/8); queries: per decoder layer (B, Q, C) -> per layer (B, Q, H/4, W/4).

        Query set i is read against the mask features after block i. At inference the decoder hands
        over only its last layer, so only the first block runs: the released models were evaluated so.
        """
        size = [s * 8 // self.downsample_ratio for s in spatial.shape[-2:]]
        x = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        masks = []
        for block, q in zip(self.blocks, queries):
            x = block(x)
            q = self.query_features_proj(self.query_features_block(q))
            masks.append(torch.einsum("bchw,bnc->bnhw", self.spatial_features_proj(x), q) + self.bias)
        return masks


class DepthwiseConvBlock(nn.Module):
    """x + GELU(Linear(LayerNorm(dwconv3x3(x)))) on (B, C, H, W)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))
        return x + y.permute(0, 3, 1, 2)


class ResidualMLP(nn.Module):
    """Pre-norm residual MLP block on (..., C): x + Linear(GELU(Linear(LayerNorm(x)))), 4C wide inside."""

    def __init__(self, dim):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.layers = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return x + self.layers(self.norm_in(x))


# ---- ECPose: DETRPose's decoder (Janampa and Pattichis, "DETRPose: Real-time end-to-end transformer model for
# multi-person pose estimation", 2025), a variation on the above (keypoint queries and FDR) ----
# Each query is one person: an instance token and K = 17 keypoint tokens, (B, Q, 1 + K, C), with a
# reference point per token (the keypoints, and their mean for the instance token). Keypoints are
# refined with FDR's distributions, one per coordinate, around the first layer's prediction.

# COCO's per-keypoint OKS constants (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles).
COCO_SIGMAS = torch.tensor([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10


def sine_embed(points, dim_t):
    """Points (..., 2) normalised x, y -> (..., 2 * len(dim_t)): sin/cos of 2*pi*coord / dim_t,
    interleaved, y's features first (DAB-DETR's embedding)."""
    def embed(coord):
        t = coord * (2 * math.pi) / dim_t
        return torch.stack([t[..., 0::2].sin(), t[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([embed(points[..., 1:2]), embed(points[..., 0:1])], -1)


def select_keypoint_queries(memory, anchors, valid, heads, num_queries):
    """ECPose's query selection: the Q encoder positions with the highest class scores regress K keypoints
    from their anchor point; the keypoints and their mean are the reference points of the query's tokens.
    memory (B, L, C), anchors (1, L, 2) inverse sigmoid, valid (1, L, 1), heads: the DETRTransformer (its enc_*
    heads) -> reference points (B, Q, 1 + K, 2) in [0, 1], detached, and the encoder outputs `pred_logits`
    (B, Q, classes), `pred_keypoints` (B, Q, 2K)."""
    selectable = heads.enc_output_norm(heads.enc_output(memory.masked_fill(~valid, 0.0)))
    logits = heads.enc_out_class_embed(selectable)
    gather = top_k(logits, num_queries)
    delta = heads.enc_pose_embed(gather(selectable)).unflatten(-1, (-1, 2))
    keypoints = torch.sigmoid(delta + gather(anchors.expand(memory.shape[0], -1, -1))[:, :, None])  # (B, Q, K, 2)
    ref = torch.cat([keypoints.mean(2, keepdim=True), keypoints], 2).detach()
    return ref, {"pred_logits": gather(logits), "pred_keypoints": keypoints.flatten(-2)}


def keypoint_denoising_queries(targets, num_queries, label_enc, pose_enc, image_size, dn_number=20,
                               label_noise_ratio=0.5, num_classes=80):
    """ECPose's denoising queries (DETRPose's): each group holds every person twice, once with its visible
    keypoints moved a little (positive) and once further (negative), some labels flipped.

    A keypoint of sigma s gets a distance d with d^2 = 2 * alpha * area * (2s)^2 (an OKS of exp(-alpha)
    with the original) for alpha in [0, log 2) (positives) or [log 2, log 10) (negatives); see below
    for how far it actually moves.

    targets: dicts with `labels` (n,), `boxes` (n, 4) normalised cx, cy, w, h, `keypoints` (n, 3K)
    (K normalised x, y pairs, then K visibilities) and `area` (n,) normalised by the image area.
    image_size: (H, W) of the input. Returns query content (B, N, 1 + K, C), reference points
    (B, N, 1 + K, 2) in [0, 1], and the attention mask and meta data of `denoising_groups`.
    """
    counts = [len(t["labels"]) for t in targets]
    device = label_enc.weight.device
    groups, mask, meta = denoising_groups(counts, dn_number, num_queries, device)
    B, G, T = len(counts), max(counts), sum(counts)
    copies = 2 * groups  # copy 2g is group g's positive, 2g + 1 its negative
    K = pose_enc.num_embeddings

    labels = torch.cat([t["labels"] for t in targets]).repeat(copies)
    flip = (torch.rand_like(labels, dtype=torch.float) < label_noise_ratio * 0.5).nonzero().flatten()
    labels = labels.scatter(0, flip, torch.randint_like(flip, 0, num_classes))

    boxes = torch.cat([t["boxes"] for t in targets])
    keypoints = torch.cat([t["keypoints"] for t in targets])
    area = torch.cat([t["area"] for t in targets]) if "area" in targets[0] else boxes[:, 2] * boxes[:, 3] * 0.53
    # The instance token's point: the original averages the box's halves as if it were x1, y1, x2,
    # y2, giving ((cx + w) / 2, (cy + h) / 2); the released models were trained so.
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    points = torch.cat([centre[:, None], keypoints[:, :2 * K].unflatten(-1, (K, 2))], 1).repeat(copies, 1, 1)
    # The centre and invisible keypoints stay put.
    fixed = torch.cat([torch.zeros_like(keypoints[:, :1]), keypoints[:, 2 * K:]], 1).repeat(copies, 1) == 0
    variance = (2 * torch.cat([torch.tensor([0.1]), COCO_SIGMAS]).to(device)) ** 2
    # The original means a unit direction but writes F.normalize(u, -1): -1 is taken as the norm order
    # p, over dim 1, the 1 + K points. Each coordinate moves by u * sum_points(1 / u) instead, u in
    # [0, 1): often tens of times d, and only right and down. The released models were trained so.
    direction = F.normalize(torch.rand_like(points), p=-1, dim=1)
    alpha = torch.zeros_like(points[..., :1]).uniform_(-math.log(1), -math.log(0.5))
    negative = (torch.arange(groups, device=device)[:, None] * 2 * T + T + torch.arange(T, device=device)).flatten()
    alpha[negative] = alpha[negative].uniform_(-math.log(0.5), -math.log(0.1))
    H, W = image_size
    pixel_area = area.repeat(copies)[:, None, None] * H * W
    distance = (alpha * (2 * (pixel_area + torch.finfo(torch.float32).eps) * variance[:, None])).sqrt() / max(H, W)
    points = points + distance.masked_fill(fixed[..., None], 0.0) * direction

    content = torch.cat([label_enc(labels)[:, None], pose_enc.weight.expand(len(labels), -1, -1)], 1)
    image = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(counts)]).repeat(copies)
    slot = (torch.cat([torch.arange(n, device=device) for n in counts])
            + G * torch.arange(copies, device=device)[:, None]).flatten()
    N = copies * G
    dn_content = content.new_zeros(B, N, 1 + K, content.shape[-1])
    dn_content[image, slot] = content
    dn_ref = points.new_zeros(B, N, 1 + K, 2)  # empty slots sit at sigmoid(0) = 0.5
    dn_ref[image, slot] = inverse_sigmoid(points, 1e-3)
    return dn_content, dn_ref.sigmoid(), mask, meta


class PoseDecoderLayer(nn.Module):
    """Attention within each person (among its 1 + K tokens), across persons (per token type, with the denoising mask),
    deformable cross-attention from each token's reference point (fused by a gate), FFN; post-norm.

    The keypoint position embedding is added to the keypoint tokens before the within-person attention and again before
    the cross-attention. The original adds it in place, so the residual paths carry it too; so do they here.
    """

    def __init__(self, dim, nhead, dim_feedforward, dropout, act, num_points):
        super().__init__()
        self.within_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.within_norm = nn.LayerNorm(dim)
        self.across_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.across_norm = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(dim, nhead, num_points, box_reference=False)
        self.gateway = Gate(dim)
        self.linear1, self.linear2 = nn.Linear(dim, dim_feedforward), nn.Linear(dim_feedforward, dim)
        self.act, self.drop = activation(act), nn.Dropout(dropout)  # one stateless dropout for every place
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, pos, ref, values, shapes, attn_mask):
        """x (B, Q, 1 + K, C) tokens; pos (B, Q, K, C) keypoint position embedding; ref (B, Q, 1 + K, 2)."""
        B, Q, T, C = x.shape
        pos = F.pad(pos, (0, 0, 1, 0))  # the instance token gets none
        x = (x + pos).flatten(0, 1)
        x = self.within_norm(x + self.drop(self.within_attn(x, x, x, need_weights=False)[0]))
        x = x.view(B, Q, T, C).transpose(1, 2).flatten(0, 1)  # (B*T, Q, C): one sequence per token type
        x = self.across_norm(x + self.drop(self.across_attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0]))
        x = x.view(B, T, Q, C).transpose(1, 2) + pos
        y = self.cross_attn(x.flatten(1, 2), ref.flatten(1, 2)[:, :, None], values, shapes).view(B, Q, T, C)
        x = self.gateway(x, self.drop(y))
        x = x + self.drop(self.linear2(self.drop(self.act(self.linear1(x)))))
        return self.norm2(x.clamp(-65504, 65504))  # stay inside the fp16 range


class PoseTransformerDecoder(nn.Module):
    """The decoder layers with keypoint FDR: the first layer regresses keypoints from the reference points
    (pre_pose_embed); every layer then predicts, per keypoint coordinate, logits over reg_max + 1 bins, summed over the
    layers; integrated against W(n) and divided by reg_scale, they move the first layer's keypoints."""

    def __init__(self, layer, num_layers, hidden_dim):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_heads = layer.cross_attn.num_heads
        self.half_pose_ref_point_head = MLPHead(hidden_dim, hidden_dim, hidden_dim, 2)
        dim_t = torch.arange(hidden_dim // 2, dtype=torch.float32)
        self.register_buffer("dim_t", 10000 ** (2 * (dim_t // 2) / (hidden_dim // 2)))

    def forward(self, x, ref, memory, shapes, feat, heads, attn_mask=None):
        """x (B, Q, 1 + K, C) query tokens; ref (B, Q, 1 + K, 2) reference points in [0, 1]; memory (B, L, C); feat
        (B, C, H/8, W/8) for the quality estimate; heads: the DETRTransformer, holding the prediction heads and FDR's
        up, reg_scale, reg_max. Returns per-layer stacks of keypoints (B, Q, K, 2) and logits (all layers in training,
        the last at inference), and the first layer's (pre) keypoints and logits (logits None at inference)."""
        values = split_values(memory, shapes, self.num_heads)
        project = weighting_function(heads.reg_max, heads.up, heads.reg_scale)
        out_keypoints, out_logits = [], []
        x_detach = corners_sum = 0
        for i, layer in enumerate(self.layers):
            pos = self.half_pose_ref_point_head(sine_embed(ref[:, :, 1:], self.dim_t))
            if i > 0:
                # FDR below also reads the previous layer's keypoint tokens, detached. The original
                # adds this layer's position embedding to them in place, so they carry it.
                x_detach = (x[:, :, 1:] + pos).detach()
            x = layer(x, pos, ref, values, shapes, attn_mask)
            tokens, instance = x[:, :, 1:], x[:, :, 0]
            if i == 0:
                pre_keypoints = torch.sigmoid(heads.pre_pose_embed(tokens) + inverse_sigmoid(ref[:, :, 1:], 1e-3))
                pre_logits = heads.class_embed[0](instance) if self.training else None
                initial = pre_keypoints.detach()
            corners = heads.pose_embed[i](tokens + x_detach) + corners_sum
            offsets = corners.unflatten(-1, (2, -1)).softmax(-1) @ project  # (B, Q, K, 2)
            keypoints = initial + offsets / heads.reg_scale.abs()
            if self.training or i == len(self.layers) - 1:
                # The quality estimate reads the stride-8 features (B, Q, K, C) at the keypoints (bilinear).
                sampled = F.grid_sample(feat, 2 * keypoints - 1, mode="bilinear", padding_mode="zeros",
                                        align_corners=False).permute(0, 2, 3, 1)
                out_logits.append(heads.lqe_embed[i].quality(heads.class_embed[i](instance), sampled))
                out_keypoints.append(keypoints)
            corners_sum = corners
            ref = torch.cat([keypoints.mean(2, keepdim=True), keypoints], 2).detach()
        return torch.stack(out_keypoints), torch.stack(out_logits), pre_keypoints, pre_logits


class DETRTransformer(QueryDecoder):
    """ECPose's decoder (DETRPose): two-stage query selection, then the keypoint FDR decoder.

    Input: the encoder pyramid [(B, C, H/s, W/s) for s in 8, 16, 32]. Output at inference: `pred_logits`
    (B, Q, num_classes) and `pred_keypoints` (B, Q, 2K) normalised x, y pairs. In training also `aux_outputs`
    (earlier layers), `pre_outputs` (the first layer's regression), `enc_aux_outputs` (the selected encoder queries),
    and with targets the denoising outputs `dn_outputs`, `dn_pre_outputs`, `dn_meta` (the original calls these
    aux_outputs, aux_pre_outputs, aux_interm_outputs, dn_aux_outputs, dn_aux_pre_outputs).

    The denoising constants are fixed in the original: 20 groups' worth of objects, half the label noise ratio of 0.5 as
    flips to a random one of 80 classes (label_enc has 81 entries). So are the 17 keypoints and the 4 sampling points
    per head and level (support.RELEASED_ONLY).
    """

    def __init__(self, num_classes=2, hidden_dim=256, nhead=8, num_queries=300, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.0, activation="relu", reg_max=32, reg_scale=4.0,
                 eval_spatial_size=None):
        super().__init__(reg_scale, eval_spatial_size, 0.01, boxes=False)
        K, C = len(support.KEYPOINT_NAMES), hidden_dim
        self.num_queries, self.reg_max = num_queries, reg_max
        layer = PoseDecoderLayer(C, nhead, dim_feedforward, dropout, activation, [4] * 3)
        self.decoder = PoseTransformerDecoder(layer, num_decoder_layers, C)
        self.keypoint_embedding = nn.Embedding(K, C)
        self.instance_embedding = nn.Embedding(1, C)
        self.tgt_embed = nn.Embedding(num_queries, C)
        self.label_enc = nn.Embedding(80 + 1, C)
        self.pose_enc = nn.Embedding(K, C)
        for name, p in self.named_parameters():  # the deformable attention keeps its own initialisation
            if p.dim() > 1 and ".cross_attn." not in name:
                nn.init.xavier_uniform_(p)

        self.enc_output, self.enc_output_norm = nn.Linear(C, C), nn.LayerNorm(C)
        class_embed = nn.Linear(C, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # probability 0.01 at start
        pose_embed = MLPHead(C, C, 2 * (reg_max + 1), 3)
        self.pre_pose_embed = MLPHead(C, C, 2, 3)
        self.enc_pose_embed = MLPHead(C, 2 * C, 2 * K, 4)
        for mlp in (pose_embed, self.pre_pose_embed, self.enc_pose_embed):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        lqe = LQE(4, 256, 2, None, "relu", groups=K)
        # Copies of one initialisation, as in the original.
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_decoder_layers))
        self.pose_embed = nn.ModuleList(copy.deepcopy(pose_embed) for _ in range(num_decoder_layers))
        self.lqe_embed = nn.ModuleList(copy.deepcopy(lqe) for _ in range(num_decoder_layers))
        self.enc_out_class_embed = copy.deepcopy(class_embed)

    def forward(self, feats, targets=None):
        memory, shapes, anchors, valid = self.memory_and_anchors(feats)
        B, _, C = memory.shape
        Q = self.num_queries
        ref, enc = select_keypoint_queries(memory, anchors, valid, self, Q)
        # Query content is learned: per query (tgt_embed) plus per keypoint, not taken from the encoder.
        keypoint_tokens = self.keypoint_embedding.weight + self.tgt_embed.weight[:, None]  # (Q, K, C)
        x = torch.cat([self.instance_embedding.weight.expand(B, Q, 1, C), keypoint_tokens.expand(B, -1, -1, -1)], 2)

        dn_meta = attn_mask = None
        if self.training and targets is not None and any(len(t["labels"]) for t in targets):
            dn_x, dn_ref, attn_mask, dn_meta = keypoint_denoising_queries(
                targets, Q, self.label_enc, self.pose_enc, [8 * s for s in shapes[0]])
            x, ref = torch.cat([dn_x, x], 1), torch.cat([dn_ref, ref], 1)
        keypoints, logits, pre_keypoints, pre_logits = self.decoder(x, ref, memory, shapes, feats[0], self, attn_mask)
        if not self.training:
            return {"pred_logits": logits[-1], "pred_keypoints": keypoints[-1].flatten(-2)}
        layers = {"pred_logits": logits, "pred_keypoints": keypoints.flatten(-2)}
        pre = {"pred_logits": pre_logits, "pred_keypoints": pre_keypoints.flatten(-2)}
        return training_outputs(layers, pre, enc, dn_meta)


# ---- The networks, building them from a config, and loading weights ----
class ECModel(nn.Module):
    """ECDet, ECSeg and ECPose: backbone (ViT + feature generator) -> hybrid encoder -> decoder.

    `model.eval()(images)` takes (B, 3, H, W) ImageNet-normalised images with H, W multiples of 32
    and returns the decoder's dict; `model.train()(images, targets)` returns what the criterion
    needs (targets: list of dicts with `labels` (n,) and `boxes` (n, 4) normalised cx, cy, w, h;
    ECPose's also `keypoints` (n, 51) and `area` (n,), see `keypoint_denoising_queries`).
    """

    def __init__(self, backbone, encoder, decoder):
        super().__init__()
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder

    memory_format = torch.contiguous_format  # deploy() switches the convolutions to channels-last

    def forward(self, images, targets=None):
        support.check_images(images)
        images = images.contiguous(memory_format=self.memory_format)
        return self.decoder(self.encoder(self.backbone(images)), targets)

    def deploy(self):
        """Eval mode with BatchNorms folded into convolutions, RepVGG branches merged, the decoder layers after
        `eval_idx` dropped, and images and convolution weights in channels-last layout (oneDNN's own, 5-8 % faster on
        the CPU here; the ViT's tokens are already laid out so); outputs are unchanged up to float rounding."""
        self.eval()
        for m in list(self.modules()):
            if isinstance(m, (ConvNorm, RepVGG)):
                m.fuse()
        self.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        dec = self.decoder.decoder
        if isinstance(dec, TransformerDecoder):  # ECPose's evaluates its last layer: nothing to drop
            dec.layers, dec.lqe_layers = dec.layers[:dec.eval_idx + 1], dec.lqe_layers[:dec.eval_idx + 1]
        return self


def build_vit(adapter):
    """The ViT of a ViTAdapter config section: ECViT from the original's keys, or, with a `dinov3`
    key (a hub name such as "dinov3_vitb16" or DINOv3 kwargs), the DINOv3 ViT of the teacher."""
    if "dinov3" in adapter:
        vit = build_dinov3(adapter["dinov3"])
        # The feature generator reads un-normed tokens: the final norm and the mask token get no
        # gradient, and DDP would wait for theirs forever.
        vit.norm.requires_grad_(False)
        vit.mask_token.requires_grad_(False)
        return vit
    return ViT(**{k: v for k, v in adapter.items() if k in support.ECVIT_KEYS})


def build_model(cfg):
    """A network from a preset name ("ecdet_s" ... "ecpose_x") or a config dict in the original's vocabulary (sections
    ViTAdapter, HybridEncoder, ECTransformer or (ECPose) DETRTransformer, plus num_classes and eval_spatial_size)."""
    cfg = preset_config(cfg) if isinstance(cfg, str) else cfg
    support.check_config(cfg)
    adapter = support.config_section(cfg, "ViTAdapter")
    vit = build_vit(adapter)
    # The original's default, [10, 11], is the last two blocks of its depth-12 ECViTs.
    last_two = [len(vit.blocks) - 2, len(vit.blocks) - 1]
    backbone = ViTAdapter(vit, adapter.get("interaction_indexes", last_two), adapter.get("proj_dim"))
    encoder = support.make_section(HybridEncoder, cfg, "HybridEncoder")
    decoder_cls = DETRTransformer if "DETRTransformer" in cfg else ECTransformer
    decoder = support.make_section(decoder_cls, cfg, decoder_cls.__name__, num_classes=cfg["num_classes"],
                                   eval_spatial_size=cfg.get("eval_spatial_size"))
    return ECModel(backbone, encoder, decoder)


def load_weights(net, source):
    """Load a released checkpoint ({"ema": {"module": sd}} or {"model": sd}), a bare state dict or one of this project's
    checkpoints (a path or a mapping) into `net`, strictly: every name and shape must match."""
    net.load_state_dict(support.weights_for(net.state_dict(), source), strict=True)
    return net


# ---- Postprocessing: top-k (query, class) pairs -> labels, pixel boxes, scores (and masks) ----
def num_top_queries(cfg):
    """K of the original's postprocessor: ECDet and ECSeg's num_top_queries, ECPose's num_select."""
    if "DETRPosePostProcessor" in cfg:
        return cfg["DETRPosePostProcessor"]["num_select"]
    return cfg.get("PostProcessor", {}).get("num_top_queries", 300)


def postprocess(outputs, orig_sizes, num_top_queries=300, resize_masks=True):
    """Decoder outputs -> per-image dicts of `labels` (K,) and `scores` (K,), the top K sigmoid scores
    over all (query, class) pairs, with the query's `boxes` (K, 4) pixel x1, y1, x2, y2 in the original
    image (ECDet, ECSeg), `masks` (K, h, w) bool resized to the original image, on the CPU (ECSeg; the
    (K, H/4, W/4) logits when `resize_masks` is False), `keypoints` (K, 51) pixel x, y and a constant 1
    per keypoint, COCO's result format (ECPose, whose labels are COCO category ids: person = 1).
    orig_sizes: (B, 2) as (w, h). ECPose's original keeps K = 60 (DETRPosePostProcessor.num_select)."""
    return per_image(select_top(outputs, orig_sizes, num_top_queries), orig_sizes, resize_masks)


def per_image(top, orig_sizes, resize_masks=True):
    """`select_top`'s batched dict (also an exported graph's outputs, as tensors) -> the per-image
    dicts of `postprocess`."""
    results = [dict(zip(top, row)) for row in zip(*top.values())]
    for r, (w, h) in zip(results, orig_sizes.tolist()):
        if "masks" in r and resize_masks:
            r["masks"] = masks_at_size(r["masks"], (int(h), int(w)))
        if "keypoints" in r:
            r["keypoints"] = torch.cat([r["keypoints"], torch.ones_like(r["keypoints"][..., :1])], -1).flatten(-2)
    return results


def masks_at_size(logits, size, chunk=50):
    """(K, h, w) mask logits -> (K, H, W) bool masks on the CPU at `size` (H, W): bilinear, cut at 0
    (probability 0.5), `chunk` masks at a time so that the float copy at full size stays small."""
    masks = torch.empty(len(logits), *size, dtype=torch.bool)
    for i in range(0, len(logits), chunk):
        part = F.interpolate(logits[i:i + chunk, None].float(), size=size, mode="bilinear", align_corners=False)
        masks[i:i + len(part)] = part[:, 0].cpu() > 0
    return masks


def select_top(outputs, orig_sizes, num_top_queries=300):
    """The batched core of `postprocess`, free of per-image Python loops so that it also runs inside an exported graph:
    `labels` (B, K), `scores` (B, K), and whichever the outputs carry of `boxes` (B, K, 4) pixel x1, y1, x2, y2, `masks`
    (B, K, H/4, W/4) mask logits and `keypoints` (B, K, 17, 2) pixel x, y. orig_sizes: (B, 2) as (w, h)."""
    logits = outputs["pred_logits"]
    B, Q, num_classes = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(num_top_queries, Q * num_classes), dim=-1)
    # Rows of the (B*Q, ...) flattened outputs: one plain gather, not an index tensor as large as the masks.
    rows = index // num_classes + Q * torch.arange(B, device=index.device)[:, None]
    pick = lambda t: t.flatten(0, 1)[rows]
    top = {"labels": index % num_classes}  # in the original's order: labels, boxes, scores, masks
    if "pred_boxes" in outputs:
        boxes = torchvision.ops.box_convert(outputs["pred_boxes"], "cxcywh", "xyxy")
        top["boxes"] = pick(boxes * orig_sizes.repeat(1, 2).unsqueeze(1))
    top["scores"] = scores
    if "pred_masks" in outputs:
        top["masks"] = pick(outputs["pred_masks"])
    if "pred_keypoints" in outputs:
        top["keypoints"] = pick(outputs["pred_keypoints"]).unflatten(-1, (-1, 2)) * orig_sizes[:, None, None, :]
    return top
