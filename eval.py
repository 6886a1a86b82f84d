"""
Evaluate a checkpoint: top-1 / top-5 accuracy, or a linear probe of its frozen features.

    python eval.py --ckpt runs/demo/finetune/last.pt           # top-1 / top-5 on the demo's held-out images
    python eval.py --ckpt runs/in1k/finetune/last.pt --data DIR  # ... on DIR/val/<class>/*
    python eval.py --probe runs/demo/distill/last.pt              # linear probe of a frozen model (--random-init too)

train.py validates and probes with `evaluate` and `probe` from here. Benchmarks and the tables of results.sh's runs:
bench.py.
"""
import argparse, dataclasses, json, os, sys

import torch, torch.nn.functional as F
from tqdm import tqdm

import vitlinearizer as vl
from checkpoint import check_file, load_teacher, save_json, teacher_norm
from data import (DEMO_THREADS, PROBE_PER_CLASS, BadImages, Data, ImageFolder, check_folder, demo_set, list_split,
                  make_loader, to_pixels)
from distributed import Ctx, UserError, all_sum, autocast, cores_per_process, together


# ----------------------------------------------------------------------------------------------- accuracy

@torch.no_grad()
def evaluate(model, loader, args, ctx, desc="eval"):
    """-> dict(top1, top5) in percent over the whole set (summed over ranks)"""
    was = model.training
    model.eval()
    bad = BadImages(args.max_bad_frac)
    c = torch.zeros(3, dtype=torch.float64, device=ctx.device)             # correct@1, correct@5, count
    with together(ctx):                                                     # too many bad images on a rank: all stop
        for images, labels, errors in tqdm(loader, desc=desc, leave=False, disable=not ctx.main):
            bad.add(len(labels), errors)
            if not len(labels):
                continue
            with autocast(args, ctx.device):
                logits = model(vl.normalize(to_pixels(images, ctx.device), model)).logits
            labels = labels.to(ctx.device)
            top = logits.float().topk(min(5, logits.shape[-1]), -1).indices
            hit = top == labels[:, None]
            c += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(labels), device=ctx.device)]).double()
        bad.end_pass(desc, ctx)
    model.train(was)
    all_sum(c, ctx)
    return dict(top1=100 * c[0].item() / max(c[2].item(), 1), top5=100 * c[1].item() / max(c[2].item(), 1))


def load_model(path, ema=False, for_accuracy=True, norm=None):
    """our checkpoint (any kind; ema: its EMA weights), a released Adventurer file, else whatever load_teacher takes (a
    teacher file of any format it reads, a Hub folder, timm:NAME). norm: --teacher-norm, the pixel statistics it sees.
    for_accuracy: warn that a distillation checkpoint's class head is untrained."""
    if path.startswith("timm:") and not ema:
        return load_teacher(path, None, norm), {}
    try:
        ck, _ = vl.read_checkpoint(path) if not path.startswith("timm:") else ({}, None)   # a file, or a Hub folder
        ck = vl.adventurer_checkpoint(ck) or ck                                       # the public Adventurer's files
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from e
    if ema and not (isinstance(ck, dict) and ck.get("ema")):
        raise UserError(f"{path} holds no EMA weights (train with --ema-decay)")
    if isinstance(ck, dict) and "kind" in ck:
        try:
            model = vl.model_from_checkpoint({**ck, "model": ck["ema"]} if ema else ck, path)
        except Exception as e:
            raise UserError(f"{path}: {e}") from e
        if norm:                                                            # as load_teacher applies it to a teacher
            mean, std = teacher_norm(norm)
            model.cfg = dataclasses.replace(model.cfg, pixel_mean=mean, pixel_std=std)
        if ck.get("stage") == "distill" and for_accuracy:
            print(f"warning: {path} is a distillation checkpoint: its class head was never trained (distillation uses "
                  "no labels), so its accuracy is near chance; fine-tune it first (train.py --stage finetune --init "
                  f"{path})", file=sys.stderr)
        return model, ck
    return load_teacher(path, None, norm), {}


def accuracy(args):
    model, ck = load_model(args.ckpt, args.ema, norm=args.teacher_norm)
    run = ck.get("args", {})
    args.img_size = args.img_size or run.get("img_size") or model.cfg.img_size
    if args.img_size % model.cfg.patch_size:
        raise UserError(f"--img-size {args.img_size} is not a multiple of the model patch size {model.cfg.patch_size}")
    if args.data is None and run and run.get("data") is None:                            # the demo's held-out set
        ds = demo_set(demo_args(run, args.img_size), "val")
        classes = ds.classes
    elif args.data is not None:
        classes, samples = list_split(args.data, "val")
        declared = getattr(model, "eval_transform", {})                  # a teacher's library's resize / crop
        crop = args.crop_ratio or declared.get("crop_pct", 0.875)
        ds = ImageFolder(samples, classes, args.img_size, train=False, crop_ratio=crop,
                               interpolation=declared.get("interpolation", "bicubic"))
    else:
        raise UserError(f"{args.ckpt} was not trained on the demo: give --data DIR (DIR/val/<class>/*)")
    if ck.get("classes") and list(ck["classes"]) != list(classes):
        raise UserError(f"the checkpoint's {len(ck['classes'])} classes differ from the {len(classes)} "
                              "class folders")
    if model.cfg.num_classes != len(classes):
        raise UserError(f"the model has {model.cfg.num_classes} outputs but the set has {len(classes)} classes")
    ctx = Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    res = evaluate(model.to(ctx.device), make_loader(ds, args, ctx, train=False), args, ctx)
    print(f"{args.ckpt}{' (EMA weights)' if args.ema else ''}: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
          f"({len(ds)} images, {len(classes)} classes, {args.img_size} px)")
    return res


def demo_args(run, img_size):
    """the demo arguments of a run (checkpoints of a train.py before --demo-task and --demo-probe: the relations task,
    2,000 probe images)"""
    before = {"demo_task": "relations", "demo_probe": 2000}
    return argparse.Namespace(**{**before, **run, "img_size": img_size})


# ----------------------------------------------------------------------------------------------- linear probe

PROBE_L2, PROBE_ITERS = 1e-3, 500


@torch.no_grad()
def probe_features(model, loader, args, ctx):
    """Frozen features for a linear probe: [class token, mean of the patch tokens] of the model's final (normalised)
    tokens -> (features (n, 2 dim) float32, labels (n,)); linear_probe solves in float64."""
    was = model.training
    model.eval()
    feats, labels = [], []
    for images, y, _ in tqdm(loader, desc="probe features", leave=False, disable=not ctx.main):
        if len(images):
            with autocast(args, ctx.device):
                tokens = model(vl.normalize(to_pixels(images, ctx.device), model)).tokens.float()
            feats.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1).cpu())
            labels.append(y)
    model.train(was)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x, train_y, val_x, val_y, n_classes, l2=PROBE_L2, max_iter=PROBE_ITERS):
    """Multinomial logistic regression on frozen features, one fixed recipe: features standardised with the training
    set's mean and std; weights and bias start at zero; full-batch L-BFGS (strong Wolfe line search, fp64) on the mean
    cross-entropy + l2 / 2 * ||W||^2 (bias not penalised), at most max_iter iterations. Deterministic.
    -> dict(top1 on val, train_top1) in percent."""
    train_x, val_x = train_x.double(), val_x.double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    W = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ W + b, train_y) + l2 / 2 * (W * W).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)

    @torch.no_grad()
    def accuracy(x, y):
        return 100 * ((x @ W + b).argmax(1) == y).double().mean().item()
    return dict(top1=accuracy(xv, val_y), train_top1=accuracy(xt, train_y))


def probe(model, probe_set, val_set, args, ctx):
    """linear probe of a frozen model: trained on probe_set, measured on val_set (see linear_probe)"""
    model = model.to(ctx.device)
    tx, ty = probe_features(model, make_loader(probe_set, args, ctx, train=False), args, ctx)
    vx, vy = probe_features(model, make_loader(val_set, args, ctx, train=False), args, ctx)
    return linear_probe(tx, ty, vx, vy, len(val_set.classes) if hasattr(val_set, "classes") else int(ty.max()) + 1)


def random_init(ck, seed):
    """the checkpoint's architecture as training initialises it from scratch (seed, then the run's position init):
    what a distillation run starts from"""
    model_cls, cfg_cls = vl.MODEL_KINDS[ck["kind"]]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**ck["config"]))
    if ck.get("args", {}).get("pos_init", "sincos") == "sincos":
        vl.sincos_pos_init_(model)
    return model


def probe_ckpts(args):
    """eval.py --probe: linear probe of each frozen checkpoint; results also merged into <its folder>/probe.json"""
    ctx = Ctx(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.max_bad_frac = 0, 0.01
    results = {}
    for path in args.probe:
        model, ck = load_model(path, for_accuracy=False, norm=args.teacher_norm)
        run = ck.get("args", {})
        img_size = args.img_size or run.get("img_size") or model.cfg.img_size
        if args.data is None and run.get("data") is None and run:
            a = demo_args(run, img_size)
            a.demo_probe = args.probe_train or a.demo_probe
            probe_set, val = demo_set(a, "probe"), demo_set(a, "val")
        elif args.data is not None:
            d = Data(argparse.Namespace(data=args.data, img_size=img_size, distill_data=None))
            probe_set, val = d.probe(args.probe_train), d.val
        else:
            raise UserError(f"{path} was not trained on the demo: give --data DIR (DIR/{{train,val}}/<class>/*)")
        if args.random_init:
            if "kind" not in ck:
                raise UserError(f"--random-init needs one of our checkpoints (its architecture), not {path}")
            model, name = random_init(ck, args.random_init_seed), f"random-init-s{args.random_init_seed}"
        else:
            name = os.path.basename(path)
        out = None if path.startswith("timm:") else os.path.join(os.path.dirname(path) or ".", "probe.json")
        earlier = earlier_probes(out) if out else {}                        # a damaged file stops before the probe
        args.img_size, args.batch_size = img_size, max(args.batch_size, 256)
        res = probe(model, probe_set, val, args, ctx)
        print(f"{path}{' (random init)' if args.random_init else ''}: linear probe top-1 {res['top1']:.2f}  "
              f"(train {res['train_top1']:.2f}; {len(probe_set)} probe images, {len(val)} held out)")
        if out:
            save_json(out, {**earlier, name: res})
        results[path] = res
    return results


def earlier_probes(path):
    """the results a probe.json already holds ({} when there is none), or a UserError when it is damaged"""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        if isinstance(old, dict) and all(isinstance(v, dict) for v in old.values()):
            return old
    except ValueError:                                                      # not JSON, not text
        pass
    raise UserError(f"{path}: damaged (not the JSON eval.py --probe writes): delete it, then run the probes again")


# ----------------------------------------------------------------------------------------------- main

def check_args(args):
    """Every numeric flag and file argument, checked before anything runs: a UserError that says what is allowed.
    A new flag's check goes here."""
    for flag, value, least in (("--img-size", args.img_size, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0), ("--threads", args.threads, 1),
                               ("--probe-train", args.probe_train, 0),
                               ("--random-init-seed", args.random_init_seed, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be a whole number >= {least}")
    teacher_norm(args.teacher_norm)
    if args.crop_ratio is not None and not 0 < args.crop_ratio <= 1:
        raise UserError(f"--crop-ratio {args.crop_ratio}: must be > 0 and <= 1")
    if args.ckpt and not args.ckpt.startswith("timm:"):
        check_file(args.ckpt, "--ckpt", folder_ok=True)
    for path in args.probe or ():
        if not path.startswith("timm:"):
            check_file(path, "--probe", folder_ok=True)
    if args.data is not None:
        check_folder(args.data, "--data")


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
    p.add_argument("--teacher-norm", help="the pixel mean / std the model sees instead of what its file or library "
                   f"declares, as train.py's flag: {' | '.join(vl.PIXEL_NORMS)} | 'M,M,M/S,S,S' (pixels in [0, 1])")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (--ema-decay runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4 if cuda else 0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--probe", nargs="+", metavar="CKPT", help="linear probe of frozen checkpoints: multinomial "
                   "logistic regression on [class token, mean patch token] of the final tokens; features standardised; "
                   f"weights from zero; full-batch L-BFGS, fp64, L2 {PROBE_L2:g}, at most {PROBE_ITERS} "
                   "iterations; trained on the demo's probe set (or DIR/train with --data), measured on the held-out "
                   "set (DIR/val); results also go to <ckpt folder>/probe.json")
    p.add_argument("--probe-train", type=int, help="probe: training images (demo: default the run's --demo-probe; "
                   f"--data: class-balanced, default {PROBE_PER_CLASS} per class, e.g. 100 k for ImageNet-1k: "
                   "0.6 GB of ViT-B features, 1.2 GB in the fp64 solver, a few minutes; 0 = the whole train split, "
                   "for ImageNet 1.28 M x 1,536 features: 7.9 GB fp32 + 15.7 GB fp64)")
    p.add_argument("--random-init", action="store_true", help="probe: the checkpoint's architecture at its training "
                   "initialisation instead of its weights")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default: {DEMO_THREADS} on the demo's held-out "
                   "set, else the CPU cores this process may use; overrides OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        on_demo = (args.ckpt or args.probe) and not args.data
        torch.set_num_threads(args.threads or (DEMO_THREADS if on_demo else cores_per_process()))
        if args.probe:
            probe_ckpts(args)
        elif args.ckpt:
            accuracy(args)
        else:
            p.error("give --ckpt PATH or --probe CKPT (benchmarks and the --runs tables: bench.py)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
