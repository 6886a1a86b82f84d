"""
Checkpoints and logs on disk: atomic, durable writes (a full disk or Ctrl-C leaves the last complete file), run-folder
locks, every rank's RNG states, the checks that a checkpoint may be resumed with the arguments given; and the checks of
the files and folders a command line names, with a teacher read from one.
"""
import contextlib, dataclasses, errno, glob, json, os, random, socket, sys

import numpy as np
import torch
import torch.distributed as dist

import vitlinearizer as vl
from distributed import UserError, as_user_error

try:
    import fcntl                                                            # run-folder locks (Linux, macOS)
except ImportError:                                                         # Windows: no lock
    fcntl = None


def save_checkpoint(path, obj):
    """atomic and durable: write a temporary file next to it, fsync it, rename it over the old one, fsync the folder.
    Whatever stops the write (a full disk, Ctrl-C) removes the temporary file and leaves the old checkpoint."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise
    fsync_dir(folder)


def write_error(e, path):
    """a UserError for an OSError while writing PATH: 'disk full' when it is"""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"disk full while writing {path}: the last complete checkpoint is kept, no partial file is "
                         "left; free space, then run the same command again to continue")
    return UserError(f"cannot write {path}: {e.strerror or e}; the last complete checkpoint is kept")


def fsync_dir(folder):
    """make a rename in FOLDER durable (POSIX; a no-op where folders cannot be opened)"""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_log(path, text, mode):
    """mode "a": append a line (a failed write is cut off again); "w": replace the whole log atomically"""
    target = path if mode == "a" else f"{path}.tmp{os.getpid()}"
    size = os.path.getsize(path) if mode == "a" and os.path.exists(path) else 0
    try:
        with open(target, mode) as f:
            f.write(text)
            f.flush()
            if mode == "w":
                os.fsync(f.fileno())
        if mode == "w":
            os.replace(target, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            if mode == "a":
                os.truncate(target, size)
            else:
                os.remove(target)
        raise write_error(e, path) from None


_held_locks = {}                                                            # run folder -> open lock file


def lock_run_dir(run_dir):
    """An exclusive lock on RUN_DIR until release_locks() (flock: the kernel drops it when the process dies, kill -9
    included): a second run that would write the same folder stops with one line. Then removes the temporary files
    that a killed write left behind (none can be in use: the lock is ours)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        f = open(os.path.join(run_dir, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    if fcntl is not None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{run_dir} is in use by another run ({holder}): wait for it to end or stop it, "
                            "or give another --out / --name") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    except OSError as e:                                                    # e.g. a full disk
        f.close()
        raise write_error(e, os.path.join(run_dir, ".lock")) from None
    _held_locks[run_dir] = f
    for stale in glob.glob(os.path.join(glob.escape(run_dir), "*.tmp[0-9]*")):
        os.remove(stale)
        print(f"note: removed {stale}, a partial file left by an interrupted write", file=sys.stderr)


def release_locks():
    for f in _held_locks.values():
        f.close()
    _held_locks.clear()


def save_json(path, obj):
    """atomic, like save_checkpoint"""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(e, path) from None


def load_checkpoint(path):
    """a checkpoint file (vl.read_state_dict: tensors and plain values only), or a one-line UserError"""
    with as_user_error(f"could not read checkpoint {path}"):
        return vl.read_state_dict(path)


def rng_state(ctx):
    """every rank's torch / CUDA / numpy / python RNG state, as tensors and plain values (rank 0 gets them all)"""
    np_st = np.random.get_state()
    st = dict(torch=torch.get_rng_state().tolist(), numpy=[np_st[0], np_st[1].tolist(), *np_st[2:]],
              cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
              python=random.getstate())
    out = [st]
    if ctx.world > 1:                                                       # plain Python objects: no tensor pickles
        out = [None] * ctx.world
        dist.all_gather_object(out, st)
    for s in out:
        s["torch"] = torch.tensor(s["torch"], dtype=torch.uint8)
        s["cuda"] = [torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]]
        s["numpy"][1] = torch.tensor(s["numpy"][1], dtype=torch.int64)
    return out


def set_rng_state(states, ctx):
    if ctx.rank >= len(states):                                             # resumed on more processes than saved
        return
    st = states[ctx.rank]
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    np.random.set_state((st["numpy"][0], st["numpy"][1].numpy().astype(np.uint32), *st["numpy"][2:]))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))


# args whose change makes a checkpoint a different experiment (model and data): resuming with another value is an error
FIXED_ARGS = ("stage", "teacher", "teacher_norm", "init", "teacher_preset", "teacher_opts", "student", "student_opts",
              "img_size", "stages", "am_scope", "target", "demo_train", "demo_teacher_train", "demo_seed", "pos_init",
              "layer_decay", "demo_task", "demo_pool", "distill_data")   # (layer_decay: the optimizer's groups)
PATH_ARGS = ("teacher", "init", "distill_data")


def check_resume(ck, path, args, cfg, ctx):
    if not {"config", "optimizer", "step", "args"} <= set(ck):
        raise UserError(f"{path} is not a training checkpoint of train.py (no optimizer state or step): "
                        "--resume takes an OUT/NAME/last.pt")
    old = ck["args"]

    def same(k, a, b):                  # a file given by another spelling (relative / absolute) is the same file
        paths = k in PATH_ARGS and isinstance(a, str) and isinstance(b, str) and not a.startswith("timm:")
        return a == b or paths and os.path.realpath(a) == os.path.realpath(b)
    diff = [f"{k}: {old.get(k)!r} -> {getattr(args, k)!r}" for k in FIXED_ARGS
            if k in old and not same(k, old[k], getattr(args, k))]
    diff += [f"config.{k}: {v!r} -> {dataclasses.asdict(cfg).get(k)!r}" for k, v in ck["config"].items()
             if dataclasses.asdict(cfg).get(k) != v]
    if diff:
        raise UserError(f"cannot resume {path} with different model arguments ({'; '.join(diff)}); "
                        "use the original arguments, another --out/--name, or --fresh")
    old_gb, gb = old.get("batch_size", 0) * ck.get("world", 1), args.batch_size * ctx.world
    if old_gb != gb:
        raise UserError(f"cannot resume with another global batch ({old_gb} -> {gb}): keep --batch-size x processes")
    soft = [k for k in ("data", "epochs", "lr", "blr", "weight_decay", "warmup_epochs", "warmup_steps", "warmup_frac",
                        "lam", "am_weight", "mask_ratio", "mask_kind", "threads", "aa", "hflip", "erase_prob", "mixup",
                        "cutmix", "repeated_aug", "ema_decay", "label_smoothing")
            if k in old and old[k] != getattr(args, k)]
    if soft and ctx.main:
        print(f"note: resuming with changed {soft}; the run no longer follows the original trajectory", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Files named on the command line


def check_file(path, flag, folder_ok=False):
    """a file that exists, is not a folder (unless folder_ok: its reader checks what is in it), is not empty and can
    be read"""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        if folder_ok:
            return
        raise UserError(f"{flag} {path} is a folder: give a checkpoint file")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} {path} is empty (0 bytes): an interrupted copy or download?")


def check_out_dir(path, flag):
    """an output folder that exists or can be created"""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file: give a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        why = "not writable" if os.path.isdir(parent) else "a file"
        raise UserError(f"{flag} {path}: cannot write there ({parent} is {why})")


def teacher_norm(text):
    """--teacher-norm -> (mean, std): a name of vl.PIXEL_NORMS or 'M,M,M/S,S,S'; None -> (None, None)"""
    if not text:
        return None, None
    if text in vl.PIXEL_NORMS:
        return vl.PIXEL_NORMS[text]
    mean, _, std = text.partition("/")
    try:
        return vl.pixel_stats(mean.split(","), std.split(","), "--teacher-norm")
    except ValueError:
        raise UserError(f"--teacher-norm {text!r}: give one of {', '.join(vl.PIXEL_NORMS)} or 'M,M,M/S,S,S' "
                        "(pixels in [0, 1], std > 0)") from None


def load_teacher(spec, img_size, norm=None):
    """a frozen teacher, as vl.load_teacher reads it (any file, Hub folder or timm:NAME it takes), or a UserError.
    norm: --teacher-norm (default: the pixel mean / std its library declares)"""
    mean, std = teacher_norm(norm)
    with as_user_error(f"could not load teacher {spec!r}"):                # the loader says which keys did not fit
        return vl.load_teacher(spec, img_size=img_size, pixel_mean=mean, pixel_std=std)
