"""
Named recipes (train.py --recipe NAME): plain dicts of flag defaults, each from the published recipe of a model this
project builds on, and the defaults of a --data run. train.py sets them on its parser before it reads the command line,
so that a flag given always wins (train.py, section 1).
"""
import os

from distributed import cores_per_process


def data_defaults(data):
    """a --data run's defaults where they differ from the demo's (the parser's own): the paper's pair of models (a
    ViT-B/16 teacher, an Adventurer-B student) at 224 px, DeiT's recipe, all the CPU cores"""
    cores = cores_per_process()
    return dict(recipe="deit", out=os.path.join("runs", os.path.basename(os.path.normpath(data))), threads=cores,
                workers=min(8, cores), teacher_preset="vit_b16", student="adventurer_base", student_opts="",
                img_size=224, teacher_epochs=300, distill_epochs=300, finetune_epochs=300, supervised_epochs=300,
                batch_size=128, lr=None, teacher_lr=None, finetune_lr=None, warmup_epochs=5.0, warmup_frac=None,
                log_every=50, ckpt_every=1000, eval_every=1, demo_train=0, demo_teacher_train=0, demo_val=0,
                demo_pool=0, demo_probe=0)


# A dict value gives each stage its own (train.py's for_stage). The distillation stage sees random-resized crops and
# flips only in every recipe (no labels to mix; as MAE-style masked pre-training does) and its student keeps its
# preset's drop path: our choice, the paper is silent. The ViT teacher, trained with labels, gets the recipe's drop
# path as the student does. --data runs default to "deit". The paper's own recipe is NOT public: these are the
# published recipes of the models it builds on.

def labelled(value, distill):
    """a per-stage recipe value: `value` for the labelled stages (teacher, finetune), `distill` for distillation"""
    return dict(teacher=value, distill=distill, finetune=value)


_DEIT = dict(teacher_epochs=300, distill_epochs=300, finetune_epochs=300, img_size=224, blr=5e-4, min_lr=1e-5,
             warmup_epochs=5.0, weight_decay=0.05, label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5,
             aa=labelled("rand-m9-mstd0.5-inc1", "none"), erase_prob=labelled(0.25, 0.0), repeated_aug=labelled(3, 1),
             ema_decay=labelled(0.99996, 0.0), layer_decay=1.0, hflip=0.5,
             drop_path=labelled(0.1, None))
_ADVENTURER = dict(_DEIT, blr=5e-4, batch_size=128, amp="bf16", aa=labelled("3augment", "none"),
                   erase_prob=0.0, label_smoothing=0.0)
RECIPES = {
    "none": {},
    "deit": _DEIT,
    "vim": dict(_DEIT, amp="none", blr=1e-3, weight_decay=0.05, drop_path=labelled(0.05, None)),
    "adventurer-128": dict(_ADVENTURER, img_size=128, teacher_epochs=300, distill_epochs=300, finetune_epochs=300,
                           drop_path=labelled(0.1, None)),
    "adventurer-224": dict(_ADVENTURER, img_size=224, teacher_epochs=100, distill_epochs=100, finetune_epochs=100,
                           drop_path=labelled(0.4, None)),
    "adventurer-ft": dict(_DEIT, img_size=224, teacher_epochs=20, distill_epochs=20, finetune_epochs=20, batch_size=64,
                          lr=1e-5, min_lr=1e-5, weight_decay=0.1, amp="bf16", erase_prob=0.0, repeated_aug=1,
                          drop_path=labelled(0.6, None)),
    "mae-ft": dict(_DEIT, finetune_epochs=50, blr=2e-3, min_lr=1e-6, layer_decay=0.75, repeated_aug=1, ema_decay=0.0,
                   drop_path=labelled(0.2, None)),
}
RECIPE_NOTES = {
    "none": "no recipe: the flags' own defaults (no augmentation beyond an image folder's random-resized crop and "
            "flip)",
    "deit": "DeiT's ImageNet recipe (facebookresearch/deit main.py defaults; lr 5e-4 x global batch / 512)",
    "vim": "Vim-S's (hustvl/Vim pt-vim-s.sh): DeiT's recipe in fp32, lr 1e-3 at global batch 512, drop path 0.05",
    "adventurer-128": "Adventurer stage 1 (wangf3014/Adventurer): 300 epochs at 128 px, 3-Augment, global batch 1024 "
                      "on 8 processes, drop path 0.1, bf16",
    "adventurer-224": "Adventurer stage 2: 100 epochs at 224 px from the 128 px run (give --init OUT/NAME/last.pt), "
                      "drop path 0.4",
    "adventurer-ft": "Adventurer stage 3: 20 epochs at 224 px from stage 2 (--init), lr 1e-5 unscaled, global batch "
                     "512 on 8 processes, RandAugment, drop path 0.6, wd 0.1",
    "mae-ft": "MAE's fine-tuning recipe for its 24-block ViT-L (facebookresearch/mae FINETUNE.md; lr 1e-3 per 256 = "
              "2e-3 per 512), layer-wise lr decay 0.75, 50 epochs: for fine-tuning a distilled student (--init)",
}
