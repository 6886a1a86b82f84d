"""
Processes and devices: ranks and collectives (torchrun: DistributedDataParallel), the CPU cores and autocast of a
process, and UserError: the one-line error that stops a run, raised by every rank together.
"""
import contextlib, dataclasses, os

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input or a run that cannot go on: printed as one line, checkpoints left as they are."""
    shared = False                                                          # raised by all ranks at once: stop_together


@contextlib.contextmanager
def as_user_error(what):
    """An exception in the block (a loader's: a file it cannot read, a checkpoint that does not fit) becomes a
    UserError on one line: 'WHAT: ExceptionType: message'."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what}: {type(e).__name__}: {e}".replace("\n", " ")) from e



@dataclasses.dataclass
class Ctx:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_dist():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ctx(int(os.environ.get("RANK", 0)), world, device)


def all_sum(t, ctx):
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def barrier(ctx):
    if ctx.world > 1:
        dist.barrier()


def stop_together(err, ctx, skip=False):
    """Collective (every rank calls it at the same point): when any rank has a UserError, every rank raises the same
    one, so no rank is left waiting in a collective for a rank that stopped. -> whether any rank asked to skip."""
    if ctx.world == 1:
        if err is not None:
            raise err
        return skip
    flags = torch.tensor([err is not None, skip], dtype=torch.float32, device=ctx.device)
    dist.all_reduce(flags)
    if flags[0] > 0:
        msgs = [None] * ctx.world
        dist.all_gather_object(msgs, None if err is None else str(err))
        rank = next(r for r, m in enumerate(msgs) if m is not None)
        shared = UserError(msgs[rank] if msgs.count(msgs[rank]) == ctx.world else f"{msgs[rank]} (rank {rank})")
        shared.shared = True
        raise shared from err
    return bool(flags[1] > 0)


@contextlib.contextmanager
def together(ctx):
    """A block that every rank runs (holding no collective): a UserError in it on any rank stops every rank."""
    err = None
    try:
        yield
    except UserError as e:
        err = e
    stop_together(err, ctx)


def cores_per_process():
    """CPU cores this process may use: its affinity mask (taskset, cgroup cpusets), shared by torchrun's local ranks"""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def autocast(args, device):
    """--amp: bf16 / fp16 autocast, or none; auto = bf16 on CUDA, none on CPU"""
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
