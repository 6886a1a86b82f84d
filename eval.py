"""
Evaluate a checkpoint, or benchmark the teacher against the student.

    python eval.py --ckpt runs/demo/finetune/last.pt           # top-1 / top-5 on the demo's held-out images
    python eval.py --ckpt runs/in1k/finetune/last.pt --data DIR  # ... on DIR/val/<class>/*
    python eval.py --bench                                        # teacher vs student: img/s, latency, memory
    python eval.py --bench-scan                                   # selective scan: per-step baseline vs ours
    python eval.py --probe runs/demo/distill/last.pt              # linear probe of a frozen model (--random-init too)
    python eval.py --runs runs/results/pairs                      # tables over seeds (README "Results", results.sh)
"""
import argparse, csv, json, os, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

import train
import vitlinearizer as vl
import scan_kernel


# ----------------------------------------------------------------------------------------------- accuracy

def load_model(path):
    """our checkpoint (any kind), else whatever load_teacher takes (timm / CLIP file, timm:NAME)"""
    ck = train.load_checkpoint(path) if not path.startswith("timm:") else {}
    if "kind" in ck:
        try:
            return vl.model_from_checkpoint(ck, path), ck
        except Exception as e:
            raise train.UserError(f"{path}: {e}") from e
    return train.load_teacher(path, None), ck


def accuracy(args):
    model, ck = load_model(args.ckpt)
    run = ck.get("args", {})
    args.img_size = args.img_size or run.get("img_size") or model.cfg.img_size
    if args.data is None and run and run.get("data") is None:                            # the demo's held-out set
        ds = train.demo_set(demo_args(run, args.img_size), "val")
        classes = ds.classes
    elif args.data is not None:
        classes, samples = train.list_split(args.data, "val")
        ds = train.ImageFolder(samples, classes, args.img_size, train=False)
    else:
        raise train.UserError(f"{args.ckpt} was not trained on the demo: give --data DIR (DIR/val/<class>/*)")
    if ck.get("classes") and list(ck["classes"]) != list(classes):
        raise train.UserError(f"the checkpoint's {len(ck['classes'])} classes differ from the {len(classes)} class folders")
    if model.cfg.num_classes != len(classes):
        raise train.UserError(f"the model has {model.cfg.num_classes} outputs but the set has {len(classes)} classes")
    ctx = train.Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    res = train.evaluate(model.to(ctx.device), train.make_loader(ds, args, ctx, train=False), args, ctx)
    print(f"{args.ckpt}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  ({len(ds)} images, {len(classes)} classes)")
    return res


def demo_args(run, img_size):
    """the demo arguments of a run (checkpoints from before --demo-task used the relations task)"""
    return argparse.Namespace(**{"demo_task": "relations", "demo_probe": train.DEMO["demo_probe"], **run, "img_size": img_size})


# ----------------------------------------------------------------------------------------------- linear probe

def random_init(ck, seed):
    """the checkpoint's architecture as training initialises it from scratch (seed, then the run's position init):
    what a distillation run starts from"""
    cls, ccls = (vl.ViT, vl.ViTConfig) if ck["kind"] == "vit" else (vl.VisionMamba, vl.MambaConfig)
    torch.manual_seed(seed)
    model = cls(ccls(**ck["config"]))
    if ck.get("args", {}).get("pos_init", "sincos") == "sincos":
        train.sincos_pos_init_(model)
    return model


def probe_ckpts(args):
    """eval.py --probe: linear probe of each frozen checkpoint; results also merged into <its folder>/probe.json"""
    ctx = train.Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    results = {}
    for path in args.probe:
        model, ck = load_model(path)
        run = ck.get("args", {})
        img_size = args.img_size or run.get("img_size") or model.cfg.img_size
        if args.data is None and run.get("data") is None and run:
            a = demo_args(run, img_size)
            a.demo_probe = args.probe_train or a.demo_probe
            probe_set, val = train.demo_set(a, "probe"), train.demo_set(a, "val")
        elif args.data is not None:
            d = train.Data(argparse.Namespace(data=args.data, img_size=img_size, distill_data=None))
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
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    models = {"teacher": vl.ViT(train.make_config(vl.TEACHER_PRESETS, args.teacher_preset, args.teacher_opts, "teacher")),
              "student": vl.VisionMamba(train.make_config(vl.STUDENT_PRESETS, args.student, args.student_opts, "student"))}
    rows, slow = [], set()
    for res in map(int, args.resolutions.split(",")):
        for bs in map(int, args.batch_sizes.split(",")):
            for name, model in models.items():
                model.to(device).eval()
                row = dict(model=name, preset=args.teacher_preset if name == "teacher" else args.student, res=res,
                           batch=bs, img_s="", latency_ms="", peak_mb="", train_mem_mb="", vs_teacher="", time_split="")
                rows.append(row)
                if name in slow:
                    row["img_s"] = "skipped (slow)"
                    continue
                x = torch.randn(bs, 3, res, res, device=device)

                def fwd():
                    with torch.no_grad(), amp:
                        model(x)
                try:
                    t0 = time.perf_counter()
                    mem = peak_mb(device, fwd)                                          # also the first warm-up
                    if time.perf_counter() - t0 > args.max_seconds:                     # CPU: larger ones would take ages
                        slow.add(name)
                    sec = timed(fwd, args.warmup, args.repeats, device)
                    row.update(img_s=f"{bs / sec:.1f}", latency_ms=f"{1000 * sec:.1f}", peak_mb="n/a" if mem is None else f"{mem:.0f}")
                    if res in (224, 448) and bs == max(map(int, args.batch_sizes.split(","))):
                        row["train_mem_mb"] = train_step_mem(model, x, device, amp)
                    if name == "student":
                        teacher_row = rows[-2]
                        if teacher_row["latency_ms"]:
                            row["vs_teacher"] = f"{float(teacher_row['latency_ms']) / (1000 * sec):.2f}x"
                        with amp:
                            parts, total = student_time_split(model, x, device)
                        row["time_split"] = " ".join(f"{k.split()[0]} {100 * v / total:.0f}%" for k, v in parts.items())
                except torch.cuda.OutOfMemoryError:
                    row["img_s"] = "OOM"
                    torch.cuda.empty_cache()
                model.cpu()
    cols = ["model", "preset", "res", "batch", "img_s", "latency_ms", "vs_teacher", "peak_mb", "train_mem_mb", "time_split"]
    print(f"\n{device.type.upper()} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} CPU threads, warm-up "
          f"{args.warmup}, repeats {args.repeats}; vs_teacher = teacher latency / student latency (> 1: student faster); "
          f"time_split = the student's forward by part; train_mem_mb: {'peak' if device.type == 'cuda' else 'saved activations + 4 x parameters'}\n")
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
    """-> {part: seconds} of one no-grad forward of a VisionMamba: the scan, the in/out projections, the depthwise
    conv, the norms, and the rest (x_proj / dt_proj matmuls, gates, layout, patch embedding, head)."""
    parts = dict.fromkeys(["scan", "in/out projections", "depthwise conv", "norms"], 0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed_call(part, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            parts[part] += time.perf_counter() - t
            return out
        return wrapper
    saved = {name: getattr(vl, name) for name in ("selective_scan", "bidirectional_selective_scan")}
    conv = vl.BiMamba.conv
    patched = [(m, m.forward) for m in model.modules() if isinstance(m, (nn.RMSNorm, nn.Linear))]
    try:
        for name, fn in saved.items():
            setattr(vl, name, timed_call("scan", fn))
        vl.BiMamba.conv = timed_call("depthwise conv", conv)
        for m, fwd in patched:
            m.forward = timed_call("norms" if isinstance(m, nn.RMSNorm) else "in/out projections", fwd)
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            model(x)
            sync()
            total = time.perf_counter() - t
    finally:
        for name, fn in saved.items():
            setattr(vl, name, fn)
        vl.BiMamba.conv = conv
        for m, _ in patched:
            del m.forward
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
    shapes = [tuple(map(int, s.split(","))) for s in args.scan_shapes.split(";")] if args.scan_shapes else (
        [(64, 768, 16, 197), (64, 768, 16, 785), (128, 1536, 16, 197), (128, 1536, 16, 785)] if device.type == "cuda"
        else [(8, 384, 16, 197), (8, 384, 16, 1025)])
    impls = {"baseline (per-step slicing)": scan_baseline,
             "ours: selective_scan_ref": lambda *a: scan_kernel.selective_scan_ref(*a, delta_softplus=True),
             "ours: chunked (CPU path)": lambda *a: scan_kernel.selective_scan_chunked(*a, delta_softplus=True)}
    if device.type == "cuda":                                                           # never timed under the interpreter
        impls["ours: triton"] = lambda *a: scan_kernel.selective_scan(*a, delta_softplus=True, backend="triton")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for (b, d, n, L) in shapes:
        for dt in dtypes:
            g = torch.Generator(device).manual_seed(0)
            r = lambda *s: torch.randn(*s, device=device, generator=g)
            u, delta, z, B, C = (r(b, d, L).to(dt), (0.5 * r(b, d, L)).to(dt), r(b, d, L).to(dt),
                                 r(b, n, L).to(dt), r(b, n, L).to(dt))
            A, D, dbias = -torch.rand(d, n, device=device, generator=g) - 0.5, r(d), r(d) - 3
            es = dt.itemsize
            unavoidable = {"fwd": es * (4 * b * d * L + 2 * b * n * L) + 4 * (d * n + 2 * d),   # read u,delta,z,B,C; write y
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


# ----------------------------------------------------------------------------------------------- ablation table

def val_curve(run_dir):
    """[(step, top-1)] of the validations in RUN_DIR/log.jsonl (the last one is the run's result)"""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(rec["step"], rec["val_top1"]) for rec in map(json.loads, f) if "val_top1" in rec]


def final_top1(run_dir):
    """top-1 of the last validation in RUN_DIR/log.jsonl, None while the run has none"""
    curve = val_curve(run_dir)
    return curve[-1][1] if curve else None


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
    top1, curves, probes = {}, {}, {}
    for name in sorted(os.listdir(root)):
        config, _, seed = name.rpartition("-s")
        if not (config and seed.isdigit() and os.path.isdir(os.path.join(root, name))):
            continue
        for run in sorted(os.listdir(os.path.join(root, name))):
            run_dir = os.path.join(root, name, run)
            curve = val_curve(run_dir)
            if curve:
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
    for i, run in enumerate(sorted(top1, key=lambda r: (r != "finetune", r))):
        group = top1[run]
        labels = [c for c in group if c.startswith("labels")]                # labels-only baselines of this group
        best = max(labels, key=lambda c: sum(t for _, t in group[c]) / len(group[c])) if labels else None
        cols = "| seeds | top-1 mean | std | min - max | per seed |" + (f" minus {best}, paired by seed |" if best else "")
        print(("\n" if i else "") + f"| {run}: configuration {cols}\n|" + "---|" * (7 if best else 6))
        if teacher is not None and i == 0:
            print(f"| teacher (ViT) | 1 | {teacher:.1f} | | | |")
        for config, res in group.items():
            print(f"| {config} | {seed_stats(res)} |" + (f" {paired_gap(res, group[best])} |" if best else ""))
    if teacher is not None and not top1:
        print(f"| configuration {head}\n| teacher (ViT) | 1 | {teacher:.1f} | | | |")
    long = {k: v for k, v in curves.items() if max(map(len, v)) > 1}
    if long:
        print("\n| learning curve: configuration / run | seeds | top-1 at step (mean over seeds) |\n|---|---|---|")
        for (config, run), runs in long.items():
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            print(f"| {config} / {run} | {len(runs)} | "
                  + ", ".join(f"{s}: {sum(c[s] for c in runs) / len(runs):.1f}" for s in steps) + " |")
    if probes:
        print(f"\n| linear probe: configuration / checkpoint {head}")
        step = lambda k: int(k[2][4:-3]) if k[2].startswith("step") and k[2][4:-3].isdigit() else 1 << 60  # noqa: E731
        for key in sorted(probes, key=lambda k: (k[0], k[1], step(k), k[2])):
            print(f"| {key[0]} / {key[1]}/{key[2]} | {seed_stats(probes[key])} |")
    return top1


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to evaluate (train.py's, or a teacher file / timm:NAME)")
    p.add_argument("--data", help="ImageNet-layout folder; its val/ split is evaluated (default: the demo's held-out set)")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's training resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4 if cuda else 0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--bench", action="store_true", help="teacher vs student throughput, latency and peak memory")
    p.add_argument("--bench-scan", action="store_true", help="selective scan: baseline vs scan_kernel")
    p.add_argument("--teacher-preset", default="vit_b16")
    p.add_argument("--teacher-opts", default="")
    p.add_argument("--student", default="base")
    p.add_argument("--student-opts", default="")
    p.add_argument("--resolutions", default="224,448,768,1024")
    p.add_argument("--batch-sizes", default="1,64" if cuda else "1,8")
    p.add_argument("--scan-shapes", help="'b,dim,N,L;...' (default: a GPU or a CPU set)")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--max-seconds", type=float, default=30.0, help="bench: skip larger inputs once one call takes longer")
    p.add_argument("--out", default=".", help="folder for bench.csv / bench.png / bench_scan.csv")
    p.add_argument("--runs", help="folder of <config>-s<seed> runs: print their top-1 over seeds")
    p.add_argument("--probe", nargs="+", metavar="CKPT", help="linear probe of frozen checkpoints: multinomial logistic "
                   "regression on [class token, mean patch token] of the final tokens; features standardised; weights "
                   f"from zero; full-batch L-BFGS, fp64, L2 {train.PROBE_L2:g}, at most {train.PROBE_ITERS} iterations; "
                   "trained on the demo's probe set (or DIR/train with --data), measured on the held-out set (DIR/val); "
                   "results also go to <ckpt folder>/probe.json")
    p.add_argument("--probe-train", type=int, default=0, help="probe: training images (demo: default the run's "
                   "--demo-probe; --data: 0 = the whole train split)")
    p.add_argument("--random-init", action="store_true", help="probe: the checkpoint's architecture at its training "
                   "initialisation instead of its weights")
    p.add_argument("--random-init-seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
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
