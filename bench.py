"""
Student against teacher, side by side in one process: the ratio the method exists for.

    python bench.py                                      # ViT-B/16 vs Adventurer-B and Vim-B (alt), 224 / 448 / 1024 px
    python bench.py --models vit_s16,adventurer_small,small_alt --resolutions 224,448
    python bench.py --resolutions 224 --rounds 9 --threads 2

For each resolution every model is built at that size (batch 1 by default, random weights: speed does not depend on
them), then timed in rounds, the models in turn within a round (A B C A B C ...), so a machine whose speed drifts
slows all of them alike. Per round and model: one training step's forward + backward (no optimizer step) and one
inference forward. The ratios are teacher time / model time per round (> 1: the model is faster); the table gives
their median and, in brackets, their min - max over the rounds. The first model is the reference (the teacher).
Also: parameters, forward GFLOPs (torch's FlopCounterMode, plus the Vim scan's element-wise work that it cannot see)
and the memory of a training step (CPU: tensors saved for the backward + 4 x the parameters, i.e. weights, gradients
and AdamW's two moments; CUDA: peak allocated). On CPU the figures change with the thread count and the machine:
always quote the command, the threads and the processor with them.
"""
import argparse, platform, statistics, time

import torch

import vitlinearizer as vl
from eval import model_flops, train_step_mem


def build(preset, res):
    """a model of a teacher or student preset at resolution res (random weights)"""
    presets = vl.TEACHER_PRESETS if preset in vl.TEACHER_PRESETS else vl.STUDENT_PRESETS
    if preset not in presets:
        raise SystemExit(f"error: --models {preset!r}: not one of {sorted(vl.TEACHER_PRESETS | vl.STUDENT_PRESETS)}")
    cfg = presets[preset]
    if res % cfg.patch_size:
        raise SystemExit(f"error: --resolutions {res} is not a multiple of {preset}'s patch size {cfg.patch_size}")
    return vl.build_model(type(cfg)(**{**vars(cfg), "img_size": res}))


def seconds(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def side_by_side(names, res, batch, rounds, device):
    """-> one row per model: params, GFLOPs, training memory, and per round the seconds of a training forward +
    backward ("train") and of an inference forward ("infer")"""
    models = {n: build(n, res).to(device) for n in names}
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
    rows = {n: dict(model=n, res=res, params=sum(p.numel() for p in m.parameters()),
                    gflops=model_flops(m.eval(), res, device) / 1e9, train=[], infer=[]) for n, m in models.items()}
    for n, m in models.items():
        rows[n]["train_mem"] = train_step_mem(m, x, device, amp)                   # (leaves m frozen)
        m.train().requires_grad_(True)
        train_step(m)                                                               # warm-up
        m.eval()
        infer(m)
    for _ in range(rounds):
        for n, m in models.items():
            rows[n]["train"].append(seconds(lambda: train_step(m.train()), device))
            rows[n]["infer"].append(seconds(lambda: infer(m.eval()), device))
    return list(rows.values())


def ratio(ref, row, key):
    r = [a / b for a, b in zip(ref[key], row[key])]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="vit_b16,adventurer_base,base_alt",
                   help="teacher preset first (the reference), then students (vitlinearizer TEACHER_PRESETS, "
                        "STUDENT_PRESETS); default: %(default)s")
    p.add_argument("--resolutions", default="224,448,1024", help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("error: --rounds, --batch-size and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    try:
        resolutions = [int(r) for r in args.resolutions.split(",")]
    except ValueError:
        raise SystemExit(f"error: --resolutions {args.resolutions!r}: a comma-separated list of integers") from None
    where = (torch.cuda.get_device_name() + ", bf16 autocast" if device.type == "cuda" else
             f"CPU {platform.processor() or platform.machine()}, fp32, {torch.get_num_threads()} thread(s)")
    print(f"{where}; torch {torch.__version__}; batch {args.batch_size}; {args.rounds} rounds; ratio = "
          f"{names[0]} time / model time, median (min-max) over rounds; > 1: faster than {names[0]}\n")
    print("| model | px | params (M) | fwd GFLOPs | FLOP ratio | train fwd+bwd (ms) | vs teacher | inference (ms) "
          "| vs teacher | train memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in resolutions:
        rows = side_by_side(names, res, args.batch_size, args.rounds, device)
        for row in rows:
            print(f"| {row['model']} | {res} | {row['params'] / 1e6:.1f} | {row['gflops']:.1f} | "
                  f"{rows[0]['gflops'] / row['gflops']:.2f} | {1e3 * statistics.median(row['train']):.0f} | "
                  f"{ratio(rows[0], row, 'train')} | {1e3 * statistics.median(row['infer']):.0f} | "
                  f"{ratio(rows[0], row, 'infer')} | {row['train_mem']} |", flush=True)


if __name__ == "__main__":
    main()
