"""
Selective scan (Mamba-1 "S6") for the ViT-Linearizer student: a readable PyTorch reference and
a Triton kernel (forward and backward), single-direction and fused bidirectional (Vim "v2").

Symbols (shapes as mamba-ssm's selective_scan_fn; PAPER.md, "The student"):
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
                 CPU_CHUNK steps (the CPU path for training and inference).
    "triton":    _ScanFn, Triton kernels for forward and backward (CUDA, or the CPU interpreter
                 when TRITON_INTERPRET=1 was set before this module was imported).
    "auto":      "triton" if triton imports, u is fp32/fp16/bf16 and (u.is_cuda or TRITON_INTERPRET=1),
                 else "chunked". An explicit "triton" that cannot run raises instead.
"""

import os

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
    """-> "triton", "chunked" or "reference"; an explicit "triton" raises (never falls back) when it cannot run."""
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
# chunks of CPU_CHUNK steps; per chunk, the decays exp(dt A) and inputs dt u B of all its steps are
# computed in one vectorised op each, the recurrence is one in-place multiply-add per step, and the
# outputs <C_t, h_t> are one multiply-sum per chunk. Only the state entering each chunk is kept for
# the backward, which recomputes the chunk's states and runs the adjoint recurrence
#     g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}      (g_t = dLoss/dh_t; "t+1" = the next scan step)
# from which d(dt u) = <g_t, B_t>, dB_t = sum_d g_t dt u, dC_t = sum_d h_t dy_t and
# d(dt_t A) = g_t h_{t-1} exp(dt_t A) follow in vectorised ops. Saved memory: O(batch dim L)
# inputs + O(batch dim N L / CPU_CHUNK) states, never (batch, dim, L, N).

CPU_CHUNK = 16


def _time_major(x):  # (batch, K, L) -> (L, batch, K) contiguous: one step = one contiguous block
    return x.permute(2, 0, 1).contiguous()


def _chunk_states(dt, v, A, B, h, reverse):
    """One chunk: dt, v = dt u (T, batch, dim); B (T, batch, N); h (batch, dim, N) the state entering it.
    -> decays exp(dt A) and states h_t, both (T, batch, dim, N) in time order, and the state leaving it."""
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (T, batch, dim, N)
    H = v.unsqueeze(-1) * B.unsqueeze(2)  # (T, batch, dim, N), dt u B, turned into h_t in place
    for t in (range(len(H) - 1, -1, -1) if reverse else range(len(H))):
        h = H[t].addcmul_(decay[t], h)
    return decay, H, h


def _chunks(L, reverse):  # [(start, end), ...] in scan order
    bounds = [(lo, min(lo + CPU_CHUNK, L)) for lo in range(0, L, CPU_CHUNK)]
    return bounds[::-1] if reverse else bounds


class _ChunkedScanFn(torch.autograd.Function):
    """y_t = <C_t, h_t>, h_t = exp(dt_t A) h_{t-1} + v_t B_t. dt, v (batch, dim, L); A (dim, N); B, C
    (batch, N, L), all fp32/fp64. Returns y (batch, dim, L) and the last state (batch, dim, N)."""

    @staticmethod
    def forward(ctx, dt, v, A, B, C, reverse):
        dt, v, B, C = map(_time_major, (dt, v, B, C))  # (L, batch, K)
        h = dt.new_zeros(dt.shape[1], dt.shape[2], A.shape[1])  # (batch, dim, N)
        y = torch.empty_like(dt)  # (L, batch, dim)
        starts = []
        for lo, hi in _chunks(len(dt), reverse):
            starts.append(h)
            _, H, h = _chunk_states(dt[lo:hi], v[lo:hi], A, B[lo:hi], h, reverse)
            h = h.clone()  # a view into H, which the next line overwrites
            y[lo:hi] = H.mul_(C[lo:hi].unsqueeze(2)).sum(-1)
        ctx.save_for_backward(dt, v, A, B, C, *starts)
        ctx.reverse = reverse
        return y.permute(1, 2, 0), h

    @staticmethod
    def backward(ctx, dy, dlast):
        dt, v, A, B, C, *starts = ctx.saved_tensors
        reverse, dy = ctx.reverse, _time_major(dy)
        ddt, dv, dB, dC = map(torch.empty_like, (dt, v, B, C))
        dA = torch.zeros_like(A)
        carry = dlast if dlast is not None else torch.zeros_like(starts[0])  # exp(dt_{t+1} A) g_{t+1}
        for (lo, hi), h0 in reversed(list(zip(_chunks(len(dt), reverse), starts))):
            decay, H, _ = _chunk_states(dt[lo:hi], v[lo:hi], A, B[lo:hi], h0, reverse)
            G = dy[lo:hi].unsqueeze(-1) * C[lo:hi].unsqueeze(2)  # (T, batch, dim, N), C_t dy_t
            prev = None
            for t in (range(len(G)) if reverse else range(len(G) - 1, -1, -1)):  # against the scan
                G[t].add_(carry) if prev is None else G[t].addcmul_(decay[prev], G[prev])
                prev = t
            carry = decay[prev] * G[prev]
            H_before = torch.cat([H[1:], h0[None]]) if reverse else torch.cat([h0[None], H[:-1]])  # h_{t-1}
            dv[lo:hi] = (G * B[lo:hi].unsqueeze(2)).sum(-1)
            dB[lo:hi] = (G * v[lo:hi].unsqueeze(-1)).sum(2)
            dC[lo:hi] = H.mul_(dy[lo:hi].unsqueeze(-1)).sum(2)
            dlog = G.mul_(H_before).mul_(decay)  # d(dt_t A), (T, batch, dim, N)
            ddt[lo:hi] = (dlog * A).sum(-1)
            dA += (dlog * dt[lo:hi].unsqueeze(-1)).sum((0, 1))
        batch_first = lambda x: x.permute(1, 2, 0)  # noqa: E731  (L, batch, K) -> (batch, K, L)
        return batch_first(ddt), batch_first(dv), dA, batch_first(dB), batch_first(dC), None


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, reverse=False):
    """Selective scan in PyTorch with a hand-written, chunk-recomputing backward: the CPU path.
    Same arguments, math and outputs as selective_scan_ref (module docstring), faster on CPU, and
    its backward keeps one state per CPU_CHUNK steps instead of autograd's one per step."""
    _check("selective_scan_chunked", u, delta, A, B, C, D, z, delta_bias)
    f = torch.promote_types(u.dtype, torch.float32)
    u32, dt = u.to(f), _step_size(delta, delta_bias, delta_softplus, f)
    y, last = _ChunkedScanFn.apply(dt, dt * u32, A.to(f), B.to(f), C.to(f), reverse)
    out = _skip_and_gate(y, u32, D, z).to(u.dtype)
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# Triton kernels. One program = one batch element x BLOCK_D channels (x one direction in the backward). Time is
# cut into tiles of BLOCK_T consecutive steps, loaded as 2-D (BLOCK_D, BLOCK_T) tiles (coalesced along whichever
# axis has stride 1). Per tile and per state n, the program forms the pairs (a_t, b_t) = (exp(dt_t A_n), dt_t u_t B_t)
# of all the tile's steps, runs a parallel scan over time with the combine
#     (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)        (1 earlier in scan order than 2)
# which turns them into h_t = a~_t h_in + b~_t, where h_in is the state carried in from the previous tile; then
# y_t += C_t h_t. The states leaving the tiles (all n) live in a (BLOCK_D, NP) fp32 register tile between tiles, and
# are written to ck (ND, batch, dim, n_tiles, N) fp32: the checkpoints the backward restarts each tile from.
# N is padded to NP = next power of 2 (padded lanes are never read back). Steps past the end (t >= L) get dt = 0 and
# u = 0, i.e. (a, b) = (1, 0), the identity of the combine: they pass the state through in either scan direction.
# A reverse scan (t = L-1 .. 0) visits the tiles last to first and scans each with reverse=True: no flipped copies.

@_jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # no tl.log1p in the interpreter


@_jit
def _combine(a_l, b_l, a_r, b_r):  # (a_l, b_l) earlier in scan order
    return a_r * a_l, a_r * b_l + b_r


@_jit
def _column(x, sel):
    """x (R, C), sel (C,) or (1, C) bool, True at one column -> that column of x, (R,)"""
    return tl.sum(tl.where(sel, x, 0.0), axis=1)


@_jit
def _load_tile(ptr, offs_d, offs_t, s_d, s_t, mask):
    """(BLOCK_D, BLOCK_T) tile of a (dim, L) view, fp32, 0 outside mask"""
    return tl.load(ptr + offs_d[:, None] * s_d + offs_t[None, :] * s_t, mask=mask, other=0.0).to(tl.float32)


@_jit
def _step_tile(dt_ptr, offs_d, offs_t, s_d, s_t, mask, bias, SOFTPLUS: tl.constexpr):
    """-> (delta + bias, dt), (BLOCK_D, BLOCK_T) fp32; dt = softplus(delta + bias) if SOFTPLUS, and 0 outside mask"""
    raw = _load_tile(dt_ptr, offs_d, offs_t, s_d, s_t, mask) + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, tl.where(mask, dt, 0.0)


@_jit
def _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """-> pointers to A[offs_d, 0] (BLOCK_D,) (A is (dim, N) contiguous), D and delta_bias (BLOCK_D,) fp32"""
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A_ptr + offs_d * N, Dv, bias


@_jit
def _scan_tile(u, dt, s, offs_t, mask_t, mask_d, A_p, B_p, C_p, sB_n, sB_t, sC_n, sC_t, ck_p, Dv, N,
               REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Scan-order tile s of one direction; u, dt (BLOCK_D, BLOCK_T). Reads the states entering the tile from ck_p
    (BLOCK_D,) pointers at checkpoint s - 1, writes the states leaving it at checkpoint s.
    -> y = sum_n C_n h_n + D u, (BLOCK_D, BLOCK_T) fp32."""
    dtu = dt * u
    y = Dv[:, None] * u
    last = tl.arange(0, BLOCK_T) == (0 if REVERSE else BLOCK_T - 1)  # the tile's last step in scan order
    for n in range(N):
        A_n = tl.load(A_p + n, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
        B_n = tl.load(B_p + n * sB_n + offs_t * sB_t, mask=mask_t, other=0.0).to(tl.float32)  # (BLOCK_T,)
        C_n = tl.load(C_p + n * sC_n + offs_t * sC_t, mask=mask_t, other=0.0).to(tl.float32)
        h_in = tl.load(ck_p + tl.maximum(s - 1, 0) * N + n, mask=mask_d, other=0.0)
        h_in = tl.where(s > 0, h_in, 0.0)
        a, h = tl.associative_scan((tl.exp(dt * A_n[:, None]), dtu * B_n[None, :]), 1, _combine, reverse=REVERSE)
        h = a * h_in[:, None] + h  # (BLOCK_D, BLOCK_T)
        y += h * C_n[None, :]
        tl.store(ck_p + s * N + n, _column(h, last[None, :]), mask=mask_d)
    return y


@_jit
def _emit(y, tt, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, out_ptr, y_ptr, so_b, so_d, so_t,
          HAS_Z: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_T: tl.constexpr):
    """Final y of time tile tt: keep it (fp32, for dz in the backward) if asked, gate by silu(z), store out."""
    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = mask_d[:, None] & (offs_t < L)[None, :]
    o = b * so_b + offs_d[:, None] * so_d + offs_t[None, :] * so_t
    if STORE_Y:
        tl.store(y_ptr + o, y, mask=mask)
    if HAS_Z:
        zt = _load_tile(z_ptr + b * sz_b, offs_d, offs_t, sz_d, sz_t, mask)
        y = y * zt * tl.sigmoid(zt)
    tl.store(out_ptr + o, y.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, y_ptr, p_ptr, ck_ptr,
    batch, dim, L, N, n_tiles,
    su_k, su_b, su_d, su_t, sdt_k, sdt_b, sdt_d, sdt_t,
    sB_k, sB_b, sB_n, sB_t, sC_k, sC_b, sC_n, sC_t,
    sz_b, sz_d, sz_t, so_b, so_d, so_t,
    ND: tl.constexpr, REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
    SOFTPLUS: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grid (batch, cdiv(dim, BLOCK_D)). ND = 1: one scan, direction REVERSE. ND = 2 (REVERSE = False): direction 0
    forward and direction 1 in reverse, in the same program and loop: iteration s does time tile s of direction 0 and
    time tile n_tiles-1-s of direction 1. Each tile is reached twice; the first direction there parks its fp32 y in
    p_ptr, the second adds it, gates and stores: one launch, no flipped copies, no atomics."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    ck_p = ck_ptr + (b * dim + offs_d) * n_tiles * N  # (ND, batch, dim, n_tiles, N); direction 1 at + ck_k
    ck_k = batch * dim * n_tiles * N
    A0, D0, bias0 = _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, N, HAS_D, HAS_BIAS, BLOCK_D)
    A1, D1, bias1 = _load_params(A_ptr + (ND - 1) * dim * N, D_ptr + (ND - 1) * dim, bias_ptr + (ND - 1) * dim,
                                 offs_d, mask_d, N, HAS_D, HAS_BIAS, BLOCK_D)
    for s in range(n_tiles):
        tl.debug_barrier()  # the states written at checkpoint s - 1 by other threads are visible now
        tt0 = n_tiles - 1 - s if REVERSE else s  # time tiles of direction 0 and (ND = 2) direction 1
        tt1 = n_tiles - 1 - s
        offs_t0 = tt0 * BLOCK_T + tl.arange(0, BLOCK_T)
        mask0 = mask_d[:, None] & (offs_t0 < L)[None, :]
        u0 = _load_tile(u_ptr + b * su_b, offs_d, offs_t0, su_d, su_t, mask0)
        _, dt0 = _step_tile(dt_ptr + b * sdt_b, offs_d, offs_t0, sdt_d, sdt_t, mask0, bias0, SOFTPLUS)
        y0 = _scan_tile(u0, dt0, s, offs_t0, offs_t0 < L, mask_d, A0, B_ptr + b * sB_b, C_ptr + b * sC_b,
                        sB_n, sB_t, sC_n, sC_t, ck_p, D0, N, REVERSE, BLOCK_T)
        if ND == 1:
            _emit(y0, tt0, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, out_ptr, y_ptr, so_b, so_d, so_t,
                  HAS_Z, STORE_Y, BLOCK_T)
        else:
            offs_t1 = tt1 * BLOCK_T + tl.arange(0, BLOCK_T)
            mask1 = mask_d[:, None] & (offs_t1 < L)[None, :]
            u1 = _load_tile(u_ptr + su_k + b * su_b, offs_d, offs_t1, su_d, su_t, mask1)
            _, dt1 = _step_tile(dt_ptr + sdt_k + b * sdt_b, offs_d, offs_t1, sdt_d, sdt_t, mask1, bias1, SOFTPLUS)
            y1 = _scan_tile(u1, dt1, s, offs_t1, offs_t1 < L, mask_d, A1, B_ptr + sB_k + b * sB_b,
                            C_ptr + sC_k + b * sC_b, sB_n, sB_t, sC_n, sC_t, ck_p + ck_k, D1, N, True, BLOCK_T)
            if s < tt1:  # first visit of both tiles: park the partial sums
                _emit(y0, tt0, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, p_ptr, y_ptr, so_b, so_d, so_t,
                      False, False, BLOCK_T)
                _emit(y1, tt1, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, p_ptr, y_ptr, so_b, so_d, so_t,
                      False, False, BLOCK_T)
            elif s == tt1:  # the middle tile: both directions are here now
                _emit(y0 + y1, tt0, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, out_ptr, y_ptr, so_b, so_d, so_t,
                      HAS_Z, STORE_Y, BLOCK_T)
            else:  # second visit: add what the other direction parked (visible after the barrier above)
                y0 += _load_tile(p_ptr + b * so_b, offs_d, offs_t0, so_d, so_t, mask0)
                y1 += _load_tile(p_ptr + b * so_b, offs_d, offs_t1, so_d, so_t, mask1)
                _emit(y0, tt0, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, out_ptr, y_ptr, so_b, so_d, so_t,
                      HAS_Z, STORE_Y, BLOCK_T)
                _emit(y1, tt1, b, offs_d, mask_d, L, z_ptr, sz_b, sz_d, sz_t, out_ptr, y_ptr, so_b, so_d, so_t,
                      HAS_Z, STORE_Y, BLOCK_T)


@_jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, y_ptr, g_ptr, ck_ptr, G_ptr,
    du_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dA_ptr, dDp_ptr, dbp_ptr,
    batch, dim, L, N, n_tiles,
    su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sB_b, sB_n, sB_t, sC_b, sC_n, sC_t,
    sz_b, sz_d, sz_t, sy_b, sy_d, sy_t, sg_b, sg_d, sg_t,
    sdu_b, sdu_d, sdu_t, sddt_b, sddt_d, sddt_t, sdz_b, sdz_d, sdz_t,
    REVERSE: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
    WRITE_DZ: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grid (batch, cdiv(dim, BLOCK_D)), one direction (launched once per direction). Walks the tiles against the
    scan order. Per tile and state n: recompute h_t from the tile's checkpoint (forward scan), then the adjoint
        g_t = C_t dy_t + a_{t+1} g_{t+1}      (g = dLoss/dh, "t+1" = the next step in scan order, a = exp(dt A))
    as a second scan running the other way over the pairs (a_{t+1}, C_t dy_t), with the g of the next tile carried
    in through G_ptr (batch, dim, N), which starts as dLoss/d(last state); a_{t+1} uses dt loaded one step shifted.
    Then, with a_t h_{t-1} = h_t - b_t:
        dC_t = sum_d dy_t h_t;  dB_t = sum_d g_t dt_t u_t;  d(dt u)_t = sum_n g_t B_t
        q_t = g_t (h_t - b_t) = d(dt_t A);   ddt_t += sum_n q_t A_n;   dA_n += sum_t q_t dt_t
    dB, dC (sums over channels) are written per channel block, dA, dD, d(delta_bias) (sums over time) per program,
    as partial sums that torch adds up afterwards: deterministic, no atomics."""
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    A_p, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, offs_d, mask_d, N, HAS_D, HAS_BIAS, BLOCK_D)
    ck_p = ck_ptr + (b * dim + offs_d) * n_tiles * N
    row = (b * dim + offs_d) * N  # (batch, dim, N) tensors: G and dA
    part = ((pid_d * batch + b) * N) * L  # (n_dblocks, batch, N, L) partial sums of dB, dC
    B_p, C_p = B_ptr + b * sB_b, C_ptr + b * sC_b
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    first = tl.arange(0, BLOCK_T) == (BLOCK_T - 1 if REVERSE else 0)  # the tile's first step in scan order
    for i in range(n_tiles):
        tl.debug_barrier()  # G and dA written for the previous tile by other threads are visible now
        s = n_tiles - 1 - i  # scan-order tile index, last first
        tt = n_tiles - 1 - s if REVERSE else s
        offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < L
        mask = mask_d[:, None] & mask_t[None, :]
        u = _load_tile(u_ptr + b * su_b, offs_d, offs_t, su_d, su_t, mask)
        raw, dt = _step_tile(dt_ptr + b * sdt_b, offs_d, offs_t, sdt_d, sdt_t, mask, bias, SOFTPLUS)
        t_nb = offs_t - 1 if REVERSE else offs_t + 1  # the next step in scan order
        _, dt_nb = _step_tile(dt_ptr + b * sdt_b, offs_d, t_nb, sdt_d, sdt_t,
                              mask_d[:, None] & ((t_nb >= 0) & (t_nb < L))[None, :], bias, SOFTPLUS)
        dtu = dt * u
        dy = _load_tile(g_ptr + b * sg_b, offs_d, offs_t, sg_d, sg_t, mask)  # dLoss/dout
        if HAS_Z:
            zt = _load_tile(z_ptr + b * sz_b, offs_d, offs_t, sz_d, sz_t, mask)
            sig = tl.sigmoid(zt)
            if WRITE_DZ:  # dz = dout * y * silu'(z), y = both directions' sum, saved by the forward
                yt = _load_tile(y_ptr + b * sy_b, offs_d, offs_t, sy_d, sy_t, mask)
                dz = dy * yt * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_ptr + b * sdz_b + offs_d[:, None] * sdz_d + offs_t[None, :] * sdz_t,
                         dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * zt * sig
        ddtu = tl.zeros_like(u)
        ddt = tl.zeros_like(u)
        for n in range(N):
            A_n = tl.load(A_p + n, mask=mask_d, other=0.0).to(tl.float32)
            B_n = tl.load(B_p + n * sB_n + offs_t * sB_t, mask=mask_t, other=0.0).to(tl.float32)
            C_n = tl.load(C_p + n * sC_n + offs_t * sC_t, mask=mask_t, other=0.0).to(tl.float32)
            h_in = tl.load(ck_p + tl.maximum(s - 1, 0) * N + n, mask=mask_d, other=0.0)  # state entering the tile
            h_in = tl.where(s > 0, h_in, 0.0)
            g_in = tl.load(G_ptr + row + n, mask=mask_d, other=0.0)
            bn = dtu * B_n[None, :]
            a, h = tl.associative_scan((tl.exp(dt * A_n[:, None]), bn), 1, _combine, reverse=REVERSE)
            h = a * h_in[:, None] + h  # h_t
            a, g = tl.associative_scan((tl.exp(dt_nb * A_n[:, None]), dy * C_n[None, :]), 1, _combine,
                                       reverse=not REVERSE)
            g = a * g_in[:, None] + g  # g_t
            tl.store(G_ptr + row + n, _column(g, first[None, :]), mask=mask_d)
            tl.store(dCp_ptr + part + n * L + offs_t, tl.sum(dy * h, axis=0), mask=mask_t)
            tl.store(dBp_ptr + part + n * L + offs_t, tl.sum(g * dtu, axis=0), mask=mask_t)
            ddtu += g * B_n[None, :]
            q = g * (h - bn)
            ddt += q * A_n[:, None]
            dA_n = tl.load(dA_ptr + row + n, mask=mask_d, other=0.0)
            tl.store(dA_ptr + row + n, dA_n + tl.sum(q * dt, axis=1), mask=mask_d)
        du = ddtu * dt + Dv[:, None] * dy
        ddt += ddtu * u
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        ddt = tl.where(mask, ddt, 0.0)
        dD_acc += tl.sum(dy * u, axis=1)
        db_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + b * sdu_b + offs_d[:, None] * sdu_d + offs_t[None, :] * sdu_t,
                 du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + b * sddt_b + offs_d[:, None] * sddt_d + offs_t[None, :] * sddt_t,
                 ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
    tl.store(dDp_ptr + b * dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbp_ptr + b * dim + offs_d, db_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# autograd wrapper around the kernels

MAX_REGISTERS = 128  # per thread: 4 programs of 4 warps (16 warps) per SM on sm_80 / sm_90; tested without spills


def _launch(kernel, grid, *args, **constexprs):
    """kernel[grid](*args, **constexprs): the one place where the kernels start (the compile-budget test records
    launches here)."""
    kernel[grid](*args, maxnreg=MAX_REGISTERS, **constexprs)


def _tiles(dim, L, N):
    """(BLOCK_D, BLOCK_T, num_warps) for a scan of this shape."""
    return min(8, triton.next_power_of_2(dim)), min(32, max(16, triton.next_power_of_2(L))), 4


def _empty_like_layout(x, dtype):
    """Dense tensor of x's shape whose memory order follows x's strides (coalesced kernel stores)."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
    return torch.empty([x.shape[i] for i in order], dtype=dtype, device=x.device).permute(
        [order.index(i) for i in range(x.dim())])


def _strides(x, n=3):
    return x.stride() if x is not None else (0,) * n


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
        BLOCK_D, BLOCK_T, num_warps = _tiles(dim, L, N)
        n_tiles = triton.cdiv(L, BLOCK_T)
        store_y = z is not None and grad_enabled and any(ctx.needs_input_grad[:8])  # y before the gate, for dz
        out = _empty_like_layout(u[0], u.dtype)
        y = _empty_like_layout(u[0], torch.float32) if store_y else None
        p = _empty_like_layout(u[0], torch.float32) if ND == 2 else None
        ck = torch.empty(ND, batch, dim, n_tiles, N, dtype=torch.float32, device=u.device)
        opt = lambda x: u if x is None else x  # noqa: E731  (absent inputs: any pointer, never read)
        _launch(_fwd_kernel, (batch, triton.cdiv(dim, BLOCK_D)),
            u, delta, A, B, C, opt(D), opt(delta_bias), opt(z), out, opt(y), opt(p), ck,
            batch, dim, L, N, n_tiles,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z), *out.stride(),
            ND=ND, REVERSE=bool(reverse) and ND == 1, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            HAS_Z=z is not None, SOFTPLUS=softplus, STORE_Y=store_y, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T, num_warps=num_warps)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y, ck)  # ck, not (batch, dim, L, N) states
        ctx.cfg = (softplus, reverse)
        return out, (ck[:, :, :, -1].clone() if return_last else None)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, y, ck = ctx.saved_tensors
        softplus, reverse = ctx.cfg
        ND, batch, dim, L = u.shape
        N, n_tiles = A.shape[-1], ck.shape[3]
        BLOCK_D, BLOCK_T, num_warps = _tiles(dim, L, N)
        grid = (batch, triton.cdiv(dim, BLOCK_D))
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = _empty_like_layout(u, u.dtype), _empty_like_layout(delta, delta.dtype)
        dz = _empty_like_layout(z, z.dtype) if z is not None else None
        dBp = torch.empty(ND, grid[1], batch, N, L, **f32)  # per-channel-block partial sums
        dCp = torch.empty(ND, grid[1], batch, N, L, **f32)
        dAp = torch.zeros(ND, batch, dim, N, **f32)  # per-batch-element partial sums, accumulated over tiles
        dDp = torch.empty(ND, batch, dim, **f32)
        dbp = torch.empty(ND, batch, dim, **f32)
        G = torch.zeros(ND, batch, dim, N, **f32) if dlast is None else dlast.float().clone()  # the g carry
        opt = lambda x: u if x is None else x  # noqa: E731  (absent inputs: any pointer, never read)
        pick = lambda x, k: None if x is None else x[k]  # noqa: E731
        for k in range(ND):  # direction 1 of a bidirectional scan runs in reverse
            _launch(_bwd_kernel, grid,
                u[k], delta[k], A[k], B[k], C[k], opt(pick(D, k)), opt(pick(delta_bias, k)), opt(z), opt(y), dout,
                ck[k], G[k], du[k], ddelta[k], opt(dz), dBp[k], dCp[k], dAp[k], dDp[k], dbp[k],
                batch, dim, L, N, n_tiles,
                *u[k].stride(), *delta[k].stride(), *B[k].stride(), *C[k].stride(), *_strides(z), *_strides(y),
                *dout.stride(), *du[k].stride(), *ddelta[k].stride(), *_strides(dz),
                REVERSE=bool(reverse) or k == 1, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
                HAS_Z=z is not None, WRITE_DZ=z is not None and k == 0, SOFTPLUS=softplus,
                BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T, num_warps=num_warps)
        dB = dBp.sum(1).to(B.dtype)  # (ND, batch, N, L)
        dC = dCp.sum(1).to(C.dtype)
        dA = dAp.sum(1).to(A.dtype)
        dD = dDp.sum(1).to(D.dtype) if D is not None else None
        dbias = dbp.sum(1).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False, backend="auto"):
    """Selective scan, mamba-ssm selective_scan_fn semantics (see the module docstring).

    backend: "triton" (Triton forward + backward; CUDA, or CPU with TRITON_INTERPRET=1 set before
    import), "chunked" (selective_scan_chunked, the fast PyTorch path), "reference" (selective_scan_ref),
    "auto" = "triton" if triton imports, u is fp32/fp16/bf16 and (u.is_cuda or TRITON_INTERPRET=1),
    else "chunked". All compute the same math; "triton" raises instead of falling back.
    last_state is differentiable on every backend.
    Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N) fp32]."""
    _check("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    backend = _pick_backend("selective_scan", backend, u)
    if backend != "triton":
        scan = selective_scan_chunked if backend == "chunked" else selective_scan_ref
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    stack = lambda x: None if x is None else x[None]  # noqa: E731  (views, no copies)
    out, last = _ScanFn.apply(u[None], delta[None], A[None], B[None], C[None], stack(D), z, stack(delta_bias),
                              delta_softplus, reverse, return_last_state, torch.is_grad_enabled())
    return (out, last[0]) if return_last_state else out


def bidirectional_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 backend="auto"):
    """Fused bidirectional scan (Vim v2): out = (y_fwd + y_bwd) * silu(z), (batch, dim, L) in u's dtype.

    u, delta (2, batch, dim, L); A (2, dim, N); B, C (2, batch, N, L); D, delta_bias (2, dim);
    z (batch, dim, L), shared. Direction 0 scans t = 0..L-1, direction 1 t = L-1..0, both in the
    original token order; y_dir includes D * u. Any strides (e.g. transposed views), no copies.
    "triton": one forward launch and one backward launch for both directions.
    "chunked" / "reference": two PyTorch scans (reverse=False / True; no flips), summed in fp32, gated."""
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
