"""
ViT-Linearizer training: distil a frozen ViT teacher into a linear-time student, a bidirectional Mamba (Vim) or the
paper's Adventurer (--student adventurer_*), with activation matching + masked prediction (no labels), then fine-tune
the student with labels.

    python train.py                                  # built-in demo on CPU: teacher -> distill -> finetune -> table
    python train.py --data DIR --teacher timm:vit_base_patch16_clip_224.openai --stage distill --out runs/in1k
    python train.py --data DIR --stage finetune --init runs/in1k/distill/last.pt --out runs/in1k
    python train.py --data DIR --stage finetune --init adventurer_base_patch16_224.pth   # a released Adventurer file
    torchrun --nproc_per_node=8 train.py --data DIR ...            # DistributedDataParallel, one process per GPU

Stages (--stage): teacher (a ViT from scratch, labels), distill (teacher frozen; AM + lambda * MP; reads images only,
never a label: the demo's pool of fresh images, or --distill-data / DIR/train), finetune (labels; from --init, or from
scratch = the labels-only baseline), all (the demo's story: every stage in turn, linear probes, then a table).
Each stage writes OUT/NAME/{last.pt, log.jsonl}; re-running the same command resumes from last.pt.

One training step, from main() down: run_stage -> start_or_resume (models, optimizer, loaders, a checkpoint restored)
-> train_one_epoch (get the batch, augment, forward, backward, clip, step, log, checkpoint) -> end_epoch (validate).
The images, loaders and augmentations are in data.py; the optimizer's groups, lr schedule and EMA in optim.py;
checkpoint files in checkpoint.py; ranks and devices in distributed.py; accuracy and the linear probe in eval.py.
"""
import argparse, ast, contextlib, dataclasses, json, math, os, resource, signal, sys, time

import torch, torch.nn as nn, torch.nn.functional as F, torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import vitlinearizer as vl
from checkpoint import (check_file, check_out_dir, check_resume, load_checkpoint, load_teacher, lock_run_dir,
                        release_locks, rng_state, save_checkpoint, save_json, set_rng_state, teacher_norm, write_log)
from data import (DEMO_TASKS, DEMO_THREADS, BadImages, ImageFolder, batch_augment, check_folder, get_data,
                  image_augment, make_loader, to_pixels, with_augmentation)
from distributed import (Ctx, UserError, all_sum, as_user_error, autocast, barrier, cores_per_process, setup_dist,
                         stop_together, together)
from eval import evaluate, probe
from optim import EMA, lr_at, param_groups, warmup_steps
from recipes import RECIPE_NOTES, RECIPES, data_defaults


# ----------------------------------------------------------------------------------------------------------------
# 1. Config: the flags with their defaults (argparse), the recipes set on them (recipes.py), the checks
# Defaults come in one layer, set on the parser before it reads the command line: the parser's own are the demo's;
# a --data run replaces some; a recipe (--recipe) replaces some more (both in recipes.py); the command line wins.
# The demo is a miniature of the paper's setting: the teacher learns from a larger labelled set (standing in for its
# large pre-training corpus), the student is distilled on a large pool of unlabelled images (the generator is
# unlimited), then both students get the same small labelled set: the distilled one is fine-tuned briefly at a lower
# lr, the labels-only one is trained until its held-out accuracy is flat (docs/results.md: longer schedules do not do
# better). Sizes are chosen to finish in under 10 minutes on a 2-core CPU.

VIM_DEMO_OPTS = "dim=64,depth=4,d_state=8"   # the demo's Vim student (--student demo): 0.15 M parameters
WARMUP_FLAGS = ("warmup_steps", "warmup_epochs", "warmup_frac")           # one given replaces the others' defaults


class ShowDefaults(argparse.HelpFormatter):
    """--help ends each flag's help with its default, as this command line sets it (none shown when unset)"""
    def _get_help_string(self, action):
        v = action.default
        if v is None or v is False or v is argparse.SUPPRESS:
            return action.help
        def show(x):
            return "unset" if x is None else "empty" if x == "" else f"{x:g}" if isinstance(x, float) else str(x)
        text = "/".join(map(show, v.values())) + " (teacher/distill/finetune)" if isinstance(v, dict) else show(v)
        return f"{action.help} (default: {text})"


def get_parser(**kw):
    """the command line, with the demo's defaults (parse_args sets a --data run's and the recipe's on it)"""
    about = " The defaults shown are the demo's; `--data DIR --help` shows a --data run's (recipe deit)."
    p = argparse.ArgumentParser(formatter_class=ShowDefaults, description=__doc__.split("\n\n")[0] + about, **kw)
    g = p.add_argument_group("run")
    g.add_argument("--data", help="ImageNet-layout folder DIR/{train,val}/<class>/*; omit for the built-in demo")
    g.add_argument("--stage", choices=["all", "teacher", "distill", "finetune"], default="all")
    g.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (--data: runs/<name of DIR>)")
    g.add_argument("--name", help="this stage's sub-folder of --out (unset: the stage)")
    g.add_argument("--teacher", help="teacher for distill (and finetune --kd-weight): what load_teacher takes "
                   "(timm/DeiT or CLIP file, own checkpoint, timm:NAME); stage all trains one if not given")
    g.add_argument("--teacher-norm", help="the teacher's pixel mean / std instead of what its library declares: "
                   f"{' | '.join(vl.PIXEL_NORMS)} | 'M,M,M/S,S,S' (pixels in [0, 1])")
    g.add_argument("--init", help="start the stage's model from this checkpoint of train.py (finetune: e.g. "
                   "OUT/distill/last.pt; any stage: a run at another --img-size, position embeddings resized)")
    g.add_argument("--resume", nargs="?", const="auto", default="auto",
                   help="checkpoint to resume from; 'auto' = OUT/NAME/last.pt when it exists")
    g.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    g.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps; re-run to continue")
    g.add_argument("--threads", type=int, default=DEMO_THREADS, help="torch CPU threads per process (--data: the "
                   "CPU cores this process may use)")
    g.add_argument("--no-baseline", action="store_true", help="stage all: skip the labels-only student")
    g.add_argument("--recipe", choices=list(RECIPES), default="none", help="named flag defaults (recipes.py, "
                   "docs/imagenet.md 'Recipes'), printed at start. The paper's own training recipe is not public: "
                   "these are the published recipes of DeiT, Vim, Adventurer (its student; 128 -> 224 px -> "
                   "fine-tuning), MAE")
    g.add_argument("--distill-data", help="--data runs: folder of images (any depth, labelled or not) that "
                   "distillation reads, without labels (unset: DIR/train)")
    g.add_argument("--save-steps", help="also write OUT/NAME/step<N>.pt (model only) at these steps, e.g. 0,250,1000 "
                   "(0 = the initialisation; for eval.py --probe curves)")
    g = p.add_argument_group("models")
    g.add_argument("--teacher-preset", default="demo", help=f"ViT of --stage teacher: {sorted(vl.TEACHER_PRESETS)}")
    g.add_argument("--teacher-opts", default="", help="override preset fields, e.g. dim=64,depth=4")
    g.add_argument("--student", default="adventurer_demo", help=f"student preset: {sorted(vl.STUDENT_PRESETS)}")
    g.add_argument("--student-opts", default="", help="override preset fields, e.g. dim=64,depth=4,bidirectional="
                   f"alternate (the demo with --student demo: {VIM_DEMO_OPTS})")
    g.add_argument("--img-size", type=int, default=32, help="training resolution (a multiple of the patch size)")
    g.add_argument("--drop-path", type=float, help="stochastic depth of the trained model (unset: the preset's)")
    g.add_argument("--pos-init", choices=["sincos", "model"], default="sincos", help="position embedding of a model "
                   "trained from scratch: 2-D sin-cos (MAE) or the model's own init")
    g = p.add_argument_group("distillation loss (paper defaults)")
    g.add_argument("--stages", type=int, default=4, help="K: teacher/student blocks split into K stages for AM")
    g.add_argument("--am-scope", choices=["visible", "all", "cls"], default="visible", help="tokens AM compares")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches masked")
    g.add_argument("--mask-kind", choices=["random", "block"], default="random", help="which patches are masked")
    g.add_argument("--lam", type=float, default=1.0, help="MP weight lambda (0 = AM only)")
    g.add_argument("--am-weight", type=float, default=1.0, help="AM weight (0 = MP only)")
    g.add_argument("--target", choices=["post_norm", "pre_norm"], default="post_norm",
                   help="MP target: teacher tokens after/before its final norm")
    g = p.add_argument_group("fine-tuning loss")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy")
    g.add_argument("--kd-weight", type=float, default=0.0, help="soft logit distillation from --teacher's head: "
                   "(1-w) CE + w KL")
    g.add_argument("--kd-temp", type=float, default=1.0, help="temperature of the soft logit distillation")
    g = p.add_argument_group("augmentation and regularisation (DeiT's values: --recipe deit, the default of --data)")
    g.add_argument("--aa", default="none", help="per-image augmentation after crop and flip: timm's RandAugment spec "
                   "(DeiT: rand-m9-mstd0.5-inc1; sections m, n, p, mstd, inc), 3augment (DeiT III / Adventurer: one "
                   "of grayscale, solarize, blur, then colour jitter 0.3) or none")
    g.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip (image folders)")
    g.add_argument("--erase-prob", type=float, default=0.0, help="random erasing probability (one box of 2-33 %% of "
                   "the image, per-pixel normal noise on the normalised image)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, labelled stages (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha, labelled stages (0 = off)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="chance of cutmix when both are on")
    g.add_argument("--repeated-aug", type=int, default=1, help="repeated augmentation: each image this many times per "
                   "global batch, differently augmented; epochs keep their length (1 = off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights, evaluated alongside and saved in "
                   "the checkpoint (0 = off)")
    g.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (MAE / BEiT): block i of depth "
                   "blocks gets lr x decay^(depth - i), the embeddings decay^(depth + 1), norm and head 1 (1 = off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs of a single --stage (unset: its --<stage>-epochs)")
    g.add_argument("--teacher-epochs", type=int, default=5, help="epochs of the teacher stage")
    g.add_argument("--distill-epochs", type=int, default=1, help="epochs of the distill stage")
    g.add_argument("--finetune-epochs", type=int, default=11, help="epochs of the finetune stage")
    g.add_argument("--supervised-epochs", type=int, default=80, help="stage all: epochs of the labels-only student "
                   "(long enough to converge)")
    g.add_argument("--batch-size", type=int, default=32, help="per process; global batch = batch size x processes")
    g.add_argument("--lr", type=float, default=4e-3, help="peak lr (unset: --blr x global batch / 512)")
    g.add_argument("--teacher-lr", type=float, default=1.5e-3, help="peak lr of the teacher stage (stage all, or "
                   "stage teacher without --lr; unset: --lr)")
    g.add_argument("--finetune-lr", type=float, default=1e-3, help="stage all: peak lr of fine-tuning the distilled "
                   "student (unset: --lr)")
    g.add_argument("--blr", type=float, default=5e-4, help="base lr per 512 images of global batch, when --lr is unset")
    g.add_argument("--min-lr", type=float, default=1e-6, help="the lr the cosine schedule ends at")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up length in steps (wins over the other two)")
    g.add_argument("--warmup-frac", type=float, default=0.05, help="linear warm-up length as a fraction of the "
                   "stage's steps, when the other two are unset (one warm-up flag given unsets the others)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast; auto = bf16 on CUDA, none on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the trained model's blocks: "
                   "about 1/3 more compute per step, far less activation memory (high resolutions, large batches)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentations")
    g = p.add_argument_group("io")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per process (--data: "
                   "min(8, CPU cores per process))")
    g.add_argument("--log-every", type=int, default=20, help="steps between JSON log lines")
    g.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints (and every epoch end)")
    g.add_argument("--eval-every", type=int, default=0, help="epochs between validations (0: after the last epoch)")
    g.add_argument("--eval-every-steps", type=int, default=0, help="also validate every N steps (0: off)")
    g.add_argument("--max-bad-frac", type=float, default=0.01, help="stop when more images are unreadable")
    g.add_argument("--demo-train", type=int, default=300, help="demo: training images of the students")
    g.add_argument("--demo-teacher-train", type=int, default=4000, help="demo: training images of the teacher stage")
    g.add_argument("--demo-val", type=int, default=2000, help="demo: held-out images")
    g.add_argument("--demo-task", choices=sorted(DEMO_TASKS), default="pairs", help="demo: the task (RelationsDemo)")
    g.add_argument("--demo-pool", type=int, default=32000, help="demo: fresh unlabelled images that distillation "
                   "reads (0: the students' labelled images, labels dropped)")
    g.add_argument("--demo-probe", type=int, default=2000, help="demo: labelled images of the linear probe")
    g.add_argument("--demo-seed", type=int, default=0, help="demo: seed of the procedural images")
    return p


def given_flags(argv):
    """{flag: value} of the flags the command line gives, alone (argparse.SUPPRESS leaves out a flag not given); {}
    for a command line that parse_args refuses (it says why)"""
    p = get_parser(add_help=False)
    for action in p._actions:
        action.default = argparse.SUPPRESS

    def refuse(message):
        raise ValueError(message)
    p.error = refuse
    try:
        return vars(p.parse_known_args(argv)[0])
    except ValueError:
        return {}


def defaults_for(given):
    """the defaults that the command line's --data and --recipe choose, over the parser's own (the demo's): a --data
    run's, then the recipe's. The warm-up flags go together: one given leaves the others unset, and a recipe that sets
    one replaces the other two."""
    out = {} if given.get("data") is None else data_defaults(given["data"])
    recipe = RECIPES[given.get("recipe", out.get("recipe", "none"))]
    out |= recipe
    if any(k in given for k in WARMUP_FLAGS):
        out |= dict.fromkeys(WARMUP_FLAGS)
    elif any(k in recipe for k in WARMUP_FLAGS):
        out |= {k: recipe.get(k) for k in WARMUP_FLAGS}
    return out


def parse_args(argv=None):
    """The command line over the recipe over the mode's defaults (defaults_for); then two defaults that depend on
    other flags: the demo's Vim student's opts (--student demo), the teacher stage's own lr."""
    given = given_flags(argv)
    p = get_parser()
    p.set_defaults(**defaults_for(given))
    args = p.parse_args(argv)
    args.given = sorted(given)
    chosen = set(given) | set(RECIPES[args.recipe])                         # flags the command line or recipe set
    if "student_opts" not in chosen and args.data is None and args.student == "demo":
        args.student_opts = VIM_DEMO_OPTS                                   # the demo's Vim student
    if args.stage == "teacher" and "lr" not in chosen and args.teacher_lr is not None:
        args.lr = args.teacher_lr                                           # the teacher's own lr, as in stage all
    return args


def for_stage(args, stage):
    """a copy of args with every per-stage value (a dict keyed by stage) resolved for this stage"""
    return argparse.Namespace(**{k: v.get(stage) if isinstance(v, dict) else v for k, v in vars(args).items()})


def describe_recipe(args):
    """-> lines saying which recipe ran, what it set and what the command line changed"""
    def show(v):
        return "/".join(map(str, v.values())) + " (teacher/distill/finetune)" if isinstance(v, dict) else str(v)
    recipe = RECIPES[args.recipe]
    used = [f"{k}={show(v)}" for k, v in recipe.items() if k not in args.given]
    over = [f"{k}={show(getattr(args, k))} (recipe: {show(v)})" for k, v in recipe.items() if k in args.given]
    other = [f"{k}={show(getattr(args, k))}" for k in args.given if k not in recipe and k != "recipe"]
    lines = [f"recipe {args.recipe}{'' if 'recipe' in args.given else ' (default)'}: {RECIPE_NOTES[args.recipe]}"]
    parts = (("from the recipe", used), ("the command line changed", over), ("from the command line", other))
    for what, items in parts:
        if items:
            lines.append(f"  {what}: " + ", ".join(items))
    return lines


def check_args(args):
    """Every numeric flag and file argument, checked before anything runs or is written: a UserError that says what is
    allowed. A new flag's check goes here."""
    def need(ok, flag, allowed):
        if not ok:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {allowed}")
    for k, v in vars(args).items():
        if isinstance(v, float):
            need(math.isfinite(v), k, "must be a finite number")
    demo = ("demo_train", "demo_val", "demo_probe") if args.data is None else ()
    for k in ("img_size", "batch_size", "epochs", "teacher_epochs", "distill_epochs", "finetune_epochs",
              "supervised_epochs", "stages", "max_steps", "threads", "log_every", "ckpt_every", *demo):
        need(getattr(args, k) is None or getattr(args, k) >= 1, k, "must be a whole number >= 1")
    for k in ("workers", "eval_every", "eval_every_steps", "seed", "demo_seed", "demo_teacher_train", "demo_pool",
              "warmup_steps"):
        need(getattr(args, k) is None or getattr(args, k) >= 0, k, "must be a whole number >= 0")
    for k in ("lr", "teacher_lr", "finetune_lr", "blr", "kd_temp"):
        need(getattr(args, k) is None or getattr(args, k) > 0, k, "must be > 0")
    for k in ("min_lr", "warmup_epochs", "weight_decay", "clip_grad", "lam", "am_weight"):
        need(getattr(args, k) is None or getattr(args, k) >= 0, k, "must be >= 0")
    for k in ("mask_ratio", "kd_weight", "max_bad_frac"):
        need(0 <= getattr(args, k) <= 1, k, "must be between 0 and 1")
    need(args.warmup_frac is None or 0 <= args.warmup_frac <= 1, "warmup_frac", "must be between 0 and 1")
    steps = (args.save_steps or "").split(",")
    need(all(v.strip().isdigit() for v in steps) or not args.save_steps, "save_steps",
         "must be whole numbers >= 0 separated by commas, e.g. 0,250,1000")
    def values(k):                                                          # a recipe may give each stage its own
        v = getattr(args, k)
        return list(v.values()) if isinstance(v, dict) else [v]
    for k in ("drop_path", "label_smoothing"):
        need(all(v is None or 0 <= v < 1 for v in values(k)), k, "must be >= 0 and < 1")
    for k in ("mixup", "cutmix"):
        need(all(v >= 0 for v in values(k)), k, "must be >= 0 (a Beta alpha; 0 = off)")
    for k in ("mixup_switch_prob", "hflip", "erase_prob"):
        need(all(0 <= v <= 1 for v in values(k)), k, "must be between 0 and 1")
    need(all(v >= 1 for v in values("repeated_aug")), "repeated_aug", "must be a whole number >= 1 (1 = off)")
    need(all(0 <= v < 1 for v in values("ema_decay")), "ema_decay", "must be >= 0 and < 1 (0 = off)")
    need(all(0 < v <= 1 for v in values("layer_decay")), "layer_decay", "must be > 0 and <= 1 (1 = off)")
    for spec in values("aa"):
        try:
            image_augment(spec)
        except ValueError as e:
            raise UserError(str(e)) from None
    teacher_norm(args.teacher_norm)
    if args.lam == 0 and args.am_weight == 0:
        raise UserError("--lam 0 and --am-weight 0 leave no distillation loss: give one of them a weight > 0")
    if args.lr is not None and args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min-lr")
    single = {"epochs": "--epochs (stage all: --teacher-epochs, --distill-epochs, --finetune-epochs)", "name": "--name"}
    for k, flag in single.items():
        if args.stage == "all" and getattr(args, k) is not None:
            raise UserError(f"{flag} applies to a single --stage; --stage all names and sizes its stages itself")
    if args.init is not None and args.stage == "all":
        raise UserError("--init starts a single --stage (teacher, distill or finetune); --stage all starts its stages "
                        "itself")
    if args.teacher is not None and args.stage == "teacher":
        raise UserError("--stage teacher trains a teacher from scratch: it would ignore --teacher")
    if args.kd_weight > 0 and args.stage == "finetune" and not args.teacher:
        raise UserError("--kd-weight needs --teacher (the model whose logits the student learns from)")
    if args.fresh and args.resume not in ("auto", None):
        raise UserError(f"--fresh starts over and --resume {args.resume} continues: give one of them")
    if args.data is not None:
        check_folder(args.data, "--data", " (expected DIR/train/<class>/* and DIR/val/<class>/*)")
    if args.distill_data is not None:
        if args.data is None:
            raise UserError("--distill-data is for --data runs (the demo distils on its own pool: --demo-pool)")
        check_folder(args.distill_data, "--distill-data")
    for flag in ("teacher", "init", "resume"):
        path = getattr(args, flag)
        if path not in (None, "auto") and not path.startswith("timm:"):
            check_file(path, f"--{flag}", folder_ok=flag == "teacher")      # a teacher may be a Hub folder
    check_out_dir(args.out, "--out")


# ----------------------------------------------------------------------------------------------------------------
# 2. Build: models and losses

def parse_opts(s):
    """'dim=64,depth=4,bidirectional=alternate' -> dict (values parsed as Python literals when they are)"""
    out = {}
    for kv in filter(None, s.split(",")):
        k, _, v = kv.partition("=")
        try:
            out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            out[k.strip()] = v.strip()
    return out


def make_config(presets, name, opts, what, **fields):
    if name not in presets:
        raise UserError(f"unknown {what} preset {name!r}; choose from {', '.join(sorted(presets))}")
    cfg = presets[name]
    valid = {f.name for f in dataclasses.fields(cfg)}
    over = {**parse_opts(opts), **{k: v for k, v in fields.items() if v is not None}}
    bad = sorted(set(over) - valid)
    if bad:
        raise UserError(f"{what} config has no field(s) {bad}; fields: {sorted(valid)}")
    for k, v in parse_opts(opts).items():                                   # the values, against the preset's
        default, choices = getattr(cfg, k), OPT_CHOICES.get(k)
        if choices:
            ok, want = v in choices, f"one of {', '.join(choices)}"
        elif type(default) in (int, float):
            zero_ok = k in ("num_classes", "dt_rank", "drop_path")           # 0 = no head / automatic / off
            number = type(v) in (int, float) and (type(default) is float or type(v) is int)
            ok = number and (v > 0 or zero_ok and v == 0)
            want = f"a {'whole ' if type(default) is int else ''}number {'>= 0' if zero_ok else '> 0'}"
        else:
            ok, want = type(v) is type(default), type(default).__name__
        if not ok:
            raise UserError(f"--{what}-opts {k}={v!r}: must be {want}")
    cfg = dataclasses.replace(cfg, **over)
    if hasattr(cfg, "heads") and cfg.dim % cfg.heads:
        raise UserError(f"--{what}-opts: dim {cfg.dim} is not a multiple of heads {cfg.heads}")
    try:
        with torch.device("meta"):                                          # the model's own checks, no memory
            vl.build_model(dataclasses.replace(cfg, img_size=cfg.patch_size))   # (check_img_size: --img-size)
    except ValueError as e:
        raise UserError(f"--{what}-opts: {e}") from None
    return cfg


OPT_CHOICES = dict(act=("gelu", "quick_gelu"), bidirectional=("fused", "alternate"), flip=tuple(vl.FLIP_RULES),
                   scan_backend=("auto", "triton", "chunked", "reference"))
STUDENT_KINDS = ("vision_mamba", "adventurer")


def check_img_size(img_size, patch_size, what):
    """--img-size against a model's patch size (vl.check_resolution checks the images a model is given)"""
    if img_size % patch_size:
        raise UserError(f"--img-size {img_size} is not a multiple of the {what} patch size {patch_size}")


def student_config(args, n_classes):
    cfg = make_config(vl.STUDENT_PRESETS, args.student, args.student_opts, "student",
                      img_size=args.img_size, num_classes=n_classes, drop_path=args.drop_path)
    check_img_size(args.img_size, cfg.patch_size, "student")
    return cfg


def check_stages(args, student_cfg, teacher_depth):
    """--stages K splits both models' blocks into K stages: at most the depth of the shallower one"""
    depth = min(student_cfg.depth, teacher_depth)
    if args.stages > depth:
        raise UserError(f"--stages {args.stages}: the student has {student_cfg.depth} blocks and the teacher "
                        f"{teacher_depth}; use 1 <= --stages <= {depth}")


def init_from(path, args, n_classes, kinds=None, verbose=False):
    """a model from one of our checkpoints (of one of `kinds` when given) or a released Adventurer file, at --img-size
    (vl.model_from_checkpoint: the position embedding resampled once when the checkpoint was trained at another
    resolution), with a new class head when the class count differs"""
    ck = load_checkpoint(path)
    with as_user_error(f"--init {path}"):
        ck = vl.adventurer_checkpoint(ck) or ck                             # the public Adventurer code's files
    if "kind" not in ck or "config" not in ck:
        raise UserError(f"--init {path} is not a checkpoint written by train.py (no 'kind'/'config') nor a released "
                        "Adventurer file")
    if kinds is not None and ck["kind"] not in kinds:
        raise UserError(f"--init {path} holds a {ck['kind']} model; this stage trains a {' or a '.join(kinds)}")
    changes = {"drop_path": args.drop_path} if args.drop_path is not None else {}
    if changes and "drop_path" not in {f.name for f in dataclasses.fields(vl.MODEL_KINDS[ck["kind"]][1])}:
        raise UserError(f"--drop-path: the {ck['kind']} model has no drop path")
    patch = ck["config"]["patch_size"]
    check_img_size(args.img_size, patch, "student" if ck["kind"] in STUDENT_KINDS else "teacher")
    old_grid, grid = ck["config"]["img_size"] // patch, args.img_size // patch
    if old_grid != grid and verbose:
        print(f"--init {path}: position embeddings resized from {old_grid}x{old_grid} to {grid}x{grid} patches")
    try:
        return vl.model_from_checkpoint(ck, f"--init {path}", img_size=args.img_size, num_classes=n_classes, **changes)
    except ValueError as e:                                                 # names what does not fit
        raise UserError(str(e)) from e


def build(args, stage, n_classes, ctx):
    """-> (model to save, module to train, loss(module, images, labels, step) -> dict with 'loss', teacher or None)"""
    torch.manual_seed(args.seed)                                            # same init on every rank
    if stage == "teacher" and args.init:                                    # e.g. a higher-resolution stage
        model = init_from(args.init, args, n_classes, kinds=("vit",), verbose=ctx.main)
        return model, model, supervised_loss(None, args, model), None
    if stage == "teacher":
        cfg = make_config(vl.TEACHER_PRESETS, args.teacher_preset, args.teacher_opts, "teacher",
                          img_size=args.img_size, num_classes=n_classes, drop_path=args.drop_path)
        check_img_size(args.img_size, cfg.patch_size, "teacher")
        model = vl.ViT(cfg)
        if args.pos_init == "sincos":
            vl.sincos_pos_init_(model)
        return model, model, supervised_loss(None, args, model), None
    if stage == "finetune":
        teacher = (load_teacher(args.teacher, args.img_size, args.teacher_norm) if args.teacher and args.kd_weight > 0
                   else None)
        if teacher is not None and teacher.cfg.num_classes != n_classes:
            if ctx.main:
                print(f"note: the teacher has no {n_classes}-class head: --kd-weight ignored", file=sys.stderr)
            teacher = None
        if args.init:
            model = init_from(args.init, args, n_classes, verbose=ctx.main)
        else:
            torch.manual_seed(args.seed)                                    # the same start as a distilled student
            model = vl.build_model(student_config(args, n_classes))
            if args.pos_init == "sincos":
                vl.sincos_pos_init_(model)
        for n, p in model.named_parameters():                               # unused without a mask (DDP wants all used)
            if n.endswith("mask_token"):
                p.requires_grad_(False)
        return model, model, supervised_loss(teacher, args, model), teacher
    # distill
    if not args.teacher:
        raise UserError("--stage distill needs --teacher (a checkpoint, timm/CLIP file or timm:NAME)")
    teacher = load_teacher(args.teacher, args.img_size, args.teacher_norm)
    if args.init:                                                           # e.g. progressive resolution
        student = init_from(args.init, args, n_classes, kinds=STUDENT_KINDS, verbose=ctx.main)
        cfg = student.cfg
    else:
        cfg = student_config(args, n_classes)
        torch.manual_seed(args.seed)                                        # (loading the teacher drew numbers)
        student = vl.build_model(cfg)
        if args.pos_init == "sincos":
            vl.sincos_pos_init_(student)
    if cfg.patch_size != teacher.cfg.patch_size:
        p = teacher.cfg.patch_size
        presets = sorted(k for k, v in vl.STUDENT_PRESETS.items() if v.patch_size == p and type(v) is type(cfg))
        raise UserError(f"student patch size {cfg.patch_size} != teacher patch size {p}: the losses compare tokens "
                        f"position by position; add patch_size={p} to --student-opts"
                        + (f" or use --student {' / '.join(presets)}" if presets else ""))
    check_stages(args, cfg, teacher.cfg.depth)
    distiller = vl.Distiller(teacher, student, stages=args.stages, am_scope=args.am_scope, lam=args.lam,
                             am_weight=args.am_weight, target=args.target)
    for n, p in student.named_parameters():                                 # no labels: the class head is unused
        if n.startswith("head."):
            p.requires_grad_(False)
    if args.lam == 0:                                                       # AM only: the MP head is unused
        for m in distiller.children():
            if m is not teacher and m is not student:
                m.requires_grad_(False)
    grid = (args.img_size // cfg.patch_size,) * 2

    def loss(module, x, y, step):                     # x: pixels in [0, 1]; one masked student forward, both losses
        g = torch.Generator().manual_seed(hash((args.seed, step, ctx.rank)) & (2**63 - 1))
        mask = vl.sample_mask(len(x), grid, args.mask_ratio, args.mask_kind, generator=g, device=x.device)
        return module(x, mask)                                              # dict(loss, am, mp)
    return student, distiller, loss, teacher


def supervised_loss(teacher, args, model):
    """cross-entropy with label smoothing, or against soft targets (B, classes) from mixup / cutmix, which carry the
    smoothing already; + soft logit distillation when a teacher is given. x: pixels in [0, 1]; the trained model
    (module: model, compiled or in DDP) and the teacher each get their own normalisation."""
    def loss(module, x, y, step):
        logits = module(vl.normalize(x, model)).logits.float()
        if y.is_floating_point():
            ce = torch.sum(-y * F.log_softmax(logits, -1), -1).mean()
        else:
            ce = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        if teacher is None:
            return dict(loss=ce)
        with torch.no_grad():
            t = teacher(vl.normalize(x, teacher)).logits.float()
        T = args.kd_temp
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return dict(loss=(1 - args.kd_weight) * ce + args.kd_weight * kd, ce=ce, kd=kd)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# 3. Training loop: run_stage -> start_or_resume (models, optimizer, loaders; a checkpoint restored), then
# train_one_epoch and end_epoch until the last epoch or --max-steps. One step is train_one_epoch's loop body.

class NonFinite(UserError):
    pass


class LogSums:
    """The sums behind the next log line, since the last one, on this rank: each loss (by name), the gradient norm,
    the steps they cover; and the images and time behind img/s. A log line sums them over ranks and shows the means.
    A checkpoint keeps them as 8 numbers (the losses in `names` order, the gradient norm, zeros, the step count last),
    so that a resumed run logs the same lines."""
    SLOTS = 8

    def __init__(self, device, names=None, saved=None):
        self.names = names                                                  # the losses' names: from the first step on
        self.sums = torch.zeros(self.SLOTS, dtype=torch.float64, device=device)
        if saved is not None:
            self.sums += torch.tensor(saved, dtype=torch.float64, device=device)
        self.images, self.since = 0, time.time()

    def add(self, losses, grad_norm, images):
        """one step; a step on no image (a rank's stand-in for a batch it could not read) names the losses, adds none"""
        self.names = self.names or sorted(losses)
        if not images:
            return
        values = [losses[k].detach().double() for k in self.names] + [grad_norm.double()]
        self.sums[:len(values)] += torch.stack(values)
        self.sums[-1] += 1                                                  # the steps
        self.images += images

    def total(self, ctx):
        """collective: the sums over every rank, as a checkpoint keeps them"""
        return all_sum(self.sums.clone(), ctx).tolist()

    def means(self, ctx):
        """collective: {each loss, grad_norm} averaged over the steps (and ranks) since the last line; None when none
        of them had an image"""
        *sums, steps = self.total(ctx)
        if not steps:
            return None
        return {**{k: sums[i] / steps for i, k in enumerate(self.names)}, "grad_norm": sums[len(self.names)] / steps}

    def img_per_s(self, ctx):
        return self.images * ctx.world / (time.time() - self.since)

    def restart(self):
        self.sums.zero_()
        self.images, self.since = 0, time.time()


@dataclasses.dataclass
class Run:
    """One stage's training run: what start_or_resume builds, then where the run is (its checkpoint keeps that)."""
    stage: str
    label: str                                  # the stage's name in messages and its folder OUT/label (--name)
    ckpt_path: str                              # OUT/label/last.pt
    log_path: str                               # OUT/label/log.jsonl
    classes: list
    saved: nn.Module                            # the model the checkpoint holds: the student, or the teacher trained
    trained: nn.Module                          # what the optimizer updates: `saved`, or the Distiller around it
    model: nn.Module                            # `trained` as the step runs it: compiled (--compile), in DDP (torchrun)
    params: list                                # trained's parameters with a gradient: clipped, checked
    teacher: nn.Module | None                   # frozen: distillation's, or fine-tuning's (--kd-weight)
    loss_fn: object                             # loss_fn(model, images, labels, step) -> dict, "loss" minimised
    augment: object                             # augment(images, labels, step) -> (images, labels)
    ema: EMA | None                             # --ema-decay
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler                # fp16 loss scaling (enabled with --amp fp16 on CUDA)
    loader: DataLoader
    val_loader: DataLoader | None               # None: distillation has no labels to validate with
    peak_lr: float
    total_steps: int
    warmup: int
    save_steps: set                             # --save-steps
    bad: BadImages
    sums: LogSums
    live_log: str                               # log.jsonl, or log.jsonl.new while an older run's record stays
    step: int = 0                               # where the run is: optimizer steps done,
    epoch: int = 0                              # the epoch it is in,
    batch_in_epoch: int = 0                     # the batches of that epoch done (steps and skipped batches)
    history: list = dataclasses.field(default_factory=list)  # this run's log lines
    saved_step: int | None = None               # the step of the last checkpoint of this run (None: none yet)
    metrics: dict = dataclasses.field(default_factory=dict)  # the last epoch-end validation's, for the last checkpoint
    nonfinite: torch.Tensor | None = None       # on the device: [step, loss, grad norm] of the first non-finite step
                                                # since the start (step -1: none), read at log lines and checkpoints

    @property
    def steps_per_epoch(self):
        return len(self.loader.batch_sampler)

    def kept(self):
        if self.saved_step is None:
            return "no checkpoint of this run was written yet"
        return f"kept the last good checkpoint {self.ckpt_path} (step {self.saved_step})"


def run_stage(args, stage, data, ctx):
    """Train one stage: -> the path of its finished checkpoint, or None when --max-steps stopped it first. Running
    the same command again resumes from OUT/NAME/last.pt."""
    args = for_stage(args, stage)                                           # per-stage recipe values
    args.run_dir = os.path.join(args.out, args.name or stage)
    run = start_or_resume(args, stage, data, ctx)
    if run is None:                                                         # its checkpoint is finished
        return resume_path(args)
    while run.epoch < args.epochs:
        hit_max_steps = train_one_epoch(run, args, ctx)
        if not hit_max_steps or run.batch_in_epoch >= run.steps_per_epoch:  # the epoch's batches are done
            end_epoch(run, args, ctx)
        if hit_max_steps and run.epoch < args.epochs:
            save(run, args, ctx)
            if ctx.main:
                print(f"{run.label}: stopped at step {run.step} (--max-steps); run the same command again to continue")
            barrier(ctx)
            return None
    log(run, dict(step=run.step, finished=True), ctx)                     # bench.py --runs counts finished runs only
    save(run, args, ctx, finished=True)
    barrier(ctx)
    return run.ckpt_path


def start_or_resume(args, stage, data, ctx):
    """A stage ready for its next step: the models (build), optimizer, loaders and schedule, then the state of its
    checkpoint when there is one (resume_path), else a fresh start. -> Run; None when that checkpoint is finished."""
    train_set = data.teacher_train if stage == "teacher" else data.distill if stage == "distill" else data.train
    train_set = with_augmentation(train_set, args)                          # distill reads images only, no labels
    if ctx.main and not isinstance(train_set, ImageFolder) and (args.aa not in (None, "", "none")):
        print(f"note: --aa {args.aa} and --hflip act on image folders (--data); the demo's images are used as they are")
    label = args.name or stage
    ckpt_path, log_path = os.path.join(args.run_dir, "last.pt"), os.path.join(args.run_dir, "log.jsonl")
    with together(ctx):                                                     # a UserError on any rank stops every rank
        if ctx.main:
            lock_run_dir(args.run_dir)                                      # one run per folder
        saved, trained, loss_fn, teacher = build(args, stage, len(data.classes), ctx)
        saved.grad_checkpointing = args.grad_ckpt                           # vl.run_block
        resume = resume_path(args)
        ck = load_checkpoint(resume) if resume and os.path.exists(resume) else None
        if ck is not None:
            check_resume(ck, resume, args, saved.cfg, ctx)
    if ck is not None and ck.get("finished"):
        if ctx.main:
            print(f"{label}: {ckpt_path} is finished (step {ck['step']}); --fresh to train again")
        return None

    # the models, on the device, with the checkpoint's weights
    saved.to(ctx.device)
    trained.to(ctx.device)
    if ck is not None:
        saved.load_state_dict(ck["model"])
        if "extra" in ck:                                                   # distiller's MP head
            trained.load_state_dict({**trained.state_dict(), **ck["extra"]})
    ema = EMA(saved, args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None and ck is not None and ck.get("ema"):
        ema.model.load_state_dict(ck["ema"])
        ema.updates = ck["ema_updates"]

    # optimizer, loaders, schedule
    world_batch = args.batch_size * ctx.world
    peak_lr = args.lr if args.lr is not None else args.blr * world_batch / 512
    groups = param_groups(trained, args.weight_decay, args.layer_decay, saved.cfg.depth)
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and ctx.device.type == "cuda")
    loader = make_loader(train_set, args, ctx, train=True)
    val_loader = make_loader(data.val, args, ctx, train=False) if stage != "distill" else None
    steps_per_epoch = len(loader.batch_sampler)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one global batch ({world_batch})")
    total = args.epochs * steps_per_epoch
    warmup = warmup_steps(args, steps_per_epoch, total, ctx)
    save_steps = {int(v) for v in (args.save_steps or "").split(",") if v.strip()}
    run = Run(stage=stage, label=label, ckpt_path=ckpt_path, log_path=log_path, classes=list(data.classes),
              saved=saved, trained=trained, model=trained, params=[p for p in trained.parameters() if p.requires_grad],
              teacher=teacher, loss_fn=loss_fn,
              augment=batch_augment(args, len(data.classes), stage, ctx.rank, saved.cfg),
              ema=ema, opt=opt, scaler=scaler, loader=loader, val_loader=val_loader, peak_lr=peak_lr,
              total_steps=total, warmup=warmup, save_steps=save_steps,
              bad=BadImages(args.max_bad_frac, args.repeated_aug), sums=LogSums(ctx.device), live_log=log_path)

    # where the run is: the checkpoint's step, optimizer, RNG states and log; or a fresh start
    if ck is not None:
        restore(run, ck, resume, ctx)
    else:
        torch.manual_seed(args.seed + 1000 * ctx.rank + 1)                  # per-rank dropout / drop-path streams
    open_log(run, ctx, fresh=ck is None)
    run.nonfinite = torch.full((3,), -1.0, device=ctx.device)
    if args.compile:
        run.model = torch.compile(run.model)
    if ctx.world > 1:
        run.model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.main:
        print_start(run, args, ctx, len(train_set))
    if ck is None and 0 in run.save_steps:
        save_snapshot(run, args, ctx)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.model.train()
    if teacher is not None:
        teacher.eval()                                                      # frozen (train() reached it in a Distiller)
    return run


def train_one_epoch(run, args, ctx):
    """Train the rest of run.epoch (from run.batch_in_epoch on). -> True when --max-steps stopped it."""
    run.loader.batch_sampler.set_epoch(run.epoch, run.batch_in_epoch)
    with tqdm(run.loader, total=run.steps_per_epoch, initial=run.batch_in_epoch, leave=False, disable=not ctx.main,
              desc=f"{run.label} epoch {run.epoch + 1}/{args.epochs}") as bar:
        for images, *labels, errors in bar:                                 # distill: (images, errors), no labels
            # the batch, less its unreadable images (counted); a batch left with none is skipped on one process, and
            # with several becomes a stand-in whose loss weighs nothing, so that every rank takes the same steps
            empty = run.bad.add_batch(len(images), errors, ctx)
            if empty and ctx.world == 1:
                run.batch_in_epoch += 1
                continue
            if empty:
                images = torch.zeros(1, 3, args.img_size, args.img_size, dtype=torch.uint8)
                labels = [torch.zeros(1, dtype=torch.long)] if labels else labels
            x = to_pixels(images, ctx.device)                               # (B, 3, H, W) in [0, 1]
            y = labels[0].to(ctx.device, non_blocking=True) if labels else None
            x, y = run.augment(x, y, run.step)                             # random erasing, mixup / cutmix
            lr = lr_at(run.step, run.total_steps, run.warmup, run.peak_lr, args.min_lr)   # warm-up, then cosine
            for group in run.opt.param_groups:
                group["lr"] = lr * group["lr_scale"]                        # x the layer-wise decay
            # forward: the stage's loss (distill: one masked student forward, AM + lambda MP); backward; clip; step
            with autocast(args, ctx.device):
                out = run.loss_fn(run.model, x, y, run.step)
            if empty:
                out = {k: v * 0 for k, v in out.items()}
            run.opt.zero_grad(set_to_none=True)
            run.scaler.scale(out["loss"]).backward()
            run.scaler.unscale_(run.opt)
            grad_norm = nn.utils.clip_grad_norm_(run.params, args.clip_grad if args.clip_grad > 0 else float("inf"))
            note_nonfinite(run, out["loss"], grad_norm)
            run.scaler.step(run.opt)
            run.scaler.update()
            if run.ema is not None:
                run.ema.update(run.saved)
            run.step += 1
            run.batch_in_epoch += 1
            run.sums.add(out, grad_norm, 0 if empty else len(images))
            # the model at this step (--save-steps), validation (--eval-every-steps), a log line, a checkpoint
            if run.step in run.save_steps:
                save_snapshot(run, args, ctx)
            every = args.eval_every_steps
            if run.val_loader is not None and every and run.step % every == 0 and run.step < run.total_steps:
                validate(run, args, ctx, run.epoch + run.batch_in_epoch / run.steps_per_epoch)
            if run.step % args.log_every == 0:
                log_means(run, lr, bar, ctx)
            if run.step % args.ckpt_every == 0:
                save(run, args, ctx)
            if args.max_steps and run.step >= args.max_steps:
                return True                                                 # run_stage writes the checkpoint
    return False


def note_nonfinite(run, loss, grad_norm):
    """the first step with a non-finite loss or gradient, noted on the device (no host sync per step); check_health
    stops the run at the next log line or checkpoint, before anything is written"""
    values = torch.stack([loss.detach().float(), grad_norm.float()])
    first = ~torch.isfinite(values).all() & (run.nonfinite[0] < 0)
    here = torch.cat([torch.full((1,), float(run.step), device=values.device), values])
    run.nonfinite = torch.where(first, here, run.nonfinite)


def log_means(run, lr, bar, ctx):
    """collective: a log line of the means since the last one (losses, gradient norm), the lr, speed and memory; none
    when no rank had a readable image since then"""
    check_health(run, ctx)
    means = run.sums.means(ctx)
    if means is not None:
        log(run, dict(step=run.step, epoch=round(run.epoch + run.batch_in_epoch / run.steps_per_epoch, 4), **means,
                      lr=lr, img_per_s=run.sums.img_per_s(ctx), peak_mem_mb=peak_mem_mb(ctx)), ctx)
        bar.set_postfix(loss=f"{means['loss']:.4f}")
    run.sums.restart()


def check_health(run, ctx):
    """collective, at log lines and checkpoints (never per step): a non-finite loss or gradient since the start, or
    too many unreadable images on any rank, stops every rank"""
    step, loss, grad_norm = run.nonfinite.tolist()
    err = run.bad.pending
    if step >= 0:
        err = NonFinite(f"{run.label}: non-finite loss/gradient at step {int(step)} (loss {loss:.4g}, grad norm "
                        f"{grad_norm:.4g}); stopped, {run.kept()} (try a lower --lr or --amp none)")
    stop_together(err, ctx)


def end_epoch(run, args, ctx):
    """after an epoch's last batch: the unreadable-image report, validation when it is due, a checkpoint"""
    with together(ctx):
        run.bad.end_pass(f"{run.label} epoch {run.epoch + 1}", ctx)
    run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    due = run.epoch == args.epochs or args.eval_every and run.epoch % args.eval_every == 0
    if run.val_loader is not None and due:
        run.metrics = validate(run, args, ctx, run.epoch)
    elif ctx.main and run.sums.names:
        tqdm.write(f"{run.label} epoch {run.epoch}/{args.epochs} done (step {run.step})")
    save(run, args, ctx)


def validate(run, args, ctx, at_epoch):
    """top-1 / top-5 on the held-out set (and of the EMA weights alongside), logged and printed; -> the results"""
    res = evaluate(run.trained, run.val_loader, args, ctx, desc=f"{run.label} val")
    if run.ema is not None:
        ema = evaluate(run.ema.model, run.val_loader, args, ctx, desc=f"{run.label} EMA val")
        res.update({f"ema_{k}": v for k, v in ema.items()})
    log(run, dict(step=run.step, epoch=round(at_epoch, 4), **{f"val_{k}": v for k, v in res.items()}), ctx)
    if ctx.main:
        ema_text = f"  (EMA: top-1 {res['ema_top1']:.2f}  top-5 {res['ema_top5']:.2f})" if run.ema is not None else ""
        tqdm.write(f"{run.label} step {run.step}: val top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}{ema_text}")
    return res


def log(run, record, ctx):
    """one line of OUT/NAME/log.jsonl: every rank calls it at the same steps, rank 0 writes"""
    line = json.dumps(record) + "\n"
    run.history.append(line)
    with together(ctx):
        if ctx.main:
            write_log(run.live_log, line, "a")


def save(run, args, ctx, finished=False):
    """OUT/NAME/last.pt: the models, optimizer, schedule, where the run is, every rank's RNG states and the log
    (collective: every rank calls it). A first checkpoint over an older run's folder makes its log.jsonl this run's."""
    check_health(run, ctx)
    if not all(torch.isfinite(p).all() for p in run.params):
        raise NonFinite(f"{run.label}: parameters became non-finite at step {run.step}; {run.kept()}")
    rng = rng_state(ctx)                                                    # collective: every rank
    log_sums = run.sums.total(ctx)                                          # collective: a resume logs the same lines
    with together(ctx):                                                     # e.g. rank 0's full disk stops every rank
        if ctx.main:
            extra = {}                                                      # the Distiller's own weights (MP head)
            if run.stage == "distill":
                others = tuple(f"{n}." for n, m in run.trained.named_children() if m is run.saved or m is run.teacher)
                extra = {k: v for k, v in run.trained.state_dict().items() if not k.startswith(others)}
            save_checkpoint(run.ckpt_path, dict(
                kind=vl.model_kind(run.saved), config=dataclasses.asdict(run.saved.cfg), model=run.saved.state_dict(),
                extra=extra, classes=run.classes, stage=run.stage, optimizer=run.opt.state_dict(),
                scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {},
                schedule=dict(total_steps=run.total_steps, warmup_steps=run.warmup, peak_lr=run.peak_lr,
                              min_lr=args.min_lr),
                step=run.step, epoch=run.epoch, batch_in_epoch=run.batch_in_epoch, world=ctx.world, rng=rng,
                args=dict(vars(args)), finished=finished, metrics=run.metrics if finished else {},
                log=run.history, log_sums=log_sums, log_keys=run.sums.names,
                **(dict(ema=run.ema.model.state_dict(), ema_updates=run.ema.updates) if run.ema is not None else {})))
            if run.live_log != run.log_path:                                # this run's record replaces the old one
                write_log(run.log_path, "".join(run.history), "w")
                os.remove(run.live_log)
                run.live_log = run.log_path
    run.saved_step = run.step


def save_snapshot(run, args, ctx):
    """--save-steps: OUT/NAME/step<N>.pt, the model alone (for eval.py --probe curves)"""
    if run.nonfinite is not None:
        check_health(run, ctx)
    if ctx.main:
        save_checkpoint(os.path.join(args.run_dir, f"step{run.step}.pt"), dict(
            kind=vl.model_kind(run.saved), config=dataclasses.asdict(run.saved.cfg), model=run.saved.state_dict(),
            classes=run.classes, stage=run.stage, step=run.step, args=dict(vars(args)), finished=False))


def resume_path(args):
    """the checkpoint a stage continues from: --resume, or OUT/NAME/last.pt ('auto'); None with --fresh"""
    if args.fresh:
        return None
    return os.path.join(args.run_dir, "last.pt") if args.resume == "auto" else args.resume


def print_start(run, args, ctx, n_images):
    """what the stage trains, on what, for how long, with which recipe"""
    n_params = sum(p.numel() for p in run.params)
    images = f"{n_images} {'unlabelled ' if run.stage == 'distill' else ''}images"
    print(f"{run.label}: {vl.model_kind(run.saved)} {n_params / 1e6:.2f}M trainable params, {images}, "
          f"{run.steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch {args.batch_size * ctx.world}, "
          f"lr {run.peak_lr:.2e}, warm-up {run.warmup} of {run.total_steps} steps, "
          f"{torch.get_num_threads()} thread(s) -> {args.run_dir}")
    mixing = f"mixup {args.mixup}, cutmix {args.cutmix}, smoothing {args.label_smoothing}, "
    print(f"{run.label}: recipe {args.recipe}: aa {args.aa}, hflip {args.hflip}, erase {args.erase_prob}, "
          + (mixing if run.stage != "distill" else "")
          + f"repeated aug x{args.repeated_aug}, EMA {args.ema_decay or 'off'}, layer decay {args.layer_decay}, "
          f"drop path {getattr(run.saved.cfg, 'drop_path', 'n/a')}, wd {args.weight_decay}, amp {args.amp}")


def restore(run, ck, path, ctx):
    """a run where its checkpoint ck (read from path) left it: optimizer, loss scaler, step, RNG states, the log"""
    scales = [group["lr_scale"] for group in run.opt.param_groups]         # from this run's arguments: a checkpoint
    run.opt.load_state_dict(ck["optimizer"])                                # of an older train.py may lack them
    for group, scale in zip(run.opt.param_groups, scales):
        group["lr_scale"] = scale
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    run.step, run.epoch, run.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
    run.saved_step = ck["step"]
    set_rng_state(ck["rng"], ctx)
    if "log" in ck:                                                         # the log and its partial sums as of step
        run.history = list(ck["log"])
        run.sums = LogSums(ctx.device, ck["log_keys"], ck["log_sums"] if ctx.main else None)
    elif ctx.main and os.path.exists(run.log_path):                         # a checkpoint of an older train.py
        with open(run.log_path) as f:
            run.history = [line for line in f if json.loads(line).get("step", 0) <= run.step]
    if ctx.main:
        print(f"{run.label}: resuming from {path} at step {run.step} (epoch {run.epoch}, batch {run.batch_in_epoch})")


def open_log(run, ctx, fresh):
    """log.jsonl holds this run's lines so far; a fresh run over an older run's folder writes log.jsonl.new instead,
    and the old record stays until the new run's first checkpoint (save)"""
    if ctx.main:
        if fresh and (os.path.exists(run.ckpt_path) or os.path.exists(run.log_path)):
            run.live_log = run.log_path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.remove(run.log_path + ".new")
    with together(ctx):
        if ctx.main:
            write_log(run.live_log, "".join(run.history), "w")


def peak_mem_mb(ctx):
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # CPU: peak resident set of the process


# ----------------------------------------------------------------------------------------------------------------
# 4. The demo's story (stage all)

def run_all(args, data, ctx):
    """The demo's story: teacher (unless --teacher) -> distil on unlabelled images -> fine-tune on the labelled images
    -> the same student with labels only on the same images, trained to convergence -> linear probes of the frozen
    random-init, distilled and teacher models -> table."""
    t_start, times, base = time.time(), {}, dict(vars(args))

    def stage(name, stage_, epochs, **kw):
        a = argparse.Namespace(**{**base, "stage": stage_, "name": name, "epochs": epochs, "resume": "auto", **kw})
        t = time.time()
        path = run_stage(a, stage_, data, ctx)
        times[name] = time.time() - t
        return path

    teacher = args.teacher
    if teacher is None:
        teacher = stage("teacher", "teacher", args.teacher_epochs, teacher=None, init=None,
                        lr=args.teacher_lr if args.teacher_lr is not None else args.lr)
    if not teacher:
        return                                                              # --max-steps stopped a stage
    distilled = stage("distill", "distill", args.distill_epochs, teacher=teacher, init=None, save_steps="0")
    if not distilled:
        return
    tuned = stage("finetune", "finetune", args.finetune_epochs, teacher=teacher, init=distilled,
                  lr=args.finetune_lr if args.finetune_lr is not None else args.lr)
    if not tuned:
        return
    scratch = None
    if not args.no_baseline:
        scratch = stage("supervised", "finetune", args.supervised_epochs, teacher=teacher, init=None, kd_weight=0.0)
        if not scratch:
            return
    val = make_loader(data.val, args, ctx, train=False)

    def load(path):                         # a checkpoint of this run, or --teacher as given (any format it reads)
        if path == args.teacher:
            return {}, load_teacher(path, args.img_size, args.teacher_norm)
        ck = load_checkpoint(path)
        return ck, vl.model_from_checkpoint(ck)

    def accuracy(path):                                                     # measured by the stage after its last epoch
        ck, model = load(path)
        if ck.get("metrics"):
            return ck["metrics"]
        if model.cfg.num_classes != len(data.classes):
            return None                                                     # e.g. a CLIP teacher: no class head
        return evaluate(model.to(ctx.device), val, args, ctx, desc="eval")

    t, probe_set, probes = time.time(), data.probe(), dict.fromkeys(("teacher", "distilled", "random"))
    if ctx.main:                                                            # one process, every image: no sharding
        for name, path in (("teacher", teacher), ("distilled", distilled),
                           ("random", os.path.join(os.path.dirname(distilled), "step0.pt"))):
            probes[name] = probe(load(path)[1], probe_set, data.val, args, Ctx(device=ctx.device))["top1"]
    barrier(ctx)
    times["probes"] = time.time() - t

    def steps(ds, epochs):                                                  # optimizer steps of `epochs` epochs on ds
        return f"{epochs * (len(ds) // (args.batch_size * ctx.world)):,}"
    n, n_t, n_d = f"{len(data.train):,}", f"{len(data.teacher_train):,}", f"{len(data.distill):,}"
    teacher_row = (("teacher: ViT, labels", n_t, steps(data.teacher_train, args.teacher_epochs)) if args.teacher is None
                   else (f"teacher: {args.teacher}", "-", "-"))                # trained here, or given as --teacher
    rows = [(*teacher_row, accuracy(teacher), probes["teacher"]),
            (f"student: distilled ({steps(data.distill, args.distill_epochs)} steps on {n_d} unlabelled images) "
             "+ fine-tuned", n, steps(data.train, args.finetune_epochs), accuracy(tuned), probes["distilled"])]
    if not args.no_baseline:
        rows.append(("student: labels only, to convergence", n, steps(data.train, args.supervised_epochs),
                     accuracy(scratch), None))
    rows.append(("student: random initialisation", "0", "0", None, probes["random"]))
    if ctx.main:
        task = f"demo task {args.demo_task!r}" if args.data is None else args.data
        print(f"\nheld-out set: {len(data.val):,} images, {len(data.classes)} classes ({task}); linear probe: frozen "
              f"[class, mean patch] tokens, logistic regression trained on {len(probe_set):,} other labelled images; "
              f"{torch.get_num_threads()} thread(s); total {time.time() - t_start:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})\n")
        print("| model | labelled images | steps with labels | top-1 | top-5 | linear probe top-1 |\n"
              "|---|---|---|---|---|---|")
        for name, n_lab, n_steps, r, p in rows:
            print(f"| {name} | {n_lab} | {n_steps} | " + (f"{r['top1']:.1f} | {r['top5']:.1f}" if r else "- | -")
                  + f" | {'-' if p is None else f'{p:.1f}'} |")
        save_json(os.path.join(args.out, "results.json"), {
            name: dict(labelled_images=n_lab, steps=n_steps, **(r or {}), probe_top1=p)
            for name, n_lab, n_steps, r, p in rows})


# ----------------------------------------------------------------------------------------------------------------
# 5. main

class Terminated(KeyboardInterrupt):
    """SIGTERM (what torchrun and cluster schedulers send): the run stops as it does on Ctrl-C"""


def main(argv=None):
    args = parse_args(argv)
    ctx = setup_dist()

    def on_sigterm(signum, frame):
        raise Terminated()
    handlers = {}
    with contextlib.suppress(ValueError):                   # (not the main thread: no handler)
        handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with together(ctx):                                                 # fail fast, before any stage trains
            check_args(args)
            torch.set_num_threads(args.threads)
            if ctx.main:
                print("\n".join(describe_recipe(args)))
            if args.workers > cores_per_process() and ctx.main:
                print(f"warning: --workers {args.workers} on {cores_per_process()} CPU core(s) per process: the "
                      "workers compete with training for the cores", file=sys.stderr)
            data = get_data(args)
            if args.stage != "teacher":
                student = student_config(for_stage(args, "distill" if args.stage == "all" else args.stage),
                                         len(data.classes))
                if args.stage == "all" and not args.teacher:                # the teacher it will train
                    check_stages(args, student, make_config(vl.TEACHER_PRESETS, args.teacher_preset, args.teacher_opts,
                                                            "teacher").depth)
        if args.stage == "all":
            run_all(args, data, ctx)
        else:
            if args.epochs is None:
                args.epochs = getattr(args, f"{args.stage}_epochs")
            if args.stage == "finetune" and args.init is None and ctx.main:
                print("note: finetune without --init trains the student from scratch (the labels-only baseline)")
            run_stage(args, args.stage, data, ctx)
    except UserError as e:
        if not e.shared or int(os.environ.get("LOCAL_RANK", 0)) == 0:     # a shared error: once per node
            print(f"error{f' (rank {ctx.rank})' if ctx.world > 1 and not e.shared else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: run the same command again to continue from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        release_locks()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
