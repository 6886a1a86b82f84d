"""Tests of optim.py: the EMA, the parameter groups with layer-wise lr decay, the warm-up and the lr schedule."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import distributed
import optim
import train
import vitlinearizer as vl
from conftest import TINY_ADVENTURER


def test_ema_follows_the_formula_with_warm_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = optim.EMA(model, 0.9)
    expect = {k: v.clone().float() for k, v in model.state_dict().items()}
    for t in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].num_batches_tracked += 1
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            expect[k] = d * expect[k] + (1 - d) * v.float() if v.is_floating_point() else v.clone()
    for k, v in ema.model.state_dict().items():
        assert torch.allclose(v.float(), expect[k].float(), atol=1e-5), k
    assert not any(p.requires_grad for p in ema.model.parameters()) and ema.updates == 39


@pytest.mark.parametrize("kind", ["vit", "mamba", "adventurer", "distiller", "adventurer distiller"])
def test_layer_wise_lr_decay_scales(kind):
    vit = vl.ViT(vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=3, heads=2, num_classes=5, registers=2))
    mamba = vl.VisionMamba(vl.MambaConfig(img_size=16, patch_size=4, dim=32, depth=3, d_state=4, num_classes=5))
    adventurer = vl.Adventurer(replace(TINY_ADVENTURER, depth=3))
    model = {"vit": vit, "mamba": mamba, "adventurer": adventurer, "distiller": vl.Distiller(vit, mamba, stages=3),
             "adventurer distiller": vl.Distiller(vit, adventurer, stages=3)}[kind]
    groups = optim.param_groups(model, 0.05, 0.5, depth=3)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(scale)
    for n, p in trainable:
        name = n.removeprefix("student.")
        want = (0.5 ** 4
                if name.split(".")[0] in ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_cls", "mask_token")
                else 0.5 ** (3 - int(name.split(".")[1])) if name.startswith(("blocks.", "layers.")) else 1.0)
        assert scale[id(p)][0] == want, n
    decay, _ = optim.no_decay_params(model)                                             # weight decay kept as before
    assert {id(p) for p in decay} == {i for i, (_, wd) in scale.items() if wd == 0.05}
    assert {g["lr_scale"] for g in optim.param_groups(model, 0.05, 1.0, 3)} == {1.0}       # off: two groups, as before
    assert len(optim.param_groups(model, 0.05, 1.0, 3)) == 2


def test_warmup_in_steps_epochs_or_fraction():
    def warmup(*argv, steps_per_epoch=1000, epochs=1):
        return optim.warmup_steps(train.parse_args(list(argv)), steps_per_epoch, epochs * steps_per_epoch,
                                  distributed.Ctx())
    demo_frac = train.get_parser().get_default("warmup_frac")
    assert warmup() == round(demo_frac * 1000) < 500                                  # demo: a fraction of the run
    assert warmup("--warmup-frac", "0.1", epochs=3) == 300
    assert warmup("--warmup-steps", "7") == 7
    assert warmup("--warmup-epochs", "0.5") == 500                                     # explicit: no mode default
    assert warmup("--warmup-steps", "7", "--warmup-epochs", "0.5") == 7
    root = "/nonexistent"                                                              # --data defaults: 5 epochs
    assert warmup("--data", root, steps_per_epoch=10, epochs=100) == 50
    assert warmup("--data", root, "--warmup-frac", "0.2", steps_per_epoch=10, epochs=100) == 200
    lrs = [optim.lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[10] == 1.0 and lrs[99] < 0.01 and lrs == sorted(lrs[:10]) + lrs[10:]
