"""
ViT-Linearizer in one file: distil a frozen ViT teacher into a linear-time bidirectional Mamba student.

    G. Wei and R. Chellappa, "ViT-Linearizer: Distilling Quadratic Knowledge into Linear-Time Vision Models",
    arXiv 2504.00037 (ICCV 2025). No official code is public; see README.md for what we had to choose.

The file reads like the paper, top to bottom:

1. Teacher   `ViT`, `load_teacher`      a plain pre-norm ViT, loadable from timm / DeiT / OpenAI-CLIP / own files.
2. Student   `VisionMamba`             a Vim-style bidirectional Mamba (selective scan in scan_kernel.py).
3. Masks     `sample_mask`             which patch tokens the student does not see (ratio a = 0.75).
4. Losses    `activation_matching_loss`, `masked_prediction_loss`, `Distiller`   L = L_act + lambda * L_mask.

Symbols of the paper / PAPER.md and where they live:

    f^k          stage-k token features: `Output.hidden[i]` for i in `stage_indices(depth, K)`
    K            number of stages (default 4): `Distiller(stages=K)`
    A^k(i, j)    cosine similarity of tokens i and j at stage k          `similarity_rows`
    Abar^k       A^k with every row L2-normalised                        `similarity_rows`
    L_act        1/(K L) sum_k sum_i (1 - <Abar_tea^k(i,:), Abar_stu^k(i,:)>)   `activation_matching_loss`
    a            mask ratio: exactly round(a N) of the N patches are masked   `sample_mask`
    Y_tea, Y_stu teacher final token features, student predictions (`Distiller.head`)
    L_mask       1/(a L) sum_{i masked} SmoothL1(Y_tea(i,:), Y_stu(i,:))      `masked_prediction_loss`
    lambda       weight of L_mask (default 1)                            `Distiller(lam=...)`

The student's selective scan (Mamba-1, S6), per channel d and state n, with tokens t = 1..L:

    dt_t = softplus(delta_t + delta_bias)                 x_proj/dt_proj of the conv output: `BiMamba.forward`
    h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t             A = -exp(A_log), A, B, C, D as in mamba-ssm
    y_t  = <C_t, h_t> + D u_t,   out = y * silu(z)        `scan_kernel.selective_scan`

Token order: every model returns its tokens as [class, patch_0 .. patch_{N-1}] (row-major patch grid), the teacher's
order, so the losses compare position by position. The student keeps its class token in the middle of the sequence
(Vim) internally and reorders on the way out.
"""
import math
import os
import zipfile
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import bidirectional_selective_scan, selective_scan


class Output(NamedTuple):
    logits: torch.Tensor | None   # (B, num_classes), None for a model without a classifier head
    tokens: torch.Tensor          # (B, 1+N, dim) final features after the final norm, class token first
    hidden: list                  # depth x (B, 1+N, dim) each block's output (before the final norm), class token first


def check_resolution(images, patch_size):
    H, W = images.shape[-2:]
    if images.ndim != 4 or H % patch_size or W % patch_size:
        raise ValueError(f"images must be (B, 3, H, W) with H and W multiples of the patch size {patch_size}, "
                         f"got {tuple(images.shape)}: resize or crop them to a multiple of {patch_size}")
    return H // patch_size, W // patch_size


def resize_pos_embed(pos_embed, grid_hw):
    """Bicubic resampling of a (1, gh*gw, D) patch-grid position embedding to grid_hw (class position kept aside)."""
    n = pos_embed.shape[1]
    side = math.isqrt(n)
    if (side, side) == tuple(grid_hw):
        return pos_embed
    grid = pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)                   # (1, D, side, side)
    grid = F.interpolate(grid.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)                        # (1, gh*gw, D)


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a random p of the samples, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


# ----------------------------------------------------------------------------------------------------------------
# 1. Teacher: a plain ViT

@dataclass
class ViTConfig:
    img_size: int = 224        # native resolution of the position embedding; any multiple of patch_size runs
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000    # 0: no classifier head (e.g. a CLIP image tower)
    act: str = "gelu"          # "quick_gelu" for OpenAI CLIP weights
    norm_pre: bool = False     # CLIP's ln_pre before the blocks
    eps: float = 1e-6          # LayerNorm eps: 1e-6 timm/DeiT, 1e-5 CLIP


TEACHER_PRESETS = {
    "demo": ViTConfig(img_size=32, patch_size=4, dim=96, depth=4, heads=3, num_classes=10),
    "vit_t16": ViTConfig(dim=192, depth=12, heads=3),
    "vit_s16": ViTConfig(dim=384, depth=12, heads=6),
    "vit_b16": ViTConfig(dim=768, depth=12, heads=12),
}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                              # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The teacher: patch embedding, class token, learned position embedding, pre-norm blocks, final norm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.dim % cfg.heads or cfg.img_size % cfg.patch_size:
            raise ValueError(f"ViTConfig: dim {cfg.dim} must divide by heads {cfg.heads} and img_size "
                             f"{cfg.img_size} by patch_size {cfg.patch_size}")
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.dim))     # class position first (timm)
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        for t in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):                                                         # (B, 3, H, W)
        grid_hw = check_resolution(images, self.cfg.patch_size)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                         # (B, N, D)
        pos_cls, pos_grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        x = x + resize_pos_embed(pos_grid, grid_hw)
        x = torch.cat([(self.cls_token + pos_cls).expand(len(x), -1, -1), x], dim=1)   # (B, 1+N, D)
        x = self.norm_pre(x)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        tokens = self.norm(x)
        logits = self.head(tokens[:, 0]) if self.head is not None else None
        return Output(logits, tokens, hidden)

    def no_weight_decay(self):
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n in ("cls_token", "pos_embed")}


# Loading teachers. Every format is first converted to this file's key names, then loaded exactly (no key may be
# missing, unexpected or mis-shaped). Checkpoints are untrusted: tensors only (weights_only=True), never pickles.

def read_state_dict(path):
    """A checkpoint file as a dict of tensors / plain values; TorchScript archives (OpenAI CLIP) keep their state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: give a file path or timm:<model-name>")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path} is a .safetensors file: pip install safetensors to read it") from None
        return load_file(path)
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} as tensors (weights_only=True): {str(e).splitlines()[0]}") \
            from None


def convert_clip(sd):
    """OpenAI CLIP / open_clip image tower (visual.*) -> this file's ViT keys. visual.proj (the image-text
    projection of the class token) is not part of the token features and is dropped."""
    rename = [("conv1.", "patch_embed."), ("transformer.resblocks.", "blocks."), ("ln_1.", "norm1."),
              ("ln_2.", "norm2."), ("attn.in_proj_", "attn.qkv."), ("attn.out_proj.", "attn.proj."),
              ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm.")]
    out = {}
    for k, v in sd.items():
        if not k.startswith("visual.") or k == "visual.proj":
            continue                                                                   # text tower, projection
        k = k[len("visual."):]
        for a, b in rename:
            k = k.replace(a, b)
        out[k] = v
    out["cls_token"] = out.pop("class_embedding").reshape(1, 1, -1)
    out["pos_embed"] = out.pop("positional_embedding").unsqueeze(0)
    weight = out["patch_embed.weight"]
    out.setdefault("patch_embed.bias", weight.new_zeros(weight.shape[0]))          # CLIP's conv1 has no bias
    return out


def convert_timm(sd):
    """timm / DeiT ViT keys -> this file's (the same names, patch_embed.proj -> patch_embed)."""
    return {k.replace("patch_embed.proj.", "patch_embed."): v for k, v in sd.items()}


def infer_vit_config(sd, **overrides):
    """Architecture from the weights; heads by the 64-dims-per-head convention unless given."""
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.weight", "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"incomplete ViT weights: missing {', '.join(missing)} (a partial or truncated checkpoint?)")
    dim = sd["cls_token"].shape[-1]
    n_patches = sd["pos_embed"].shape[1] - 1
    grid, patch = math.isqrt(n_patches), sd["patch_embed.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    clip = "norm_pre.weight" in sd
    cfg = ViTConfig(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, heads=max(1, dim // 64),
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                    num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                    act="quick_gelu" if clip else "gelu", norm_pre=clip, eps=1e-5 if clip else 1e-6)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


def load_exact(model, sd, source):
    """load_state_dict that names every missing, unexpected and mis-shaped key in one error."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        problems = [f"{name}: {show(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd)
    return model


def model_from_checkpoint(ckpt, source="checkpoint"):
    """Rebuild a model from this project's checkpoint dict {"kind", "config", "model"} (train.py writes these)."""
    kinds = {"vit": (ViT, ViTConfig), "vision_mamba": (VisionMamba, MambaConfig)}
    if ckpt.get("kind") not in kinds:
        raise ValueError(f"{source}: kind {ckpt.get('kind')!r} is not one of {sorted(kinds)}")
    model_cls, cfg_cls = kinds[ckpt["kind"]]
    known = {f.name for f in fields(cfg_cls)}
    if set(ckpt["config"]) - known:
        raise ValueError(f"{source}: unknown config fields {sorted(set(ckpt['config']) - known)}")
    return load_exact(model_cls(cfg_cls(**ckpt["config"])), ckpt["model"], source)


def load_teacher(spec, img_size=None, num_classes=None, heads=None, act=None):
    """A frozen ViT teacher (eval mode, no grad) from one of:
    - a timm / DeiT ViT checkpoint (.pth / .bin / .safetensors; DeiT files wrap it in "model"), incl. timm's CLIP ViTs;
    - an OpenAI CLIP / open_clip checkpoint (visual.* keys), also a TorchScript archive as OpenAI ships them;
    - this project's own checkpoint (written by train.py);
    - "timm:<model-name>" when timm is installed (downloads pretrained weights through timm).
    img_size: the resolution you will run at (checked against the patch size; any multiple works).
    num_classes: a new, randomly initialised head when it differs from the checkpoint's (0 removes the head).
    heads / act ("gelu" | "quick_gelu"): override what is inferred (64 dims per head; QuickGELU for CLIP weights)."""
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ImportError(f"{spec}: pip install timm to load timm models by name") from None
        source = timm.create_model(spec[len("timm:"):], pretrained=True)
        act = act or ("quick_gelu" if "QuickGELU" in type(source.blocks[0].mlp.act).__name__ else "gelu")
        heads = heads or source.blocks[0].attn.num_heads
        sd = source.state_dict()
    else:
        sd = read_state_dict(spec)
    if isinstance(sd, dict) and "kind" in sd and "config" in sd:
        model = model_from_checkpoint(sd, spec)
        if not isinstance(model, ViT):
            raise ValueError(f"{spec} holds a {type(model).__name__}, not a ViT teacher")
    else:
        for wrapper in ("model", "state_dict", "module"):                               # DeiT: {"model": sd}
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if any(k.startswith("visual.") for k in sd):
            sd = convert_clip(sd)
        elif "blocks.0.attn.qkv.weight" in sd:
            sd = convert_timm(sd)
        else:
            raise ValueError(f"{spec}: neither a timm/DeiT ViT (blocks.0.attn.qkv.weight) nor a CLIP image tower "
                             f"(visual.*); first keys: {', '.join(list(sd)[:5])}")
        model = load_exact(ViT(infer_vit_config(sd, heads=heads, act=act)), sd, spec)
    if img_size is not None:
        check_resolution(torch.empty(1, 3, img_size, img_size, device="meta"), model.cfg.patch_size)
    if num_classes is not None and num_classes != model.cfg.num_classes:
        model.cfg.num_classes = num_classes
        model.head = nn.Linear(model.cfg.dim, num_classes) if num_classes else None
        if model.head is not None:
            nn.init.trunc_normal_(model.head.weight, std=0.02)
            nn.init.zeros_(model.head.bias)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# 2. Student: a bidirectional Mamba (Vision Mamba, "v2" blocks)

@dataclass
class MambaConfig:
    img_size: int = 224
    patch_size: int = 16
    dim: int = 384
    depth: int = 24
    d_state: int = 16          # N
    d_conv: int = 4
    expand: int = 2            # inner width E = expand * dim
    dt_rank: int = 0           # 0: ceil(dim / 16)
    num_classes: int = 1000
    bidirectional: str = "fused"    # "fused": both directions in every block; "alternate": one per block, flipping
    drop_path: float = 0.0
    scan_backend: str = "auto"      # "auto" | "triton" | "chunked" | "reference", see scan_kernel.selective_scan
    eps: float = 1e-5


STUDENT_PRESETS = {
    "demo": MambaConfig(img_size=32, patch_size=4, dim=96, depth=8, num_classes=10),
    "tiny": MambaConfig(dim=192),
    "small": MambaConfig(dim=384),
    "base": MambaConfig(dim=768),
}
STUDENT_PRESETS.update({f"{name}_alt": MambaConfig(**{**asdict(cfg), "bidirectional": "alternate"})
                        for name, cfg in list(STUDENT_PRESETS.items())})


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer. Shared in_proj / out_proj; each direction has its own conv1d, x_proj,
    dt_proj, A_log and D, stacked on a leading axis (0 = forward, 1 = backward). The backward direction scans the
    tokens in reverse without flipping any tensor: its conv is anti-causal and the scan runs t = L-1 .. 0, which is
    exactly Vim's flip -> conv -> scan -> flip.
    directions = "both" (Vim v2: out = out_proj(silu(z) * (y_fwd + y_bwd) / 2)), "forward" or "backward"."""

    def __init__(self, cfg: MambaConfig, directions="both"):
        super().__init__()
        self.cfg, self.directions = cfg, directions
        E, N, R, K = cfg.expand * cfg.dim, cfg.d_state, cfg.dt_rank or math.ceil(cfg.dim / 16), cfg.d_conv
        ndir = 2 if directions == "both" else 1
        self.in_proj = nn.Linear(cfg.dim, 2 * E, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(ndir, E, K).uniform_(-K ** -0.5, K ** -0.5))   # nn.Conv1d init
        self.conv_bias = nn.Parameter(torch.empty(ndir, E).uniform_(-K ** -0.5, K ** -0.5))
        self.x_proj = nn.Parameter(torch.empty(ndir, R + 2 * N, E).uniform_(-E ** -0.5, E ** -0.5))
        self.dt_proj = nn.Parameter(torch.empty(ndir, E, R).uniform_(-R ** -0.5, R ** -0.5))
        # dt initialised log-uniform in [1e-3, 0.1] through the inverse softplus, for BOTH directions
        dt = torch.exp(torch.rand(ndir, E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(ndir, E, 1))  # S4D-real
        self.D = nn.Parameter(torch.ones(ndir, E))
        self.out_proj = nn.Linear(E, cfg.dim, bias=False)

    def conv(self, x):                                                                 # (B, E, L) -> (ndir, B, E, L)
        K = self.cfg.d_conv
        outs = []
        for w, b, d in zip(self.conv_weight, self.conv_bias, self.scan_directions()):
            if d == "forward":                                                         # causal
                outs.append(F.conv1d(F.pad(x, (K - 1, 0)), w.unsqueeze(1), b, groups=x.shape[1]))
            else:                                                                      # anti-causal = flip, conv, flip
                outs.append(F.conv1d(F.pad(x, (0, K - 1)), w.flip(-1).unsqueeze(1), b, groups=x.shape[1]))
        return F.silu(torch.stack(outs))

    def scan_directions(self):
        return ("forward", "backward") if self.directions == "both" else (self.directions,)

    def forward(self, hidden):                                                         # (B, L, D)
        R, N = self.dt_proj.shape[-1], self.cfg.d_state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                                   # (B, L, E) each
        u = self.conv(x.transpose(1, 2))                                               # (ndir, B, E, L)
        x_dbl = u.transpose(-1, -2) @ self.x_proj.transpose(-1, -2).unsqueeze(1)      # (ndir, B, L, R+2N)
        dt_low, B, C = x_dbl.split([R, N, N], dim=-1)
        delta = (dt_low @ self.dt_proj.transpose(-1, -2).unsqueeze(1)).transpose(-1, -2)   # (ndir, B, E, L)
        B, C = B.transpose(-1, -2), C.transpose(-1, -2)                                # (ndir, B, N, L)
        A = -torch.exp(self.A_log.float())                                             # (ndir, E, N)
        z = z.transpose(1, 2)                                                          # (B, E, L)
        if self.directions == "both":
            y = bidirectional_selective_scan(u, delta, A, B, C, self.D.float(), z, self.dt_bias.float(),
                                             delta_softplus=True, backend=self.cfg.scan_backend) / 2
        else:
            y = selective_scan(u[0], delta[0], A[0], B[0], C[0], self.D[0].float(), z, self.dt_bias[0].float(),
                               delta_softplus=True, reverse=self.directions == "backward",
                               backend=self.cfg.scan_backend)
        return self.out_proj(y.transpose(1, 2))                                        # (B, L, D)


class MambaBlock(nn.Module):
    """Pre-norm residual block; the residual stream stays fp32 (bf16 only inside the mixer under autocast)."""

    def __init__(self, cfg, directions, drop_path):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.mixer = BiMamba(cfg, directions)
        self.drop_path = drop_path

    def forward(self, x):                                                              # (B, L, D) fp32
        return x + drop_path(self.mixer(self.norm(x)), self.drop_path, self.training).float()


class VisionMamba(nn.Module):
    """The student: patch embedding, [mask] tokens, class token in the middle of the sequence, Mamba blocks."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        if cfg.bidirectional not in ("fused", "alternate"):
            raise ValueError(f"MambaConfig.bidirectional must be 'fused' or 'alternate', got {cfg.bidirectional!r}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"MambaConfig: img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))                         # kept apart from the grid,
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.dim))            # so resizing cannot mix them up
        if cfg.bidirectional == "fused":
            directions = ["both"] * cfg.depth
        else:
            directions = ["forward" if i % 2 == 0 else "backward" for i in range(cfg.depth)]
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MambaBlock(cfg, d, r) for d, r in zip(directions, rates))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        for t in (self.cls_token, self.mask_token, self.pos_cls, self.pos_embed):
            nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if name.endswith("out_proj"):                                          # GPT-2 / Mamba residual scaling
                    m.weight.data /= math.sqrt(cfg.depth)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images, mask=None):                                             # (B, 3, H, W), (B, N) bool
        grid_hw = check_resolution(images, self.cfg.patch_size)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                         # (B, N, D)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be (batch, patches) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + resize_pos_embed(self.pos_embed, grid_hw)
        middle = x.shape[1] // 2                                                       # Vim: class token in the middle
        cls = (self.cls_token + self.pos_cls).expand(len(x), -1, -1)
        x = torch.cat([x[:, :middle], cls, x[:, middle:]], dim=1).float()              # (B, 1+N, D)
        order = torch.cat([torch.tensor([middle]), torch.arange(middle), torch.arange(middle + 1, x.shape[1])])
        order = order.to(x.device)                                                     # sequence -> class-first order
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x.index_select(1, order))
        tokens = self.norm(x).index_select(1, order)
        logits = self.head(tokens[:, 0]) if self.head is not None else None
        return Output(logits, tokens, hidden)

    def no_weight_decay(self):
        skip = ("cls_token", "mask_token", "pos_cls", "pos_embed", "A_log", "D", "dt_bias", "conv_bias")
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n.split(".")[-1] in skip}


# ----------------------------------------------------------------------------------------------------------------
# 3. Masks: which patches the student does not see

def sample_mask(batch_size, grid_hw, ratio=0.75, kind="random", generator=None, device=None):
    """(B, N) bool, True = masked, with exactly round(ratio * N) masked patches in every image.
    kind "random": uniform without replacement. kind "block": BEiT-style rectangles (area >= 16 patches, aspect
    0.3 .. 3.3) until the count is reached; if the rectangles get stuck the last few patches are drawn at random."""
    gh, gw = grid_hw
    n = gh * gw
    n_mask = round(ratio * n)
    if not 0 <= ratio <= 1 or kind not in ("random", "block"):
        raise ValueError(f"sample_mask: ratio must be in [0, 1] and kind 'random' or 'block', got {ratio}, {kind!r}")
    if kind == "random":
        order = torch.rand(batch_size, n, generator=generator).argsort(dim=1)
        return torch.zeros(batch_size, n, dtype=torch.bool).scatter_(1, order[:, :n_mask], True).to(device)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    masks = torch.zeros(batch_size, gh, gw, dtype=torch.bool)
    for m in masks:
        for _ in range(10 * n):                                                        # rectangles, BEiT's recipe
            left = n_mask - int(m.sum())
            if left < min(16, n_mask) or left == 0:
                break
            area = uniform(min(16, left), left)
            aspect = math.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < gh and 0 < w < gw):
                continue
            top = int(torch.randint(gh - h + 1, (), generator=generator))
            lft = int(torch.randint(gw - w + 1, (), generator=generator))
            patch = m[top:top + h, lft:lft + w]
            if int((~patch).sum()) <= left:                                            # never overshoot the count
                patch.fill_(True)
        free = (~m).flatten().nonzero().squeeze(1)                                     # top up to the exact count
        fill = free[torch.randperm(len(free), generator=generator)[:n_mask - int(m.sum())]]
        m.view(-1)[fill] = True
    return masks.flatten(1).to(device)


# ----------------------------------------------------------------------------------------------------------------
# 4. Losses

def stage_indices(depth, stages):
    """Block indices (0-based) ending each of K evenly spaced stages: depth 12, K 4 -> [2, 5, 8, 11]."""
    if not 1 <= stages <= depth:
        raise ValueError(f"cannot split {depth} blocks into {stages} stages: use 1 <= stages <= depth")
    return [round((k + 1) * depth / stages) - 1 for k in range(stages)]


def similarity_rows(features, keep):
    """Abar: the cosine-similarity map A(i, j) between kept tokens, each row L2-normalised.
    features (B, L, C); keep (B, L) bool -> (B, L, L), zero outside kept rows/columns."""
    f = F.normalize(features.float(), dim=-1)
    A = f @ f.transpose(1, 2)                                                          # (B, L, L) cosine similarity
    A = A * (keep.unsqueeze(1) & keep.unsqueeze(2))                                    # only kept token pairs
    return F.normalize(A, dim=-1)


def activation_matching_loss(teacher_feats, student_feats, mask=None, scope="visible"):
    """L_act = 1/(K L) sum_k sum_i (1 - <Abar_tea^k(i,:), Abar_stu^k(i,:)>), averaged over the batch.
    teacher_feats / student_feats: K stage outputs (B, 1+N, C_tea) / (B, 1+N, C_stu), class token first; widths
    may differ (no projection). mask (B, N): True = masked patch. scope: "visible" (class + unmasked patches, the
    paper's default), "all" (every token, masked ones too), "cls" (only the class token's row, over visible tokens)."""
    if len(teacher_feats) != len(student_feats) or scope not in ("visible", "all", "cls"):
        raise ValueError(f"activation_matching_loss: need as many teacher as student stages "
                         f"({len(teacher_feats)} vs {len(student_feats)}) and scope visible/all/cls, got {scope!r}")
    B, L = student_feats[0].shape[:2]
    keep = torch.ones(B, L, dtype=torch.bool, device=student_feats[0].device)
    if mask is not None and scope != "all":
        keep[:, 1:] = ~mask
    rows = keep.clone()
    if scope == "cls":
        rows[:, 1:] = False
    loss = 0.0
    for f_tea, f_stu in zip(teacher_feats, student_feats):
        cos = (similarity_rows(f_tea, keep) * similarity_rows(f_stu, keep)).sum(-1)    # (B, L)
        loss = loss + ((1 - cos) * rows).sum() / rows.sum()
    return loss / len(teacher_feats)


def masked_prediction_loss(pred, target, mask):
    """L_mask = 1/(a L) sum_{i masked} SmoothL1(Y_tea(i,:), Y_stu(i,:)), SmoothL1 averaged over channels.
    pred, target (B, N, C) patch tokens only; mask (B, N) True = masked. Visible positions do not count."""
    per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)   # (B, N)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class Distiller(nn.Module):
    """The distillation objective L = am_weight * L_act + lam * L_mask, no labels. One student forward on the masked
    image feeds both losses; the frozen teacher sees the full image. Holds the trainable MP head (student width ->
    teacher width; identity when they match). target: the teacher's final features after ("post_norm") or before
    ("pre_norm") its final norm — the paper does not say which."""

    def __init__(self, teacher, student, stages=4, am_scope="visible", lam=1.0, am_weight=1.0, target="post_norm"):
        super().__init__()
        if target not in ("post_norm", "pre_norm"):
            raise ValueError(f"Distiller: target must be 'post_norm' or 'pre_norm', got {target!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        t_dim, s_dim = teacher.cfg.dim, student.cfg.dim
        self.head = nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()
        self.teacher_stages = stage_indices(teacher.cfg.depth, stages)
        self.student_stages = stage_indices(student.cfg.depth, stages)
        self.am_scope, self.lam, self.am_weight, self.target = am_scope, lam, am_weight, target

    def train(self, mode=True):                                                        # the teacher stays in eval
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images, mask):                                                   # (B, 3, H, W), (B, N) bool
        with torch.no_grad():
            tea = self.teacher(images)
        stu = self.student(images, mask)
        am = activation_matching_loss([tea.hidden[i] for i in self.teacher_stages],
                                      [stu.hidden[i] for i in self.student_stages], mask, self.am_scope)
        target = tea.tokens if self.target == "post_norm" else tea.hidden[-1]
        mp = masked_prediction_loss(self.head(stu.tokens[:, 1:]), target[:, 1:], mask)
        return dict(loss=self.am_weight * am + self.lam * mp, am=am, mp=mp)
