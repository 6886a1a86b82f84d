"""
Optimisation: AdamW's parameter groups (no weight decay on norms, biases, tokens, A_log, D; layer-wise lr decay), the
lr schedule (linear warm-up, then cosine), and the EMA of the weights.
"""
import copy, math, sys

import torch


def no_decay_params(model):
    """AdamW groups: no weight decay for A_log, D, norms, biases, tokens and position embeddings."""
    skip = {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
            if hasattr(m, "no_weight_decay") for n in m.no_weight_decay()}
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n in skip else decay).append(p)
    return decay, no_decay


def layer_id(name, depth):
    """MAE / BEiT layer of a parameter: 0 = patch embedding, tokens, position embeddings; i + 1 = block i; depth + 1 =
    the rest (final norm, class head, the distiller's MP head). Names may carry the distiller's 'student.' prefix."""
    name = name.removeprefix("student.")
    if name.startswith(("patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed", "pos_cls", "norm_pre")):
        return 0
    if name.startswith(("blocks.", "layers.")):                          # ViT, Vim / Adventurer
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=1.0, depth=0):
    """AdamW groups: weight decay or not (no_decay_params), each with an 'lr_scale' applied on top of the schedule:
    layer_decay ** (depth + 1 - layer_id), i.e. 1 for the head, layer_decay for the last block, the smallest for the
    embeddings. Without layer decay: two groups, as before."""
    decay, no_decay = no_decay_params(model)
    if layer_decay == 1.0:
        return [dict(params=decay, weight_decay=weight_decay, lr_scale=1.0),
                dict(params=no_decay, weight_decay=0.0, lr_scale=1.0)]
    wd_of = {id(p): weight_decay for p in decay} | {id(p): 0.0 for p in no_decay}
    groups = {}
    for n, p in model.named_parameters():
        if id(p) in wd_of:
            key = (layer_id(n, depth), wd_of[id(p)])
            groups.setdefault(key, dict(params=[], weight_decay=key[1], lr_scale=layer_decay ** (depth + 1 - key[0])))
            groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


class EMA:
    """Exponential moving average of a model's weights (DeiT / timm ModelEma), updated after every optimizer step:
    w_ema = d w_ema + (1 - d) w with d = min(decay, (1 + t) / (10 + t)) at update t. The warm-up term (our choice, the
    form TensorFlow's ExponentialMovingAverage uses) makes short runs average their recent weights rather than keep the
    initial ones; it is below DeiT's 0.99996 only for the first 225k updates. Buffers are copied."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        floats = [(e, w.to(e.dtype)) for e, w in pairs if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [w for _, w in floats], 1 - d)
        for e, w in pairs:
            if not e.is_floating_point():
                e.copy_(w)


def warmup_steps(args, steps_per_epoch, total, ctx):
    """--warmup-steps, else --warmup-epochs, else --warmup-frac of the run; a warning when it is not shorter than the
    run, a note when it is more than half of it"""
    if args.warmup_steps is not None:
        warmup, given = args.warmup_steps, f"--warmup-steps {args.warmup_steps}"
    elif args.warmup_epochs is not None:
        warmup, given = round(args.warmup_epochs * steps_per_epoch), f"--warmup-epochs {args.warmup_epochs:g}"
    else:
        warmup, given = round((args.warmup_frac or 0.0) * total), f"--warmup-frac {args.warmup_frac:g}"
    if warmup >= total and ctx.main:
        print(f"warning: the warm-up ({warmup} steps, {given}) is not shorter than the run ({total} steps): the lr "
              "never reaches its peak; lower it, or set it with --warmup-steps / --warmup-frac", file=sys.stderr)
    elif warmup > total // 2 and ctx.main:
        print(f"note: the warm-up ({warmup} steps, {given}) is more than half of the run ({total} steps); "
              "--warmup-steps or --warmup-frac set it independently of the epoch length", file=sys.stderr)
    return warmup


def lr_at(step, total, warmup, peak, floor):
    """linear warm-up then cosine to floor, per step"""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
