"""Tests of train.py: the pipeline in miniature, image folders and distillation data in a run, the recipes, never
losing work, bad input and faults, and the results protocol. Every test here sees the scan dispatch a CPU user gets."""
import argparse
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

import bench
import checkpoint
import data
import distributed
import eval as evaluate_cli
import train
import vitlinearizer as vl
from conftest import (HERE, TINY_ADVENTURER, TINY_STUDENT, TINY_TEACHER, random_vit_state_dict, ZOO, TINY, run_train,
                      tiny_teacher, one_error_line, write_tree)

pytestmark = pytest.mark.usefixtures("cpu_dispatch")   # the scan dispatch a CPU user gets (conftest)


def log(path):
    return [json.loads(l) for l in open(path)]


@pytest.mark.parametrize("name", ["hf_siglip_vision", "timm_dinov2_reg4"])
def test_train_distills_from_a_hub_folder_teacher(tmp_path, capsys, name):
    """train.py --teacher with a Hub folder; SigLIP (no class token: the class slot is the mean patch token) and
    DINOv2 with registers (left out of the tokens the losses see)."""
    rc, _, err = run_train(capsys, "--stage", "distill", "--teacher", os.path.join(ZOO, name), "--out", tmp_path,
                           *TINY, "--distill-epochs", 1)
    assert rc == 0, err
    rec = log(tmp_path / "distill" / "log.jsonl")
    assert rec and all(math.isfinite(r["loss"]) and r["am"] > 0 and r["mp"] > 0 for r in rec if "loss" in r)


def test_demo_table_with_a_hub_folder_teacher(tmp_path, capsys):
    """python train.py --teacher FOLDER (every stage, then the table): the teacher is read as given, not as a
    checkpoint of this project; its row says where it came from"""
    folder = os.path.join(ZOO, "hf_vit_classifier")
    rc, out, err = run_train(capsys, "--teacher", folder, "--out", tmp_path, *TINY, "--no-baseline")
    assert rc == 0, err
    assert f"| teacher: {folder} | - | - |" in out and "| student: distilled" in out


def losses(path):
    return {r["step"]: r["loss"] for r in log(path) if "loss" in r}


@pytest.mark.parametrize("student", ["demo", "adventurer_demo"])                     # Vim, the demo's Adventurer
def test_pipeline_in_miniature(tmp_path, capsys, student):
    out_dir = tmp_path / "run"
    stages = ["--teacher-epochs", 2, "--distill-epochs", 4, "--finetune-epochs", 1, "--supervised-epochs", 5]
    rc, out, err = run_train(capsys, "--out", out_dir, *TINY, *stages, "--student", student)
    assert rc == 0, err
    for row in ("| teacher: ViT, labels | 64 | 8 |",
                "| student: distilled (16 steps on 64 unlabelled images) + fine-tuned | 64 | 4 |",
                "| student: labels only, to convergence | 64 | 20 |",
                "| student: random initialisation | 0 | 0 | - | - |"):
        assert row in out
    assert len(json.load(open(out_dir / "results.json"))) == 4
    d = losses(out_dir / "distill" / "log.jsonl")                                      # 16 steps of AM + MP
    first, last = np.mean([d[s] for s in (1, 2, 3)]), np.mean([d[s] for s in (14, 15, 16)])
    assert last < 0.9 * first, d
    rec = log(out_dir / "distill" / "log.jsonl")[0]
    assert {"step", "loss", "am", "mp", "lr", "img_per_s", "peak_mem_mb", "grad_norm"} <= set(rec)
    ck = torch.load(out_dir / "finetune" / "last.pt", weights_only=True)               # tensors and plain values only
    assert {"kind", "config", "model", "optimizer", "schedule", "scaler", "step", "epoch", "rng", "args"} <= set(ck)
    kind, cls = {"demo": ("vision_mamba", vl.VisionMamba), "adventurer_demo": ("adventurer", vl.Adventurer)}[student]
    assert ck["kind"] == kind and ck["finished"] and ck["step"] == 4
    assert isinstance(vl.model_from_checkpoint(ck), cls)
    assert isinstance(vl.load_teacher(str(out_dir / "teacher" / "last.pt")), vl.ViT)
    # eval.py on the demo's held-out set gives the accuracy the run measured at its end
    capsys.readouterr()
    assert evaluate_cli.main(["--ckpt", str(out_dir / "finetune" / "last.pt")]) == 0
    assert f"top-1 {ck['metrics']['top1']:.2f}" in capsys.readouterr().out
    # re-running the finished command trains nothing
    rc, out, _ = run_train(capsys, "--out", out_dir, *TINY, *stages, "--student", student)
    assert rc == 0 and "is finished" in out


def test_image_folder_training_skips_a_corrupt_file(tmp_path, capsys):
    root = write_tree(tmp_path / "d", corrupt=1)
    rc, out, err = run_train(capsys, "--data", root, "--out", tmp_path / "r", "--stage", "teacher", "--epochs", 2,
                       "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2", "--img-size", 16,
                       "--batch-size", 13, "--workers", 1, "--log-every", 1, "--recipe", "none")
    assert rc == 0, err
    assert "skipped 1 unreadable image(s) of 13" in err and "bad0.JPEG" in err
    assert [r["epoch"] for r in log(tmp_path / "r" / "teacher" / "log.jsonl") if "val_top1" in r] == [1, 2]


def png_declaring(path, w, h):
    """a valid-looking PNG header that declares w x h pixels, followed by a few bytes of pixel data"""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_decompression_bombs_are_skipped_undecoded_and_odd_images_train(tmp_path, capsys, monkeypatch):
    """PNGs that declare 10 G and 100 M pixels (over PIL's MAX_IMAGE_PIXELS) among good images: skipped and counted,
    never decoded. Legal but odd images (1x1, every mode, 16-bit, .JPEG, non-ASCII names) all train."""
    root = write_tree(tmp_path / "d", corrupt=0)
    png_declaring(tmp_path / "d" / "train" / "dog" / "bomb.png", 100_000, 100_000)     # PIL: an error at open
    png_declaring(tmp_path / "d" / "train" / "fox" / "bomb.PNG", 10_000, 10_000)      # PIL: a warning, then decodes
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    odd = {"1x1.png": rgb.resize((1, 1)), "2x3.JPEG": rgb.resize((2, 3)), "la.png": rgb.convert("LA"),
           "bw.png": rgb.convert("1"), "i.tif": rgb.convert("I"), "f.tif": rgb.convert("F"),
           "cmyk.jpg": rgb.convert("CMYK"), "lab.tif": rgb.convert("LAB"), "pal.gif": rgb.convert("P"),
           "16bit.png": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),
           "ünïcødé 名前.webp": rgb}
    for i, (name, im) in enumerate(odd.items()):
        im.save(tmp_path / "d" / "train" / ("cat", "dog", "fox")[i % 3] / name)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.filename) or real_load(im))
    rc, out, err = run_train(capsys, "--data", root, "--out", tmp_path / "r", "--stage", "teacher", "--epochs", 1,
                             "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2", "--img-size", 16,
                             "--batch-size", 5, "--workers", 0, "--recipe", "none")
    assert rc == 0, err
    assert "skipped 2 unreadable image(s) of 25" in err and "DecompressionBomb" in err, err
    assert not [f for f in decoded if os.path.basename(f).startswith("bomb")] and len(set(decoded)) == 23 + 12
    ds = data.ImageFolder([(str(tmp_path / "d" / "train" / "cat" / "16bit.png"), 0)], ["cat"], 16, False)
    assert abs(ds[(0, None)][0].float().mean().item() - np.asarray(rgb.convert("L")).mean()) < 20  # not all white


def same_log(path):
    """the log without the measured fields (speed and memory differ from run to run)"""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "peak_mem_mb")} for r in log(path)]


def test_resume_follows_the_uninterrupted_trajectory(tmp_path, capsys, monkeypatch):
    teacher = tiny_teacher(tmp_path / "t.pt")
    args = ["--stage", "distill", "--teacher", teacher, *TINY, "--epochs", 3, "--drop-path", 0.1, "--ckpt-every", 2,
            "--log-every", 3]                                                          # log windows span checkpoints
    assert run_train(capsys, "--out", tmp_path / "a", *args)[0] == 0                   # uninterrupted: 12 steps
    ref = same_log(tmp_path / "a" / "distill" / "log.jsonl")
    assert [r["step"] for r in ref] == [3, 6, 9, 12, 12] and ref[-1] == dict(step=12, finished=True)
    # a clean stop after 5 steps (mid-epoch, mid log window), then the same command again: the same log, line for line
    assert run_train(capsys, "--out", tmp_path / "b", *args, "--max-steps", 5)[0] == 0
    assert not any(r.get("finished") for r in log(tmp_path / "b" / "distill" / "log.jsonl"))
    assert run_train(capsys, "--out", tmp_path / "b", *args)[0] == 0
    assert same_log(tmp_path / "b" / "distill" / "log.jsonl") == ref
    # Ctrl-C between checkpoints (in the 10th step; the last checkpoint is at step 8): one line; the resumed run drops
    # the log line of step 9 and redoes the work since step 8
    real = train.lr_at

    def crash(step, *a):
        if step == 9:
            raise KeyboardInterrupt
        return real(step, *a)
    monkeypatch.setattr(train, "lr_at", crash)
    rc, _, err = run_train(capsys, "--out", tmp_path / "c", *args)
    assert rc == 130 and err.strip().splitlines()[-1].startswith("interrupted: run the same command again")
    assert [r["step"] for r in log(tmp_path / "c" / "distill" / "log.jsonl")] == [3, 6, 9]
    monkeypatch.setattr(train, "lr_at", real)
    rc, out, err = run_train(capsys, "--out", tmp_path / "c", *args)
    assert rc == 0 and "resuming" in out and "at step 8" in out
    assert same_log(tmp_path / "c" / "distill" / "log.jsonl") == ref


def test_a_log_line_cut_mid_write_is_repaired_by_the_same_command(tmp_path, capsys, monkeypatch):
    """a kill during a log write leaves half a line at the end of log.jsonl: the same command resumes and the log is
    valid JSON lines again, the same as an uninterrupted run's (with a checkpoint: from it; before the first
    checkpoint: a fresh run, whose first checkpoint replaces the log)"""
    args = ["--stage", "teacher", *TINY, "--epochs", 2, "--ckpt-every", 3]
    assert run_train(capsys, "--out", tmp_path / "a", *args)[0] == 0
    ref = same_log(tmp_path / "a" / "teacher" / "log.jsonl")
    real = checkpoint.write_log

    def killed_at(step):
        def write_log(path, text, mode):
            if f'"step": {step},' in text and mode == "a":
                with open(path, "a") as f:
                    f.write(text[:len(text) // 2])
                raise KeyboardInterrupt
            return real(path, text, mode)
        return write_log
    for run, step in (("b", 5), ("c", 2)):                                  # after the checkpoint of step 3; before
        monkeypatch.setattr(train, "write_log", killed_at(step))
        assert run_train(capsys, "--out", tmp_path / run, *args)[0] == 130
        with pytest.raises(json.JSONDecodeError):
            log(tmp_path / run / "teacher" / "log.jsonl")
        monkeypatch.setattr(train, "write_log", real)
        rc, out, err = run_train(capsys, "--out", tmp_path / run, *args)
        assert rc == 0 and ("resuming from" in out) == (step > 3), err
        assert same_log(tmp_path / run / "teacher" / "log.jsonl") == ref


def test_ddp_two_processes_gloo(tmp_path):
    teacher = tiny_teacher(tmp_path / "t.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train.py"), "--teacher", teacher, "--out", str(tmp_path / "r"), "--no-baseline",
           *map(str, TINY), "--batch-size", "8", "--distill-epochs", "2", "--finetune-epochs", "1"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| student: distilled") == 1                                 # rank 0 alone prints / writes
    ck = torch.load(tmp_path / "r" / "finetune" / "last.pt", weights_only=True)
    assert ck["world"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 4               # 64 images / (2 x 8) per step
    assert len(losses(tmp_path / "r" / "distill" / "log.jsonl")) == 8
    assert not list((tmp_path / "r").rglob("*.tmp*"))


def bad_case(tmp_path, case):
    if case == "missing folder":
        return ["--data", tmp_path / "nope"], "no such folder"
    if case == "empty folder":
        os.makedirs(tmp_path / "e" / "train")
        os.makedirs(tmp_path / "e" / "val")
        return ["--data", tmp_path / "e"], "no class sub-folders"
    if case == "empty class":
        root = write_tree(tmp_path / "d", corrupt=0)
        os.makedirs(os.path.join(root, "train", "emu"))
        return ["--data", root], "has no images"
    if case == "classes differ":
        root = write_tree(tmp_path / "d", corrupt=0)
        os.rename(os.path.join(root, "val", "fox"), os.path.join(root, "val", "owl"))
        return ["--data", root], "only in train ['fox'], only in val ['owl']"
    if case == "too many corrupt":
        return ["--data", write_tree(tmp_path / "d", corrupt=4), "--max-bad-frac", "0.01", "--recipe", "none"], \
            "could not be read"                                             # (repeated augmentation would see fewer)
    if case == "bad teacher":
        torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "t.pt")
        return ["--stage", "distill", "--teacher", tmp_path / "t.pt"], "could not load teacher"
    if case == "resolution":
        return ["--img-size", "18"], "not a multiple of the student patch size 4"
    if case == "preset":
        return ["--stage", "finetune", "--student", "huge"], "unknown student preset 'huge'"


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "empty class", "classes differ", "too many corrupt",
                                  "bad teacher", "resolution", "preset"])
def test_bad_input_gets_one_clear_line(tmp_path, capsys, case):
    extra, msg = bad_case(tmp_path, case)
    argv = [*TINY, "--out", tmp_path / "r", "--teacher-epochs", 1, "--batch-size", 4, *extra]
    if "--data" in extra:
        argv += ["--stage", "teacher", "--teacher-preset", "demo", "--epochs", 1, "--workers", 0]
    rc, out, err = run_train(capsys, *argv)
    assert rc == 2 and msg in one_error_line(err), err
    assert not list((tmp_path / "r").rglob("*.pt"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    args = ["--stage", "teacher", "--out", tmp_path / "r", *TINY, "--epochs", 2, "--ckpt-every", 1]
    assert run_train(capsys, *args, "--max-steps", 2)[0] == 0
    real = train.to_pixels
    monkeypatch.setattr(train, "to_pixels", lambda x, device: real(x, device) * float("inf"))   # a diverged step
    rc, out, err = run_train(capsys, *args)
    assert rc == 2 and "non-finite" in one_error_line(err) and "last good checkpoint" in err
    ck = torch.load(tmp_path / "r" / "teacher" / "last.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_resume_with_different_model_arguments_is_refused(tmp_path, capsys):
    args = ["--stage", "teacher", "--out", tmp_path / "r", *TINY, "--epochs", 2]
    assert run_train(capsys, *args, "--max-steps", 1)[0] == 0
    rc, _, err = run_train(capsys, *args, "--teacher-opts", "dim=48,depth=2,heads=2")
    assert rc == 2 and "different model arguments" in one_error_line(err) and "dim" in err
    assert torch.load(tmp_path / "r" / "teacher" / "last.pt", weights_only=True)["step"] == 1


def test_resume_takes_the_same_teacher_by_another_path_and_an_older_optimizer_state(tmp_path, capsys, monkeypatch):
    """the teacher given relative, then absolute, is the same file: the run resumes; and a checkpoint of an older
    train.py, whose optimizer groups have no 'lr_scale', resumes with this run's scales"""
    tiny_teacher(tmp_path / "t.pt")
    monkeypatch.chdir(tmp_path)
    args = ["--stage", "distill", "--out", tmp_path / "r", *TINY, "--epochs", 2]
    assert run_train(capsys, *args, "--teacher", "t.pt", "--max-steps", 2)[0] == 0
    path = tmp_path / "r" / "distill" / "last.pt"
    ck = torch.load(path, weights_only=True)
    for group in ck["optimizer"]["param_groups"]:
        del group["lr_scale"]
    torch.save(ck, path)
    rc, out, err = run_train(capsys, *args, "--teacher", tmp_path / "t.pt")
    assert rc == 0 and "at step 2" in out, err
    assert torch.load(path, weights_only=True)["finished"]
    assert run_train(capsys, *args, "--teacher", "t.pt", "--fresh", "--max-steps", 1)[0] == 0
    shutil.copy(tmp_path / "t.pt", tmp_path / "t2.pt")
    rc, _, err = run_train(capsys, *args, "--teacher", "t2.pt")                 # another file: refused
    assert rc == 2 and "different model arguments" in one_error_line(err)


def test_stage_all_checks_the_student_before_training_the_teacher(tmp_path, capsys):
    rc, _, err = run_train(capsys, "--out", tmp_path / "r", *TINY, "--student", "huge")
    assert rc == 2 and "unknown student preset 'huge'" in one_error_line(err)
    assert not (tmp_path / "r" / "teacher").exists()


def test_stage_teacher_uses_the_teacher_lr():
    default = train.get_parser().get_default
    assert train.parse_args(["--stage", "teacher"]).lr == default("teacher_lr") != default("lr")
    assert train.parse_args(["--stage", "teacher", "--lr", "2e-3"]).lr == 2e-3
    assert train.parse_args(["--stage", "distill"]).lr == default("lr")


def test_soft_target_loss_is_cross_entropy_with_smoothing(monkeypatch):
    args = train.parse_args([])
    monkeypatch.setattr(vl, "normalize", lambda x, model: x)                          # the "images" are the logits
    loss = train.supervised_loss(None, args, None)

    def model(x):
        return vl.Output(x, None, [])
    logits, y = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    soft = F.one_hot(y, 5).float() * (1 - 0.1) + 0.1 / 5
    assert torch.allclose(loss(model, logits, soft, 0)["loss"], F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(loss(model, logits, y, 0)["loss"], F.cross_entropy(logits, y, label_smoothing=0.1))


@pytest.mark.parametrize("kind", ["vit", "vision_mamba", "adventurer"])
def test_init_at_another_resolution_resizes_the_position_embedding_once(tmp_path, kind):
    torch.manual_seed(0)
    cfg = {"vit": vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=5),
           "vision_mamba": vl.MambaConfig(img_size=16, patch_size=4, dim=32, depth=2, d_state=4, num_classes=5,
                                          scan_backend="chunked"),
           "adventurer": replace(TINY_ADVENTURER, depth=2)}[kind]
    model = vl.build_model(cfg)
    with torch.no_grad():
        model.pos_embed.normal_()                                                       # a position table that matters
    torch.save(dict(kind=kind, config=dataclasses.asdict(cfg), model=model.state_dict()), tmp_path / "c.pt")
    args = train.parse_args(["--img-size", "32"])
    args.drop_path = None
    new = train.init_from(str(tmp_path / "c.pt"), args, 5, kinds=(kind,))
    assert new.cfg.img_size == 32 and new.pos_embed.shape[1] == (0 if kind == "vision_mamba" else 1) + 64
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    new.eval()
    with torch.no_grad():                                                               # = the old model resampling
        assert torch.allclose(new(x).logits, model(x).logits, atol=1e-5)                # on the fly at 32 px
    with pytest.raises(distributed.UserError, match="holds a"):
        train.init_from(str(tmp_path / "c.pt"), args, 5, kinds=("vit",) if kind != "vit" else train.STUDENT_KINDS)


ADVENTURER = ["--student", "adventurer_demo", "--student-opts", "dim=16,depth=2,d_state=4,headdim=8,chunk_size=8"]


def test_adventurer_student_distills_resumes_finetunes_and_evaluates(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    args = ["--stage", "distill", "--teacher", teacher, *TINY, *ADVENTURER, "--epochs", 2, "--drop-path", 0.1,
            "--ckpt-every", 2, "--log-every", 2]
    assert run_train(capsys, "--out", tmp_path / "a", *args)[0] == 0                   # uninterrupted: 8 steps
    ref = same_log(tmp_path / "a" / "distill" / "log.jsonl")
    assert [r["step"] for r in ref] == [2, 4, 6, 8, 8] and all(math.isfinite(r["am"]) for r in ref[:-1])
    assert run_train(capsys, "--out", tmp_path / "b", *args, "--max-steps", 3)[0] == 0     # stopped, then resumed
    rc, out, err = run_train(capsys, "--out", tmp_path / "b", *args)
    assert rc == 0 and "resuming" in out, err
    assert same_log(tmp_path / "b" / "distill" / "log.jsonl") == ref
    ck = torch.load(tmp_path / "a" / "distill" / "last.pt", weights_only=True)
    assert ck["kind"] == "adventurer" and ck["config"]["flip"] == "public" and ck["config"]["dim"] == 16
    assert ck["config"]["drop_path"] == 0.1 and "layers.1.mixer.in_proj.weight" in ck["model"]
    # fine-tuned from the distilled student; eval.py gives the accuracy the run measured at its end
    rc, out, err = run_train(capsys, "--out", tmp_path / "a", "--stage", "finetune", *TINY, *ADVENTURER,
                             "--init", tmp_path / "a" / "distill" / "last.pt", "--epochs", 1)
    assert rc == 0, err
    ft = torch.load(tmp_path / "a" / "finetune" / "last.pt", weights_only=True)
    assert ft["kind"] == "adventurer" and ft["finished"]
    for k, v in ck["model"].items():                                                   # it started from the distilled
        if k.startswith("layers."):                                                    # weights (and trained them)
            assert v.shape == ft["model"][k].shape
    assert not torch.equal(ft["model"]["layers.0.mixer.in_proj.weight"], ck["model"]["layers.0.mixer.in_proj.weight"])
    capsys.readouterr()
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "a" / "finetune" / "last.pt")]) == 0
    assert f"top-1 {ft['metrics']['top1']:.2f}" in capsys.readouterr().out


def test_released_adventurer_file_for_init_and_eval(tmp_path, capsys):
    """A file as the public Adventurer code saves it ({"model": its state dict, "args": its Namespace, ...}, no mask
    token) is taken by --init (at another resolution and class count) and by eval.py."""
    torch.manual_seed(0)
    public = vl.Adventurer(replace(TINY_ADVENTURER, img_size=8, dim=32, depth=2))
    with torch.no_grad():
        public.pos_embed.normal_()
    sd = {k: v for k, v in public.state_dict().items() if k != "mask_token"}
    torch.save({"model": sd, "args": argparse.Namespace(model="adventurer_tiny_patch16"), "epoch": 299},
               tmp_path / "released.pth")
    model, _ = evaluate_cli.load_model(str(tmp_path / "released.pth"))
    assert isinstance(model, vl.Adventurer) and model.cfg.img_size == 8 and model.cfg.num_classes == 5
    args = train.parse_args(["--img-size", "16"])
    new = train.init_from(str(tmp_path / "released.pth"), args, 3, kinds=train.STUDENT_KINDS)
    assert new.cfg.img_size == 16 and new.head.weight.shape == (3, 32)
    assert torch.equal(new.pos_embed[:, -1], public.pos_embed[:, -1])                  # the class slot, last, kept
    torch.testing.assert_close(new.pos_embed[:, :16], vl.resize_pos_embed(public.pos_embed[:, :4], (4, 4)))
    rc, out, err = run_train(capsys, "--stage", "finetune", *TINY, "--init", tmp_path / "released.pth", "--epochs", 1,
                             "--out", tmp_path / "run")
    assert rc == 0 and "position embeddings resized from 2x2 to 4x4" in out, err
    assert torch.load(tmp_path / "run" / "finetune" / "last.pt", weights_only=True)["kind"] == "adventurer"
    with pytest.raises(distributed.UserError, match="holds a adventurer model"):
        train.init_from(str(tmp_path / "released.pth"), args, 3, kinds=("vit",))


def test_adventurer_student_opts_and_the_demos_vim_opts(tmp_path, capsys):
    args = train.parse_args([])                                                         # the demo: Adventurer
    assert (args.student, args.student_opts) == ("adventurer_demo", "")
    assert train.parse_args(["--student", "demo"]).student_opts == "dim=64,depth=4,d_state=8"       # the Vim one
    assert train.parse_args(["--student", "demo", "--student-opts", ""]).student_opts == ""
    assert train.parse_args(["--data", str(tmp_path), "--student", "demo"]).student_opts == ""
    cfg = train.student_config(train.parse_args(["--student", "adventurer_demo", "--student-opts", "flip=alternate"]),
                               10)
    assert isinstance(cfg, vl.AdventurerConfig) and cfg.flip == "alternate" and cfg.dim == 48
    model = vl.Adventurer(TINY_ADVENTURER)                                              # sin-cos rows: the grid's,
    cls = model.pos_embed[0, -1].clone()                                               # the class slot (last) kept
    vl.sincos_pos_init_(model)
    assert torch.equal(model.pos_embed[0, -1], cls)
    assert torch.equal(model.pos_embed[0, 0, :8], torch.tensor([0.0] * 4 + [0.5] * 4))  # patch (0, 0): sin 0, cos 0
    for opts, words in (("flip=sideways", "flip='sideways'"), ("scan_backend=triton", "scan_backend"),
                        ("headdim=7", "headdim 7")):
        rc, _, err = run_train(capsys, "--student", "adventurer_demo", "--student-opts", opts, "--stage", "finetune",
                               "--out", tmp_path / "run")
        assert rc != 0 and words in one_error_line(err) and not (tmp_path / "run").exists(), err


def test_recipes_defaults_precedence_and_printout():
    demo = train.parse_args([])
    assert demo.recipe == "none" and demo.mixup == 0 and demo.aa == "none" and demo.repeated_aug == 1
    a = train.parse_args(["--data", "d"])
    assert (a.recipe == "deit"
            and (a.mixup, a.cutmix, a.label_smoothing, a.blr, a.weight_decay) == (0.8, 1.0, 0.1, 5e-4, 0.05))
    fin, dis = train.for_stage(a, "finetune"), train.for_stage(a, "distill")
    assert ((fin.aa, fin.erase_prob, fin.repeated_aug, fin.ema_decay, fin.drop_path)
            == ("rand-m9-mstd0.5-inc1", 0.25, 3, 0.99996, 0.1))
    assert (dis.aa, dis.erase_prob, dis.repeated_aug, dis.ema_decay, dis.drop_path) == ("none", 0.0, 1, 0.0, None)
    assert train.for_stage(a, "teacher").drop_path == 0.1
    b = train.parse_args(["--data", "d", "--mixup", "0.2", "--aa", "none", "--hflip", "0.5", "--batch-size", "8"])
    assert b.mixup == 0.2 and b.aa == "none" and b.cutmix == 1.0                        # command line > recipe
    text = "\n".join(train.describe_recipe(b))
    assert "recipe deit (default)" in text and "mixup=0.2 (recipe: 0.8)" in text and "hflip=0.5 (recipe: 0.5)" in text
    assert ("cutmix=1.0" in text.split("the command line changed")[0]
            and "batch_size=8" in text.split("from the command line")[1])
    c = train.parse_args(["--data", "d", "--recipe", "adventurer-ft", "--stage", "finetune"])
    assert (c.lr, c.min_lr, c.img_size, c.finetune_epochs, c.weight_decay, c.amp) == (1e-5, 1e-5, 224, 20, 0.1, "bf16")
    assert train.for_stage(c, "finetune").drop_path == 0.6 and c.repeated_aug == 1
    d = train.parse_args(["--data", "d", "--recipe", "adventurer-128"])
    assert (d.img_size, d.aa["finetune"], d.erase_prob, d.label_smoothing) == (128, "3augment", 0.0, 0.0)
    assert train.parse_args(["--data", "d", "--recipe", "mae-ft"]).layer_decay == 0.75
    assert train.parse_args(["--data", "d", "--recipe", "none"]).mixup == 0
    assert "not public" in train.get_parser().format_help().replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize("flags, msg", [(["--aa", "rand-x9"], "is not a RandAugment spec"),
                                        (["--erase-prob", "1.5"], "--erase-prob 1.5: must be between 0 and 1"),
                                        (["--repeated-aug", "0"], "--repeated-aug 0"),
                                        (["--layer-decay", "0"], "--layer-decay 0.0"),
                                        (["--ema-decay", "1"], "--ema-decay 1.0"),
                                        (["--mixup", "-1"], "--mixup -1.0")])
def test_bad_recipe_flags_get_one_clear_line(tmp_path, capsys, flags, msg):
    rc, _, err = run_train(capsys, *TINY, "--out", tmp_path / "r", *flags)
    assert rc == 2 and msg in one_error_line(err)
    assert not (tmp_path / "r").exists()


AUG = ["--aa", "rand-m9-mstd0.5-inc1", "--erase-prob", "0.5", "--mixup", "0.8", "--cutmix", "1.0",
       "--repeated-aug", "3", "--ema-decay", "0.99", "--layer-decay", "0.75"]


def test_resume_with_every_augmentation_and_ema_follows_the_uninterrupted_run(tmp_path, capsys):
    root = write_tree(tmp_path / "d", n=6, corrupt=0)
    args = ["--data", root, "--stage", "finetune", *TINY, "--batch-size", 4, "--epochs", 2, "--workers", 0,
            "--threads", 1, "--student-opts", "dim=32,depth=2,d_state=4,scan_backend=chunked", "--ckpt-every", 2, *AUG]
    assert run_train(capsys, "--out", tmp_path / "a", *args)[0] == 0
    ref = losses(tmp_path / "a" / "finetune" / "log.jsonl")
    assert len(ref) == 8                                                                # 18 images // 4 x 2 epochs
    assert run_train(capsys, "--out", tmp_path / "b", *args, "--max-steps", 3)[0] == 0
    rc, out, _ = run_train(capsys, "--out", tmp_path / "b", *args)
    assert rc == 0 and "resuming" in out
    assert losses(tmp_path / "b" / "finetune" / "log.jsonl") == ref
    a, b = (torch.load(tmp_path / r / "finetune" / "last.pt", weights_only=True) for r in "ab")
    assert a["ema_updates"] == b["ema_updates"] == 8
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])               # EMA restored on resume
    assert not all(torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])
    assert {"ema_top1", "ema_top5", "top1"} <= set(a["metrics"])
    groups = a["optimizer"]["param_groups"]                                              # layer decay in the schedule
    assert {round(g["lr"] / g["lr_scale"], 12) for g in groups} == {round(groups[0]["lr"] / groups[0]["lr_scale"], 12)}
    assert min(g["lr_scale"] for g in groups) == 0.75 ** 3


def write_digits(root, size=32, n=None, val_frac=0.25, seed=0):
    """scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey levels, 10 classes) as an ImageNet-layout folder of real
    files: upscaled to size x size (bicubic), saved in turn as grayscale JPEG, RGB PNG, palette PNG and CMYK JPEG,
    split at random into val (val_frac) and train. n: only the first n of a seeded shuffle."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:n]
    n_val = round(val_frac * len(order))
    formats = [("L", "jpg"), ("RGB", "png"), ("P", "png"), ("CMYK", "jpg")]
    for k, i in enumerate(order):
        folder = os.path.join(root, "val" if k < n_val else "train", str(digits.target[i]))
        os.makedirs(folder, exist_ok=True)
        im = Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
        mode, ext = formats[k % len(formats)]
        im.convert(mode).save(os.path.join(folder, f"{i}.{ext}"))
    return str(root)


def test_digits_folder_teacher_distill_finetune_with_every_augmentation(tmp_path, capsys):
    """real files (JPEG / PNG / palette / CMYK) through train.py's command line with every augmentation on, then
    eval.py"""
    root = write_digits(tmp_path / "digits", size=16, n=400)
    modes = {Image.open(p).mode for p in (tmp_path / "digits").rglob("*.*")}
    assert modes == {"L", "RGB", "P", "CMYK"}
    common = ["--data", root, "--out", tmp_path / "r", "--img-size", 16, "--batch-size", 32, "--workers", 1,
              "--threads", 1, "--log-every", 1, "--warmup-epochs", 0.5, "--stages", 2, *AUG]
    rc, out, err = run_train(capsys, *common, "--stage", "teacher", "--teacher-preset", "demo", "--epochs", 3,
                             "--teacher-opts", "dim=32,depth=2,heads=2", "--lr", "2e-3")
    assert rc == 0, err
    assert "recipe deit (default)" in out and "mixup=0.8 (recipe: 0.8)" in out
    teacher = str(tmp_path / "r" / "teacher" / "last.pt")
    student = ["--student", "demo", "--student-opts", "dim=32,depth=2,d_state=4,scan_backend=chunked", "--lr", "2e-3"]
    rc, out, err = run_train(capsys, *common, "--stage", "distill", "--teacher", teacher, "--epochs", 1, *student)
    assert rc == 0, err
    rc, out, err = run_train(capsys, *common, "--stage", "finetune", "--init", tmp_path / "r" / "distill" / "last.pt",
                             "--epochs", 2, *student)
    assert rc == 0, err
    ck = torch.load(tmp_path / "r" / "finetune" / "last.pt", weights_only=True)
    assert ck["finished"] and ck["classes"] == [str(c) for c in range(10)]
    assert (ck["args"]["aa"], ck["args"]["repeated_aug"], ck["args"]["erase_prob"]) == ("rand-m9-mstd0.5-inc1", 3, 0.5)
    tk = torch.load(teacher, weights_only=True)
    for stage in ("teacher", "distill", "finetune"):
        assert all(math.isfinite(v) for v in losses(tmp_path / "r" / stage / "log.jsonl").values())
    capsys.readouterr()                                                                  # eval.py on the val folder
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "finetune" / "last.pt"), "--data", root]) == 0
    assert f"top-1 {ck['metrics']['top1']:.2f}" in capsys.readouterr().out
    assert evaluate_cli.main(["--ckpt", teacher, "--data", root, "--ema"]) == 0
    assert f"top-1 {tk['metrics']['ema_top1']:.2f}" in capsys.readouterr().out
    assert evaluate_cli.main(["--ckpt", teacher, "--data", root, "--img-size", "32", "--crop-ratio", "1.0"]) == 0
    assert "32 px" in capsys.readouterr().out


def test_progressive_resolution_from_the_command_line(tmp_path, capsys):
    """a 16 px student continues at 32 px (--init, position embeddings resized), then eval.py runs it at 64 px"""
    common = [*TINY, "--stage", "finetune", "--epochs", 1, "--batch-size", 32]
    assert run_train(capsys, "--out", tmp_path / "r", *common, "--name", "s16")[0] == 0
    rc, out, err = run_train(capsys, "--out", tmp_path / "r", *common, "--name", "s32", "--img-size", 32,
                             "--init", tmp_path / "r" / "s16" / "last.pt", "--drop-path", 0.2)
    assert rc == 0, err
    assert "position embeddings resized from 4x4 to 8x8 patches" in out
    ck = torch.load(tmp_path / "r" / "s32" / "last.pt", weights_only=True)
    assert (ck["config"]["img_size"] == 32 and ck["config"]["drop_path"] == 0.2
            and ck["model"]["pos_embed"].shape[1] == 64)
    capsys.readouterr()
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "s32" / "last.pt"), "--img-size", "64"]) == 0
    assert "64 px" in capsys.readouterr().out
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "s32" / "last.pt"), "--img-size", "30"]) == 2
    assert "not a multiple of the model patch size 4" in one_error_line(capsys.readouterr().err)
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "s32" / "last.pt"), "--crop-ratio", "0"]) == 2
    assert "--crop-ratio 0.0: must be > 0 and <= 1" in one_error_line(capsys.readouterr().err)


SHORT = [*TINY, "--teacher-epochs", 1, "--distill-epochs", 1, "--finetune-epochs", 1]   # stage all in a few seconds


BAD_TRAIN_FLAGS = [  # (extra argv, words the error line must contain)
    (["--img-size", 0], "--img-size 0"), (["--img-size", -8], "--img-size -8"), (["--batch-size", 0], "--batch-size 0"),
    (["--ckpt-every", 0], "--ckpt-every 0"), (["--log-every", 0], "--log-every 0"), (["--workers", -1], "--workers -1"),
    (["--mask-ratio", 1.5], "--mask-ratio 1.5"), (["--stages", 0], "--stages 0"),
    (["--stages", 3], "use 1 <= --stages <= 2"), (["--lr", -1], "--lr -1"),
    (["--stage", "teacher", "--epochs", 0], "--epochs 0"), (["--stage", "teacher", "--epochs", -2], "--epochs -2"),
    (["--lr", "nan"], "--lr nan"), (["--blr", "inf"], "--blr inf"), (["--teacher-lr", 0], "--teacher-lr 0"),
    (["--min-lr", -1], "--min-lr -1"), (["--min-lr", 1], "--min-lr 1.0 is above --lr"),
    (["--warmup-epochs", -1], "--warmup-epochs -1"), (["--weight-decay", -0.1], "--weight-decay -0.1"),
    (["--clip-grad", -1], "--clip-grad -1"), (["--lam", -1], "--lam -1"), (["--am-weight", -1], "--am-weight -1"),
    (["--lam", 0, "--am-weight", 0], "no distillation loss"), (["--label-smoothing", 1], "--label-smoothing 1"),
    (["--kd-weight", 2], "--kd-weight 2"), (["--kd-temp", 0], "--kd-temp 0"), (["--drop-path", 1], "--drop-path 1"),
    (["--max-bad-frac", 1.5], "--max-bad-frac 1.5"), (["--eval-every", -1], "--eval-every -1"),
    (["--max-steps", 0], "--max-steps 0"), (["--threads", 0], "--threads 0"), (["--seed", -1], "--seed -1"),
    (["--demo-seed", -1], "--demo-seed -1"), (["--demo-train", 0], "--demo-train 0"),
    (["--demo-val", 0], "--demo-val 0"), (["--demo-teacher-train", -1], "--demo-teacher-train -1"),
    (["--teacher-epochs", 0], "--teacher-epochs 0"),
    (["--distill-epochs", 0], "--distill-epochs 0"), (["--finetune-epochs", -1], "--finetune-epochs -1"),
    (["--epochs", 2], "--epochs (stage all:"), (["--name", "x"], "--name applies to a single --stage"),
    (["--init", "x.pt"], "--init starts a single --stage (teacher, distill or finetune)"),
    (["--stage", "finetune", "--kd-weight", 0.5], "--kd-weight needs --teacher"),
    (["--fresh", "--resume", "x.pt"], "--fresh starts over and --resume x.pt continues"),
    (["--student-opts", "dim=-4"], "--student-opts dim=-4: must be a whole number > 0"),
    (["--student-opts", "dim=abc"], "--student-opts dim='abc': must be a whole number > 0"),
    (["--student-opts", "bidirectional=maybe"], "must be one of fused, alternate"),
    (["--student-opts", "dimm=3"], "student config has no field(s) ['dimm']"),
    (["--teacher-opts", "dim=32,depth=2,heads=3"], "dim 32 is not a multiple of heads 3"),
]


@pytest.mark.parametrize("extra,words", BAD_TRAIN_FLAGS, ids=[" ".join(map(str, e)) for e, _ in BAD_TRAIN_FLAGS])
def test_bad_train_flags_get_one_line_and_write_nothing(tmp_path, capsys, extra, words):
    rc, out, err = run_train(capsys, *SHORT, "--out", tmp_path / "r", *extra)
    assert rc == 2 and words in one_error_line(err), err
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("log.jsonl"))


def bad_file(tmp_path, kind):
    """a file argument that is not what the flag needs"""
    path = tmp_path / "f.pt"
    if kind == "missing":
        return path, "no such file"
    if kind == "folder":
        path.mkdir()
        return path, "is a folder"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if kind == "text":
        path.write_text("not a checkpoint\n")
        return path, "could not"
    if kind == "student":                                   # a checkpoint of another model
        torch.save(dict(kind="vision_mamba", config=dataclasses.asdict(TINY_STUDENT),
                        model=vl.VisionMamba(TINY_STUDENT).state_dict()), path)
        return path, "VisionMamba"
    if kind == "incomplete teacher":                        # a timm file that lost a tensor
        torch.save({k: v for k, v in random_vit_state_dict().items() if k != "pos_embed"}, path)
        return path, "has no 'pos_embed'"
    if kind == "image":                                     # e.g. a tab-completed cat.png
        Image.new("RGB", (8, 8)).save(path, format="PNG")
        return path, "it is a PNG image"
    if kind == "truncated":                                 # an interrupted copy
        torch.save(random_vit_state_dict(), path)
        path.write_bytes(path.read_bytes()[:-100])
        return path, "truncated or damaged zip archive"


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "student", "incomplete teacher", "image",
                                  "truncated"])
@pytest.mark.parametrize("flag", ["--teacher", "--init", "--resume", "eval --ckpt"])
def test_bad_file_arguments_get_one_line(tmp_path, capsys, flag, kind):
    path, words = bad_file(tmp_path, kind)
    if flag == "eval --ckpt":
        capsys.readouterr()
        rc, err = evaluate_cli.main(["--ckpt", str(path)]), capsys.readouterr().err
    else:
        stage = {"--teacher": "distill", "--init": "finetune", "--resume": "teacher"}[flag]
        rc, _, err = run_train(capsys, *TINY, "--stage", stage, "--epochs", 1, "--out", tmp_path / "r", flag, path)
    if flag in ("--init", "--resume") and kind in ("student", "incomplete teacher"):
        words = "not a checkpoint written by train.py" if flag == "--init" else "not a training checkpoint of train.py"
        if kind == "student" and flag == "--init":                                     # a fine start for a student
            assert rc == 0, err
            return
    if flag == "eval --ckpt" and kind == "student":
        words = "was not trained on the demo"
    if flag in ("--teacher", "eval --ckpt") and kind == "folder":                     # a teacher may be a Hub folder
        words = "holds none of"
    assert rc == 2 and words in one_error_line(err), err
    assert "KeyError" not in err and not list((tmp_path / "r").rglob("*.pt"))


def test_unreadable_files_and_folders_get_one_line(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    os.chmod(teacher, 0)
    (tmp_path / "file").write_text("x")
    cases = [(["--stage", "distill", "--teacher", teacher], "cannot read it (Permission denied)"),
             (["--out", tmp_path / "file"], "is a file: give a folder"),
             (["--out", tmp_path / "file" / "sub"], "cannot write there"),
             (["--data", tmp_path / "file"], "--data " + str(tmp_path / "file") + ": not a folder")]
    root = write_tree(tmp_path / "d", corrupt=0)
    os.chmod(tmp_path / "d" / "train" / "dog", 0)
    (tmp_path / "w").mkdir(mode=0o777)
    os.chmod(tmp_path / "w", 0o777)
    cases.append((["--data", root, "--stage", "teacher", "--teacher-preset", "demo", "--epochs", 1, "--out",
                   tmp_path / "w"], f"class folder {os.path.join(root, 'train', 'dog')}: cannot read it (Permission"))
    root = os.geteuid() == 0
    for extra, words in cases:
        if root and "Permission" in words:
            for folder in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
                os.chmod(folder, 0o755)
            os.seteuid(65534)                                   # root reads anything: test as an ordinary user
        try:
            rc, _, err = run_train(capsys, *TINY, "--out", tmp_path / "r", *extra) if "--out" not in extra else \
                run_train(capsys, *TINY, *extra)
        finally:
            if root:
                os.seteuid(0)
        assert rc == 2 and words in one_error_line(err), err
    for cli, argv, words in (
            (evaluate_cli, ["--ckpt", str(tmp_path / "t.pt"), "--data", str(tmp_path / "file")], "not a folder"),
            (bench, ["--runs", str(tmp_path / "file")], "--runs " + str(tmp_path / "file") + ": not a folder"),
            (bench, ["--plot", "--csv", str(tmp_path / "file"), "--out", str(tmp_path / "file")],
             "is a file: give a folder")):
        capsys.readouterr()
        assert cli.main(argv) == 2 and words in one_error_line(capsys.readouterr().err)


def test_fresh_keeps_the_old_record_until_the_new_run_has_a_checkpoint(tmp_path, capsys, monkeypatch):
    root = tmp_path / "ablation"
    args = ["--stage", "finetune", *TINY, "--epochs", 1, "--out", root / "cfg-s0"]
    assert run_train(capsys, *args)[0] == 0
    run_dir = root / "cfg-s0" / "finetune"
    before = (run_dir / "log.jsonl").read_bytes(), (run_dir / "last.pt").read_bytes()
    top1 = bench.final_top1(run_dir)
    assert top1 is not None
    real = train.lr_at

    def die_at_step_1(step, *a):
        if step == 1:
            raise MemoryError("killed")
        return real(step, *a)
    monkeypatch.setattr(train, "lr_at", die_at_step_1)
    with pytest.raises(MemoryError):                                                  # a fresh run dies at step 1
        run_train(capsys, *args, "--fresh", "--seed", 1)
    assert ((run_dir / "log.jsonl").read_bytes(), (run_dir / "last.pt").read_bytes()) == before
    assert bench.main(["--runs", str(root)]) == 0 and f"| cfg | 1 | {top1:.1f} |" in capsys.readouterr().out
    monkeypatch.setattr(train, "lr_at", real)
    assert run_train(capsys, *args, "--fresh", "--seed", 1)[0] == 0                    # its replacement exists: swapped
    assert (run_dir / "log.jsonl").read_bytes() != before[0] and not list(run_dir.glob("log.jsonl.*"))
    assert torch.load(run_dir / "last.pt", weights_only=True)["args"]["seed"] == 1


def test_a_batch_with_no_readable_image_is_skipped_and_counted(tmp_path, capsys):
    root = write_tree(tmp_path / "d", corrupt=1)                                       # 12 good images, 1 bad one
    rc, out, err = run_train(capsys, "--data", root, "--out", tmp_path / "r", "--stage", "teacher", "--epochs", 1,
                             "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2", "--img-size", 16,
                             "--batch-size", 1, "--workers", 0, "--log-every", 1, "--max-bad-frac", 0.5,
                             "--recipe", "none")
    assert rc == 0, err
    assert "skipped 1 unreadable image(s) of 13" in err and "1 batch(es) with no readable image skipped" in err
    ck = torch.load(tmp_path / "r" / "teacher" / "last.pt", weights_only=True)
    assert ck["finished"] and ck["step"] == 12                                         # 13 batches, 12 updates


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_a_rank_with_no_readable_image_takes_a_weightless_step_in_step_with_the_others(tmp_path, stage):
    """two processes, one image each per step, 5 of 17 images unreadable: a rank whose batch is empty while the other's
    is not steps on a stand-in whose loss weighs nothing (with labels, and without: distillation), so that both ranks
    take every step of the epoch and the run finishes"""
    root = write_tree(tmp_path / "d", corrupt=5)
    wrapper = tmp_path / "count_empty.py"                                   # records each rank's empty batches
    wrapper.write_text(f"""import json, os, sys
sys.path.insert(0, {HERE!r})
import data, train
empty = []
real = data.BadImages.add_batch
def add_batch(self, n_good, errors, ctx):
    empty.append(real(self, n_good, errors, ctx))
    return empty[-1]
data.BadImages.add_batch = add_batch
rc = train.main()
with open(os.path.join({str(tmp_path)!r}, "empty" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(empty, f)
sys.stdout.flush(), sys.stderr.flush()
os._exit(rc)
""")    # os._exit: no interpreter teardown, where torch's gloo aborts now and then (SIGABRT, "terminate called
        # without an active exception"; about 1 launch in 50 here) after main has returned and its files are written
    teacher = ["--teacher", tiny_teacher(tmp_path / "t.pt")] if stage == "distill" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "--data", root, "--stage", stage, *teacher, "--out", str(tmp_path / "r"), "--epochs", "2",
           "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2", "--student", "demo",
           "--student-opts", "dim=32,depth=2,d_state=4,scan_backend=chunked", "--stages", "2", "--img-size", "16",
           "--batch-size", "1", "--workers", "0", "--log-every", "1", "--max-bad-frac", "0.5", "--recipe", "none"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "unreadable image(s) of" in p.stderr and "(rank 0's share)" in p.stderr              # rank 0's counts
    e0, e1 = (json.load(open(tmp_path / f"empty{r}.json")) for r in (0, 1))
    assert len(e0) == len(e1) == 2 * 8                                                # 17 images / 2 per step, 2 epochs
    assert any(a != b for a, b in zip(e0, e1))                                        # the case under test happened
    ck = torch.load(tmp_path / "r" / stage / "last.pt", weights_only=True)
    assert ck["finished"] and ck["step"] == 16
    lines = [r for r in log(tmp_path / "r" / stage / "log.jsonl") if "loss" in r]     # --log-every 1: a line for each
    assert [r["step"] for r in lines] == [i + 1 for i, (a, b) in enumerate(zip(e0, e1)) if not (a and b)]  # step
    assert all(math.isfinite(r["loss"]) for r in lines)                               # with an image on some rank


def test_an_error_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    wrapper = tmp_path / "rank1_fails.py"                                   # rank 1 alone finds too many bad images
    wrapper.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import data, distributed, train
if os.environ["RANK"] == "1":
    real = data.BadImages.add
    def add(self, n_good, errors):
        real(self, n_good, errors)
        if self.seen > 8:
            raise distributed.UserError("40 of 50 images could not be read (more than --max-bad-frac 0.01); "
                                        "first: x.JPEG")
    data.BadImages.add = add
sys.exit(train.main())
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "--stage", "teacher", "--out", str(tmp_path / "r"), *map(str, TINY), "--batch-size", "4", "--epochs", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    lines = [l for l in p.stderr.splitlines() if l.startswith("error")]
    assert p.returncode != 0 and lines == ["error: 40 of 50 images could not be read (more than --max-bad-frac 0.01); "
                                           "first: x.JPEG (rank 1)"], p.stderr[-3000:]
    # no worker traceback
    assert 'train.py", line' not in p.stderr and "gloo" not in p.stderr.lower(), p.stderr[-3000:]
    assert not list((tmp_path / "r").rglob("*.tmp*"))


def test_sigterm_stops_the_run_like_ctrl_c_and_the_same_command_resumes(tmp_path, capsys):
    """SIGTERM to the whole process group (as a scheduler sends it; DataLoader workers included) during training:
    one line within seconds, exit code 143, no traceback; the same command continues from the last checkpoint"""
    root = write_tree(tmp_path / "d", corrupt=0)
    wrapper = tmp_path / "slow_log.py"                                  # slow log lines: a run that lasts a while
    wrapper.write_text(f"""import sys, time
sys.path.insert(0, {HERE!r})
import train
real = train.log
train.log = lambda *a: (real(*a), time.sleep(0.3))
sys.exit(train.main())
""")
    args = ["--data", root, "--out", tmp_path / "r", "--stage", "teacher", "--epochs", 3, "--teacher-preset", "demo",
            "--teacher-opts", "dim=32,depth=2,heads=2", "--img-size", 16, "--batch-size", 4, "--workers", 1,
            "--log-every", 1, "--ckpt-every", 1, "--recipe", "none"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(wrapper), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    ckpt = tmp_path / "r" / "teacher" / "last.pt"
    t = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t < 120:
        time.sleep(0.02)
    t = time.time()
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert time.time() - t < 10 and p.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM): run the same command again" in err and "Traceback" not in err, err[-3000:]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 1 <= step < 9 and not list(ckpt.parent.glob("*.tmp*"))
    rc, out, err = run_train(capsys, *args)
    assert rc == 0 and f"resuming from {ckpt} at step {step}" in out, err
    assert [r["step"] for r in log(ckpt.parent / "log.jsonl") if "loss" in r] == list(range(1, 10))


def full_disk_save(real, fail_at):
    """torch.save that fails like a full disk from its fail_at-th call on: part of the file written, then ENOSPC
    (torch raises OSError through a Python file object, a RuntimeError of its own when it opens the path itself)"""
    calls = []

    def save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) < fail_at:
            return real(obj, f, *a, **kw)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04" + b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_a_full_disk_says_so_in_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk_save(torch.save, fail_at=3))
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 2, "--ckpt-every", 1,
                           "--out", tmp_path / "r")
    assert rc == 2 and "disk full while writing" in one_error_line(err), err
    run_dir = tmp_path / "r" / "teacher"
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 2             # the 2nd checkpoint, intact
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "last.pt", "log.jsonl"]   # no partial file
    # a log line that the full disk cuts off half-way is cut off again: the log stays valid JSON lines
    before = (run_dir / "log.jsonl").read_text()

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r": HalfWritten(open(path, mode)), raising=False)
    with pytest.raises(distributed.UserError, match="disk full while writing"):
        checkpoint.write_log(str(run_dir / "log.jsonl"), json.dumps({"step": 99, "loss": 1.0}) + "\n", "a")
    assert (run_dir / "log.jsonl").read_text() == before


def test_a_full_disk_at_the_start_or_in_a_json_write_gets_one_line(tmp_path, capsys, monkeypatch):
    """the run folder's lock (the first write of a run) and the JSON results (results.json, eval.py's probe.json)"""
    real_open = open

    def full(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "r" not in mode or "+" in mode:
            def write(text):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f
    monkeypatch.setattr(checkpoint, "open", full, raising=False)
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "r")
    assert rc == 2 and "disk full while writing " + str(tmp_path / "r" / "teacher" / ".lock") in one_error_line(err)
    with pytest.raises(distributed.UserError, match="disk full while writing .*results.json"):
        checkpoint.save_json(str(tmp_path / "results.json"), {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]                        # no partial file


def test_partial_files_of_a_killed_write_are_removed(tmp_path, capsys):
    run_dir = tmp_path / "r" / "teacher"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt.tmp4242").write_bytes(b"PK\x03\x04" + b"\0" * 1000)          # kill -9 during a write
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "r")
    assert rc == 0 and "removed" in err and "last.pt.tmp4242" in err
    assert not list(run_dir.glob("*.tmp*"))


def test_checkpoints_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save_checkpoint(str(tmp_path / "last.pt"), {"w": torch.ones(3)})
    tmp = str(tmp_path / f"last.pt.tmp{os.getpid()}")
    assert events.index(("fsync", tmp)) < events.index(("rename", tmp)) < events.index(("fsync", str(tmp_path)))
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.ones(3))


def test_a_second_run_on_the_same_folder_gets_one_line(tmp_path, capsys):
    import fcntl
    run_dir = tmp_path / "r" / "teacher"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:                                        # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on otherhost\n")
        held.flush()
        rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "r")
        assert rc == 2 and "in use by another run (pid 4242 on otherhost)" in one_error_line(err)
        assert not (run_dir / "log.jsonl").exists() and not (run_dir / "last.pt").exists()
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "r")
    assert rc == 0, err                                                                # released: the folder is free


def test_misleading_messages_name_the_right_thing(tmp_path, capsys, monkeypatch):
    # --resume FILE with another model names FILE, not this run's folder
    assert run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 2, "--max-steps", 1,
                     "--out", tmp_path / "a")[0] == 0
    other = tmp_path / "a" / "teacher" / "last.pt"
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 2, "--out", tmp_path / "b",
                           "--resume", other, "--teacher-opts", "dim=48,depth=2,heads=2")
    assert rc == 2 and f"cannot resume {other} with different model arguments" in one_error_line(err)
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 2, "--out", tmp_path / "a",
                           "--batch-size", 8)
    assert rc == 2 and "cannot resume with another global batch (16 -> 8)" in one_error_line(err)
    # a non-finite loss before any checkpoint: no "kept the last good checkpoint"
    real = train.to_pixels
    monkeypatch.setattr(train, "to_pixels", lambda x, device: real(x, device) * float("inf"))
    rc, _, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "c")
    line = one_error_line(err)
    assert rc == 2 and "no checkpoint of this run was written yet" in line and "kept" not in line
    monkeypatch.setattr(train, "to_pixels", real)
    # patch sizes that differ: the message names the student options that match the teacher
    rc, _, err = run_train(capsys, "--stage", "distill", "--teacher", tiny_teacher(tmp_path / "t.pt"), *TINY,
                           "--student", "tiny", "--out", tmp_path / "d")
    assert rc == 2 and "add patch_size=4 to --student-opts or use --student demo" in one_error_line(err)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")                  # torch's own note on --workers 3
def test_threads_and_workers_are_chosen_on_purpose(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)   # a 2-core box
    assert train.parse_args([]).threads == train.DEMO_THREADS == 1                    # the demo: fixed, reproducible
    assert train.parse_args(["--threads", "3"]).threads == 3
    # --data: the cores; 2 workers, not 8
    data = train.parse_args(["--data", str(tmp_path)])
    assert (data.threads, data.workers) == (2, 2)
    # two torchrun processes share them
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    data = train.parse_args(["--data", str(tmp_path)])
    assert (data.threads, data.workers) == (1, 1)
    assert train.parse_args(["--data", str(tmp_path), "--workers", "6"]).workers == 6  # given: kept (with a warning)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    before = torch.get_num_threads()
    try:
        rc, out, err = run_train(capsys, "--stage", "teacher", *TINY, "--epochs", 1, "--out", tmp_path / "r",
                                 "--threads", 2, "--workers", 3)
        assert rc == 0 and "2 thread(s)" in out and torch.get_num_threads() == 2
        assert "warning: --workers 3 on 2 CPU core(s)" in err
        assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "teacher" / "last.pt")]) == 0
        assert torch.get_num_threads() == train.DEMO_THREADS                           # eval on the demo set: fixed too
    finally:
        torch.set_num_threads(before)


def test_a_warm_up_longer_than_the_run_is_reported(tmp_path, capsys):
    root = write_tree(tmp_path / "d", corrupt=0)
    rc, _, err = run_train(capsys, "--data", root, "--out", tmp_path / "r", "--stage", "teacher", "--epochs", 2,
                           "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2", "--img-size", 16,
                           "--batch-size", 4, "--workers", 0)                      # --data: 5 warm-up epochs by default
    assert rc == 0 and "warning: the warm-up (15 steps, --warmup-epochs 5) is not shorter than the run (6 steps)" in err


def test_distillation_reads_images_only(tmp_path):
    """The distill stage's loader yields (images, errors) only: demo pool, the demo's labelled images with labels
    dropped, and any folder of images (no class folders) with --distill-data."""
    args = train.parse_args([*TINY])
    sets = data.get_data(args)
    ctx = distributed.Ctx()
    for pool in (64, 0):
        args.demo_pool = pool
        ds = data.Data(args).distill
        assert isinstance(ds, data.UnlabelledImages) and not hasattr(ds, "labels") and len(ds) == 64
        for batch in data.make_loader(ds, args, ctx, train=True):
            assert len(batch) == 2 and batch[0].shape == (16, 3, 16, 16) and batch[0].dtype == torch.uint8
    assert torch.equal(data.Data(args).distill.images, sets.train.images)            # pool 0: the students' images
    args.demo_pool = 64
    pool = data.Data(args).distill.images
    assert not any(torch.equal(pool[i], sets.train.images[j]) for i in range(8) for j in range(64))  # fresh images
    assert torch.equal(pool, data.demo_images(64, 16, args.demo_seed + 3, args.demo_task))  # deterministic
    chunked = data.demo_images(64, 16, 3, "pairs", chunk=24)                         # made 24 at a time
    assert len(chunked) == 64 and torch.equal(chunked[24:48], data.RelationsDemo(24, 16, seed=[3, 24], pairs=2,
                                                                                 distractors=0).images)
    flat = tmp_path / "unlabelled" / "deep"
    flat.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(flat / f"{i}.png")
    root = write_tree(tmp_path / "d", corrupt=0)
    args = train.for_stage(train.parse_args(["--data", root, "--img-size", "16", "--batch-size", "2", "--workers", "0",
                                             "--distill-data", str(tmp_path / "unlabelled")]), "distill")
    ds = data.get_data(args).distill
    assert isinstance(ds, data.UnlabelledFolder) and len(ds) == 5
    batches = list(data.make_loader(ds, train.for_stage(args, "distill"), ctx, train=True))  # recipe values
    assert len(batches) == 2 and all(len(b) == 2 and b[0].shape == (2, 3, 16, 16) for b in batches)
    args.distill_data = None                                                           # default: DIR/train, unlabelled
    assert len(data.get_data(args).distill) == 12
    args.distill_data = str(tmp_path / "nope")
    with pytest.raises(distributed.UserError, match="no such folder"):
        data.get_data(args)


def test_learning_curve_every_n_steps(tmp_path, capsys):
    rc, _, err = run_train(capsys, "--stage", "finetune", "--out", tmp_path / "r", *TINY, "--epochs", 3,
                           "--eval-every-steps", 5)
    assert rc == 0, err
    curve = [(r["step"], r["val_top1"]) for r in log(tmp_path / "r" / "finetune" / "log.jsonl") if "val_top1" in r]
    assert [s for s, _ in curve] == [5, 10, 12]                                        # 4 steps/epoch x 3, then the end
    assert bench.run_log(tmp_path / "r" / "finetune")[0] == curve


def test_help_shows_every_default_for_both_modes():
    """--help is true: on the demo and in a --data run (recipe deit), each flag's help names the value that parse_args
    gives it when it is not given; no help says None"""
    for argv in ([], ["--data", "d"]):
        parser = train.get_parser()
        parser.set_defaults(**train.defaults_for(train.given_flags(argv)))
        assert "None" not in parser.format_help()
        values, formatter = vars(train.parse_args(argv)), parser._get_formatter()
        flags = {a.dest: a for a in parser._actions if a.dest != "help"}
        assert set(flags) == set(values) - {"given"}
        for k, action in flags.items():
            text = " ".join(formatter._get_help_string(action).split())
            words = re.split(r"[\s/()]+", text[text.rfind("(default:"):])
            v = values[k]
            if k in values["given"] or v is None or v is False:
                continue
            for x in (v.values() if isinstance(v, dict) else [v]):         # a recipe's per-stage values
                want = "empty" if x == "" else "unset" if x is None else f"{x:g}" if isinstance(x, float) else str(x)
                assert want in words or f"(default: {want})" in text, (k, argv, want, text)   # a path: whole


def test_init_from_with_another_class_count_keeps_every_other_tensor(tmp_path):
    cfg = vl.MambaConfig(img_size=16, patch_size=4, dim=16, depth=2, d_state=4, num_classes=5, scan_backend="chunked")
    torch.manual_seed(0)
    old = vl.VisionMamba(cfg)
    torch.save(dict(kind="vision_mamba", config=dataclasses.asdict(cfg), model=old.state_dict()), tmp_path / "c.pt")
    args = train.parse_args(["--img-size", "16"])
    new = train.init_from(str(tmp_path / "c.pt"), args, 3)
    assert new.cfg.num_classes == 3 and new.head.weight.shape == (3, 16)
    assert vl.model_kind(new) == "vision_mamba" and vl.model_kind(vl.ViT(TINY_TEACHER)) == "vit"
    for k, v in old.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(new.state_dict()[k], v), k
    ours = vl.model_from_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True), num_classes=0)
    assert ours.head is None and torch.equal(ours.pos_embed, old.pos_embed)


def test_distillation_and_kd_hand_each_model_its_own_normalisation(tmp_path, capsys, monkeypatch):
    """a step of distillation and of fine-tuning with logit KD: the teacher gets exactly (pixels - its mean) / its
    std (here --teacher-norm half), the student its own (ImageNet's), from the same pixels in [0, 1]"""
    pixels, seen = [], {"ViT": [], "VisionMamba": []}
    real_pixels = train.to_pixels
    monkeypatch.setattr(train, "to_pixels", lambda x, d: pixels.append(real_pixels(x, d)) or pixels[-1].clone())
    for cls in (vl.ViT, vl.VisionMamba):
        def forward(self, images, *a, real=cls.forward):
            seen[type(self).__name__].append(images.detach().clone())
            return real(self, images, *a)
        monkeypatch.setattr(cls, "forward", forward)
    teacher = tiny_teacher(tmp_path / "t.pt")
    view = lambda t: torch.tensor(t).view(1, 3, 1, 1)                                 # noqa: E731
    for stage in (["--stage", "distill"], ["--stage", "finetune", "--kd-weight", "0.5"]):
        pixels.clear(), seen["ViT"].clear(), seen["VisionMamba"].clear()
        rc, _, err = run_train(capsys, *stage, "--teacher", teacher, "--teacher-norm", "half", *TINY, "--max-steps", 1,
                               "--epochs", 1, "--out", tmp_path / stage[1])
        assert rc == 0, err
        x = pixels[0]
        assert 0 <= x.min() and x.max() <= 1
        torch.testing.assert_close(seen["ViT"][0], (x - 0.5) / 0.5, rtol=0, atol=0)
        torch.testing.assert_close(seen["VisionMamba"][0], (x - view(vl.IMAGENET_MEAN)) / view(vl.IMAGENET_STD),
                                   rtol=0, atol=0)
    ck = torch.load(tmp_path / "distill" / "distill" / "last.pt", weights_only=True)
    assert ck["config"]["pixel_mean"] == vl.IMAGENET_MEAN and ck["args"]["teacher_norm"] == "half"
    rc, _, err = run_train(capsys, "--stage", "distill", "--teacher", teacher, "--teacher-norm", "0.5,0.5/1,1,1",
                           *TINY, "--out", tmp_path / "bad")
    assert rc == 2 and "--teacher-norm '0.5,0.5/1,1,1'" in one_error_line(err)


def test_no_collective_or_item_per_step_beyond_ddps_own(tmp_path):
    """two gloo processes distil: between two steps our code calls no collective and no .item() / .tolist() / bool()
    of a tensor (a host sync on a GPU); the finite-loss check and the unreadable-image counts are gathered at log
    lines (--log-every 4: only the step after a log line sees them)"""
    wrapper = tmp_path / "count.py"
    wrapper.write_text(f"""import json, os, sys
sys.path.insert(0, {HERE!r})
import torch, torch.distributed as dist
import train
calls, per_step = [], []
OURS = tuple(os.path.join({HERE!r}, f) for f in ("train.py", "vitlinearizer.py", "scan_kernel.py"))
def counted(name, real, ours_only=False):
    def f(*a, **kw):
        if not ours_only or sys._getframe(1).f_code.co_filename in OURS:
            calls.append(name)
        return real(*a, **kw)
    return f
for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce", "gather_object"):
    setattr(dist, name, counted(name, getattr(dist, name)))
for name in ("item", "tolist", "__bool__"):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name), ours_only=True))
real_lr_at = train.lr_at
def lr_at(step, *a):                                                  # once per step, before its forward
    per_step.append(list(calls))
    return real_lr_at(step, *a)
train.lr_at = lr_at
rc = train.main()
json.dump(per_step, open(f"{tmp_path}/calls{{os.environ['RANK']}}.json", "w"))
sys.exit(rc)
""")
    teacher = tiny_teacher(tmp_path / "t.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "--stage", "distill", "--teacher", teacher, "--out", str(tmp_path / "r"), *map(str, TINY),
           "--batch-size", "4", "--epochs", "1", "--log-every", "4", "--ckpt-every", "1000"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        per_step = json.load(open(tmp_path / f"calls{rank}.json"))
        assert len(per_step) == 8                                                      # 64 images / (2 x 4)
        between = [b[len(a):] for a, b in zip(per_step, per_step[1:])]               # step k's calls, k = 1 .. 7
        assert [bool(c) for c in between] == [False, False, False, True, False, False, False], between
        assert "all_reduce" in between[3]                                              # the log line's sums, checks



@pytest.mark.parametrize("student", ["demo", "adventurer_demo"])
def test_grad_ckpt_trains_the_same_trajectory_and_may_be_switched_on_resume(tmp_path, capsys, monkeypatch, student):
    """--grad-ckpt (activation checkpointing of the student's blocks) changes memory, not math: a distillation with it
    logs the same losses and gradient norms as one without, also when the flag is dropped on resume"""
    teacher = tiny_teacher(tmp_path / "t.pt")
    args = ["--stage", "distill", "--teacher", teacher, *TINY, "--student", student, "--epochs", 2,
            "--drop-path", 0.1]
    assert run_train(capsys, *args, "--out", tmp_path / "plain")[0] == 0
    calls, real = [], vl.run_block
    monkeypatch.setattr(vl, "run_block", lambda block, x, checkpoint=False: calls.append(checkpoint) or
                        real(block, x, checkpoint))
    assert run_train(capsys, *args, "--out", tmp_path / "ckpt", "--grad-ckpt", "--max-steps", 3)[0] == 0
    assert True in calls and False in calls                                            # the student's; the teacher's
    rc, out, err = run_train(capsys, *args, "--out", tmp_path / "ckpt")                 # resumed without the flag
    assert rc == 0 and "resuming from" in out, err
    run = tmp_path / "ckpt" / "distill"
    assert same_log(run / "log.jsonl") == same_log(tmp_path / "plain" / "distill" / "log.jsonl")
