"""
Benchmarks and reports: the student against its teacher side by side (the ratio the method exists for), the selective
scan, a GPU report, the Triton scan's register budget, results.sh's runs as tables over seeds, and figures of them.

    python bench.py                                      # ViT-B/16 vs Adventurer-B and Vim-B (alt), 224 / 448 / 1024 px
    python bench.py --models vit_s16,adventurer_small,small_alt --resolutions 224,448 --csv speed.csv
    python bench.py --scan                               # selective scan: a per-step baseline vs ours
    python bench.py --gpu-report                         # CUDA: the Triton scan's errors and speed, students vs teacher
    python bench.py --kernel-budget                      # no GPU needed: registers and spills of the Triton scan
    python bench.py --runs runs/results/pairs            # results.sh's runs: top-1 and probes over seeds
    python bench.py --plot runs/results/pairs --csv speed.csv --out docs/    # their figures (needs matplotlib)

Side by side (the default): for each resolution every model is built at that size (random weights: speed does not
depend on them), then timed in rounds, the models in turn within a round (A B C A B C ...), so a machine whose speed
drifts slows all of them alike. Per round and model: one training step's forward + backward (no optimizer step) and one
inference forward. The ratios are teacher time / model time per round (> 1: the model is faster); the table gives their
median and, in brackets, their min - max over the rounds. The first model is the reference (the teacher). Also:
parameters, forward GFLOPs (torch's FlopCounterMode, plus the Vim scan's element-wise work that it cannot see), the
memory of a training step (CPU: tensors saved for the backward + 4 x the parameters, i.e. weights, gradients and AdamW's
two moments; CUDA: peak allocated) and a student's inference time by part (torch.profiler). On CPU the figures change
with the thread count and the machine: always quote the command, the threads and the processor with them.
"""
import argparse, csv, json, os, platform, re, statistics, sys, time

import torch, torch.nn.functional as F

import scan_kernel
import vitlinearizer as vl


class BenchError(Exception):
    """bad input: printed as one line 'error: ...'"""


# ----------------------------------------------------------------------------------------------- side by side

def preset_config(preset):
    """the config of a teacher preset, else of a student preset; "NAME:field=value,..." changes fields, e.g.
    adventurer_base:chunk_size=32"""
    name, _, opts = preset.partition(":")
    cfg = vl.TEACHER_PRESETS.get(name) or vl.STUDENT_PRESETS.get(name)
    if cfg is None:
        raise BenchError(f"--models {preset!r}: not one of "
                         + ", ".join(sorted(vl.TEACHER_PRESETS | vl.STUDENT_PRESETS)) + " (NAME:field=value,...)")
    try:
        changes = {k: type(getattr(cfg, k))(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
        return type(cfg)(**{**vars(cfg), **changes})
    except (ValueError, TypeError, AttributeError):
        raise BenchError(f"--models {preset!r}: NAME:field=value,... with fields of {type(cfg).__name__}") from None


def build(preset, res):
    """a model of a teacher or student preset at resolution res (random weights)"""
    cfg = preset_config(preset)
    if res % cfg.patch_size:
        raise BenchError(f"--resolutions {res} is not a multiple of {preset}'s patch size {cfg.patch_size}")
    return vl.build_model(type(cfg)(**{**vars(cfg), "img_size": res}))


def seconds(fn, device):
    """seconds of one call of fn (CUDA: synchronised before and after)"""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_ms(fn, device, warmup=3, repeats=20):
    """median milliseconds of fn(); on CUDA each call is timed with its own pair of events"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def model_flops(model, res, device):
    """forward FLOPs of one image: matmuls, convolutions and attention as torch counts them, plus what it cannot see:
    the selective scan (per channel, step, state and direction: dt A, exp, dt u B, a h + b, C h: 7 operations) and,
    where its counter has no rule for the attention kernel that ran (CPU flash attention), the ViT's attention
    products (Q K^T and A V: 4 L^2 dim per block)"""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, res, res, device=device))
    flops, cfg = counter.get_total_flops(), model.cfg
    L = (res // cfg.patch_size) ** 2 + (1 if getattr(cfg, "class_token", True) else 0) + getattr(cfg, "registers", 0)
    if isinstance(model, vl.VisionMamba):
        directions = 2 if cfg.bidirectional == "fused" else 1
        flops += cfg.depth * directions * cfg.expand * cfg.dim * L * 7 * cfg.d_state
    if isinstance(model, vl.ViT) and not any("attention" in str(op) for op in counter.get_flop_counts()["Global"]):
        flops += cfg.depth * 4 * L * L * cfg.dim
    return flops


def peak_mb(device, fn):
    """peak allocated GPU memory of fn() in MiB; None on CPU (no allocator statistics there)"""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def train_step_mem(model, x, device, amp):
    """memory of one training step in MiB. CUDA: peak allocated over forward, backward and the AdamW step.
    CPU (no allocator statistics): tensors saved for the backward (the activations, counted once per storage)
    + 4 x the parameters (weights, gradients, AdamW's two moments): the terms that set the peak."""
    model.train().requires_grad_(True)
    try:
        if device.type != "cuda":
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved = {}

            def pack(t):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(x).logits.float().logsumexp(-1).mean()
            activations = sum(n for ptr, n in saved.items() if ptr not in params)
            return f"{(activations + 4 * sum(p.nbytes for p in model.parameters())) / 2**20:.0f}"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            with amp:
                loss = model(x).logits.float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f"{peak_mb(device, step):.0f}"
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        model.eval().requires_grad_(False)


def student_time_split(model, x, device):
    """-> ({part: seconds}, total) of one no-grad forward of a VisionMamba or an Adventurer, read from torch.profiler:
    the scan (selective or SSD) and the depthwise conv (their record_function labels), the projections (in, x, dt and
    out; Adventurer's MLP: the matmuls outside the scan), the norms, and the rest (gates, layout, patch embedding,
    head). On CUDA the parts are device times."""
    parts = dict.fromkeys(["scan", "projections", "depthwise conv", "norms"], 0.0)
    kind = {"selective_scan": "scan", "ssd_scan": "scan", "depthwise conv": "depthwise conv", "aten::rms_norm": "norms",
            **dict.fromkeys(["aten::matmul", "aten::linear", "aten::mm", "aten::addmm", "aten::bmm"], "projections")}
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("student forward"):
            model(x)
        if cuda:
            torch.cuda.synchronize()
    root = next(e for e in prof.events() if e.name == "student forward")
    us = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    for e in root.cpu_children:                                                        # the forward's top-level calls
        if e.name in kind:
            parts[kind[e.name]] += us(e) / 1e6
    total = (sum(us(e) for e in root.cpu_children) if cuda else us(root)) / 1e6
    parts["rest"] = total - sum(parts.values())
    return parts, total


def side_by_side(names, res, batch, rounds, device, grad_ckpt=False):
    """-> one row per model: params, GFLOPs, training memory, inference time by part (students), and per round the
    seconds of a training forward + backward ("train") and of an inference forward ("infer"); grad_ckpt: every model
    with activation checkpointing (vl.run_block)"""
    models = {n: build(n, res).to(device) for n in names}
    for m in models.values():
        m.grad_checkpointing = grad_ckpt
    x = torch.randn(batch, 3, res, res, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(model):
        with amp:
            loss = model(x).logits.float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def infer(model):
        with torch.no_grad(), amp:
            model(x)
    rows = {n: dict(model=n, res=res, batch=batch, params=sum(p.numel() for p in m.parameters()),
                    gflops=model_flops(m.eval(), res, device) / 1e9, split="", train=[], infer=[])
            for n, m in models.items()}
    for n, m in models.items():
        rows[n]["train_mem"] = train_step_mem(m, x, device, amp)                   # (leaves m frozen)
        m.train().requires_grad_(True)
        train_step(m)                                                               # warm-up
        m.eval()
        infer(m)
        if not isinstance(m, vl.ViT):
            with amp:
                parts, total = student_time_split(m, x, device)
            rows[n]["split"] = " ".join(f"{k.split()[0]} {100 * v / total:.0f}%" for k, v in parts.items())
    for _ in range(rounds):
        for n, m in models.items():
            rows[n]["train"].append(seconds(lambda: train_step(m.train()), device))
            rows[n]["infer"].append(seconds(lambda: infer(m.eval()), device))
    for m in models.values():
        m.cpu()
    return list(rows.values())


def ratios(ref, row, key):
    """teacher time / model time, per round"""
    return [a / b for a, b in zip(ref[key], row[key])]


def ratio(ref, row, key):
    r = ratios(ref, row, key)
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


TABLE_HEAD = ("| model | px | batch | params (M) | fwd GFLOPs | FLOP ratio | train fwd+bwd (ms) | vs teacher | "
              "inference (ms) | vs teacher | inference img/s | train memory (MB) | inference by part |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_lines(rows):
    """side_by_side's rows as Markdown table rows (TABLE_HEAD's columns); rows[0] is the reference"""
    ref = rows[0]
    return [f"| {r['model']} | {r['res']} | {r['batch']} | {r['params'] / 1e6:.1f} | {r['gflops']:.1f} | "
            f"{ref['gflops'] / r['gflops']:.2f} | {1e3 * statistics.median(r['train']):.0f} | "
            f"{ratio(ref, r, 'train')} | {1e3 * statistics.median(r['infer']):.0f} | {ratio(ref, r, 'infer')} | "
            f"{r['batch'] / statistics.median(r['infer']):.1f} | {r['train_mem']} | {r['split']} |" for r in rows]


CSV_COLS = ["model", "px", "batch", "params", "gflops", "train_ms", "train_vs_teacher", "infer_ms", "infer_vs_teacher",
            "train_mem_mb", "train_ms_rounds", "infer_ms_rounds"]


def csv_rows(rows):
    """side_by_side's rows as CSV_COLS records: medians, median ratios and every round's milliseconds"""
    ref = rows[0]
    return [dict(model=r["model"], px=r["res"], batch=r["batch"], params=r["params"], gflops=f"{r['gflops']:.6g}",
                 train_ms=f"{1e3 * statistics.median(r['train']):.6g}",
                 train_vs_teacher=f"{statistics.median(ratios(ref, r, 'train')):.6g}",
                 infer_ms=f"{1e3 * statistics.median(r['infer']):.6g}",
                 infer_vs_teacher=f"{statistics.median(ratios(ref, r, 'infer')):.6g}", train_mem_mb=r["train_mem"],
                 train_ms_rounds=" ".join(f"{1e3 * t:.6g}" for t in r["train"]),
                 infer_ms_rounds=" ".join(f"{1e3 * t:.6g}" for t in r["infer"])) for r in rows]


def print_table(cols, rows):
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def write_csv(path, cols, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def run_side_by_side(args, device):
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    where = (torch.cuda.get_device_name() + ", bf16 autocast" if device.type == "cuda" else
             f"CPU {platform.processor() or platform.machine()}, fp32, {torch.get_num_threads()} thread(s)")
    where += ", activation checkpointing" if args.grad_ckpt else ""
    print(f"{where}; torch {torch.__version__}; {args.rounds} rounds; ratio = {names[0]} time / model time, median "
          f"(min-max) over rounds; > 1: faster than {names[0]}\n")
    print(TABLE_HEAD, flush=True)
    rows, records = [], []
    for res in int_list(args.resolutions, "--resolutions"):
        got = side_by_side(names, res, args.batch_size, args.rounds, device, args.grad_ckpt)
        print("\n".join(table_lines(got)), flush=True)
        rows, records = rows + got, records + csv_rows(got)
    if args.csv:
        write_csv(args.csv, CSV_COLS, records)
        print(f"\nwrote {args.csv}")
    return rows


# ----------------------------------------------------------------------------------------------- selective scan

def scan_baseline(u, delta, A, B, C, D, z, delta_bias):
    """Per-step-slicing baseline in the way of mamba-ssm's selective_scan_ref: deltaA and deltaB_u materialised
    as (batch, dim, L, N) tensors, then a Python loop that indexes them per step."""
    dtype_in = u.dtype
    u, delta = u.float(), F.softplus(delta.float() + delta_bias[..., None].float())
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))                         # (b, d, L, N)
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)                   # (b, d, L, N)
    x = A.new_zeros(u.shape[0], u.shape[1], A.shape[1])                                 # (b, d, N)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    y = torch.stack(ys, dim=2) + u * D[:, None]                                         # (b, d, L)
    return (y * F.silu(z.float())).to(dtype_in)


SCAN_SHAPES = dict(cuda=[(64, 768, 16, 197), (64, 768, 16, 785), (128, 1536, 16, 197), (128, 1536, 16, 785)],
                   cpu=[(8, 384, 16, 197), (8, 384, 16, 1025)])                 # (batch, dim, N, L)


def bench_scan(args, device):
    """--scan: forward and forward + backward of the selective scan, a per-step baseline against ours"""
    warmup = 3 if device.type == "cuda" else 1
    shapes = ([tuple(int_list(s, "--scan-shapes")) for s in args.scan_shapes.split(";")] if args.scan_shapes
              else SCAN_SHAPES[device.type])
    impls = {"baseline (per-step slicing)": scan_baseline,
             "ours: selective_scan_ref": lambda *a: scan_kernel.selective_scan_ref(*a, delta_softplus=True),
             "ours: chunked (CPU path)": lambda *a: scan_kernel.selective_scan_chunked(*a, delta_softplus=True)}
    if device.type == "cuda":                                                        # never timed under the interpreter
        impls["ours: triton"] = lambda *a: scan_kernel.selective_scan(*a, delta_softplus=True, backend="triton")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for (b, d, n, L) in shapes:
        for dt in dtypes:
            g = torch.Generator(device).manual_seed(0)

            def r(*s):
                return torch.randn(*s, device=device, generator=g)
            u, delta, z, B, C = (r(b, d, L).to(dt), (0.5 * r(b, d, L)).to(dt), r(b, d, L).to(dt),
                                 r(b, n, L).to(dt), r(b, n, L).to(dt))
            A, D, dbias = -torch.rand(d, n, device=device, generator=g) - 0.5, r(d), r(d) - 3
            es = dt.itemsize
            unavoidable = {
                "fwd": es * (4 * b * d * L + 2 * b * n * L) + 4 * (d * n + 2 * d),      # read u,delta,z,B,C; write y
                "fwd+bwd": es * (11 * b * d * L + 6 * b * n * L) + 8 * (d * n + 2 * d)}
            base = {}
            for mode in ("fwd", "fwd+bwd"):
                ins = [t.clone().requires_grad_(mode == "fwd+bwd") for t in (u, delta, A, B, C, D, z, dbias)]
                gy = torch.randn_like(u)
                for name, fn in impls.items():
                    def call():
                        with torch.set_grad_enabled(mode == "fwd+bwd"):
                            y = fn(*ins)
                            if mode == "fwd+bwd":
                                y.backward(gy)
                    try:
                        sec = median_ms(call, device, warmup, args.rounds) / 1000
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        rows.append(dict(shape=f"{b}x{d}x{n}x{L}", dtype=str(dt)[6:], mode=mode, impl=name, ms="OOM",
                                         vs_baseline="", GB_s=""))
                        continue
                    base.setdefault(mode, sec)
                    rows.append(dict(shape=f"{b}x{d}x{n}x{L}", dtype=str(dt)[6:], mode=mode, impl=name,
                                     ms=f"{1000 * sec:.2f}", vs_baseline=f"{base[mode] / sec:.2f}x",
                                     GB_s=f"{unavoidable[mode] / sec / 1e9:.0f}" if device.type == "cuda" else "n/a"))
    cols = ["shape", "dtype", "mode", "impl", "ms", "vs_baseline", "GB_s"]
    print(f"\nselective scan on {device.type.upper()} (b x dim x N x L; vs_baseline = baseline time / time; GB_s = "
          f"unavoidable bytes / time), warm-up {warmup}, median of {args.rounds}\n")
    print_table(cols, rows)
    if args.csv:
        write_csv(args.csv, cols, rows)
        print(f"\nwrote {args.csv}")
    return rows


# ----------------------------------------------------------------------------------------------- GPU report

def copy_bandwidth(device):
    """GB/s of a 2 GiB device-to-device copy, bytes read + written: the practical memory ceiling of this device"""
    src = torch.empty(2**29, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * src.nbytes / ms / 1e6


def scan_inputs(batch, dim, N, L, dtype, layout, directions, device, seed=0):
    """Random scan inputs. layout "L-contiguous": (.., dim, L) and (.., N, L) tensors contiguous along L (what our
    student passes); "transposed": transposed views of (.., L, dim) / (.., L, N) tensors (what Vim's block passes).
    directions 2: u, delta, A, B, C, D, delta_bias stacked on a leading axis of 2 (bidirectional_selective_scan)."""
    g = torch.Generator(device).manual_seed(seed)
    lead = (2,) if directions == 2 else ()

    def rand(*shape):
        return torch.randn(shape, device=device, generator=g)

    def act(lead, rows, scale=1.0, shift=0.0):
        if layout == "L-contiguous":
            return (rand(*lead, batch, rows, L) * scale + shift).to(dtype)
        return (rand(*lead, batch, L, rows) * scale + shift).to(dtype).transpose(-1, -2)
    return dict(u=act(lead, dim), delta=act(lead, dim, 0.5, -1.0), A=-torch.exp(0.5 * rand(*lead, dim, N)),
                B=act(lead, N), C=act(lead, N), D=rand(*lead, dim), z=act((), dim), delta_bias=0.3 * rand(*lead, dim))


def scan_check(x, reverse, directions, backend="triton"):
    """-> (error, name): the largest error of the scan's output, last state (single direction) and every gradient
    against the fp64 reference on the same (rounded) inputs, max |got - ref| / (1 + max |ref|) (relative for large
    tensors, absolute for tiny ones such as dA at L = 1, which is exactly 0), and which tensor it was. On CUDA the
    allocator's free memory is filled with NaN first, so an unwritten output shows."""
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    device = x["u"].device
    w = torch.randn(x["u"].shape[-3:], device=device, dtype=torch.float64)
    results = []
    for backend, dtype in ((backend, None), ("reference", torch.float64)):
        leaves = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in x.items()}
        if device.type == "cuda":
            torch.full((2**28,), float("nan"), device=device)  # poison: freed at once, reused by the next allocations
        if directions == 2:
            out, last = scan_kernel.bidirectional_selective_scan(**leaves, delta_softplus=True, backend=backend), None
        else:
            out, last = scan_kernel.selective_scan(**leaves, delta_softplus=True, reverse=reverse,
                                                   return_last_state=True, backend=backend)
        loss = (out.double() * w).sum() + (0 if last is None else last.double().sum())
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        results.append([out] + ([] if last is None else [last]) + list(grads))
    labels = ["out"] + ([] if directions == 2 else ["last state"]) + ["d" + k for k in names]
    errs = {lab: ((a.double() - b).abs().max() / (1 + b.abs().max())).nan_to_num(float("inf")).item()
            for lab, a, b in zip(labels, *results)}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def scan_bytes(batch, dim, N, L, itemsize, directions, backward):
    """unavoidable bytes: each input read once, each output written once. Forward: u, delta, B, C per direction
    and z read, out written. Backward: the same reads plus dout, then du, ddelta, dB, dC per direction and dz."""
    act, small = batch * dim * L * itemsize, batch * N * L * itemsize
    fwd = directions * (2 * act + 2 * small) + 2 * act
    return fwd + (directions * (4 * act + 4 * small) + 3 * act if backward else 0)


def bidirectional_three_ways(ins, backend="auto"):
    """{name: fn() -> out}: the fused launch, two single-direction launches (reverse=True, no copies), and Vim's own
    way (two launches, the backward direction on flipped copies of its inputs and z, its output flipped back)"""
    def pick(k):
        return {n: (v if n == "z" else v[k]) for n, v in ins.items()}

    def flip(d):
        return {n: (v.flip(-1) if n in ("u", "delta", "B", "C", "z") else v) for n, v in d.items()}

    def scan(d, **kw):
        return scan_kernel.selective_scan(**d, delta_softplus=True, backend=backend, **kw)
    return {"fused bidirectional": lambda: scan_kernel.bidirectional_selective_scan(**ins, delta_softplus=True,
                                                                                    backend=backend),
            "two launches, reverse=True": lambda: scan(pick(0)) + scan(pick(1), reverse=True),
            "two launches + flips (Vim)": lambda: scan(pick(0)) + scan(flip(pick(1))).flip(-1)}


def scan_speed(shape, dtype, layout, peak, device, backend="auto", repeats=20):
    """rows of forward and forward + backward times of the three ways of bidirectional_three_ways"""
    batch, dim, N, L = shape
    x = scan_inputs(batch, dim, N, L, dtype, layout, 2, device)
    rows = []
    for backward in (False, True):
        ins = {k: v.detach().requires_grad_(backward) for k, v in x.items()}
        gy = torch.randn(x["z"].shape, device=device, dtype=dtype)
        times = {}
        for name, fn in bidirectional_three_ways(ins, backend).items():
            def call():
                with torch.set_grad_enabled(backward):
                    out = fn()
                    if backward:
                        torch.autograd.grad(out, list(ins.values()), gy)
            times[name] = median_ms(call, device, warmup=2, repeats=repeats)
        nbytes = scan_bytes(batch, dim, N, L, dtype.itemsize, 2, backward)
        for name, ms in times.items():
            rows.append(dict(shape=f"{batch}x{dim}x{N}x{L}", dtype=str(dtype)[6:], layout=layout,
                             mode="fwd+bwd" if backward else "fwd", impl=name, ms=f"{ms:.3f}",
                             GB_s=f"{nbytes / ms / 1e6:.0f}", of_peak=f"{100 * nbytes / ms / 1e6 / peak:.0f}%",
                             fused_speedup=f"{ms / times['fused bidirectional']:.2f}x"))
    rows[3]["fused_speedup"] += f" (fwd+bwd = {float(rows[3]['ms']) / float(rows[0]['ms']):.2f} x fwd)"
    return rows


def attention_kernel(model, device):
    """name of the CUDA kernel that PyTorch's scaled_dot_product_attention runs for this ViT under bf16"""
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad(), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    hits = [e.key for e in prof.key_averages()
            if any(k in e.key.lower() for k in ("flash", "fmha", "attention", "cudnn", "efficient"))]
    return min(hits, key=len)[:70] if hits else "not found"


def kernel_resources():
    """registers and spills of the scan kernels compiled so far in this process, and the warps per SM they allow
    (64K registers per SM, allocated per warp in units of 256)"""
    seen = set()
    for kernel in (scan_kernel._fwd_kernel, scan_kernel._bwd_kernel):
        for cache in getattr(kernel, "device_caches", {}).values():
            for compiled in cache[0].values():
                regs, warps = compiled.n_regs, compiled.metadata.num_warps
                per_warp = -(-regs * 32 // 256) * 256
                resident = min(64, 32 * warps, 65536 // (per_warp * warps) * warps)
                seen.add(f"{kernel.fn.__name__[1:4]} {warps} warps: {regs} registers, {compiled.n_spills} spills, "
                         f"{resident} warps/SM")
    return sorted(seen)


def gpu_report(args):
    """One command on a CUDA machine: the Triton scan against the reference, its speed, and student vs teacher.
    Returns the failed correctness rows (exit code 1 if any)."""
    if not torch.cuda.is_available():
        raise BenchError("--gpu-report needs a CUDA GPU; on a CPU the tests check the kernel under the interpreter")
    import triton
    device, t0 = torch.device("cuda"), time.perf_counter()
    torch.manual_seed(0)
    name, peak = torch.cuda.get_device_name(), copy_bandwidth(device)
    print(f"\n## GPU report: {name}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs, torch "
          f"{torch.__version__}, triton {triton.__version__}; device-to-device copy {peak:.0f} GB/s (read + write), "
          f"taken as the peak below\n", flush=True)

    print("### Triton scan vs the fp64 reference: largest error over out, last state and every gradient, "
          "max |got - ref| / (1 + max |ref|) (batch 2, dim 40; outputs NaN-poisoned first)\n", flush=True)
    rows = []
    for directions, layout in ((2, "transposed"), (2, "L-contiguous"), (1, "L-contiguous")):
        for dtype in (torch.float32, torch.bfloat16):
            for L in (1, 197, 785, 4097):
                for N in (16, 64):
                    if directions == 1 and N == 64 and L > 197:
                        continue
                    reverse = directions == 1 and L % 4 == 1
                    x = scan_inputs(2, 40, N, L, dtype, layout, directions, device, seed=L + N)
                    err, worst = scan_check(x, reverse, directions)
                    tol = 1e-3 if dtype == torch.float32 else 3e-2
                    rows.append(dict(scan="fused bidirectional" if directions == 2 else f"single, reverse={reverse}",
                                     layout=layout, dtype=str(dtype)[6:], L=L, N=N, error=f"{err:.1e}", worst=worst,
                                     result="PASS" if err <= tol else f"FAIL (tol {tol:g})"))
    print_table(list(rows[0]), rows)
    failed = [r for r in rows if r["result"] != "PASS"]
    print(f"\n{len(rows) - len(failed)} / {len(rows)} pass ({time.perf_counter() - t0:.0f} s so far)\n", flush=True)

    print("### Selective scan speed, bidirectional (batch x dim x N x L; GB/s = unavoidable bytes / time, median of 20;"
          " fused_speedup = time / fused time)\n", flush=True)
    rows = []
    for shape, dtype, layout in (((128, 768, 16, 197), torch.bfloat16, "L-contiguous"),
                                 ((128, 768, 16, 197), torch.bfloat16, "transposed"),
                                 ((128, 768, 16, 197), torch.float32, "L-contiguous"),
                                 ((128, 768, 64, 197), torch.bfloat16, "L-contiguous"),
                                 ((32, 768, 16, 785), torch.bfloat16, "L-contiguous"),
                                 ((8, 768, 16, 4097), torch.bfloat16, "L-contiguous")):
        rows += scan_speed(shape, dtype, layout, peak, device)
    print_table(list(rows[0]), rows)
    print("\nCompiled scan kernels: " + "; ".join(kernel_resources()))
    print(f"\n({time.perf_counter() - t0:.0f} s so far)\n", flush=True)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    kernel = attention_kernel(build(names[0], 224).to(device), device) if names[0] in vl.TEACHER_PRESETS else "-"
    print(f"### Students vs teacher side by side, bf16 autocast, {args.rounds} rounds (as `python bench.py`); the "
          f"teacher's attention is PyTorch SDPA (kernel: {kernel})\n", flush=True)
    print(TABLE_HEAD, flush=True)
    for res, batch in ((224, 64), (448, 16), (1024, 2)):
        try:
            print("\n".join(table_lines(side_by_side(names, res, batch, args.rounds, device))), flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"| out of memory at {res} px, batch {batch} |", flush=True)
            torch.cuda.empty_cache()
    print(f"\ngpu report: {time.perf_counter() - t0:.0f} s on {name}")
    return failed


# ----------------------------------------------------------------------------------------------- kernel budget

def kernel_budget(archs=(80, 90), dim=768, batch=2):
    """Compile, on any machine and without a GPU, every Triton scan launch that Vim-sized inputs make (L 197, 785,
    4097; N 16, 64; fp32, bf16; one direction and fused bidirectional; forward with and without saving y, and
    backward) for sm_80 (A100) and sm_90 (H100 / H200), and read registers, stack (spill) bytes and shared memory
    from the cubin with the cuobjdump that ships with Triton. -> rows, one per distinct launch and architecture."""
    import re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    if not hasattr(scan_kernel._fwd_kernel, "_pack_args"):
        raise BenchError(f"--kernel-budget needs a compiled (not interpreted) kernel and triton >= 3.6 "
                              f"(TRITON_INTERPRET set, or triton {triton.__version__})")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    launches, launch = [], scan_kernel._launch
    scan_kernel._launch = lambda kernel, grid, *a, **kw: launches.append((kernel, a, kw, where))
    try:
        for L in (197, 785, 4097):
            for N in (16, 64):
                for dtype in (torch.float32, torch.bfloat16):
                    for directions in (1, 2):
                        where = f"L {L}, N {N}"
                        x = scan_inputs(batch, dim, N, L, dtype, "L-contiguous", directions, torch.device("cpu"))
                        lead = {k: (v if directions == 2 else v[None]) for k, v in x.items() if k != "z"}
                        for grad in (False, True):
                            ins = {k: v.detach().requires_grad_(grad) for k, v in lead.items()}
                            z = x["z"].detach().requires_grad_(grad)
                            with torch.set_grad_enabled(grad):
                                out, _ = scan_kernel._ScanFn.apply(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"],
                                                                   ins["D"], z, ins["delta_bias"], True, False, False,
                                                                   grad)
                                if grad:
                                    out.float().sum().backward()
    finally:
        scan_kernel._launch = launch
    rows, seen = [], {}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for kernel, args, kw, where in launches:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kw)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
            key = (arch, kernel.fn.__name__, repr(signature), repr(constexprs), repr(attrs), options.num_warps)
            if key in seen:
                seen[key]["shapes"].add(where)
                continue
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            regs, stack, shared = (int(re.search(rf"{k}:(\d+)", usage)[1]) for k in ("REG", "STACK", "SHARED"))
            warps = options.num_warps
            per_warp = -(-regs * 32 // 256) * 256  # registers are given to warps in units of 256
            programs = min(65536 // (per_warp * warps), 32, 64 // warps,
                           (164 if arch == 80 else 228) * 1024 // max(shared, 1))
            scan = ("fused bidirectional" if kw.get("ND") == 2 else "one direction") + (
                " forward" + (" (training: saves y)" if kw.get("STORE_Y") else "") if "ND" in kw else " backward")
            seen[key] = dict(kernel=scan, arch=f"sm_{arch}", dtype=str(args[0].dtype)[6:], NP=kw["NP"],
                             warps=warps, registers=regs, stack_bytes=stack, shared_bytes=shared,
                             resident_warps=programs * warps, shapes={where})
            rows.append(seen[key])
    for r in rows:
        r["shapes"] = "L " + " / ".join(sorted({w.split(",")[0][2:] for w in r["shapes"]}, key=int)) + ", " + \
            " / ".join(sorted({w.split(", ")[1] for w in r["shapes"]}))
    return rows


# ----------------------------------------------------------------------------------------------- runs over seeds

def run_log(run_dir):
    """RUN_DIR/log.jsonl, read once: its validations [(step, top-1)] (the last one is the run's result), whether the
    run has saved its finished checkpoint (the last record says so) and the step of its last record (None: no log)"""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return [], False, None
    with open(path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:             # cut off mid-write (a kill; or the run is writing it): not counted
                break
            raise BenchError(f"{path}: line {i + 1} is not JSON ({line[:30]!r}...): a damaged log") from None
    curve = [(rec["step"], rec["val_top1"]) for rec in records if "val_top1" in rec]
    return curve, bool(records) and records[-1].get("finished", False), records[-1]["step"] if records else None


def final_top1(run_dir):
    """top-1 of the last validation in RUN_DIR/log.jsonl, None until the run has finished"""
    curve, finished, _ = run_log(run_dir)
    return curve[-1][1] if curve and finished else None


def seed_stats(res):
    """[(seed, value)] -> '| seeds | mean | std | min - max | per seed |' cells"""
    v = torch.tensor([t for _, t in res], dtype=torch.float64)
    std = f"{v.std().item():.1f}" if len(res) > 1 else ""
    return (f"{len(res)} | {v.mean().item():.1f} | {std} | {v.min().item():.1f} - {v.max().item():.1f} | "
            + ", ".join(f"s{s}: {t:.1f}" for s, t in sorted(res)))


def paired_gap(res, base):
    """mean (sample std) over the seeds both have of res - base, e.g. '+29.1 (2.3), 5 seeds'"""
    base = dict(base)
    d = torch.tensor([t - base[s] for s, t in res if s in base], dtype=torch.float64)
    if not len(d):
        return ""
    return f"{d.mean().item():+.1f}" + (f" ({d.std().item():.1f})" if len(d) > 1 else "") + f", {len(d)} seeds"


def collect_runs(root):
    """The results of ROOT/<config>-s<seed>/<run> folders (results.sh's layout) -> dict of
    top1 {run: {config: [(seed, final top-1)]}} of finished runs, curves {(config, run): [{step: top-1} per seed]},
    probes {(config, run, checkpoint): [(seed, probe top-1)]} from probe.json files (eval.py --probe), last_step
    {(config, run): the step of each seed's last log record}, unfinished ['<config>-s<seed>/<run> (step N)'] and
    teacher (the top-1 of ROOT/teacher, a single run, or None)."""
    if not os.path.isdir(root):
        raise BenchError(f"--runs {root}: no such folder")
    top1, curves, probes, last_step, unfinished = {}, {}, {}, {}, []
    for name in sorted(os.listdir(root)):
        config, _, seed = name.rpartition("-s")
        if not (config and seed.isdigit() and os.path.isdir(os.path.join(root, name))):
            continue
        for run in sorted(os.listdir(os.path.join(root, name))):
            run_dir = os.path.join(root, name, run)
            curve, finished, last = run_log(run_dir)
            if curve and not finished:                                       # stopped or still running: not counted
                unfinished.append(f"{name}/{run} (step {last})")
            elif curve:
                top1.setdefault(run, {}).setdefault(config, []).append((int(seed), curve[-1][1]))
                curves.setdefault((config, run), []).append(dict(curve))
            if last is not None:
                last_step.setdefault((config, run), []).append(last)
            probe_file = os.path.join(run_dir, "probe.json")
            if os.path.exists(probe_file):                                   # damaged: an error, not a row left out
                try:
                    with open(probe_file) as f:
                        found = {ckpt: float(res["top1"]) for ckpt, res in json.load(f).items()}
                except (ValueError, KeyError, TypeError, AttributeError):    # not JSON, or not {ckpt: {"top1": x}}
                    raise BenchError(f"{probe_file}: damaged (not the JSON eval.py --probe writes): delete it and "
                                     f"re-run `eval.py --probe` on the checkpoints in {run_dir}") from None
                for ckpt, t in found.items():
                    probes.setdefault((config, run, ckpt), []).append((int(seed), t))
    return dict(top1=top1, curves=curves, probes=probes, last_step=last_step, unfinished=unfinished,
                teacher=final_top1(os.path.join(root, "teacher")))


def natural(name):
    """a sort key that puts n300 before n1200"""
    return re.sub(r"\d+", lambda m: m.group().zfill(9), name)


def summarize_runs(root):
    """Markdown tables of ROOT/<config>-s<seed>/<run> folders, over seeds (mean, sample std, range, every seed):
    one table per run name (final top-1 of its log.jsonl), learning curves of runs validated more than once, and the
    linear probes in their probe.json files (eval.py --probe). ROOT/teacher (a single run) is listed too."""
    got = collect_runs(root)
    top1, curves, probes, unfinished, teacher = (got[k] for k in ("top1", "curves", "probes", "unfinished", "teacher"))
    if not top1 and not probes and teacher is None:
        raise BenchError(f"--runs {root}: no finished <config>-s<seed>/<run> or teacher run in it")
    head = "| seeds | top-1 mean | std | min - max | per seed |\n|---|---|---|---|---|---|"
    for i, run in enumerate(sorted(top1, key=lambda r: (r != "finetune", natural(r)))):
        group = top1[run]
        labels = [c for c in group if c.startswith("labels")]                # labels-only baselines of this group
        best = max(labels, key=lambda c: sum(t for _, t in group[c]) / len(group[c])) if labels else None
        cols = ("| seeds | top-1 mean | std | min - max | per seed |"
                + (f" minus {best}, paired by seed |" if best else ""))
        print(("\n" if i else "") + f"| {run}: configuration {cols}\n|" + "---|" * (7 if best else 6))
        if teacher is not None and i == 0:
            print(f"| teacher (ViT) | 1 | {teacher:.1f} | | | |")
        for config, res in sorted(group.items(), key=lambda kv: natural(kv[0])):
            print(f"| {config} | {seed_stats(res)} |" + (f" {paired_gap(res, group[best])} |" if best else ""))
    if teacher is not None and not top1:
        print(f"| configuration {head}\n| teacher (ViT) | 1 | {teacher:.1f} | | | |")
    long = {k: v for k, v in curves.items() if max(map(len, v)) > 1}
    if long:
        print("\n| learning curve: configuration / run | seeds | top-1 at step (mean over seeds) |\n|---|---|---|")
        for (config, run), runs in sorted(long.items(), key=lambda kv: (natural(kv[0][1]), natural(kv[0][0]))):
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            print(f"| {config} / {run} | {len(runs)} | "
                  + ", ".join(f"{s}: {sum(c[s] for c in runs) / len(runs):.1f}" for s in steps) + " |")
    if probes:
        print(f"\n| linear probe: configuration / checkpoint {head}")

        def step(k):
            return int(k[2][4:-3]) if k[2].startswith("step") and k[2][4:-3].isdigit() else 1 << 60
        for key in sorted(probes, key=lambda k: (k[0], k[1], step(k), k[2])):
            print(f"| {key[0]} / {key[1]}/{key[2]} | {seed_stats(probes[key])} |")
    if unfinished:
        print(f"\nunfinished, not counted: {', '.join(unfinished)}")
    return top1


# ----------------------------------------------------------------------------------------------- figures

def spread(values):
    """[value] -> (mean, min, max, count)"""
    return statistics.mean(values), min(values), max(values), len(values)


def figure_data(root=None, csv_path=None):
    """What --plot draws, as numbers. From the runs in ROOT (collect_runs):
    probe_curve {"<config>/<run>": [(distillation step, mean, min, max, seeds)]}: linear-probe top-1 of the checkpoints
      step<N>.pt and last.pt (at the run's last step) of runs probed at two or more steps, over seeds;
    teacher_probe: the teachers' probe top-1 (mean over seeds) or None;
    label_efficiency {config: [(labelled images, mean, min, max, seeds)]}: final top-1 of the runs named n<N> (N
      labelled images) of configurations run at two or more N, over seeds (am+mp: distilled; labels_*: labels only).
    From a side-by-side CSV (--csv): speed {model: [(px, train fwd+bwd ms, inference ms)]}."""
    data = dict(probe_curve={}, teacher_probe=None, label_efficiency={}, speed={})
    if root:
        runs = collect_runs(root)
        curves, teacher = {}, []
        for (config, run, ckpt), res in runs["probes"].items():
            if config == "teacher" and ckpt == "last.pt":
                teacher += [t for _, t in res]
            m = re.fullmatch(r"step(\d+)\.pt", ckpt)
            step = int(m[1]) if m else max(runs["last_step"].get((config, run), [None]), default=None) \
                if ckpt == "last.pt" else None
            if step is not None:
                curves.setdefault(f"{config}/{run}", {})[step] = [t for _, t in res]
        data["probe_curve"] = {k: [(s, *spread(v[s])) for s in sorted(v)] for k, v in sorted(curves.items())
                               if len(v) > 1}
        data["teacher_probe"] = statistics.mean(teacher) if teacher else None
        by_n = {}
        for run, group in runs["top1"].items():
            if re.fullmatch(r"n\d+", run):
                for config, res in group.items():
                    by_n.setdefault(config, {})[int(run[1:])] = [t for _, t in res]
        data["label_efficiency"] = {c: [(n, *spread(v[n])) for n in sorted(v)]
                                    for c, v in sorted(by_n.items(), key=lambda kv: natural(kv[0])) if len(v) > 1}
    if csv_path:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"model", "px", "batch", "train_ms", "infer_ms"} <= set(rows[0]):
            raise BenchError(f"--csv {csv_path}: not a table of `python bench.py --csv` (model, px, batch, train_ms, "
                             "infer_ms, ...)")
        batches = {r["batch"] for r in rows}
        for r in rows:
            name = r["model"] + (f" (batch {r['batch']})" if len(batches) > 1 else "")
            data["speed"].setdefault(name, []).append((int(r["px"]), float(r["train_ms"]), float(r["infer_ms"])))
    return data


def plot_figures(data, out, prefix=""):
    """PNG files of figure_data's series in OUT (the runs' figures named PREFIX...) -> their paths"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from None
    paths = []

    def plain_log_ticks(axis, ticks=None):               # 224, 448 (or 1, 2, 5, 10, ...) rather than 2 x 10^2
        if ticks:
            axis.set_ticks(sorted(set(ticks)))
        else:
            axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())

    def save(fig, name):
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    def series(ax, points, label):
        x, mean, lo, hi = (list(v) for v in list(zip(*points))[:4])
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, lo, hi, alpha=0.2)
    if data["probe_curve"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in data["probe_curve"].items():
            series(ax, points, f"{name} ({max(p[4] for p in points)} seeds)")
        if data["teacher_probe"] is not None:
            ax.axhline(data["teacher_probe"], color="gray", ls="--", label="teacher")
        ax.set(xlabel="distillation step", ylabel="linear probe top-1 (%)", title="linear probe over distillation "
               "(mean, min-max over seeds)")
        ax.legend()
        save(fig, prefix + "probe_curve.png")
    if data["label_efficiency"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for config, points in data["label_efficiency"].items():
            series(ax, points, ("labels only: " if config.startswith("labels") else "distilled: ") + config)
        ax.set(xscale="log", xlabel="labelled images", ylabel="top-1 (%)",
               title="top-1 against labelled images (mean, min-max over seeds)")
        plain_log_ticks(ax.xaxis, [p[0] for points in data["label_efficiency"].values() for p in points])
        ax.legend()
        save(fig, prefix + "label_efficiency.png")
    if data["speed"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for i, (ax, what) in enumerate(zip(axes, ("training forward + backward", "inference"))):
            for model, points in data["speed"].items():
                points = sorted(points)
                ax.plot([p[0] for p in points], [p[1 + i] for p in points], marker="o", label=model)
            ax.set(xscale="log", yscale="log", xlabel="resolution (px)", ylabel="ms (median over rounds)", title=what)
            plain_log_ticks(ax.xaxis, [p[0] for points in data["speed"].values() for p in points])
            plain_log_ticks(ax.yaxis)
            ax.legend()
        save(fig, "speed.png")
    return paths


# ----------------------------------------------------------------------------------------------- main

def int_list(text, flag, sep=","):
    """'224,448' -> [224, 448], every entry a whole number >= 1"""
    try:
        values = [int(v) for v in text.split(sep)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise BenchError(f"{flag} {text!r}: give whole numbers >= 1 separated by '{sep}'")
    return values


def check_args(args):
    """every flag, checked before anything runs: a BenchError that says what is allowed"""
    modes = [f for f, on in (("--scan", args.scan), ("--gpu-report", args.gpu_report),
                             ("--kernel-budget", args.kernel_budget), ("--runs", args.runs is not None),
                             ("--plot", args.plot is not None)) if on]
    if len(modes) > 1:
        raise BenchError(f"{' and '.join(modes)}: give one mode at a time")
    for flag, value in (("--rounds", args.rounds), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise BenchError(f"{flag} {value}: must be a whole number >= 1")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    patches = {n: preset_config(n).patch_size for n in names or [args.models]}
    for res in int_list(args.resolutions, "--resolutions"):
        for n, patch in patches.items():
            if not modes and res % patch:
                raise BenchError(f"--resolutions {res} is not a multiple of {n}'s patch size {patch}")
    for shape in (args.scan_shapes or "1,1,1,1").split(";"):
        if len(int_list(shape, "--scan-shapes")) != 4:
            raise BenchError(f"--scan-shapes {args.scan_shapes!r}: give b,dim,N,L (four whole numbers) per shape, "
                             "shapes separated by ';'")
    for flag, path in (("--runs", args.runs), ("--plot", args.plot)):
        if path and not os.path.isdir(path):
            raise BenchError(f"{flag} {path}: {'not a folder' if os.path.exists(path) else 'no such folder'}")
    if args.plot is not None:
        if not args.plot and not args.csv:
            raise BenchError("--plot: give a runs folder (--plot DIR), a side-by-side table (--csv PATH) or both")
        if args.csv and not os.path.isfile(args.csv):
            raise BenchError(f"--csv {args.csv}: no such file (write it with `python bench.py --csv {args.csv}`)")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise BenchError(f"--out {args.out} is a file: give a folder")
    elif args.csv:
        folder = os.path.dirname(os.path.abspath(args.csv))
        if os.path.isdir(args.csv) or not os.path.isdir(folder):
            raise BenchError(f"--csv {args.csv}: " + ("a folder: give a file name" if os.path.isdir(args.csv) else
                                                      f"no folder {folder} to write it in"))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """the docstring as written; each flag's help ends with its default where it has one"""
    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip() + "\n\n" + __doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--models", default="vit_b16,adventurer_base,base_alt", help="side by side and --gpu-report: "
                   "a preset of vitlinearizer's TEACHER_PRESETS first (the reference), then STUDENT_PRESETS; "
                   "NAME:field=value,... changes fields, e.g. adventurer_base:chunk_size=32")
    p.add_argument("--resolutions", default="224,448,1024", help="side by side: image sizes (px)")
    p.add_argument("--batch-size", type=int, default=1, help="side by side: images per call")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up (side by side, --gpu-report's "
                   "models); --scan: timed calls")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grad-ckpt", action="store_true", help="side by side: every model with activation checkpointing "
                   "(train.py --grad-ckpt): training time and memory")
    p.add_argument("--csv", help="side by side, --scan: also write the table to this CSV file; --plot: the "
                   "side-by-side CSV to draw speed against resolution from")
    p.add_argument("--scan", action="store_true", help="mode: the selective scan, a per-step baseline vs ours "
                   "(reference, chunked; on CUDA also Triton), forward and forward + backward")
    p.add_argument("--scan-shapes", help="--scan: 'b,dim,N,L;...' (default: CUDA " + ";".join(
        ",".join(map(str, s)) for s in SCAN_SHAPES["cuda"]) + ", CPU " + ";".join(
        ",".join(map(str, s)) for s in SCAN_SHAPES["cpu"]) + ")")
    p.add_argument("--gpu-report", action="store_true", help="mode, CUDA only: the Triton scan against the fp64 "
                   "reference, its speed (GB/s, fused vs two launches), and --models side by side at 224 / 448 / 1024 "
                   "px (batch 64 / 16 / 2), as Markdown; exit code 1 if a scan check fails")
    p.add_argument("--kernel-budget", action="store_true", help="mode, no GPU needed: compile the Triton scan for "
                   "sm_80 and sm_90 at Vim shapes; print registers, spills, shared memory and resident warps per SM")
    p.add_argument("--runs", metavar="DIR", help="mode: the <config>-s<seed>/<run> folders of results.sh as Markdown "
                   "tables over seeds: final top-1, learning curves, linear probes")
    p.add_argument("--plot", metavar="DIR", nargs="?", const="", help="mode: figures (PNG, needs matplotlib) of the "
                   "runs in DIR (the linear probe over distillation steps; top-1 against labelled images, distilled vs "
                   "labels only) and, with --csv, of speed against resolution")
    p.add_argument("--out", default=".", help="--plot: folder for the figures")
    args = p.parse_args(argv)
    try:
        check_args(args)
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        device = torch.device("cuda" if cuda else "cpu")
        if args.kernel_budget:
            rows = kernel_budget()
            print_table(list(rows[0]), rows)
        elif args.gpu_report:
            return 1 if gpu_report(args) else 0
        elif args.scan:
            bench_scan(args, device)
        elif args.runs is not None:
            summarize_runs(args.runs)
        elif args.plot is not None:
            data = figure_data(args.plot, args.csv)
            prefix = os.path.basename(os.path.normpath(args.plot)) + "_" if args.plot else ""
            if not any((data["probe_curve"], data["label_efficiency"], data["speed"])):
                raise BenchError(f"--plot {args.plot}: no probe curve (step<N>.pt probes), no runs n<N> at two or more "
                                 "N and no --csv: nothing to draw")
            os.makedirs(args.out, exist_ok=True)
            for path in plot_figures(data, args.out, prefix):
                print(f"wrote {path}")
        else:
            run_side_by_side(args, device)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
