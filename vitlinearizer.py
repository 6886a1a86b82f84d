"""
ViT-Linearizer in one file: distil a frozen ViT teacher into a linear-time bidirectional Mamba student.

    G. Wei and R. Chellappa, "ViT-Linearizer: Distilling Quadratic Knowledge into Linear-Time Vision Models",
    arXiv 2504.00037 (ICCV 2025). No official code is public; see README.md for what we had to choose.

The file reads like the paper, top to bottom:

1. Teacher   `ViT`                     a pre-norm ViT in the variants of CLIP, DeiT-III, DINOv2, SigLIP, MAE, ...
2. Student   `VisionMamba`             a Vim-style bidirectional Mamba (selective scan in scan_kernel.py);
   2b.       `Adventurer`              the paper's own student: Mamba-2 (SSD scan in scan_kernel.py), class token last.
3. Masks     `sample_mask`             which patch tokens the student does not see (ratio a = 0.75).
4. Losses    `activation_matching_loss`, `masked_prediction_loss`, `Distiller`   L = L_act + lambda * L_mask.
5. Checkpoints `load_teacher`, `read_checkpoint`, ...   timm, OpenAI / open_clip CLIP, Hugging Face, DINOv2 torch-hub
                                        files, and this project's own checkpoints.

The paper's symbols (activation matching and masked prediction, as the paper defines them; README "The paper in the
code") and where they live:

    f^k          stage-k token features: `Output.hidden[i]` for i in `stage_indices(depth, K)`
    K            number of stages (default 4): `Distiller(stages=K)`
    A^k(i, j)    cosine similarity of tokens i and j at stage k          `similarity_rows`
    Abar^k       A^k with every row L2-normalised                        `similarity_rows`
    L_act        1/(K L) sum_k sum_i (1 - <Abar_tea^k(i,:), Abar_stu^k(i,:)>)   `activation_matching_loss`
    a            mask ratio: exactly round(a N) of the N patches are masked   `sample_mask`
    Y_tea, Y_stu teacher final token features, student predictions (`Distiller.mp_proj` of its final tokens)
    L_mask       1/(a L) sum_{i masked} SmoothL1(Y_tea(i,:), Y_stu(i,:))      `masked_prediction_loss`
    lambda       weight of L_mask (default 1)                            `Distiller(lam=...)`

The student's selective scan (Mamba-1, S6), per channel d and state n, with tokens t = 1..L:

    dt_t = softplus(delta_t + delta_bias)                 x_proj/dt_proj of the conv output: `BiMamba.forward`
    h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t             A = -exp(A_log), A, B, C, D as in mamba-ssm
    y_t  = <C_t, h_t> + D u_t,   out = y * silu(z)        `scan_kernel.selective_scan`

Adventurer's SSD (Mamba-2) scan is the same recurrence with one scalar decay per head h and a state per head
(headdim P x state N):   h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D_h x_t     `Mamba2.forward`,
`scan_kernel.ssd_scan`; gated output norm(y * silu(z)) (`GatedRMSNorm`).

Token order: every model returns its tokens as [class, patch_0 .. patch_{N-1}] (row-major patch grid), the teacher's
order, so the losses compare position by position. The students keep their class token in the middle of the sequence
(Vim) or last (Adventurer) internally and reorder on the way out. A teacher with register tokens (DINOv2 reg4) keeps
them in its forward and leaves them out of its outputs; a teacher without a class token (SigLIP) puts the mean of its
patch tokens in the class slot, in every returned layer.
"""
import argparse
import json
import math
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from scan_kernel import SSD_CHUNK, bidirectional_selective_scan, selective_scan, ssd_scan


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


# pixel mean / std (pixels in [0, 1]) that the families' libraries declare
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)      # timm / torchvision, DeiT, DINOv2
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)                                                          # SigLIP, AugReg, HF ViT: [-1, 1]
PIXEL_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "openai_clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
               "half": (HALF, HALF)}


def normalize(images, model):
    """A model's input from pixels in [0, 1] (B, 3, H, W): (x - pixel_mean) / pixel_std with the model's own stats
    (model: a ViT / VisionMamba, one wrapped in DDP, or a config). Every model's forward takes this, so that each one
    sees its pixels as it was trained to: the teacher its library's normalisation, the student its own."""
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "module", None), "cfg", None) or model
    mean = torch.tensor(cfg.pixel_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def resize_pos_embed(pos_embed, grid_hw, antialias=False):
    """Bicubic resampling of a (1, gh*gw, D) patch-grid position embedding to grid_hw (class position kept aside).
    antialias=True is timm's and open_clip's resampling, False Hugging Face's (and ours)."""
    n = pos_embed.shape[1]
    side = math.isqrt(n)
    if (side, side) == tuple(grid_hw):
        return pos_embed
    grid = pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)                   # (1, D, side, side)
    grid = F.interpolate(grid.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)                        # (1, gh*gw, D)


def sincos_pos_init_(model):
    """MAE-style 2-D sin-cos values for the patch-grid rows of model.pos_embed (still learned afterwards): a ViT
    trained from scratch on little data otherwise spends its first hundreds of steps discovering the 2-D layout."""
    pos = model.pos_embed                                                   # (1, [1+] g*g, D); Adventurer (1, g*g+1, D)
    g, d = model.cfg.img_size // model.cfg.patch_size, pos.shape[-1]
    grid = slice(0, g * g) if isinstance(model, Adventurer) else slice(-g * g, None)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(d // 4) / max(d // 4, 1))
    angles = [c.flatten()[:, None] * omega for c in (xs, ys)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)   # (g*g, 4*(d//4))
    with torch.no_grad():
        pos[0, grid].zero_()
        pos[0, grid, :table.shape[1]] = 0.5 * table


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a random p of the samples, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


def run_block(block, x, checkpoint=False):
    """block(x); checkpoint (a model's `grad_checkpointing`, train.py --grad-ckpt): activation checkpointing, which
    keeps only the block's input for the backward and runs the block again there. Less memory for about 1/3 more
    compute per training step; the same values and gradients (drop path draws the same numbers again)."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


# ----------------------------------------------------------------------------------------------------------------
# 1. Teacher: a pre-norm ViT, in the variants of the families people distil from (section 5 loads them)

@dataclass
class ViTConfig:
    img_size: int = 224        # native resolution of the position embedding; any multiple of patch_size runs
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0     # MLP hidden width / dim (SwiGLU: the width of each of fc1's two halves)
    num_classes: int = 1000    # 0: no classifier head (e.g. a CLIP image tower)
    act: str = "gelu"          # MLP: "gelu" | "gelu_tanh" (SigLIP) | "quick_gelu" (OpenAI CLIP) | "swiglu" (DINOv2-g)
    norm_pre: bool = False     # CLIP's ln_pre before the blocks
    eps: float = 1e-6          # LayerNorm eps: 1e-6 timm/DeiT/DINOv2/SigLIP, 1e-5 CLIP, 1e-12 Hugging Face ViT
    class_token: bool = True   # False (SigLIP): no class token; the output's class slot is the mean patch token
    registers: int = 0         # extra learned tokens after the class token (DINOv2 reg4); not in the output
    patch_bias: bool = True    # False: CLIP's patch embedding has no bias
    qkv_bias: bool = True
    layer_scale: float = 0.0   # > 0: per-channel scales of both residual branches, starting at this (DeiT-III, DINOv2)
    final_norm: str = "tokens"   # "tokens": LayerNorm on every output token; "pooled": none on the tokens, fc_norm
                                 # on their mean patch token before the head (MAE fine-tuned); "none"
    pos_antialias: bool = False  # resample position embeddings with antialias (timm, open_clip) or without (HF, ours)
    drop_path: float = 0.0     # stochastic depth, rising linearly to this rate in the last block
    pixel_mean: tuple = IMAGENET_MEAN   # the input it expects is (pixels in [0, 1] - mean) / std (normalize):
    pixel_std: tuple = IMAGENET_STD     # ImageNet's, or a loaded teacher's library's (load_teacher)


TEACHER_PRESETS = {
    "demo": ViTConfig(img_size=32, patch_size=4, dim=96, depth=4, heads=3, num_classes=10),
    "vit_t16": ViTConfig(dim=192, depth=12, heads=3),
    "vit_s16": ViTConfig(dim=384, depth=12, heads=6),
    "vit_b16": ViTConfig(dim=768, depth=12, heads=12),
}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SwiGLU(nn.Module):
    """The gated MLP activation of DINOv2 giant: fc1 computes both halves, silu(first) * second."""

    def forward(self, x):                                                              # (..., 2 * hidden)
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU,
               "swiglu": SwiGLU}


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                              # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden if act == "swiglu" else hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DeiT-III, DINOv2)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class ViTBlock(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg.dim, round(cfg.dim * cfg.mlp_ratio), cfg.act)
        self.ls2 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class ViT(nn.Module):
    """The teacher: patch embedding, class token (+ registers), learned position embedding, pre-norm blocks, final
    norm. The sequence is [class, registers, patches]; the output drops the registers, so every teacher returns
    [class, patches] like the student (a model without a class token puts its mean patch token in the class slot)."""

    grad_checkpointing = False                                  # run_block: activation checkpointing

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.dim % cfg.heads or cfg.img_size % cfg.patch_size:
            raise ValueError(f"ViTConfig: dim {cfg.dim} must divide by heads {cfg.heads} and img_size "
                             f"{cfg.img_size} by patch_size {cfg.patch_size}")
        if cfg.act not in ACTIVATIONS or cfg.final_norm not in ("tokens", "pooled", "none"):
            raise ValueError(f"ViTConfig: act must be one of {sorted(ACTIVATIONS)} and final_norm tokens / pooled / "
                             f"none, got {cfg.act!r}, {cfg.final_norm!r}")
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, cfg.dim)) if cfg.registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.class_token + grid * grid, cfg.dim))  # class position first
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.norm_pre else nn.Identity()
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(ViTBlock(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.final_norm == "tokens" else nn.Identity()
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.final_norm == "pooled" else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        for t in (self.cls_token, self.reg_token, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images):                                                         # (B, 3, H, W)
        grid_hw = check_resolution(images, self.cfg.patch_size)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                         # (B, N, D)
        n_cls = int(self.cfg.class_token)
        x = x + resize_pos_embed(self.pos_embed[:, n_cls:], grid_hw, self.cfg.pos_antialias)
        prefix = [self.cls_token + self.pos_embed[:, :1]] if n_cls else []             # registers get no position
        prefix += [self.reg_token] if self.reg_token is not None else []
        x = torch.cat([p.expand(len(x), -1, -1) for p in prefix] + [x], dim=1)        # (B, T+N, D), T = class + regs
        x = self.norm_pre(x)
        hidden = []
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing)
            hidden.append(self.class_and_patches(x))
        tokens = self.class_and_patches(self.norm(x))                                  # (B, 1+N, D)
        if self.head is None:
            return Output(None, tokens, hidden)
        pooled = self.fc_norm(tokens[:, 1:].mean(1)) if self.cfg.final_norm == "pooled" else tokens[:, 0]
        return Output(self.head(pooled), tokens, hidden)

    def class_and_patches(self, x):                                                    # (B, T+N, D) -> (B, 1+N, D)
        T = int(self.cfg.class_token) + self.cfg.registers
        if T == 1 and self.cfg.class_token:
            return x
        patches = x[:, T:]
        first = x[:, :1] if self.cfg.class_token else patches.mean(1, keepdim=True)
        return torch.cat([first, patches], dim=1)

    def no_weight_decay(self):
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n in ("cls_token", "reg_token", "pos_embed")}


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
    pixel_mean: tuple = IMAGENET_MEAN   # the input it expects is (pixels in [0, 1] - mean) / std (normalize)
    pixel_std: tuple = IMAGENET_STD


STUDENT_PRESETS = {
    "demo": MambaConfig(img_size=32, patch_size=4, dim=96, depth=8, num_classes=10),
    "tiny": MambaConfig(dim=192),
    "small": MambaConfig(dim=384),
    "base": MambaConfig(dim=768),
}
STUDENT_PRESETS.update({f"{name}_alt": MambaConfig(**{**asdict(cfg), "bidirectional": "alternate"})
                        for name, cfg in list(STUDENT_PRESETS.items())})


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer. Shared in_proj / out_proj; each scan direction has its own conv1d, x_proj,
    dt_proj, A_log and D, stacked on a leading axis in the order of `directions`. The backward direction scans the
    tokens in reverse without flipping any tensor: its conv is anti-causal and the scan runs t = L-1 .. 0, which is
    exactly Vim's flip -> conv -> scan -> flip.
    directions: ("forward", "backward") (Vim v2: out = out_proj(silu(z) * (y_fwd + y_bwd) / 2)), or one of them."""

    def __init__(self, cfg: MambaConfig, directions=("forward", "backward")):
        super().__init__()
        self.cfg, self.directions = cfg, tuple(directions)
        E, N, R, K = cfg.expand * cfg.dim, cfg.d_state, cfg.dt_rank or math.ceil(cfg.dim / 16), cfg.d_conv
        ndir = len(self.directions)
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

    @torch.profiler.record_function("depthwise conv")                                 # a label for profilers
    def conv(self, x):                                                                 # (B, E, L) -> (ndir, B, E, L)
        K = self.cfg.d_conv
        outs = []
        for w, b, d in zip(self.conv_weight, self.conv_bias, self.directions):
            if d == "forward":                                                         # causal
                outs.append(F.conv1d(F.pad(x, (K - 1, 0)), w.unsqueeze(1), b, groups=x.shape[1]))
            else:                                                                      # anti-causal = flip, conv, flip
                outs.append(F.conv1d(F.pad(x, (0, K - 1)), w.flip(-1).unsqueeze(1), b, groups=x.shape[1]))
        return F.silu(torch.stack(outs))

    def forward(self, hidden):                                                         # (B, L, D)
        # the scan's inputs are made contiguous along L (weights on the left of the matmuls), as the Triton kernel
        # was measured with; only the output goes back to (B, L, D)
        R, N = self.dt_proj.shape[-1], self.cfg.d_state
        x, z = (self.in_proj.weight @ hidden.transpose(1, 2)).chunk(2, dim=1)           # (B, E, L) each
        u = self.conv(x)                                                               # (ndir, B, E, L)
        dt_low, B, C = (self.x_proj.unsqueeze(1) @ u).split([R, N, N], dim=2)         # (ndir, B, R | N | N, L)
        delta = self.dt_proj.unsqueeze(1) @ dt_low                                     # (ndir, B, E, L)
        A = -torch.exp(self.A_log.float())                                             # (ndir, E, N)
        D, delta_bias, scan = self.D.float(), self.dt_bias.float(), self.cfg.scan_backend
        if len(self.directions) == 2:                                                  # both, one fused launch
            y = bidirectional_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                             backend=scan) / 2
        else:
            y = selective_scan(u[0], delta[0], A[0], B[0], C[0], D[0], z, delta_bias[0], delta_softplus=True,
                               reverse=self.directions[0] == "backward", backend=scan)
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

    grad_checkpointing = False                                  # run_block: activation checkpointing

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
            directions = [("forward", "backward")] * cfg.depth
        else:                                                                          # one direction, alternating
            directions = [("forward",) if i % 2 == 0 else ("backward",) for i in range(cfg.depth)]
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
        seq = torch.arange(x.shape[1], device=x.device)                                # made on the device: no copy
        order = torch.cat([seq[middle:middle + 1], seq[:middle], seq[middle + 1:]])    # sequence -> class-first order
        hidden = []
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing)
            hidden.append(x.index_select(1, order))
        tokens = self.norm(x).index_select(1, order)
        logits = self.head(tokens[:, 0]) if self.head is not None else None
        return Output(logits, tokens, hidden)

    def no_weight_decay(self):
        skip = ("cls_token", "mask_token", "pos_cls", "pos_embed", "A_log", "D", "dt_bias", "conv_bias")
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n.split(".")[-1] in skip}


# ----------------------------------------------------------------------------------------------------------------
# 2b. Student: Adventurer, the paper's own (Mamba-2 / SSD mixer, one scan direction per block, class token last).
# The layout and parameter names are those of the public code (github wangf3014/Adventurer, models_mamba.py and
# mamba_custom.py, on mamba_ssm's Mamba2 mixer), so its released ImageNet checkpoints load exactly (load_adventurer).

@dataclass
class AdventurerConfig:
    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    d_state: int = 64          # N
    d_conv: int = 4
    expand: int = 2            # inner width E = expand * dim
    headdim: int = 64          # P: E / P heads, one decay A per head
    ngroups: int = 1           # G: heads share B and C in G groups
    mlp_ratio: float = 2.5     # SwiGLU hidden width int(mlp_ratio * dim)
    num_classes: int = 1000
    flip: str = "public"       # which blocks scan the patches in reverse (FLIP_RULES)
    drop_path: float = 0.0
    chunk_size: int = SSD_CHUNK     # SSD chunk Q: any value computes the same (the public code uses 256)
    scan_backend: str = "auto"      # "auto" | "chunked" | "reference", see scan_kernel.ssd_scan
    eps: float = 1e-5
    pixel_mean: tuple = IMAGENET_MEAN   # the input it expects is (pixels in [0, 1] - mean) / std (normalize)
    pixel_std: tuple = IMAGENET_STD


# Block i flips its patch tokens (the class token stays last) before the mixer and back after it. "public": the
# public code's `n // 2 == 1`, i.e. blocks 2 and 3 only, the rule its released checkpoints were trained with; the
# paper (and the public code's own comment) flips every other block, so the scan direction alternates: "alternate".
FLIP_RULES = {"public": lambda i: i // 2 == 1, "alternate": lambda i: i % 2 == 1}

# demo: the CPU demo's size (32 px, patch 4: 64 patches), ~0.2 M params like a small Vim demo. dim 48 with headdim 16
# keeps 6 heads; d_state 16 (not 64) as the state is per head x headdim and 65 tokens need little memory; depth 6
# leaves blocks for the 4 distillation stages; chunk 32 cuts the 66-token sequence in 3 chunks, not one padded 64.
STUDENT_PRESETS.update({
    "adventurer_demo": AdventurerConfig(img_size=32, patch_size=4, dim=48, depth=6, d_state=16, headdim=16,
                                        num_classes=10, chunk_size=32),
    "adventurer_tiny": AdventurerConfig(dim=256),
    "adventurer_small": AdventurerConfig(dim=512),
    "adventurer_base": AdventurerConfig(dim=768),
    "adventurer_large": AdventurerConfig(dim=1024, depth=24),
    "adventurer_base_p8": AdventurerConfig(dim=768, patch_size=8),
})


class GatedRMSNorm(nn.Module):
    """mamba_ssm's gated RMSNorm with norm_before_gate=False: RMSNorm(y * silu(z)) * weight, normalised over groups
    of E / G channels, in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim, groups, eps):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):                                                           # (B, L, E) each
        f = torch.promote_types(y.dtype, torch.float32)
        g = (y.to(f) * F.silu(z.to(f))).unflatten(-1, (self.groups, -1))             # (B, L, G, E/G)
        return (F.rms_norm(g, g.shape[-1:], eps=self.eps).flatten(-2) * self.weight.to(f)).to(y.dtype)


class Mamba2(nn.Module):
    """mamba_ssm's Mamba2 mixer (rmsnorm=True, norm_before_gate=False, D per head, no dt limit), its names:
    in_proj -> [z (E), xBC (E + 2 G N), dt (H)]; causal depthwise conv1d over xBC, SiLU; split x, B, C;
    y = SSD(x, dt, A, B, C) + D x with dt = softplus(dt + dt_bias), A = -exp(A_log); out_proj(norm(y * silu(z)))."""

    def __init__(self, cfg: AdventurerConfig):
        super().__init__()
        E, N, G = cfg.expand * cfg.dim, cfg.d_state, cfg.ngroups
        H = E // cfg.headdim
        self.cfg, self.sizes = cfg, (E, N, G, H)
        self.in_proj = nn.Linear(cfg.dim, 2 * E + 2 * G * N + H, bias=False)
        self.conv1d = nn.Conv1d(E + 2 * G * N, E + 2 * G * N, cfg.d_conv, groups=E + 2 * G * N,
                                padding=cfg.d_conv - 1)
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))                # inverse softplus of dt
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(E, G, eps=1e-5)
        self.out_proj = nn.Linear(E, cfg.dim, bias=False)

    @torch.profiler.record_function("depthwise conv")                                 # a label for profilers
    def conv(self, xBC):                                                               # (B, L, C), causal
        """silu(conv1d(xBC)) with conv1d's weights, as K shifted multiply-adds in the (B, L, C) layout:
        out_t = bias + sum_k w_k x_{t-K+1+k}. The same values as nn.Conv1d, ~1.3-1.7x faster forward + backward on
        CPU at Adventurer-B sizes (L 198 to 4098), and no transposes."""
        K, L = self.conv1d.kernel_size[0], xBC.shape[1]
        w = self.conv1d.weight[:, 0].t().contiguous()                                  # (K, C)
        xp = F.pad(xBC, (0, 0, K - 1, 0))                                              # (B, K-1+L, C), zeros first
        y = torch.addcmul(self.conv1d.bias, xp[:, :L], w[0])
        for k in range(1, K):
            y = torch.addcmul(y, xp[:, k:k + L], w[k])
        return F.silu(y)

    def forward(self, u):                                                              # (B, L, D)
        E, N, G, H = self.sizes
        z, xBC, dt = self.in_proj(u).split([E, E + 2 * G * N, H], dim=-1)
        x, B, C = self.conv(xBC).split([E, G * N, G * N], dim=-1)
        y = ssd_scan(x.unflatten(-1, (H, -1)), dt, -torch.exp(self.A_log), B.unflatten(-1, (G, N)),
                     C.unflatten(-1, (G, N)), self.cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                     backend=self.cfg.scan_backend)                                    # (B, L, H, P), fp32 math
        return self.out_proj(self.norm(y.flatten(-2), z))                              # (B, L, D)


class SwiGLUMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def flip_patches(x):                                                                   # (B, N+1, D), class last
    return torch.cat([x[:, :-1].flip(1), x[:, -1:]], dim=1)


class AdventurerBlock(nn.Module):
    """norm -> [flip] -> prepend the mean token ("heading average") -> Mamba2 -> drop it -> [un-flip] -> residual;
    then a SwiGLU MLP with its own norm. The residual stream stays fp32 (as MambaBlock)."""

    def __init__(self, cfg, flip, drop_path):
        super().__init__()
        self.mixer = Mamba2(cfg)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.mlp = SwiGLUMLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.norm_mlp = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.flip, self.drop_path = flip, drop_path

    def forward(self, h):                                                              # (B, N+1, D) fp32
        x = flip_patches(self.norm(h)) if self.flip else self.norm(h)
        x = self.mixer(torch.cat([x.mean(1, keepdim=True), x], dim=1))[:, 1:]         # (B, N+1, D)
        x = flip_patches(x) if self.flip else x
        h = h + drop_path(x, self.drop_path, self.training).to(h.dtype)
        return h + drop_path(self.mlp(self.norm_mlp(h)), self.drop_path, self.training).to(h.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, images):                                                         # (B, 3, H, W) -> (B, N, D)
        return self.proj(images).flatten(2).transpose(1, 2)


class Adventurer(nn.Module):
    """The paper's student: patch embedding, [mask] tokens, patch tokens then the class token LAST with a learned
    position embedding of N+1 slots (the class slot last), Adventurer blocks, final RMSNorm, head on the class token.
    Returns the project's Output, class token first (reordered on the way out)."""

    grad_checkpointing = False                                  # run_block: activation checkpointing

    def __init__(self, cfg: AdventurerConfig):
        super().__init__()
        E = cfg.expand * cfg.dim
        if cfg.flip not in FLIP_RULES or cfg.scan_backend not in ("auto", "chunked", "reference"):
            raise ValueError(f"AdventurerConfig: flip must be one of {sorted(FLIP_RULES)} and scan_backend auto / "
                             f"chunked / reference, got {cfg.flip!r}, {cfg.scan_backend!r}")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"AdventurerConfig: img_size {cfg.img_size} must be a multiple of patch_size "
                             f"{cfg.patch_size}")
        if E % cfg.headdim or (E // cfg.headdim) % cfg.ngroups:
            raise ValueError(f"AdventurerConfig: expand * dim = {E} must be a multiple of headdim {cfg.headdim}, "
                             f"and the heads (expand * dim / headdim) a multiple of ngroups {cfg.ngroups}")
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.dim))       # patches, then the class slot
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nn.ModuleList(AdventurerBlock(cfg, FLIP_RULES[cfg.flip](i), r) for i, r in enumerate(rates))
        self.norm_f = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else None
        # the public initialisation: PyTorch's defaults for in_proj, conv1d and the MLP (biases zero), out_proj's
        # default scaled by 1 / sqrt(depth), LeCun normal for the patch embedding, truncated normal (0.02) elsewhere
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=(1 / w[0].numel()) ** 0.5 / 0.87962566103423978, a=-2, b=2)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for t in (self.cls_token, self.mask_token, self.pos_embed) + ((self.head.weight,) if self.head else ()):
            nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if name.endswith("out_proj"):
                m.weight.data /= math.sqrt(cfg.depth)

    def forward(self, images, mask=None):                                             # (B, 3, H, W), (B, N) bool
        grid_hw = check_resolution(images, self.cfg.patch_size)
        x = self.patch_embed(images)                                                   # (B, N, D)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask must be (batch, patches) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + resize_pos_embed(self.pos_embed[:, :-1], grid_hw)
        cls = (self.cls_token + self.pos_embed[:, -1:]).expand(len(x), -1, -1)
        x = torch.cat([x, cls], dim=1)                                                 # (B, N+1, D), class last
        x = x.to(torch.promote_types(x.dtype, torch.float32))                          # fp32 residual (fp64 stays)
        hidden = []
        for layer in self.layers:
            x = run_block(layer, x, self.grad_checkpointing)
            hidden.append(x.roll(1, dims=1))                                           # class first
        tokens = self.norm_f(x).roll(1, dims=1)
        logits = self.head(tokens[:, 0]) if self.head is not None else None
        return Output(logits, tokens, hidden)

    def no_weight_decay(self):
        skip = ("cls_token", "mask_token", "pos_embed", "A_log", "D", "dt_bias")
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
    image feeds both losses; the frozen teacher sees the full image. It takes pixels in [0, 1] and hands each model
    its own normalisation (normalize). Holds the trainable masked-prediction projection
    `mp_proj` (student width -> teacher width; identity when they match). target: the teacher's final features after
    ("post_norm") or before ("pre_norm") its final norm — the paper does not say which."""

    def __init__(self, teacher, student, stages=4, am_scope="visible", lam=1.0, am_weight=1.0, target="post_norm"):
        super().__init__()
        if target not in ("post_norm", "pre_norm"):
            raise ValueError(f"Distiller: target must be 'post_norm' or 'pre_norm', got {target!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        t_dim, s_dim = teacher.cfg.dim, student.cfg.dim
        self.mp_proj = nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()
        self.teacher_stages = stage_indices(teacher.cfg.depth, stages)
        self.student_stages = stage_indices(student.cfg.depth, stages)
        self.am_scope, self.lam, self.am_weight, self.target = am_scope, lam, am_weight, target

    def _load_from_state_dict(self, state_dict, prefix, *args):                        # checkpoints written before
        for k in [k for k in state_dict if k.startswith(prefix + "head.")]:            # mp_proj was named "head"
            state_dict[prefix + "mp_proj." + k[len(prefix + "head."):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def train(self, mode=True):                                                        # the teacher stays in eval
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images, mask):                                  # pixels in [0, 1] (B, 3, H, W), (B, N) bool
        with torch.no_grad():                                                          # each its own normalisation
            tea = self.teacher(normalize(images, self.teacher))
        stu = self.student(normalize(images, self.student), mask)
        am = activation_matching_loss([tea.hidden[i] for i in self.teacher_stages],
                                      [stu.hidden[i] for i in self.student_stages], mask, self.am_scope)
        target = tea.tokens if self.target == "post_norm" else tea.hidden[-1]
        mp = masked_prediction_loss(self.mp_proj(stu.tokens[:, 1:]), target[:, 1:], mask)
        return dict(loss=self.am_weight * am + self.lam * mp, am=am, mp=mp)


# ----------------------------------------------------------------------------------------------------------------
# 5. Checkpoints: teachers of every family, and our own models. One converter per family renames its keys to this
# file's ViT; infer_vit_config reads the architecture from the converted weights (plus what the family or the
# checkpoint's config file says: heads, act, eps); load_exact then requires every key to fit. Checkpoints are
# untrusted: tensors only, never arbitrary pickles.

# The weights of a Hub folder (transformers, timm, open_clip), in the order they are looked for; *.index.json: shards
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file as a dict of tensors, without the safetensors package. The format: an 8-byte little-endian
    header length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}} (+ "__metadata__"),
    then the tensors' little-endian bytes, offsets counted from the end of the header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} for a {size}-byte file")
            header = json.loads(f.read(n))
            data = bytearray(size - 8 - n)
            f.readinto(data)
            out, spans = {}, []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
                if not all(type(v) is int and v >= 0 for v in (begin, end, *info["shape"])):
                    raise ValueError(f"{name}: shape {info['shape']}, offsets {begin}..{end}: not whole numbers >= 0")
                count = math.prod(info["shape"])
                if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
                    raise ValueError(f"{name}: bytes {begin}..{end} do not hold {info['shape']} {info['dtype']}")
                spans.append((begin, end, name))
            for (_, end, a), (begin, _, b) in zip(sorted(spans), sorted(spans)[1:]):
                if begin < end:
                    raise ValueError(f"the bytes of {a} and {b} overlap")
            for begin, end, name in spans:                                      # each checked against the file above
                dtype, count = SAFETENSORS_DTYPES[header[name]["dtype"]], math.prod(header[name]["shape"])
                t = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else torch.empty(0)
                out[name] = t.to(dtype).reshape(header[name]["shape"]).clone()         # own, aligned memory
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError,
                RuntimeError) as e:                                             # RuntimeError: torch (e.g. reshape)
            raise ValueError(f"cannot read {path!r} as safetensors: {type(e).__name__} {e}") from None
    return out


IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"), (b"BM", "BMP"),
               (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


def read_state_dict(path):
    """A checkpoint file as a dict of tensors / plain values; a TorchScript archive (OpenAI CLIP) gives its state
    dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: give a file, a Hub folder or timm:<model-name>")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return torch.jit.load(path, map_location="cpu").state_dict()
    with open(path, "rb") as f:
        head = f.read(8)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):         # torch.save: a zip, or (old) a pickle
        image = next((k for m, k in IMAGE_MAGIC if head.startswith(m)), None)
        raise ValueError(f"cannot read checkpoint {path!r}: " + (
            f"it is a {image} image" if image else "a truncated or damaged zip archive (an interrupted copy or "
            "download?)" if head.startswith(b"PK") else "neither a zip archive nor a pickle, as torch.save writes"))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):                  # the public Adventurer files'
            return torch.load(path, map_location="cpu", weights_only=True)              # training arguments
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} as tensors (weights_only=True): {str(e).splitlines()[0]}") \
            from None


def read_checkpoint(spec):
    """-> (state dict, {name: JSON config beside the weights}). spec: a weights file, or a folder as the Hugging Face
    Hub holds models (config.json + model.safetensors / pytorch_model.bin, sharded or not; open_clip's files)."""
    path = spec
    if os.path.isdir(spec):
        found = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(spec, n))]
        if not found:
            raise FileNotFoundError(f"folder {spec!r} holds none of {', '.join(WEIGHT_FILES)}")
        path = os.path.join(spec, found[0])
    folder = os.path.dirname(path)
    configs = {}
    for name in ("config.json", "open_clip_config.json", "preprocessor_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            try:
                with open(os.path.join(folder, name)) as f:
                    configs[name] = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{os.path.join(folder, name)} is not valid JSON: {e}") from None
            if not isinstance(configs[name], dict):
                raise ValueError(f"{os.path.join(folder, name)} holds a JSON {type(configs[name]).__name__}, not an "
                                 "object {...}")
    if path.endswith(".index.json"):                                                   # sharded: index -> shard files
        try:
            with open(path) as f:
                index = json.load(f)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f'{path} has no "weight_map" {{tensor name: shard file}}, as a Hub shard index has: '
                             "download the folder again")
        shards = sorted(set(weight_map.values()))
        sd = {}
        for shard in shards:
            sd.update(read_state_dict(os.path.join(folder, shard)))
        return sd, configs
    return read_state_dict(path), configs


def rename(sd, pairs):
    """Apply (old, new) substring replacements, in order, to every key."""
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            k = k.replace(a, b)
        out[k] = v
    return out


def align_positions(sd):
    """pos_embed in this ViT's layout: a class position iff there is a class token, then the patch grid. Sources without
    a class position (DeiT-III, timm's DINOv2 with registers) get a zero one (the same sum); positions given to
    register tokens are added into the tokens themselves (a register never moves, so the sum is the same)."""
    pos, n_cls = sd["pos_embed"], int("cls_token" in sd)
    T = n_cls + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    L = pos.shape[1]
    n_prefix = next((p for p in (T, n_cls, 0) if L > p and math.isqrt(L - p) ** 2 == L - p), None)   # square grid
    if n_prefix is None:
        raise ValueError(f"pos_embed {tuple(pos.shape)} is not a square patch grid after {T} or fewer prefix tokens")
    if n_prefix > n_cls:
        sd["reg_token"] = sd["reg_token"] + pos[:, n_cls:n_prefix]
    class_pos = [pos[:, :1] if n_prefix else torch.zeros_like(pos[:, :1])] if n_cls else []
    sd["pos_embed"] = torch.cat(class_pos + [pos[:, n_prefix:]], dim=1)
    return sd


def convert_timm(sd, config=None):
    """timm ViTs (plain / AugReg / DeiT, DeiT-III, CLIP, DINOv2 with or without registers, SigLIP, MAE) and the DINOv2
    torch-hub layout -> this file's ViT. SigLIP's attention-pool head (attn_pool.*, and the classifier on it) is not
    part of the token features and is dropped. config: timm's config.json beside the weights (a Hub download).
    -> (state dict, hints): eps 1e-5 for CLIP towers (norm_pre, no patch bias), else 1e-6; act GELU (what timm runs
    by default) unless the config says otherwise: QuickGELU for *quickgelu* names and for weights timm notes as
    natively QuickGELU (OpenAI's); heads from the config's model_args where present."""
    drop = ("mask_token",) + (("attn_pool.", "head.") if "attn_pool.latent" in sd else ())
    sd = rename({k: v for k, v in sd.items() if not k.startswith(drop)},
                [("patch_embed.proj.", "patch_embed."), ("register_tokens", "reg_token"),   # torch-hub DINOv2 names
                 (".mlp.w12.", ".mlp.fc1."), (".mlp.w3.", ".mlp.fc2.")])                   # its SwiGLU MLP
    clip = "norm_pre.weight" in sd and "patch_embed.bias" not in sd
    hints = dict(eps=1e-5 if clip else 1e-6, act="gelu", pos_antialias=True)
    config = config or {}
    args, pretrained = config.get("model_args", {}), config.get("pretrained_cfg", {})
    if ("quickgelu" in config.get("architecture", "") or pretrained.get("tag") == "openai"
            or any("QuickGELU" in note for note in pretrained.get("notes", ()))):
        hints["act"] = "quick_gelu"
    hints["act"] = {"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_tanh"}.get(args.get("act_layer"), hints["act"])
    hints["heads"] = args.get("num_heads")
    return align_positions(sd), hints


def convert_clip(sd, config=None):
    """OpenAI CLIP / open_clip checkpoints (visual.* keys) -> this file's ViT. visual.proj (the image-text projection
    of the class token) is not part of the token features and is dropped. config: open_clip_config.json beside the
    weights gives heads (width / head_width) and act (its quick_gelu flag); without one, OpenAI's QuickGELU."""
    sd = rename({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.") and k != "visual.proj"},
                [("conv1.", "patch_embed."), ("transformer.resblocks.", "blocks."), ("ln_1.", "norm1."),
                 ("ln_2.", "norm2."), ("attn.in_proj_", "attn.qkv."), ("attn.out_proj.", "attn.proj."),
                 ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."), ("ls_1.", "ls1."), ("ls_2.", "ls2."),
                 ("ln_pre.", "norm_pre."), ("ln_post.", "norm.")])
    sd["cls_token"] = sd.pop("class_embedding").reshape(1, 1, -1)
    sd["pos_embed"] = sd.pop("positional_embedding").unsqueeze(0)
    hints = dict(eps=1e-5, act="quick_gelu", pos_antialias=True)
    if config:
        model_cfg = config.get("model_cfg", {})
        vision = model_cfg.get("vision_cfg", {})
        hints["act"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        hints["heads"] = sd["cls_token"].shape[-1] // vision.get("head_width", 64)
    return sd, hints


HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def convert_hf(sd, config=None):
    """Hugging Face transformers (4.x names, as on the Hub) ViTModel / ViTForImageClassification, Dinov2Model (+ with
    registers), CLIPVisionModel / CLIPModel, SiglipVisionModel / SiglipModel -> this file's ViT: separate q/k/v
    projections are stacked into qkv. Dropped: text towers and projections, ViT's pooler, SigLIP's attention-pool
    head, DINOv2's mask token. config: config.json beside the weights (heads, act, eps); without one, the family's
    defaults. HF resamples position embeddings without antialias (DINOv2 with registers with)."""
    vision = {}
    for k, v in sd.items():
        for prefix in ("vision_model.", "vit.", "dinov2."):
            k = k.removeprefix(prefix)
        if not k.startswith(("text_model.", "visual_projection", "text_projection", "logit_", "pooler.", "head.",
                             "embeddings.mask_token", "embeddings.position_ids")):
            vision[k] = v
    sd = rename(vision, [
        ("embeddings.patch_embeddings.projection.", "patch_embed."), ("embeddings.patch_embedding.", "patch_embed."),
        ("embeddings.cls_token", "cls_token"), ("embeddings.class_embedding", "cls_token"),
        ("embeddings.position_embeddings", "pos_embed"), ("embeddings.position_embedding.weight", "pos_embed"),
        ("embeddings.register_tokens", "reg_token"), ("encoder.layer.", "blocks."), ("encoder.layers.", "blocks."),
        ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("layer_norm1.", "norm1."),
        ("layer_norm2.", "norm2."), ("attention.attention.query.", "attn.q."), ("attention.attention.key.", "attn.k."),
        ("attention.attention.value.", "attn.v."), ("attention.output.dense.", "attn.proj."),
        ("self_attn.q_proj.", "attn.q."), ("self_attn.k_proj.", "attn.k."), ("self_attn.v_proj.", "attn.v."),
        ("self_attn.out_proj.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
        ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."), ("layer_scale1.lambda1", "ls1.gamma"),
        ("layer_scale2.lambda1", "ls2.gamma"), ("pre_layrnorm.", "norm_pre."), ("post_layernorm.", "norm."),
        ("classifier.", "head.")])
    sd = {("norm." + k[len("layernorm."):] if k.startswith("layernorm.") else k): v for k, v in sd.items()}
    for k in [k for k in sd if ".attn.q." in k]:                                       # q, k, v -> qkv
        sd[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat([sd.pop(k.replace(".attn.q.", f".attn.{p}."))
                                                              for p in "qkv"])
    if "cls_token" in sd:
        sd["cls_token"] = sd["cls_token"].reshape(1, 1, -1)                            # CLIP's class_embedding (D,)
    sd["pos_embed"] = sd["pos_embed"].reshape(1, -1, sd["pos_embed"].shape[-1])         # CLIP / SigLIP: (L, D)
    if config and "model_type" in config:
        config = config.get("vision_config", config)
        kind = config.get("model_type", "")
    else:                                                                              # no config.json: by the keys
        config = {}
        kind = ("clip" if "norm_pre.weight" in sd else "siglip" if "cls_token" not in sd
                else "dinov2" if "blocks.0.ls1.gamma" in sd else "vit")
    defaults = next(v for k, v in (("clip", ("quick_gelu", 1e-5)), ("siglip", ("gelu_pytorch_tanh", 1e-6)),
                                   ("dinov2", ("gelu", 1e-6)), ("", ("gelu", 1e-12))) if k in kind)
    act = config.get("hidden_act", defaults[0])
    if act not in HF_ACTS:
        raise ValueError(f"config.json: hidden_act {act!r} is not one of {sorted(HF_ACTS)}")
    heads = config.get("num_attention_heads", 12) if config else None                 # 12: the HF configs' default
    hints = dict(act=HF_ACTS[act], eps=config.get("layer_norm_eps", defaults[1]), heads=heads,
                 pos_antialias="reg_token" in sd)
    return align_positions(sd), hints


def default_heads(dim):
    """The usual head count for a width: 64 dims per head, except the widths whose standard models use 16 heads
    (SigLIP so400m 1152, ViT-H 1280, ViT-g 1408, ViT-bigG 1664)."""
    return {1152: 16, 1280: 16, 1408: 16, 1664: 16}.get(dim, max(1, dim // 64))


def infer_vit_config(sd, hints=None, **overrides):
    """Architecture from a state dict in this file's names: widths, depth, patch, native grid, classes, class token,
    registers, biases, LayerScale, norms, SwiGLU. hints (a converter's: the family's defaults or its config file) and
    then overrides (the caller's) set the rest: heads (else default_heads), act, eps, pos_antialias."""
    need = ["patch_embed.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
            "blocks.0.mlp.fc2.weight"]
    if any(k not in sd for k in need):
        raise ValueError(f"not a ViT this loader knows: missing {', '.join(k for k in need if k not in sd)}")
    dim, patch = sd["patch_embed.weight"].shape[0], sd["patch_embed.weight"].shape[-1]
    n_patches = sd["pos_embed"].shape[1] - ("cls_token" in sd)
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"].shape[0], sd["blocks.0.mlp.fc2.weight"].shape[1]
    cfg = ViTConfig(img_size=math.isqrt(n_patches) * patch, patch_size=patch, dim=dim,
                    depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                    heads=default_heads(dim), mlp_ratio=fc2 / dim,
                    num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                    class_token="cls_token" in sd, registers=sd["reg_token"].shape[1] if "reg_token" in sd else 0,
                    patch_bias="patch_embed.bias" in sd, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                    norm_pre="norm_pre.weight" in sd, layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else 0.0,
                    final_norm="tokens" if "norm.weight" in sd else "pooled" if "fc_norm.weight" in sd else "none")
    hints = dict(hints or {})
    if fc1 == 2 * fc2:                                   # fc1 holds both halves: SwiGLU, whatever the family's act
        hints["act"] = "swiglu"
    for k, v in [*hints.items(), *overrides.items()]:
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


# The models this project's checkpoints hold: their "kind" -> (model class, config class)
MODEL_KINDS = {"vit": (ViT, ViTConfig), "vision_mamba": (VisionMamba, MambaConfig),
               "adventurer": (Adventurer, AdventurerConfig)}


def build_model(cfg):
    """a freshly initialised model of a config: ViT, VisionMamba or Adventurer (MODEL_KINDS)"""
    return next(model_cls for model_cls, cfg_cls in MODEL_KINDS.values() if type(cfg) is cfg_cls)(cfg)


def model_kind(model):
    """the "kind" that a checkpoint of this model records (MODEL_KINDS)"""
    return next(kind for kind, (model_cls, _) in MODEL_KINDS.items() if isinstance(model, model_cls))


def load_model(model_cls, cfg, sd, source, num_classes=None):
    """model_cls(cfg) holding the state dict sd exactly (load_exact). num_classes, when it differs from cfg's: the
    model is built with that many classes instead, and keeps its new, randomly initialised head (0: no head)."""
    if num_classes is not None and num_classes != cfg.num_classes:
        model = model_cls(type(cfg)(**{**asdict(cfg), "num_classes": num_classes}))
        new_head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        sd = {**{k: v for k, v in sd.items() if not k.startswith("head.")}, **new_head}
        return load_exact(model, sd, source)
    return load_exact(model_cls(cfg), sd, source)


def model_from_checkpoint(ckpt, source="checkpoint", img_size=None, num_classes=None, **changes):
    """Rebuild a model from this project's checkpoint dict {"kind", "config", "model"} (train.py writes these).
    img_size: another resolution: the patch-grid position embedding is resampled once (bicubic, the class position
    kept apart) and is learned at the new size from then on; num_classes: a new head when it differs (load_model);
    changes: other config fields (e.g. drop_path=0.1)."""
    if ckpt.get("kind") not in MODEL_KINDS:
        raise ValueError(f"{source}: kind {ckpt.get('kind')!r} is not one of {sorted(MODEL_KINDS)}")
    model_cls, cfg_cls = MODEL_KINDS[ckpt["kind"]]
    known = {f.name for f in fields(cfg_cls)}
    if set(ckpt["config"]) - known:
        raise ValueError(f"{source}: unknown config fields {sorted(set(ckpt['config']) - known)}")
    config, sd = {**ckpt["config"], **changes}, ckpt["model"]
    if img_size is not None and img_size != config["img_size"]:
        old, new = config["img_size"] // config["patch_size"], img_size // config["patch_size"]
        pos, n_grid = sd["pos_embed"], old * old
        if model_cls is Adventurer:                                                    # class position last
            pos = torch.cat([resize_pos_embed(pos[:, :n_grid], (new, new)), pos[:, n_grid:]], 1)
        else:                                                                          # ViT: first (if any)
            n_cls = pos.shape[1] - n_grid
            pos = torch.cat([pos[:, :n_cls], resize_pos_embed(pos[:, n_cls:], (new, new))], 1)
        sd = {**sd, "pos_embed": pos}
        config["img_size"] = img_size
    return load_model(model_cls, cfg_cls(**config), sd, source, num_classes)


def adventurer_checkpoint(ck):
    """A file the public Adventurer code wrote ({"model": state dict, ...} or the state dict itself, its key names) as
    this project's checkpoint dict {"kind", "config", "model"}: the architecture read from the weights (width, depth,
    patch, native grid, classes, d_state, d_conv, expand, headdim, MLP width; ngroups 1 as in every public model) and
    a fresh [mask] token added (its code has none). None when ck is not such a file."""
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or "layers.0.mixer.in_proj.weight" not in sd or "kind" in ck:
        return None
    need = ["patch_embed.proj.weight", "pos_embed", "layers.0.mixer.norm.weight", "layers.0.mixer.dt_bias",
            "layers.0.mixer.conv1d.weight", "layers.0.mlp.w1.weight"]
    if any(k not in sd for k in need):
        raise ValueError(f"not an Adventurer checkpoint this loader knows: missing "
                         f"{', '.join(k for k in need if k not in sd)}")
    dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    E, H = sd["layers.0.mixer.norm.weight"].shape[0], sd["layers.0.mixer.dt_bias"].shape[0]
    conv = sd["layers.0.mixer.conv1d.weight"]
    cfg = AdventurerConfig(img_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * patch, patch_size=patch, dim=dim,
                           depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers.")),
                           d_state=(conv.shape[0] - E) // 2, d_conv=conv.shape[-1], expand=E // dim, headdim=E // H,
                           mlp_ratio=sd["layers.0.mlp.w1.weight"].shape[0] / dim,
                           num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    mask_token = nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return dict(kind="adventurer", config=asdict(cfg), model={"mask_token": mask_token, **sd})


def load_adventurer(path, img_size=None, num_classes=None, **changes):
    """An Adventurer from a checkpoint of the public code (its released ImageNet files, e.g.
    adventurer_base_patch16_224.pth) or of this project. img_size: another resolution (the patch grid of the position
    embedding resampled once, the class position, last, kept apart); num_classes: a new head when it differs;
    changes: other AdventurerConfig fields (e.g. flip="alternate", drop_path=0.1, scan_backend="reference")."""
    ck, _ = read_checkpoint(path)
    ck = adventurer_checkpoint(ck) or ck
    if not isinstance(ck, dict) or ck.get("kind") != "adventurer":
        raise ValueError(f"{path}: not an Adventurer checkpoint (no layers.0.mixer.in_proj.weight, no kind "
                         f"'adventurer')")
    return model_from_checkpoint(ck, path, img_size=img_size, num_classes=num_classes, **changes)


def timm_checkpoint(name):
    """timm:NAME -> (state dict, a config like timm's config.json) from timm's own model (pretrained weights)."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"timm:{name}: pip install timm to load timm models by name") from None
    model = timm.create_model(name, pretrained=True)
    act = model.blocks[0].mlp.act
    kind = type(act).__name__.lower()
    act = ("quick_gelu" if "quick" in kind else
           "gelu_tanh" if "tanh" in kind or getattr(act, "approximate", "none") == "tanh" else "gelu")
    config = dict(architecture=name.split(".")[0], pretrained_cfg=dict(getattr(model, "pretrained_cfg", {}) or {}),
                  model_args=dict(num_heads=model.blocks[0].attn.num_heads, act_layer=act))
    return model.state_dict(), {"config.json": config}


def declared_pixels(family, sd, configs):
    """What a teacher's library declares about its input -> (mean, std, eval transform, where from). family: "timm",
    "clip" or "hf" (load_teacher's); sd: the converted weights; configs: read_checkpoint's. The eval transform is
    {crop_pct, interpolation} where declared (resize to size / crop_pct, centre crop), else {}. Nothing declared: the
    family's convention where the architecture names it (CLIP towers: OpenAI's constants; SigLIP, no class token:
    0.5 / 0.5; LayerScale or registers, DINOv2 / DeiT-III: ImageNet's), else ImageNet's and where-from None."""
    def transform(crop_pct, interpolation):
        ok = isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1 and interpolation in ("bicubic", "bilinear")
        return dict(crop_pct=float(crop_pct), interpolation=interpolation) if ok else {}
    if family == "timm":
        pre = (configs.get("config.json") or {}).get("pretrained_cfg") or {}
        if pre.get("mean") and pre.get("std"):
            crop = pre.get("crop_pct") if pre.get("crop_mode", "center") == "center" else None
            return pre["mean"], pre["std"], transform(crop, pre.get("interpolation")), "timm's pretrained_cfg"
    elif family == "hf":
        pre = configs.get("preprocessor_config.json") or {}
        if pre.get("image_mean") and pre.get("image_std"):
            size, crop = pre.get("size") or {}, pre.get("crop_size") or {}
            crop_pct = (crop["height"] / size["shortest_edge"] if pre.get("do_center_crop") and "shortest_edge" in size
                        and "height" in crop else None)
            interpolation = {2: "bilinear", 3: "bicubic"}.get(pre.get("resample"))
            return pre["image_mean"], pre["image_std"], transform(crop_pct, interpolation), "preprocessor_config.json"
    elif family == "clip":                                  # open_clip's preprocess_cfg; its default is OpenAI's
        pre = (configs.get("open_clip_config.json") or {}).get("preprocess_cfg") or {}
        return (pre.get("mean", OPENAI_CLIP_MEAN), pre.get("std", OPENAI_CLIP_STD),
                transform(1.0, pre.get("interpolation", "bicubic")), "open_clip / OpenAI CLIP")
    if "norm_pre.weight" in sd and "patch_embed.bias" not in sd:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, {}, "CLIP's convention"
    if "cls_token" not in sd:
        return HALF, HALF, {}, "SigLIP's convention"
    if "blocks.0.ls1.gamma" in sd or "reg_token" in sd:
        return IMAGENET_MEAN, IMAGENET_STD, {}, "DINOv2's / DeiT-III's convention"
    return IMAGENET_MEAN, IMAGENET_STD, {}, None


def pixel_stats(mean, std, source):
    """3 means and 3 stds > 0 as tuples of floats, or a ValueError naming source"""
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"{source}: pixel mean / std must be 3 numbers each (std > 0), got {mean!r} / {std!r}")
    return mean, std


def load_teacher(spec, img_size=None, num_classes=None, heads=None, act=None, pixel_mean=None, pixel_std=None):
    """A frozen ViT teacher (eval mode, no grad) from one of:
    - a timm checkpoint (.pth / .bin / .safetensors; DeiT files wrap it in "model"): plain / AugReg / DeiT / MAE ViTs,
      CLIP ViTs, DeiT-III, DINOv2 (registers, SwiGLU), SigLIP; also DINOv2's torch-hub files;
    - an OpenAI CLIP / open_clip checkpoint (visual.* keys), also a TorchScript archive as OpenAI ships them;
    - a Hugging Face transformers ViT, CLIP, DINOv2 or SigLIP checkpoint (Hub key names);
    - a folder as the Hugging Face Hub holds a model (config.json + weights, for transformers, timm or open_clip);
    - this project's own checkpoint (written by train.py);
    - "timm:<model-name>" when timm is installed (downloads pretrained weights through timm).
    img_size: the resolution you will run at (checked against the patch size; any multiple works).
    num_classes: a new, randomly initialised head when it differs from the checkpoint's (0 removes the head).
    heads / act ("gelu" | "gelu_tanh" | "quick_gelu"): override what the checkpoint's config file or its family's
    convention says (see convert_timm / convert_clip / convert_hf and default_heads).
    pixel_mean / pixel_std (3 each, pixels in [0, 1]): override the input normalisation the model gets in its config,
    which is otherwise what its library declares (declared_pixels; a note on stderr when nothing says, ImageNet's);
    our own checkpoints keep theirs. model.eval_transform: the library's {crop_pct, interpolation} where declared."""
    if spec.startswith("timm:"):
        sd, configs = timm_checkpoint(spec[len("timm:"):])
    else:
        sd, configs = read_checkpoint(spec)
    if isinstance(sd, dict) and "kind" in sd and "config" in sd:
        model = model_from_checkpoint(sd, spec, num_classes=num_classes)
        if not isinstance(model, ViT):
            raise ValueError(f"{spec} holds a {type(model).__name__}, not a ViT teacher")
    else:
        for wrapper in ("model", "state_dict", "module"):                               # DeiT: {"model": sd}
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if any(k.startswith("visual.") for k in sd):
            family, convert, config = "an OpenAI CLIP / open_clip", convert_clip, configs.get("open_clip_config.json")
        elif any(".attention.attention.query." in k or ".self_attn.q_proj." in k for k in sd):
            family, convert, config = "a Hugging Face", convert_hf, configs.get("config.json")
        elif "blocks.0.attn.qkv.weight" in sd:
            family, convert, config = "a timm", convert_timm, configs.get("config.json")
        else:
            raise ValueError(f"{spec}: not a ViT layout this loader knows (timm / DeiT / DINOv2: "
                             f"blocks.0.attn.qkv.weight; OpenAI CLIP / open_clip: visual.*; Hugging Face: "
                             f"encoder.layer(s).0 q/k/v); first keys: {', '.join(list(sd)[:5])}")
        try:
            sd, hints = convert(sd, config)
        except KeyError as e:
            raise ValueError(f"{spec} looks like {family} checkpoint but has no {e}") from None
        library = {convert_clip: "clip", convert_hf: "hf", convert_timm: "timm"}[convert]
        mean, std, model_eval, source = declared_pixels(library, sd, configs)
        if source is None and pixel_mean is None:
            print(f"note: {spec}: no pixel mean / std declared and no family known by its architecture: ImageNet's "
                  "assumed (override: train.py --teacher-norm, load_teacher(pixel_mean=, pixel_std=))", file=sys.stderr)
        mean, std = pixel_stats(mean, std, spec)
        model = load_model(ViT, infer_vit_config(sd, hints, heads=heads, act=act, pixel_mean=mean, pixel_std=std),
                           sd, spec, num_classes)
        model.eval_transform = model_eval
    if pixel_mean is not None or pixel_std is not None:
        mean, std = pixel_stats(pixel_mean if pixel_mean is not None else model.cfg.pixel_mean,
                                pixel_std if pixel_std is not None else model.cfg.pixel_std, "pixel_mean / pixel_std")
        model.cfg = replace(model.cfg, pixel_mean=mean, pixel_std=std)
    if img_size is not None:
        check_resolution(torch.empty(1, 3, img_size, img_size, device="meta"), model.cfg.patch_size)
    return model.eval().requires_grad_(False)
