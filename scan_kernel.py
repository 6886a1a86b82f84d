"""
The scans of the ViT-Linearizer students:
- the selective scan (Mamba-1 "S6") of the Vim student: a readable PyTorch reference, a chunked CPU path and a Triton
  kernel (forward and backward), single-direction and fused bidirectional (Vim "v2");
- the SSD scan (Mamba-2) of the Adventurer student, `ssd_scan`: a step-by-step reference and the chunked form of
  matrix products (its own section at the end of this file).

The selective scan:

Symbols (shapes as mamba-ssm's selective_scan_fn):
    u, delta, z : (batch, dim, L)   input, step size (pre-activation), gate
    A           : (dim, N)          state matrix (diagonal, real, negative)
    B, C        : (batch, N, L)     input-dependent input / output projections
    D, delta_bias: (dim,)           skip connection, step-size bias

    dt_t = softplus(delta_t + delta_bias)     (softplus only if delta_softplus; x if x > 20)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t      h: (batch, dim, N), h_{-1} = 0
    y_t  = <C_t, h_t> + D * u_t
    out  = y * silu(z)                                      (if z is given)

All state and sums are fp32 (fp64 in the reference if the inputs are fp64); the output has u's
dtype. reverse=True runs t = L-1 .. 0, which equals flip -> scan -> flip along L.
Bidirectional (Vim v2, directions stacked on a leading axis of size 2; direction 0 runs forward,
direction 1 in reverse, both in the original token order):
    out = (y_fwd + y_bwd) * silu(z)        (Vim's "/ 2" is left to the caller)

Backends (the math is identical; only speed and memory differ):
    "reference": selective_scan_ref, pure PyTorch + autograd, a plain loop over time (the test oracle).
    "chunked":   selective_scan_chunked, PyTorch with a hand-written backward, vectorised per chunk of
                 CHUNK steps (the CPU path for training and inference).
    "triton":    _ScanFn, Triton kernels for forward and backward (CUDA, or the CPU interpreter
                 when TRITON_INTERPRET=1 was set before this module was imported).
    "auto":      "triton" if triton imports, u is fp32/fp16/bf16 and (u.is_cuda or TRITON_INTERPRET=1),
                 else "chunked". An explicit "triton" that cannot run raises instead.
"""

import os

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:  # e.g. macOS: the reference backend still works, "triton" raises
    triton = None

    class tl:  # only so the kernel annotations below evaluate; the kernels are never launched
        constexpr = None

    def _jit(fn):
        return fn

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # triton.jit reads it at decoration time
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 16  # both fast paths keep the state every CHUNK steps for their backward (Triton and chunked)


# ----------------------------------------------------------------------------------------------
# input checks and dispatch

def _check(fn, u, delta, A, B, C, D, z, delta_bias, lead=()):
    """One-line errors for wrong shapes, dtypes or devices. lead=(2,) for the stacked bidirectional inputs."""
    pre = "2, " if lead else ""
    if u.dim() != len(lead) + 3:
        raise ValueError(f"{fn}: u must be ({pre}batch, dim, L), got {tuple(u.shape)}")
    if A.dim() != len(lead) + 2:
        raise ValueError(f"{fn}: A must be ({pre}dim, N), got {tuple(A.shape)}")
    batch, dim, L = u.shape[-3:]
    N = A.shape[-1]
    want = {"u": ("batch, dim, L", lead + (batch, dim, L)), "delta": ("batch, dim, L", lead + (batch, dim, L)),
            "A": ("dim, N", lead + (dim, N)), "B": ("batch, N, L", lead + (batch, N, L)),
            "C": ("batch, N, L", lead + (batch, N, L)), "D": ("dim", lead + (dim,)),
            "z": ("batch, dim, L", (batch, dim, L)), "delta_bias": ("dim", lead + (dim,))}
    given = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, x in given.items():
        if x is None:
            continue
        names, shape = want[name]
        names = names if name == "z" else pre + names
        if tuple(x.shape) != shape:
            raise ValueError(f"{fn}: {name} must be ({names}) = {shape}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {x.dtype}")
        if x.device != u.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but u is on {u.device}")
    if L < 1 or N < 1:
        raise ValueError(f"{fn}: need L >= 1 and N >= 1, got L={L}, N={N}")


def _pick_backend(fn, backend, u):
    """The backend rules of the module docstring: -> "triton", "chunked" or "reference"."""
    if backend not in ("auto", "triton", "chunked", "reference"):
        raise ValueError(f"{fn}: backend must be 'auto', 'triton', 'chunked' or 'reference', got {backend!r}")
    runnable = triton is not None and (u.is_cuda or _INTERPRET) and u.dtype in _KERNEL_DTYPES
    if backend == "auto":
        return "triton" if runnable else "chunked"
    if backend != "triton" or runnable:
        return backend
    if triton is None:
        raise RuntimeError(f"{fn}: backend='triton' but triton is not installed; use backend='chunked' (PyTorch)")
    if not u.is_cuda and not _INTERPRET:
        raise RuntimeError(f"{fn}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           f"importing scan_kernel (CPU interpreter); got a {u.device} tensor. "
                           f"Use backend='chunked' (or 'reference') for the pure-PyTorch path.")
    raise TypeError(f"{fn}: the triton backend takes float32/float16/bfloat16 u, got {u.dtype}; "
                    f"use backend='chunked' or 'reference'")


# ----------------------------------------------------------------------------------------------
# reference: plain PyTorch, differentiable by autograd

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reverse=False):
    """Selective scan in pure PyTorch. Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N)].

    A Python loop over time on (batch, dim, N) states: nothing of size (batch, dim, L, N) is built,
    and the per-step inputs are unbind() views taken once (slicing x[..., t] inside the loop
    would make the backward O(L^2))."""
    _check("selective_scan_ref", u, delta, A, B, C, D, z, delta_bias)
    f = torch.promote_types(u.dtype, torch.float32)  # fp32 math (fp64 stays fp64 for gradcheck)
    u32, dt, A, B, C = u.to(f), _step_size(delta, delta_bias, delta_softplus, f), A.to(f), B.to(f), C.to(f)
    dts, dtus = dt.unbind(-1), (dt * u32).unbind(-1)  # L x (B, D)
    Bs, Cs = B.unbind(-1), C.unbind(-1)  # L x (B, N)
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    ys = [None] * u.shape[-1]
    for t in (reversed(range(len(ys))) if reverse else range(len(ys))):
        h = torch.exp(dts[t][:, :, None] * A) * h + dtus[t][:, :, None] * Bs[t][:, None, :]  # (B, D, N)
        ys[t] = torch.bmm(h, Cs[t][:, :, None])[..., 0]  # (B, D)
    out = _skip_and_gate(torch.stack(ys, dim=-1), u32, D, z).to(u.dtype)  # (B, D, L)
    return (out, h) if return_last_state else out


def _step_size(delta, delta_bias, softplus, f):
    """dt = softplus(delta + delta_bias) in dtype f (softplus only if asked; x if x > 20, else log1p(exp(x)))"""
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    return F.softplus(dt) if softplus else dt


def _skip_and_gate(y, u, D, z):
    """(y + D u) * silu(z), each term only if given; y and u in the math dtype"""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    return y * F.silu(z.to(y.dtype)) if z is not None else y


# ----------------------------------------------------------------------------------------------
# chunked: the fast CPU path. The reference's math with a hand-written backward. Time is cut into
# chunks of CHUNK steps; per chunk, the decays exp(dt A) and inputs dt u B of all its steps are
# computed in one vectorised op each, the recurrence is one in-place multiply-add per step, and the
# outputs <C_t, h_t> are one batched product per chunk. Only the state entering each chunk is kept
# for the backward, which recomputes the chunk's states and runs the adjoint recurrence
#     g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}      (g_t = dLoss/dh_t; "t+1" = the next scan step)
# from which d(dt u) = <g_t, B_t>, dB_t = sum_d g_t dt u, dC_t = sum_d h_t dy_t and
# d(dt_t A) = g_t h_{t-1} exp(dt_t A) follow in vectorised ops. Saved memory: O(batch dim L)
# inputs + O(batch dim N L / CHUNK) states, never (batch, dim, L, N).
# For CPU speed: the chunk's (T, batch, N, dim) work tensors keep dim innermost, so every
# broadcast product runs over long contiguous rows (with N = 8-16 innermost they ran ~5x slower);
# they are allocated once per call and reused (fresh multi-MB tensors cost page faults); exp(x) is
# computed as exp2(x log2 e) (~3x faster than exp on these CPUs, the same value to rounding).
# (Stacking both directions of a bidirectional scan into one time-major loop was measured too: no
# faster at the demo's shapes, slower at larger ones, so each direction scans on its own.)

_LOG2E = 1.4426950408889634


def _batch_first(x):  # (L, batch, K) -> (batch, K, L), a view
    return x.permute(1, 2, 0)


def _time_major(x):  # (batch, K, L) -> (L, batch, K) contiguous: one step = one contiguous block
    return x.permute(2, 0, 1).contiguous()


def _chunk_states(dt, v, A2, B, h, reverse, decay, H):
    """One chunk: dt, v = dt u (T, batch, dim); A2 = log2(e) A^T (N, dim); B (T, batch, N); h (batch, N, dim)
    the state entering it. Fills decay = exp(dt A) and H = the states h_t, both (T, batch, N, dim) in time
    order, and returns the state leaving it (a view into H)."""
    torch.mul(dt.unsqueeze(2), A2, out=decay).exp2_()
    torch.mul(B.unsqueeze(-1), v.unsqueeze(2), out=H)  # dt u B, turned into h_t in place
    for t in (range(len(H) - 1, -1, -1) if reverse else range(len(H))):
        h = H[t].addcmul_(decay[t], h)
    return h


def _chunks(L, reverse):  # [(start, end), ...] in scan order
    bounds = [(lo, min(lo + CHUNK, L)) for lo in range(0, L, CHUNK)]
    return bounds[::-1] if reverse else bounds


class _ChunkedScanFn(torch.autograd.Function):
    """y_t = <C_t, h_t>, h_t = exp(dt_t A) h_{t-1} + v_t B_t. dt, v (batch, dim, L); A (dim, N); B, C
    (batch, N, L), all fp32/fp64. Returns y (batch, dim, L) and the last state (batch, dim, N)."""

    @staticmethod
    def forward(ctx, dt, v, A, B, C, reverse):
        dt, v, B, C = map(_time_major, (dt, v, B, C))  # (L, batch, K)
        L, batch, dim = dt.shape
        A2 = (A * _LOG2E).T.contiguous()  # (N, dim)
        h = dt.new_zeros(batch, A.shape[1], dim)  # (batch, N, dim)
        y = torch.empty_like(dt)  # (L, batch, dim)
        work = dt.new_empty(2, min(L, CHUNK), batch, A.shape[1], dim)
        starts = []
        for lo, hi in _chunks(L, reverse):
            starts.append(h.transpose(1, 2))  # (batch, dim, N) view
            decay, H = work[:, :hi - lo]
            h = _chunk_states(dt[lo:hi], v[lo:hi], A2, B[lo:hi], h, reverse, decay, H).clone()  # H is reused
            torch.matmul(C[lo:hi].unsqueeze(2), H, out=y[lo:hi].unsqueeze(2))  # <C_t, h_t>
        ctx.save_for_backward(dt, v, A, B, C, *starts)
        ctx.reverse = reverse
        return y.permute(1, 2, 0), h.transpose(1, 2)

    @staticmethod
    def backward(ctx, dy, dlast):
        dt, v, A, B, C, *starts = ctx.saved_tensors
        reverse, dy = ctx.reverse, _time_major(dy)
        L, batch, dim = dt.shape
        A2, AT = (A * _LOG2E).T.contiguous(), A.T.contiguous()  # (N, dim)
        ddt, dv, dB, dC = map(torch.empty_like, (dt, v, B, C))
        dAT = torch.zeros_like(AT)
        work = dt.new_empty(4, min(L, CHUNK), batch, A.shape[1], dim)
        # exp(dt_{t+1} A) g_{t+1}, the gradient carried into each chunk from the one after it
        carry = dt.new_zeros(batch, A.shape[1], dim) if dlast is None else dlast.transpose(1, 2)
        for (lo, hi), h0 in reversed(list(zip(_chunks(L, reverse), starts))):
            h0 = h0.transpose(1, 2)  # (batch, N, dim)
            decay, H, G, tmp = work[:, :hi - lo]
            _chunk_states(dt[lo:hi], v[lo:hi], A2, B[lo:hi], h0, reverse, decay, H)
            torch.mul(C[lo:hi].unsqueeze(-1), dy[lo:hi].unsqueeze(2), out=G)  # C_t dy_t
            prev = None
            for t in (range(len(G)) if reverse else range(len(G) - 1, -1, -1)):  # against the scan
                G[t].add_(carry) if prev is None else G[t].addcmul_(decay[prev], G[prev])
                prev = t
            carry = decay[prev] * G[prev]
            torch.matmul(B[lo:hi].unsqueeze(2), G, out=dv[lo:hi].unsqueeze(2))  # <g_t, B_t>
            torch.sum(torch.mul(G, v[lo:hi].unsqueeze(2), out=tmp), -1, out=dB[lo:hi])
            torch.sum(torch.mul(H, dy[lo:hi].unsqueeze(2), out=tmp), -1, out=dC[lo:hi])
            dlog = G.mul_(decay)  # d(dt_t A) = g_t exp(dt_t A) h_{t-1}, in place
            before = (slice(0, -1), slice(1, None)) if reverse else (slice(1, None), slice(0, -1))
            dlog[before[0]].mul_(H[before[1]])
            dlog[-1 if reverse else 0].mul_(h0)
            torch.sum(torch.mul(dlog, AT, out=tmp), 2, out=ddt[lo:hi])
            dAT += dlog.mul_(dt[lo:hi].unsqueeze(2)).sum((0, 1))
        return _batch_first(ddt), _batch_first(dv), dAT.T, _batch_first(dB), _batch_first(dC), None


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, reverse=False):
    """Selective scan in PyTorch with a hand-written, chunk-recomputing backward: the CPU path.
    Same arguments, math and outputs as selective_scan_ref (module docstring), faster on CPU, and
    its backward keeps one state per CHUNK steps instead of autograd's one per step."""
    _check("selective_scan_chunked", u, delta, A, B, C, D, z, delta_bias)
    f = torch.promote_types(u.dtype, torch.float32)
    u32, dt = u.to(f), _step_size(delta, delta_bias, delta_softplus, f)
    y, last = _ChunkedScanFn.apply(dt, dt * u32, A.to(f), B.to(f), C.to(f), reverse)
    out = _skip_and_gate(y, u32, D, z).to(u.dtype)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# Triton kernels. One program = one batch element x BLOCK_D channels (x one direction in the
# backward); it walks over time holding the state h as a (BLOCK_D, NP) fp32 register tile and
# loads B_t, C_t once per step for the whole channel block. N is padded to NP = next power of 2:
# padded lanes load A = 0 (decay 1) and B = C = 0 (input 0), so they stay 0. Processing step s
# visits time t = s (forward) or t = L-1-s (reverse); "rev" below is 0 or 1.

@_jit
def _and(mask, cond):
    """mask & cond for a scalar cond, in a form every Triton interpreter accepts (3.9's rejects a mask made with &
    of a tensor and a scalar; 3.2's cannot build a constant False)"""
    return tl.where(cond, mask, mask != mask)


@_jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # no tl.log1p in the interpreter


@_jit
def _load_params(A_ptr, D_ptr, bias_ptr, k, dim, N, offs_d, offs_n, mask_d, mask_dn,
                 HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_D, NP), D and delta_bias (BLOCK_D,) of direction k, fp32 (A, D, bias are contiguous)."""
    A = tl.load(A_ptr + k * dim * N + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + k * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, Dv, bias


@_jit
def _load_step(t, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, bias, mask_d, mask_n, SOFTPLUS: tl.constexpr):
    """Inputs of time t in fp32: u, delta + bias, dt (BLOCK_D,); B_t, C_t (NP,)."""
    u = tl.load(u_p + t * su_t, mask=mask_d, other=0.0).to(tl.float32)
    raw = tl.load(dt_p + t * sdt_t, mask=mask_d, other=0.0).to(tl.float32) + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    Bt = tl.load(B_p + t * sB_t, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_p + t * sC_t, mask=mask_n, other=0.0).to(tl.float32)
    return u, raw, dt, Bt, Ct


@_jit
def _fwd_step(h, t, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, A, Dv, bias, mask_d, mask_n,
              SOFTPLUS: tl.constexpr):
    """One recurrence step: returns h_t (BLOCK_D, NP) and y_t = <C_t, h_t> + D u_t (BLOCK_D,)."""
    u, raw, dt, Bt, Ct = _load_step(t, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, bias, mask_d, mask_n, SOFTPLUS)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
    return h, tl.sum(h * Ct[None, :], axis=1) + Dv * u


@_jit
def _emit(y, t, o_off, z_p, sz_t, so_t, out_ptr, y_ptr, mask_d, HAS_Z: tl.constexpr, STORE_Y: tl.constexpr):
    """Final y_t: keep it (fp32, for dz in the backward) if asked, gate by silu(z_t), store out_t."""
    if STORE_Y:
        tl.store(y_ptr + o_off + t * so_t, y, mask=mask_d)
    if HAS_Z:
        zt = tl.load(z_p + t * sz_t, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zt * tl.sigmoid(zt)
    tl.store(out_ptr + o_off + t * so_t, y.to(out_ptr.dtype.element_ty), mask=mask_d)


@_jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, y_ptr, p_ptr, ck_ptr,
    batch, dim, L, N, n_chunks, reverse,
    su_k, su_b, su_d, su_t, sdt_k, sdt_b, sdt_d, sdt_t,
    sB_k, sB_b, sB_n, sB_t, sC_k, sC_b, sC_n, sC_t,
    sz_b, sz_d, sz_t, so_b, so_d, so_t,
    ND: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    """grid (batch, cdiv(dim, BLOCK_D)). ND = 1: one scan (direction set by `reverse`).
    ND = 2: both directions in the same program and the same loop (direction 1 at t = L-1-s);
    each y position is reached twice, the first direction there parks its fp32 y in p_ptr and
    the second one adds, gates and stores: one launch, no flipped copies, no atomics."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    mask_d, mask_n = offs_d < dim, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    u_p = u_ptr + b * su_b + offs_d * su_d  # (BLOCK_D,) pointers of direction 0; + s*_k for direction 1
    dt_p = dt_ptr + b * sdt_b + offs_d * sdt_d
    B_p = B_ptr + b * sB_b + offs_n * sB_n  # (NP,)
    C_p = C_ptr + b * sC_b + offs_n * sC_n
    z_p = z_ptr + b * sz_b + offs_d * sz_d
    o_off = b * so_b + offs_d * so_d  # out, y and p share one layout
    ck_p = ck_ptr + ((b * dim + offs_d[:, None]) * n_chunks) * N + offs_n[None, :]  # (ND, batch, dim, n_chunks, N)
    ck_k = batch * dim * n_chunks * N
    A0, D0, bias0 = _load_params(A_ptr, D_ptr, bias_ptr, 0, dim, N, offs_d, offs_n, mask_d, mask_dn,
                                 HAS_D, HAS_BIAS, BLOCK_D)
    A1, D1, bias1 = _load_params(A_ptr, D_ptr, bias_ptr, ND - 1, dim, N, offs_d, offs_n, mask_d, mask_dn,
                                 HAS_D, HAS_BIAS, BLOCK_D)
    h0 = tl.zeros((BLOCK_D, NP), tl.float32)
    h1 = tl.zeros((BLOCK_D, NP), tl.float32)
    for s in range(L):
        is_ck = s == tl.minimum((s // CHUNK) * CHUNK + CHUNK - 1, L - 1)  # checkpoint: a chunk's last step
        t0 = s + reverse * (L - 1 - 2 * s)
        h0, y0 = _fwd_step(h0, t0, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, A0, D0, bias0, mask_d, mask_n,
                           SOFTPLUS)
        tl.store(ck_p + (s // CHUNK) * N, h0, mask=_and(mask_dn, is_ck))
        if ND == 1:
            _emit(y0, t0, o_off, z_p, sz_t, so_t, out_ptr, y_ptr, mask_d, HAS_Z, STORE_Y)
        else:
            t1 = L - 1 - s
            h1, y1 = _fwd_step(h1, t1, u_p + su_k, dt_p + sdt_k, B_p + sB_k, C_p + sC_k, su_t, sdt_t, sB_t, sC_t,
                               A1, D1, bias1, mask_d, mask_n, SOFTPLUS)
            tl.store(ck_p + ck_k + (s // CHUNK) * N, h1, mask=_and(mask_dn, is_ck))
            if 2 * s < L - 1:  # first visit of t0 and t1: park the partial sums
                tl.store(p_ptr + o_off + t0 * so_t, y0, mask=mask_d)
                tl.store(p_ptr + o_off + t1 * so_t, y1, mask=mask_d)
            elif 2 * s == L - 1:  # the middle token: both directions are here now
                _emit(y0 + y1, t0, o_off, z_p, sz_t, so_t, out_ptr, y_ptr, mask_d, HAS_Z, STORE_Y)
            else:  # second visit; the barrier makes other threads' parked sums visible
                tl.debug_barrier()
                p0 = tl.load(p_ptr + o_off + t0 * so_t, mask=mask_d, other=0.0)
                p1 = tl.load(p_ptr + o_off + t1 * so_t, mask=mask_d, other=0.0)
                _emit(y0 + p0, t0, o_off, z_p, sz_t, so_t, out_ptr, y_ptr, mask_d, HAS_Z, STORE_Y)
                _emit(y1 + p1, t1, o_off, z_p, sz_t, so_t, out_ptr, y_ptr, mask_d, HAS_Z, STORE_Y)


@_jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, y_ptr, g_ptr, ck_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbp_ptr, sc_ptr,
    batch, dim, L, N, n_chunks, reverse,
    su_k, su_b, su_d, su_t, sdt_k, sdt_b, sdt_d, sdt_t,
    sB_k, sB_b, sB_n, sB_t, sC_k, sC_b, sC_n, sC_t,
    sz_b, sz_d, sz_t, sy_b, sy_d, sy_t, sg_b, sg_d, sg_t,
    sdu_k, sdu_b, sdu_d, sdu_t, sddt_k, sddt_b, sddt_d, sddt_t, sdz_b, sdz_d, sdz_t,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, NP: tl.constexpr, CHUNK: tl.constexpr,
):
    """grid (ND * batch, cdiv(dim, BLOCK_D)); one program = one direction k of one batch element.

    Walks the chunks last to first. Per chunk: (1) recompute the chunk's states from the forward's
    checkpoint into a program-private scratch (CHUNK, BLOCK_D, NP) fp32: registers cannot be
    indexed by step and running h backwards (h_{t-1} = (h_t - x_t) / a_t) blows up when a_t ~ 0;
    the scratch (CHUNK * BLOCK_D * NP * 4 B = 64 KiB per program) stays in L2; (2) walk backwards:
        dy_t = dout_t silu(z_t);  dh_t = a_{t+1} dh_{t+1} + dy_t C_t  (a_t = exp(dt_t A))
        dC_t += dy_t h_t;  dB_t += dh_t dt_t u_t;  du_t = dt_t <dh_t, B_t> + D dy_t
        ddt_t = u_t <dh_t, B_t> + <dh_t a_t h_{t-1}, A>;  dA += dh_t a_t h_{t-1} dt_t
    dB, dC (summed over channels) and dA, dD, d(delta_bias) (summed over batch, time) are written
    as per-program partial sums that torch reduces afterwards: deterministic, no atomics."""
    pid = tl.program_id(0)
    k, b = (pid // batch).to(tl.int64), (pid % batch).to(tl.int64)
    pid_d = tl.program_id(1)
    rev = k + reverse  # direction 1 of a bidirectional scan runs in reverse
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    mask_d, mask_n = offs_d < dim, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    u_p = u_ptr + k * su_k + b * su_b + offs_d * su_d
    dt_p = dt_ptr + k * sdt_k + b * sdt_b + offs_d * sdt_d
    B_p = B_ptr + k * sB_k + b * sB_b + offs_n * sB_n
    C_p = C_ptr + k * sC_k + b * sC_b + offs_n * sC_n
    z_p = z_ptr + b * sz_b + offs_d * sz_d
    y_p = y_ptr + b * sy_b + offs_d * sy_d
    g_p = g_ptr + b * sg_b + offs_d * sg_d
    du_p = du_ptr + k * sdu_k + b * sdu_b + offs_d * sdu_d
    ddt_p = ddt_ptr + k * sddt_k + b * sddt_b + offs_d * sddt_d
    dz_p = dz_ptr + b * sdz_b + offs_d * sdz_d
    dBp_p = dBp_ptr + ((pid_d * tl.num_programs(0) + pid).to(tl.int64) * L) * N + offs_n  # (n_dblocks, ND, batch, L, N)
    dCp_p = dCp_ptr + ((pid_d * tl.num_programs(0) + pid).to(tl.int64) * L) * N + offs_n
    kbd = (k * batch + b) * dim + offs_d  # row index into (ND, batch, dim, ...) tensors
    kbdn = kbd[:, None] * N + offs_n[None, :]
    ck_p = ck_ptr + kbd[:, None] * n_chunks * N + offs_n[None, :]
    sc_p = (sc_ptr + (pid * tl.num_programs(1) + pid_d).to(tl.int64) * (CHUNK * BLOCK_D * NP)
            + tl.arange(0, BLOCK_D)[:, None] * NP + offs_n[None, :])
    A, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, k, dim, N, offs_d, offs_n, mask_d, mask_dn,
                               HAS_D, HAS_BIAS, BLOCK_D)
    dh = tl.zeros((BLOCK_D, NP), tl.float32)  # gradient w.r.t. the state, running backwards
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + kbdn, mask=mask_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, NP), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        s0 = c * CHUNK
        n_in = tl.minimum(L - s0, CHUNK)
        # (1) recompute: scratch[j] = state before step s0 + j
        h = tl.load(ck_p + (c - 1) * N, mask=_and(mask_dn, c > 0), other=0.0)
        for j in range(n_in):
            tl.store(sc_p + j * BLOCK_D * NP, h)
            t = s0 + j + rev * (L - 1 - 2 * (s0 + j))
            h, _ = _fwd_step(h, t, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, A, Dv, bias, mask_d, mask_n, SOFTPLUS)
        tl.debug_barrier()
        # (2) backward through the chunk
        for jj in range(n_in):
            j = n_in - 1 - jj
            t = s0 + j + rev * (L - 1 - 2 * (s0 + j))
            h_prev = tl.load(sc_p + j * BLOCK_D * NP)
            u, raw, dt, Bt, Ct = _load_step(t, u_p, dt_p, B_p, C_p, su_t, sdt_t, sB_t, sC_t, bias, mask_d, mask_n,
                                            SOFTPLUS)
            a = tl.exp(dt[:, None] * A)
            h = a * h_prev + (dt * u)[:, None] * Bt[None, :]
            dy = tl.load(g_p + t * sg_t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:  # dz = dout * y * silu'(z), y = both directions' sum, saved by the forward
                zt = tl.load(z_p + t * sz_t, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zt)
                first = _and(mask_d, k == 0)  # one direction writes dz
                yt = tl.load(y_p + t * sy_t, mask=first, other=0.0)
                dz = dy * yt * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_p + t * sdz_t, dz.to(dz_ptr.dtype.element_ty), mask=first)
                dy = dy * zt * sig
            tl.store(dCp_p + t * N, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
            dh += dy[:, None] * Ct[None, :]
            tl.store(dBp_p + t * N, tl.sum(dh * (dt * u)[:, None], axis=0), mask=mask_n)
            dhB = tl.sum(dh * Bt[None, :], axis=1)  # (BLOCK_D,)
            q = dh * a * h_prev  # gradient w.r.t. dt_t * A
            ddt = u * dhB + tl.sum(q * A, axis=1)
            dA_acc += q * dt[:, None]
            du = dt * dhB + dy * Dv
            dD_acc += dy * u
            if SOFTPLUS:
                ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
            db_acc += ddt
            tl.store(du_p + t * sdu_t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_p + t * sddt_t, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            dh = dh * a  # -> gradient w.r.t. h_{t-1}
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dAp_ptr + kbdn, dA_acc, mask=mask_dn)
    tl.store(dDp_ptr + kbd, dD_acc, mask=mask_d)
    tl.store(dbp_ptr + kbd, db_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# autograd wrapper around the kernels

def _launch(kernel, grid, *args, **constexprs):
    """kernel[grid](*args, **constexprs): the one place the kernels start (the compile-budget test records here)"""
    kernel[grid](*args, **constexprs)


def _blocks(dim, N):
    """(BLOCK_D, NP): a ~1K-element fp32 state tile per program (8 registers/thread at 4 warps)."""
    NP = triton.next_power_of_2(N)
    return min(64, triton.next_power_of_2(dim), max(8, 1024 // NP)), NP


def _or(u, x):
    """x, or (for an absent optional input) any tensor as a pointer the kernel never reads"""
    return u if x is None else x


def _empty_like_layout(x, dtype):
    """Dense tensor of x's shape whose memory order follows x's strides (coalesced kernel stores)."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
    return torch.empty([x.shape[i] for i in order], dtype=dtype, device=x.device).permute(
        [order.index(i) for i in range(x.dim())])


class _ScanFn(torch.autograd.Function):
    """Stacked directions: u, delta (ND, batch, dim, L); A (ND, dim, N); B, C (ND, batch, N, L);
    D, delta_bias (ND, dim) or None; z (batch, dim, L) or None. ND = 1: one scan (reverse picks
    the direction); ND = 2: direction 0 forward + direction 1 reverse, outputs summed.
    Returns out (batch, dim, L) and, if return_last, the final states (ND, batch, dim, N)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, reverse, return_last, grad_enabled):
        ND, batch, dim, L = u.shape
        N = A.shape[-1]
        A, D, delta_bias = [None if x is None else x.contiguous() for x in (A, D, delta_bias)]
        BLOCK_D, NP = _blocks(dim, N)
        n_chunks = triton.cdiv(L, CHUNK)
        store_y = z is not None and grad_enabled and any(ctx.needs_input_grad[:8])  # y before the gate, for dz
        out = _empty_like_layout(u[0], u.dtype)
        y = _empty_like_layout(u[0], torch.float32) if store_y else None
        p = _empty_like_layout(u[0], torch.float32) if ND == 2 else None
        ck = torch.empty(ND, batch, dim, n_chunks, N, dtype=torch.float32, device=u.device)
        zs = z.stride() if z is not None else (0, 0, 0)
        _launch(_fwd_kernel, (batch, triton.cdiv(dim, BLOCK_D)),
            u, delta, A, B, C, _or(u, D), _or(u, delta_bias), _or(u, z), out, _or(u, y), _or(u, p), ck,
            batch, dim, L, N, n_chunks, int(reverse),
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zs, *out.stride(),
            ND=ND, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_Z=z is not None,
            SOFTPLUS=softplus, STORE_Y=store_y, BLOCK_D=BLOCK_D, NP=NP, CHUNK=CHUNK, num_warps=4)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, ck)  # ck, not (batch, dim, L, N) states
        ctx.cfg = (softplus, reverse)
        return out, (ck[:, :, :, -1].clone() if return_last else None)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, y, ck = ctx.saved_tensors
        softplus, reverse = ctx.cfg
        ND, batch, dim, L = u.shape
        N, n_chunks = A.shape[-1], ck.shape[3]
        BLOCK_D, NP = _blocks(dim, N)
        grid = (ND * batch, triton.cdiv(dim, BLOCK_D))
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = _empty_like_layout(u, u.dtype), _empty_like_layout(delta, delta.dtype)
        dz = _empty_like_layout(z, z.dtype) if z is not None else None
        dBp = torch.empty(grid[1], ND, batch, L, N, **f32)  # per-channel-block partial sums
        dCp = torch.empty(grid[1], ND, batch, L, N, **f32)
        dAp = torch.empty(ND, batch, dim, N, **f32)  # per-batch-element partial sums
        dDp = torch.empty(ND, batch, dim, **f32)
        dbp = torch.empty(ND, batch, dim, **f32)
        scratch = torch.empty(grid[0] * grid[1] * CHUNK * BLOCK_D * NP, **f32)
        dlast = dlast.float().contiguous() if dlast is not None else None
        zs, ys, dzs = [x.stride() if x is not None else (0, 0, 0) for x in (z, y, dz)]
        _launch(_bwd_kernel, grid,
            u, delta, A, B, C, _or(u, D), _or(u, delta_bias), _or(u, z), _or(u, y), dout, ck, _or(u, dlast),
            du, ddelta, _or(u, dz), dBp, dCp, dAp, dDp, dbp, scratch,
            batch, dim, L, N, n_chunks, int(reverse),
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zs, *ys, *dout.stride(),
            *du.stride(), *ddelta.stride(), *dzs,
            HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_Z=z is not None, SOFTPLUS=softplus,
            HAS_DLAST=dlast is not None, BLOCK_D=BLOCK_D, NP=NP, CHUNK=CHUNK, num_warps=4)
        dB = dBp.sum(0).transpose(-1, -2).to(B.dtype)  # (ND, batch, N, L)
        dC = dCp.sum(0).transpose(-1, -2).to(C.dtype)
        dA = dAp.sum(1).to(A.dtype)
        dD = dDp.sum(1).to(D.dtype) if D is not None else None
        dbias = dbp.sum(1).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API

def _stacked(x):  # a leading direction axis of 1, as a view
    return None if x is None else x[None]


@torch.profiler.record_function("selective_scan")  # a label for profilers (bench.py's student time split)
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False, backend="auto"):
    """Selective scan, mamba-ssm selective_scan_fn semantics and backends: see the module docstring.
    last_state is differentiable on every backend.
    Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N) fp32]."""
    _check("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    backend = _pick_backend("selective_scan", backend, u)
    if backend != "triton":
        scan = selective_scan_chunked if backend == "chunked" else selective_scan_ref
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    out, last = _ScanFn.apply(u[None], delta[None], A[None], B[None], C[None], _stacked(D), z, _stacked(delta_bias),
                              delta_softplus, reverse, return_last_state, torch.is_grad_enabled())
    return (out, last[0]) if return_last_state else out


@torch.profiler.record_function("selective_scan")
def bidirectional_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 backend="auto"):
    """Fused bidirectional scan (Vim v2): out = (y_fwd + y_bwd) * silu(z), (batch, dim, L) in u's dtype.

    u, delta (2, batch, dim, L); A (2, dim, N); B, C (2, batch, N, L); D, delta_bias (2, dim);
    z (batch, dim, L), shared. Direction 0 scans t = 0..L-1, direction 1 t = L-1..0, both in the
    original token order; y_dir includes D * u. Any strides (e.g. transposed views), no copies. Backends as in
    the module docstring; "triton" makes one forward and one backward launch for both directions, "chunked" and
    "reference" two PyTorch scans (reverse=False / True; no flips), summed in fp32, then gated."""
    _check("bidirectional_selective_scan", u, delta, A, B, C, D, z, delta_bias, lead=(2,))
    backend = _pick_backend("bidirectional_selective_scan", backend, u)
    if backend == "triton":
        return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, False,
                            torch.is_grad_enabled())[0]
    scan = selective_scan_chunked if backend == "chunked" else selective_scan_ref
    f = torch.promote_types(u.dtype, torch.float32)
    y = sum(scan(u[k].to(f), delta[k], A[k], B[k], C[k], None if D is None else D[k], None,
                 None if delta_bias is None else delta_bias[k], delta_softplus, reverse=k == 1)
            for k in (0, 1))
    return _skip_and_gate(y, None, None, z).to(u.dtype)


# ----------------------------------------------------------------------------------------------
# SSD: the Mamba-2 scan (the Adventurer student's mixer). Shapes as mamba-ssm's mamba_chunk_scan_combined:
#     x, z  : (batch, L, heads, headdim)      input, gate
#     dt    : (batch, L, heads)               step size (pre-activation if dt_softplus)
#     A     : (heads,)                        one scalar decay per head (negative)
#     B, C  : (batch, L, groups, N)           input / output projections, shared by heads / groups heads each
#     D     : (heads,) or (heads, headdim);  dt_bias: (heads,)
#
#     dt_t = softplus(dt_t + dt_bias)                        (softplus only if dt_softplus)
#     h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T            h: (headdim, N) per head, h_{-1} = 0
#     y_t  = h_t C_t + D x_t,     out = y * silu(z)          (z only if given)
#
# Unrolled, y_t = sum_{s <= t} (C_t . B_s) exp(dA_{s+1} + .. + dA_t) dt_s x_s: a causal, decayed "attention" whose
# L x L matrix is never built. The chunked form (Mamba-2 paper, section 6) cuts time into chunks of Q steps:
#     (1) within a chunk, that matrix restricted to the chunk (Q x Q): Y_diag = (C B^T * exp(segsum(dA))) (dt x);
#     (2) each chunk's own contribution to the state at its end: S_c = sum_s exp(dA_(s, end]) dt_s x_s B_s^T;
#     (3) the state entering each chunk, passed from chunk to chunk: H_c = exp(sum dA of chunk c-1) H_{c-1} + S_{c-1};
#     (4) what that entering state adds to each output of the chunk: Y_off = exp(dA_(start, t]) H_c C_t.
# All four are matrix products (O(L Q) per head, linear in L). The backward is written out (_SSDChunkedFn): it keeps
# the inputs and the state entering each chunk, and recomputes the rest, ~4x less saved memory than autograd through
# the same products (10 vs 42 MB for one Adventurer-B mixer at 448 px). segsum(dA)[i, j] is the
# sum of dA over (j, i], taken as a cumulative sum of a masked Q x Q tile, so no long cumsum is ever subtracted from
# another; the upper triangle is -inf before exp, so no inf * 0 arises. L is padded to a multiple of Q with dt = 0
# (decay 1, input 0): padded steps change nothing before them and are cut off.

SSD_CHUNK = 64  # the default chunk size Q


def _check_ssd(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias):
    """One-line errors for wrong shapes, dtypes or devices of the SSD inputs."""
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be (batch, L, heads, headdim), got {tuple(x.shape)}")
    if B.dim() != 4:
        raise ValueError(f"{fn}: B must be (batch, L, groups, N), got {tuple(B.shape)}")
    batch, L, heads, p = x.shape
    groups, N = B.shape[2:]
    want = {"dt": (batch, L, heads), "A": (heads,), "B": (batch, L, groups, N), "C": (batch, L, groups, N),
            "z": (batch, L, heads, p), "dt_bias": (heads,)}
    if D is not None and D.dim() == 2:
        want["D"] = (heads, p)
    else:
        want["D"] = (heads,)
    for name, t in dict(dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias).items():
        if t is None:
            continue
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{fn}: {name} must have shape {want[name]} for x {tuple(x.shape)} and B "
                             f"{tuple(B.shape)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating point tensor, got {x.dtype}")
    if L < 1 or N < 1 or groups < 1 or heads % groups:
        raise ValueError(f"{fn}: need L >= 1, N >= 1 and heads ({heads}) a multiple of groups ({groups})")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")


def _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus):
    """-> the math dtype f, x, dt (softplus applied), A, B, C in f"""
    f = torch.promote_types(x.dtype, torch.float32)                # fp32 math (fp64 stays fp64 for the tests)
    dt = dt.to(f) if dt_bias is None else dt.to(f) + dt_bias.to(f)
    return f, x.to(f), F.softplus(dt) if dt_softplus else dt, A.to(f), B.to(f), C.to(f)


def _ssd_out(y, x, D, z, dtype):
    """(y + D x) * silu(z), each term only if given, in x's dtype"""
    if D is not None:
        y = y + (D.to(y.dtype)[:, None] if D.dim() == 1 else D.to(y.dtype)) * x
    return (y * F.silu(z.to(y.dtype)) if z is not None else y).to(dtype)


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The SSD recurrence as written above, one step at a time (the tests' oracle): (batch, L, heads, headdim)."""
    _check_ssd("ssd_scan_ref", x, dt, A, B, C, 1, D, z, dt_bias)
    dtype, heads, groups = x.dtype, x.shape[2], B.shape[2]
    f, x, dt, A, B, C = _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    B, C = (t.repeat_interleave(heads // groups, dim=2) for t in (B, C))           # (batch, L, heads, N)
    h = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[3])                      # (batch, heads, headdim, N)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):  # unbind: views, O(L) bwd
        h = torch.exp(dt_t * A)[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((h @ C_t[..., None])[..., 0])                                     # (batch, heads, headdim)
    return _ssd_out(torch.stack(ys, dim=1), x, D, z, dtype)


def _segsum(dA):
    """(..., Q) -> (..., Q, Q): [i, j] = dA[j+1] + .. + dA[i] for i >= j (0 on the diagonal), -inf above it"""
    ones = torch.ones(dA.shape[-1], dA.shape[-1], dtype=torch.bool, device=dA.device)
    tile = dA[..., :, None].expand(*dA.shape, dA.shape[-1]).masked_fill(~ones.tril(-1), 0)  # [i, j] = dA[i], i > j
    return tile.cumsum(-2).masked_fill(~ones.tril(), float("-inf"))


def _pad_steps(t, pad):  # (batch, L, ...) -> (batch, L + pad, ...), zeros after the end
    return t if pad == 0 else torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


class _SSDChunks(NamedTuple):
    """What both directions of the chunked SSD compute first, for c chunks of Q steps, heads as (g groups, r heads
    each). Layout (batch, chunk, step, group, head, headdim) as x's; B and C as (batch, chunk, group, step, N)."""
    x: torch.Tensor       # (batch, c, Q, g, r, p)  x, padded
    dt: torch.Tensor      # (batch, c, Q, g, r)     dt, padded with 0: decay 1, input 0
    xs: torch.Tensor      # (batch, c, Q, g, r, p)  dt_s x_s
    cum: torch.Tensor     # (batch, c, Q, g, r)     dt A summed within the chunk up to and including the step
    B: torch.Tensor       # (batch, c, g, Q, N)
    C: torch.Tensor       # (batch, c, g, Q, N)
    CB: torch.Tensor      # (batch, c, g, Q, Q)     C_t . B_s
    decay: torch.Tensor   # (batch, c, g, r, Q, Q)  exp(segsum dA): exp(dA_(s, t]) for s <= t, else 0


def _ssd_chunks(x, dt, A, B, C, chunk_size):
    batch, L, heads, p = x.shape
    g, N = B.shape[2:]
    c = -(-L // chunk_size)                                 # chunks of at most chunk_size steps, as equal as can be,
    Q, r = -(-L // c), heads // g                           # so little is padded (L = 198, 64: 4 x 50, not 4 x 64)
    pad = c * Q - L
    x, dt = _pad_steps(x, pad).view(batch, c, Q, g, r, p), _pad_steps(dt, pad).view(batch, c, Q, g, r)
    dA = dt * A.view(g, r)
    Bc, Cc = (_pad_steps(t, pad).view(batch, c, Q, g, N).transpose(2, 3) for t in (B, C))
    return _SSDChunks(x, dt, x * dt[..., None], dA.cumsum(2), Bc, Cc, Cc @ Bc.transpose(-1, -2),
                      torch.exp(_segsum(dA.permute(0, 1, 3, 4, 2))))


class _SSDChunkedFn(torch.autograd.Function):
    """y = SSD(x, dt, A, B, C) in chunks, steps (1)-(4) above, with a hand-written backward. Saved: the inputs and
    the state entering each chunk (batch, c, g, N, r p); the backward recomputes the rest (_ssd_chunks), so nothing
    of size (batch, c, heads, Q, Q) is kept between the passes."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size):             # dt after softplus; all in the math dtype
        (batch, L, heads, p), (g, N) = x.shape, B.shape[2:]
        k = _ssd_chunks(x, dt, A, B, C, chunk_size)
        c, Q, r = k.x.shape[1], k.x.shape[2], k.x.shape[4]
        # (1) within each chunk, per head: (C B^T * exp(segsum dA)) (dt x)
        y = ((k.CB[:, :, :, None] * k.decay) @ k.xs.permute(0, 1, 3, 4, 2, 5)).permute(0, 1, 4, 2, 3, 5)
        H = None
        if c > 1:
            # (2) each chunk's contribution to the state at its end: sum_s B_s (exp(dA_(s, end]) dt_s x_s)^T
            xw = (k.xs * torch.exp(k.cum[:, :, -1:] - k.cum)[..., None]).view(batch, c, Q, g, r * p).transpose(2, 3)
            S = k.B.transpose(-1, -2) @ xw                                          # (batch, c, g, N, r p)
            # (3) the state entering each chunk, passed from chunk to chunk
            H = S.new_zeros(batch, c, g, N, r, p)
            chunk_decay = torch.exp(k.cum[:, :, -1])[:, :, :, None, :, None]        # (batch, c, g, 1, r, 1)
            for i in range(1, c):
                torch.addcmul(S[:, i - 1].view(batch, g, N, r, p), H[:, i - 1], chunk_decay[:, i - 1], out=H[:, i])
            H = H.view(batch, c, g, N, r * p)
            # (4) what the entering state adds to each output of its chunk: exp(dA_(start, t]) C_t H
            y = y + (k.C @ H).view(batch, c, g, Q, r, p).transpose(2, 3) * torch.exp(k.cum)[..., None]
        ctx.save_for_backward(x, dt, A, B, C, H)
        ctx.chunk_size = chunk_size
        return y.reshape(batch, c * Q, heads, p)[:, :L]

    @staticmethod
    def backward(ctx, dout):
        x, dt, A, B, C, H = ctx.saved_tensors
        (batch, L, heads, p), (g, N) = x.shape, B.shape[2:]
        k = _ssd_chunks(x, dt, A, B, C, ctx.chunk_size)
        c, Q, r = k.x.shape[1], k.x.shape[2], k.x.shape[4]
        dy = _pad_steps(dout, c * Q - L).view(batch, c, Q, g, r, p)
        # (1) y = M (dt x) per head, M = C B^T * decay: dM gives dCB and, through decay = exp(cum_t - cum_s), dcum
        dyT, xsT = dy.permute(0, 1, 3, 4, 2, 5), k.xs.permute(0, 1, 3, 4, 2, 5)    # (batch, c, g, r, Q, p)
        dxs = ((k.CB[:, :, :, None] * k.decay).transpose(-1, -2) @ dyT).permute(0, 1, 4, 2, 3, 5)
        dMd = (dyT @ xsT.transpose(-1, -2)) * k.decay                               # (batch, c, g, r, Q, Q)
        dCB = dMd.sum(3)                                                            # (batch, c, g, Q, Q)
        dseg = dMd * k.CB[:, :, :, None]
        dcum = (dseg.sum(-1) - dseg.sum(-2)).permute(0, 1, 4, 2, 3)                 # (batch, c, Q, g, r)
        dC, dB = dCB @ k.B, dCB.transpose(-1, -2) @ k.C                             # (batch, c, g, Q, N)
        if c > 1:
            # (4) y += exp(cum) (C H)
            E = torch.exp(k.cum)                                                    # (batch, c, Q, g, r)
            dyE = (dy * E[..., None]).transpose(2, 3).reshape(batch, c, g, Q, r * p)
            CH = (k.C @ H).view(batch, c, g, Q, r, p).transpose(2, 3)               # (batch, c, Q, g, r, p)
            dcum = dcum + (dy * CH).sum(-1) * E
            dC = dC + dyE @ H.transpose(-1, -2)
            dH = (k.C.transpose(-1, -2) @ dyE).view(batch, c, g, N, r, p)
            # (3) H_i = H_{i-1} exp(cum_end, i-1) + S_{i-1}, backwards: G_i = dH_i + exp(cum_end, i) G_{i+1}
            chunk_decay = torch.exp(k.cum[:, :, -1])                                # (batch, c, g, r)
            Hv, dS, d_decay = H.view(batch, c, g, N, r, p), torch.zeros_like(dH), torch.zeros_like(chunk_decay)
            G = dH[:, c - 1]
            for i in range(c - 2, -1, -1):
                dS[:, i] = G
                d_decay[:, i] = (G * Hv[:, i]).sum((2, 4))
                G = torch.addcmul(dH[:, i], G, chunk_decay[:, i, :, None, :, None])
            # (2) S = B^T (xs * w), w = exp(cum_end - cum)
            w = torch.exp(k.cum[:, :, -1:] - k.cum)                                 # (batch, c, Q, g, r)
            dS = dS.view(batch, c, g, N, r * p)
            xw = (k.xs * w[..., None]).view(batch, c, Q, g, r * p).transpose(2, 3)  # (batch, c, g, Q, r p)
            dB = dB + xw @ dS.transpose(-1, -2)
            dxw = (k.B @ dS).transpose(2, 3).reshape(batch, c, Q, g, r, p)
            dxs = dxs + dxw * w[..., None]
            dw = (dxw * k.xs).sum(-1) * w                                           # d/d(cum_end - cum)
            dcum = dcum - dw
            dcum[:, :, -1] += dw.sum(2) + d_decay * chunk_decay
        ddA = dcum.flip(2).cumsum(2).flip(2)                                        # cum = cumsum(dA)
        ddt = ddA * A.view(g, r) + (dxs * k.x).sum(-1)                              # dA = dt A, xs = dt x
        dA_ = (ddA * k.dt).sum((0, 1, 2)).view(heads)
        dx = (dxs * k.dt[..., None]).reshape(batch, c * Q, heads, p)[:, :L]
        dB, dC = (t.transpose(2, 3).reshape(batch, c * Q, g, N)[:, :L] for t in (dB, dC))
        return dx, ddt.reshape(batch, c * Q, heads)[:, :L], dA_, dB, dC, None


def ssd_scan_chunked(x, dt, A, B, C, chunk_size=SSD_CHUNK, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The SSD scan in chunks of chunk_size steps (steps (1)-(4) above, _SSDChunkedFn): (batch, L, heads, headdim).
    Tensors keep x's layout, (batch, chunk, step, group, head of the group, headdim), wherever a product allows,
    so that heads sharing a group's B and C are one matrix product; only step (1) needs the heads outside."""
    _check_ssd("ssd_scan_chunked", x, dt, A, B, C, chunk_size, D, z, dt_bias)
    dtype = x.dtype
    f, x, dt, A, B, C = _ssd_inputs(x, dt, A, B, C, dt_bias, dt_softplus)
    return _ssd_out(_SSDChunkedFn.apply(x, dt, A, B, C, chunk_size), x, D, z, dtype)


@torch.profiler.record_function("ssd_scan")  # a label for profilers (bench.py's student time split)
def ssd_scan(x, dt, A, B, C, chunk_size=SSD_CHUNK, D=None, z=None, dt_bias=None, dt_softplus=False,
             backend="auto"):
    """The Mamba-2 (SSD) scan with mamba-ssm's mamba_chunk_scan_combined arguments (see the section comment):
    x (batch, L, heads, headdim), dt (batch, L, heads), A (heads,), B, C (batch, L, groups, N), D (heads,) or
    (heads, headdim), z like x, dt_bias (heads,). Returns (batch, L, heads, headdim) in x's dtype; the math is fp32
    (fp64 for fp64 inputs). Backends: "chunked" (the default, "auto", on CPU and GPU) and "reference" (one step at a
    time, the tests' oracle)."""
    if backend not in ("auto", "chunked", "reference"):
        raise ValueError(f"ssd_scan: backend must be 'auto', 'chunked' or 'reference', got {backend!r}")
    if backend == "reference":
        _check_ssd("ssd_scan", x, dt, A, B, C, chunk_size, D, z, dt_bias)
        return ssd_scan_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return ssd_scan_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus)
