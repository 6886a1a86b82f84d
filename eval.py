"""
Evaluate a checkpoint, or benchmark the teacher against the student.

    python eval.py --ckpt runs/demo/finetune/last.pt           # top-1 / top-5 on the demo's held-out images
    python eval.py --ckpt runs/in1k/finetune/last.pt --data DIR  # ... on DIR/val/<class>/*
    python eval.py --bench                                        # teacher vs student: img/s, latency, memory
    python eval.py --bench-scan                                   # selective scan: per-step baseline vs ours
    python eval.py --probe runs/demo/distill/last.pt              # linear probe of a frozen model (--random-init too)
    python eval.py --runs runs/results/pairs                      # tables over seeds (README "Results", results.sh)
"""
import argparse, csv, json, os, re, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

import data
import train
import vitlinearizer as vl
import scan_kernel


# ----------------------------------------------------------------------------------------------- accuracy

def load_model(path, ema=False, for_accuracy=True):
    """our checkpoint (any kind; ema: its EMA weights), a released Adventurer file, else whatever load_teacher takes (a
    teacher file of any format it reads, a Hub folder, timm:NAME). for_accuracy: warn that a distillation checkpoint's
    class head is untrained."""
    if path.startswith("timm:") and not ema:
        return train.load_teacher(path, None), {}
    with train.as_user_error(f"could not read {path}"):
        ck, _ = vl.read_checkpoint(path) if not path.startswith("timm:") else ({}, None)   # a file, or a Hub folder
        ck = vl.adventurer_checkpoint(ck) or ck                                       # the public Adventurer's files
    if ema and not (isinstance(ck, dict) and ck.get("ema")):
        raise train.UserError(f"{path} holds no EMA weights (train with --ema-decay)")
    if isinstance(ck, dict) and "kind" in ck:
        try:
            model = vl.model_from_checkpoint({**ck, "model": ck["ema"]} if ema else ck, path)
        except Exception as e:
            raise train.UserError(f"{path}: {e}") from e
        if ck.get("stage") == "distill" and for_accuracy:
            print(f"warning: {path} is a distillation checkpoint: its class head was never trained (distillation uses "
                  "no labels), so its accuracy is near chance; fine-tune it first (train.py --stage finetune --init "
                  f"{path})", file=sys.stderr)
        return model, ck
    return train.load_teacher(path, None), {}


def accuracy(args):
    model, ck = load_model(args.ckpt, args.ema)
    run = ck.get("args", {})
    args.img_size = args.img_size or run.get("img_size") or model.cfg.img_size
    train.check_img_size(args.img_size, model.cfg.patch_size, "model")
    if args.data is None and run and run.get("data") is None:                            # the demo's held-out set
        ds = data.demo_set(demo_args(run, args.img_size), "val")
        classes = ds.classes
    elif args.data is not None:
        classes, samples = data.list_split(args.data, "val")
        declared = getattr(model, "eval_transform", {})                  # a teacher's library's resize / crop
        crop = args.crop_ratio or declared.get("crop_pct", 0.875)
        ds = data.ImageFolder(samples, classes, args.img_size, train=False, crop_ratio=crop,
                               interpolation=declared.get("interpolation", "bicubic"))
    else:
        raise train.UserError(f"{args.ckpt} was not trained on the demo: give --data DIR (DIR/val/<class>/*)")
    if ck.get("classes") and list(ck["classes"]) != list(classes):
        raise train.UserError(f"the checkpoint's {len(ck['classes'])} classes differ from the {len(classes)} "
                              "class folders")
    if model.cfg.num_classes != len(classes):
        raise train.UserError(f"the model has {model.cfg.num_classes} outputs but the set has {len(classes)} classes")
    ctx = train.Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    res = train.evaluate(model.to(ctx.device), data.make_loader(ds, args, ctx, train=False), args, ctx)
    print(f"{args.ckpt}{' (EMA weights)' if args.ema else ''}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
          f"({len(ds)} images, {len(classes)} classes, {args.img_size} px)")
    return res


def demo_args(run, img_size):
    """the demo arguments of a run (checkpoints from before --demo-task used the relations task)"""
    before = {"demo_task": "relations", "demo_probe": train.get_parser().get_default("demo_probe")}
    return argparse.Namespace(**{**before, **run, "img_size": img_size})


# ----------------------------------------------------------------------------------------------- linear probe

def random_init(ck, seed):
    """the checkpoint's architecture as training initialises it from scratch (seed, then the run's position init):
    what a distillation run starts from"""
    model_cls, cfg_cls = vl.MODEL_KINDS[ck["kind"]]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**ck["config"]))
    if ck.get("args", {}).get("pos_init", "sincos") == "sincos":
        train.sincos_pos_init_(model)
    return model


def probe_ckpts(args):
    """eval.py --probe: linear probe of each frozen checkpoint; results also merged into <its folder>/probe.json"""
    ctx = train.Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    results = {}
    for path in args.probe:
        model, ck = load_model(path, for_accuracy=False)
        run = ck.get("args", {})
        img_size = args.img_size or run.get("img_size") or model.cfg.img_size
        if args.data is None and run.get("data") is None and run:
            a = demo_args(run, img_size)
            a.demo_probe = args.probe_train or a.demo_probe
            probe_set, val = data.demo_set(a, "probe"), data.demo_set(a, "val")
        elif args.data is not None:
            d = data.Data(argparse.Namespace(data=args.data, img_size=img_size, distill_data=None))
            probe_set, val = d.probe(args.probe_train), d.val
        else:
            raise train.UserError(f"{path} was not trained on the demo: give --data DIR (DIR/{{train,val}}/<class>/*)")
        if args.random_init:
            if "kind" not in ck:
                raise train.UserError(f"--random-init needs one of our checkpoints (its architecture), not {path}")
            model, name = random_init(ck, args.random_init_seed), f"random-init-s{args.random_init_seed}"
        else:
            name = os.path.basename(path)
        args.img_size, args.batch_size = img_size, max(args.batch_size, 256)
        res = train.probe(model, probe_set, val, args, ctx)
        print(f"{path}{' (random init)' if args.random_init else ''}: linear probe top-1 {res['top1']:.2f}  "
              f"(train {res['train_top1']:.2f}; {len(probe_set)} probe images, {len(val)} held out)")
        out = os.path.join(os.path.dirname(path) or ".", "probe.json")
        if not path.startswith("timm:"):
            old = json.load(open(out)) if os.path.exists(out) else {}
            train.save_json(out, {**old, name: res})
        results[path] = res
    return results


# ----------------------------------------------------------------------------------------------- model benchmark

def timed(fn, warmup, repeats, device):
    """-> seconds per call (CUDA events on GPU, wall clock on CPU)"""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


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


def bench_models(args, csv_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    models = {"teacher": vl.ViT(train.make_config(vl.TEACHER_PRESETS, args.teacher_preset, args.teacher_opts,
                                                  "teacher")),
              "student": vl.build_model(train.make_config(vl.STUDENT_PRESETS, args.student, args.student_opts,
                                                          "student"))}
    rows, slow = [], set()
    for res in int_list(args.resolutions, "--resolutions"):
        for bs in int_list(args.batch_sizes, "--batch-sizes"):
            for name, model in models.items():
                model.to(device).eval()
                row = dict(model=name, preset=args.teacher_preset if name == "teacher" else args.student, res=res,
                           batch=bs, img_s="", latency_ms="", peak_mb="", train_mem_mb="", vs_teacher="", time_split="")
                rows.append(row)
                if name in slow:
                    row["img_s"] = "skipped (slow)"
                    continue
                x = torch.rand(bs, 3, res, res, device=device)                    # pixels in [0, 1]

                def fwd():
                    with torch.no_grad(), amp:
                        model(vl.normalize(x, model))
                try:
                    t0 = time.perf_counter()
                    mem = peak_mb(device, fwd)                                        # also the first warm-up
                    if time.perf_counter() - t0 > args.max_seconds:                   # CPU: larger ones would take ages
                        slow.add(name)
                    sec = timed(fwd, args.warmup, args.repeats, device)
                    row.update(img_s=f"{bs / sec:.1f}", latency_ms=f"{1000 * sec:.1f}",
                               peak_mb="n/a" if mem is None else f"{mem:.0f}")
                    if res in (224, 448) and bs == max(int_list(args.batch_sizes, "--batch-sizes")):
                        row["train_mem_mb"] = train_step_mem(model, vl.normalize(x, model), device, amp)
                    if name == "student":
                        teacher_row = rows[-2]
                        if teacher_row["latency_ms"]:
                            row["vs_teacher"] = f"{float(teacher_row['latency_ms']) / (1000 * sec):.2f}x"
                        with amp:
                            parts, total = student_time_split(model, vl.normalize(x, model), device)
                        row["time_split"] = " ".join(f"{k.split()[0]} {100 * v / total:.0f}%" for k, v in parts.items())
                except torch.cuda.OutOfMemoryError:
                    row["img_s"] = "OOM"
                    torch.cuda.empty_cache()
                model.cpu()
    cols = ["model", "preset", "res", "batch", "img_s", "latency_ms", "vs_teacher", "peak_mb", "train_mem_mb",
            "time_split"]
    print(f"\n{device.type.upper()} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} CPU threads, warm-up "
          f"{args.warmup}, repeats {args.repeats}; vs_teacher = teacher latency / student latency "
          f"(> 1: student faster); time_split = the student's forward by part; train_mem_mb: "
          f"{'peak' if device.type == 'cuda' else 'saved activations + 4 x parameters'}\n")
    print_table(cols, rows)
    write_csv(csv_path, cols, rows)
    print(f"\nwrote {csv_path}" + plot(rows, csv_path.rsplit(".", 1)[0] + ".png"))
    return rows


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


def print_table(cols, rows):
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def write_csv(path, cols, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return " (pip install matplotlib for a plot)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, bs) in sorted({(r["model"], r["batch"]) for r in rows}):
        pts = [(r["res"], float(r["img_s"])) for r in rows if (r["model"], r["batch"]) == (name, bs)
               and r["img_s"].replace(".", "", 1).isdigit()]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{name} batch {bs}")
    ax.set(xlabel="resolution (px)", ylabel="images / s", yscale="log", title="inference throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f" and {path}"


# ----------------------------------------------------------------------------------------------- scan benchmark

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


def bench_scan(args, csv_path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [tuple(int_list(s, "--scan-shapes")) for s in args.scan_shapes.split(";")] if args.scan_shapes else (
        [(64, 768, 16, 197), (64, 768, 16, 785), (128, 1536, 16, 197), (128, 1536, 16, 785)] if device.type == "cuda"
        else [(8, 384, 16, 197), (8, 384, 16, 1025)])
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
                        sec = timed(call, args.warmup, args.repeats, device)
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
          f"unavoidable bytes / time), warm-up {args.warmup}, repeats {args.repeats}\n")
    print_table(cols, rows)
    write_csv(csv_path, cols, rows)
    print(f"\nwrote {csv_path}")
    return rows


# ----------------------------------------------------------------------------------------------- GPU report

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


def model_flops(model, res, device):
    """forward FLOPs of one image: matmuls, convolutions and attention as torch counts them, plus the selective scan,
    which it cannot see (per channel, step, state and direction: dt A, exp, dt u B, a h + b, C h: 7 operations)"""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, res, res, device=device))
    flops = counter.get_total_flops()
    if isinstance(model, vl.VisionMamba):
        cfg, L = model.cfg, 1 + (res // model.cfg.patch_size) ** 2
        directions = 2 if cfg.bidirectional == "fused" else 1
        flops += cfg.depth * directions * cfg.expand * cfg.dim * L * 7 * cfg.d_state
    return flops


def attention_kernel(model, device):
    """name of the CUDA kernel that PyTorch's scaled_dot_product_attention runs for this ViT under bf16"""
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, torch.no_grad(), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    hits = [e.key for e in prof.key_averages()
            if any(k in e.key.lower() for k in ("flash", "fmha", "attention", "cudnn", "efficient"))]
    return min(hits, key=len)[:70] if hits else "not found"


def model_speed(res, batch, models, device, repeats=5):
    """per model: training (forward, backward, AdamW step) and inference images/s and peak memory under bf16
    autocast, forward GFLOPs per image, and each against the first model (the teacher)"""
    rows = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for name, model in models.items():
        model.to(device)
        x = torch.rand(batch, 3, res, res, device=device)                             # pixels in [0, 1]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        row = dict(res=res, tokens=1 + (res // 16) ** 2, batch=batch, model=name)

        def train_step():
            with amp:
                loss = model(vl.normalize(x, model)).logits.float().logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad(), amp:
                model(vl.normalize(x, model))
        for mode, fn in (("train", train_step), ("infer", infer)):
            model.train(mode == "train")
            try:
                mem = peak_mb(device, fn)
                ms = median_ms(fn, device, warmup=1, repeats=repeats)
                row[f"{mode} img/s"] = f"{batch * 1000 / ms:.0f}"
                row[f"{mode} GB"] = "n/a" if mem is None else f"{mem / 1024:.1f}"
            except torch.cuda.OutOfMemoryError:
                row[f"{mode} img/s"], row[f"{mode} GB"] = "OOM", ""
                torch.cuda.empty_cache()
        row["GFLOPs"] = f"{model_flops(model.eval(), res, device) / 1e9:.3g}"
        rows.append(row)
        del opt
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t = rows[0]
    for row in rows:
        ratio = [f"{float(row[k]) / float(t[k]):.2f}" if "OOM" not in (row[k], t[k]) else "-"
                 for k in ("train img/s", "infer img/s")]
        row["speed vs teacher (train / infer)"] = " / ".join(ratio)
        row["FLOP ratio teacher / model"] = f"{float(t['GFLOPs']) / float(row['GFLOPs']):.2f}"
    return rows


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
        raise train.UserError(f"--kernel-budget needs a compiled (not interpreted) kernel and triton >= 3.6 "
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


def gpu_report(args):
    """One command on a CUDA machine: the Triton scan against the reference, its speed, and student vs teacher.
    Returns the failed correctness rows (exit code 1 if any)."""
    if not torch.cuda.is_available():
        raise train.UserError("--gpu-report needs a CUDA GPU; on a CPU the tests check the kernel under the "
                              "interpreter")
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

    teacher = vl.ViT(vl.TEACHER_PRESETS[args.teacher_preset])
    students = [s for s in (args.student, args.student + "_alt", "adventurer_" + args.student)   # base: both kinds
                if s in vl.STUDENT_PRESETS]
    models = {args.teacher_preset: teacher, **{s: vl.build_model(vl.STUDENT_PRESETS[s]) for s in students}}
    print(f"### Student vs teacher, bf16 autocast, median of 5 steps; the teacher's attention is PyTorch SDPA "
          f"(kernel: {attention_kernel(teacher.to(device), device)})\n", flush=True)
    rows = []
    for res, batch in ((224, 64), (448, 16), (1024, 2)):
        rows += model_speed(res, batch, models, device)
        print(f"({res} px done, {time.perf_counter() - t0:.0f} s so far)", flush=True)
    print()
    print_table(list(rows[0]), rows)
    print(f"\ngpu report: {time.perf_counter() - t0:.0f} s on {name}")
    return failed


# ----------------------------------------------------------------------------------------------- ablation table

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
            raise train.UserError(f"{path}: line {i + 1} is not JSON ({line[:30]!r}...): a damaged log") from None
    curve = [(rec["step"], rec["val_top1"]) for rec in records if "val_top1" in rec]
    return curve, bool(records) and records[-1].get("finished", False), records[-1]["step"] if records else None


def val_curve(run_dir):
    """[(step, top-1)] of the validations in RUN_DIR/log.jsonl"""
    return run_log(run_dir)[0]


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


def summarize_runs(root):
    """Markdown tables of ROOT/<config>-s<seed>/<run> folders, over seeds (mean, sample std, range, every seed):
    one table per run name (final top-1 of its log.jsonl), learning curves of runs validated more than once, and the
    linear probes in their probe.json files (eval.py --probe). ROOT/teacher (a single run) is listed too."""
    if not os.path.isdir(root):
        raise train.UserError(f"--runs {root}: no such folder")
    top1, curves, probes, unfinished = {}, {}, {}, []
    for name in sorted(os.listdir(root)):
        config, _, seed = name.rpartition("-s")
        if not (config and seed.isdigit() and os.path.isdir(os.path.join(root, name))):
            continue
        for run in sorted(os.listdir(os.path.join(root, name))):
            run_dir = os.path.join(root, name, run)
            curve, finished, last_step = run_log(run_dir)
            if curve and not finished:                                       # stopped or still running: not counted
                unfinished.append(f"{name}/{run} (step {last_step})")
            elif curve:
                top1.setdefault(run, {}).setdefault(config, []).append((int(seed), curve[-1][1]))
                curves.setdefault((config, run), []).append(dict(curve))
            probe_file = os.path.join(run_dir, "probe.json")
            if os.path.exists(probe_file):
                for ckpt, res in json.load(open(probe_file)).items():
                    probes.setdefault((config, run, ckpt), []).append((int(seed), res["top1"]))
    teacher = final_top1(os.path.join(root, "teacher"))
    if not top1 and not probes and teacher is None:
        raise train.UserError(f"--runs {root}: no finished <config>-s<seed>/<run> or teacher run in it")
    head = "| seeds | top-1 mean | std | min - max | per seed |\n|---|---|---|---|---|---|"

    def natural(name):                                                       # n300 before n1200
        return re.sub(r"\d+", lambda m: m.group().zfill(9), name)
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


# ----------------------------------------------------------------------------------------------- main

def int_list(text, flag, sep=","):
    """'224,448' -> [224, 448], every entry a whole number >= 1"""
    try:
        values = [int(v) for v in text.split(sep)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise train.UserError(f"{flag} {text!r}: give whole numbers >= 1 separated by '{sep}'")
    return values


def check_args(args):
    """Every numeric flag and file argument, checked before anything runs: a UserError that says what is allowed.
    A new flag's check goes here."""
    for flag, value, least in (("--img-size", args.img_size, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0), ("--warmup", args.warmup, 0),
                               ("--repeats", args.repeats, 1), ("--threads", args.threads, 1),
                               ("--probe-train", args.probe_train, 0),
                               ("--random-init-seed", args.random_init_seed, 0)):
        if value is not None and value < least:
            raise train.UserError(f"{flag} {value}: must be a whole number >= {least}")
    if not 0 < args.max_seconds < float("inf"):
        raise train.UserError(f"--max-seconds {args.max_seconds}: must be a finite number > 0")
    if args.crop_ratio is not None and not 0 < args.crop_ratio <= 1:
        raise train.UserError(f"--crop-ratio {args.crop_ratio}: must be > 0 and <= 1")
    int_list(args.resolutions, "--resolutions")
    int_list(args.batch_sizes, "--batch-sizes")
    for shape in (args.scan_shapes or "1,1,1,1").split(";"):
        if len(int_list(shape, "--scan-shapes")) != 4:
            raise train.UserError(f"--scan-shapes {args.scan_shapes!r}: give b,dim,N,L (four whole numbers) per shape, "
                                  "shapes separated by ';'")
    if args.ckpt and not args.ckpt.startswith("timm:"):
        train.check_file(args.ckpt, "--ckpt", folder_ok=True)
    for path in args.probe or ():
        if not path.startswith("timm:"):
            train.check_file(path, "--probe", folder_ok=True)
    for flag, path in (("--data", args.data), ("--runs", args.runs)):
        if path is not None:
            train.check_folder(path, flag)
    train.check_out_dir(args.out, "--out")


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to evaluate (train.py's, or a teacher file / timm:NAME)")
    p.add_argument("--data", help="ImageNet-layout folder; its val/ split is evaluated (default: the demo's "
                   "held-out set)")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's training resolution; any multiple of the "
                   "patch size works (position embeddings resampled), e.g. 448 for a 224 px model")
    p.add_argument("--crop-ratio", type=float, help="--data: resize to img-size / ratio, centre crop (Adventurer "
                   "evaluates above 224 px with 1.0); default: a teacher's library's crop_pct and interpolation where "
                   "declared (timm, transformers, CLIP), else 0.875, bicubic")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (--ema-decay runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4 if cuda else 0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--bench", action="store_true", help="teacher vs student throughput, latency and peak memory")
    p.add_argument("--bench-scan", action="store_true", help="selective scan: baseline vs scan_kernel")
    p.add_argument("--kernel-budget", action="store_true", help="no GPU needed: compile the Triton scan for sm_80 "
                   "and sm_90 at Vim shapes; print registers, spills, shared memory and resident warps per SM")
    p.add_argument("--gpu-report", action="store_true", help="CUDA only: the Triton scan against the reference, its "
                   "speed (GB/s, fused vs two launches), and students (--student, its _alt and adventurer_ presets) vs "
                   "teacher throughput / memory, as Markdown")
    p.add_argument("--teacher-preset", default="vit_b16")
    p.add_argument("--teacher-opts", default="")
    p.add_argument("--student", default="base")
    p.add_argument("--student-opts", default="")
    p.add_argument("--resolutions", default="224,448,768,1024")
    p.add_argument("--batch-sizes", default="1,64" if cuda else "1,8")
    p.add_argument("--scan-shapes", help="'b,dim,N,L;...' (default: a GPU or a CPU set)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="bench: skip larger inputs once one call takes longer")
    p.add_argument("--out", default=".", help="folder for bench.csv / bench.png / bench_scan.csv")
    p.add_argument("--runs", help="folder of <config>-s<seed> runs: print their top-1 over seeds")
    p.add_argument("--probe", nargs="+", metavar="CKPT", help="linear probe of frozen checkpoints: multinomial "
                   "logistic regression on [class token, mean patch token] of the final tokens; features standardised; "
                   f"weights from zero; full-batch L-BFGS, fp64, L2 {train.PROBE_L2:g}, at most {train.PROBE_ITERS} "
                   "iterations; trained on the demo's probe set (or DIR/train with --data), measured on the held-out "
                   "set (DIR/val); results also go to <ckpt folder>/probe.json")
    p.add_argument("--probe-train", type=int, help="probe: training images (demo: default the run's --demo-probe; "
                   f"--data: class-balanced, default {data.PROBE_PER_CLASS} per class, e.g. 100 k for ImageNet-1k: "
                   "0.6 GB of ViT-B features, 1.2 GB in the fp64 solver, a few minutes; 0 = the whole train split, "
                   "for ImageNet 1.28 M x 1,536 features: 7.9 GB fp32 + 15.7 GB fp64)")
    p.add_argument("--random-init", action="store_true", help="probe: the checkpoint's architecture at its training "
                   "initialisation instead of its weights")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default: {train.DEMO_THREADS} for --ckpt on the "
                   "demo's held-out set, else the CPU cores this process may use; overrides OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        demo_set = (args.ckpt or args.probe) and not (args.data or args.bench or args.bench_scan or args.runs
                                                      or args.gpu_report or args.kernel_budget)
        torch.set_num_threads(args.threads or (train.DEMO_THREADS if demo_set else train.cores_per_process()))
        if args.kernel_budget:
            rows = kernel_budget()
            print_table(list(rows[0]), rows)
            return 0
        if args.gpu_report:
            return 1 if gpu_report(args) else 0
        if args.bench or args.bench_scan:
            os.makedirs(args.out, exist_ok=True)
            if args.bench:
                bench_models(args, os.path.join(args.out, "bench.csv"))
            if args.bench_scan:
                bench_scan(args, os.path.join(args.out, "bench_scan.csv"))
        elif args.runs:
            summarize_runs(args.runs)
        elif args.probe:
            probe_ckpts(args)
        elif args.ckpt:
            accuracy(args)
        else:
            p.error("give --ckpt PATH, --probe CKPT, --runs DIR, --bench or --bench-scan")
    except train.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
