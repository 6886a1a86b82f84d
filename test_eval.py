"""Tests of eval.py: accuracy, the linear probe's CLI, the teacher files it reads, and its bad flags (benchmarks and
results tables: test_bench.py)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import distributed
import eval as evaluate_cli
import train
import vitlinearizer as vl
from conftest import TINY, TINY_STUDENT, run_train, tiny_teacher, one_error_line, write_tree

pytestmark = pytest.mark.usefixtures("cpu_dispatch")   # the scan dispatch a CPU user gets (conftest)


def test_eval_accuracy_on_a_hand_made_case():
    logits = torch.tensor([[5., 4, 3, 2, 1, 0],        # label 0: top-1 hit
                           [0, 5, 4, 3, 2, 1],         # label 5: top-5 hit only
                           [0, 0, 0, 0, 0, 9],         # label 5: top-1 hit
                           [1, 2, 3, 4, 5, 6]])        # label 0: miss (its lowest score)

    class Fixed(torch.nn.Module):                      # image i is filled with the value i: logits row i
        cfg = vl.ViTConfig()                           # its pixel mean / std: ImageNet's

        def forward(self, x):
            i = ((x[:, 0, 0, 0] * data.STD[0] + data.MEAN[0]) * 255).round().long()
            return vl.Output(logits[i], None, [])
    samples = [(torch.full((3, 2, 2), i, dtype=torch.uint8), label, None) for i, label in enumerate([0, 5, 5, 0])]
    samples.insert(2, (None, 3, "x.JPEG: broken"))     # an unreadable image is skipped, not counted
    loader = [data.collate(samples[:3]), data.collate(samples[3:])]
    args = type("Args", (), dict(amp="none", max_bad_frac=0.5))()
    assert evaluate_cli.evaluate(Fixed(), loader, args, distributed.Ctx()) == dict(top1=50.0, top5=75.0)


BAD_EVAL_FLAGS = [(["--batch-size", 0], "--batch-size 0"), (["--workers", -1], "--workers -1"),
                  (["--img-size", 0], "--img-size 0"), (["--threads", 0], "--threads 0"),
                  (["--probe-train", -1], "--probe-train -1"), (["--crop-ratio", 0], "--crop-ratio 0")]


@pytest.mark.parametrize("extra,words", BAD_EVAL_FLAGS, ids=[" ".join(map(str, e)) for e, _ in BAD_EVAL_FLAGS])
def test_bad_eval_flags_get_one_line(tmp_path, capsys, extra, words):
    capsys.readouterr()
    assert evaluate_cli.main(["--probe", str(tmp_path / "nope.pt")] + [str(a) for a in extra]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_eval_warns_about_a_distillation_checkpoint(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    assert run_train(capsys, "--stage", "distill", "--teacher", teacher, *TINY, "--epochs", 1,
                     "--out", tmp_path / "r")[0] == 0
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "distill" / "last.pt")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "class head was never trained" in err and "--stage finetune --init" in err
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "distill" / "last.pt"), "--img-size", "18"]) == 2
    assert "--img-size 18 is not a multiple of the model patch size 4" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_eval_reads_the_teacher_files_its_help_names(tmp_path, capsys, fmt):
    root = write_tree(tmp_path / "d", corrupt=0)
    torch.manual_seed(0)
    vit = vl.ViT(vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=3)).eval()
    if fmt == "torchscript":                                          # a TorchScript archive, keys as timm writes them
        class Holder(nn.Module):
            def __init__(self):
                super().__init__()
                self.module = vit                                     # -> module.* keys, which load_teacher strips

            def forward(self, x):
                return self.module(x).logits
        path = tmp_path / "teacher.pt"
        torch.jit.save(torch.jit.trace(Holder(), torch.randn(1, 3, 16, 16)), str(path))
    else:
        path = tmp_path / "teacher.safetensors"                       # the format: header length, JSON header, bytes
        header, blobs = {}, []
        for k, v in vit.state_dict().items():
            offset = sum(map(len, blobs))
            blobs.append(v.contiguous().numpy().tobytes())
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    classes, samples = data.list_split(root, "val")
    args = type("Args", (), dict(amp="none", max_bad_frac=0.01, batch_size=64, workers=0, seed=0))()
    loader = data.make_loader(data.ImageFolder(samples, classes, 16, False), args, distributed.Ctx(), train=False)
    want = evaluate_cli.evaluate(vit, loader, args, distributed.Ctx())
    capsys.readouterr()
    assert evaluate_cli.main(["--ckpt", str(path), "--data", root]) == 0
    assert f"top-1 {want['top1']:.2f}  top-5 {want['top5']:.2f}" in capsys.readouterr().out


def test_save_steps_probe_cli_and_random_init(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    args = ["--stage", "distill", "--teacher", teacher, *TINY, "--epochs", 2, "--save-steps", "0,3"]
    rc, out, err = run_train(capsys, "--out", tmp_path / "r", *args)
    assert rc == 0, err
    run = tmp_path / "r" / "distill"
    assert {"step0.pt", "step3.pt", "last.pt"} <= {p.name for p in run.iterdir()}
    ck0, ck3 = (torch.load(run / f, weights_only=True) for f in ("step0.pt", "step3.pt"))
    assert ck0["step"] == 0 and ck3["step"] == 3
    # --random-init rebuilds exactly the distillation's starting point (seed, sin-cos positions)
    rand = evaluate_cli.random_init(ck3, seed=0).state_dict()
    assert all(torch.equal(rand[k], v) for k, v in ck0["model"].items())
    assert not all(torch.equal(ck3["model"][k], v) for k, v in ck0["model"].items())
    capsys.readouterr()
    assert evaluate_cli.main(["--probe", str(run / "step0.pt"), str(run / "last.pt")]) == 0
    assert evaluate_cli.main(["--probe", str(run / "last.pt"), "--random-init"]) == 0
    out = capsys.readouterr().out
    assert out.count("linear probe top-1") == 3 and "; 32 probe images, 32 held out)" in out
    res = json.load(open(run / "probe.json"))
    assert set(res) == {"step0.pt", "last.pt", "random-init-s0"} and res["step0.pt"] == res["random-init-s0"]
    assert all(0 <= r["top1"] <= 100 for r in res.values())
    assert evaluate_cli.main(["--probe", str(tmp_path / "nope.pt")]) == 2
    for bad in (b'{"last.pt": {"top1"', b"\xff\xd8\xff", b"[1, 2]", b'{"last.pt": 70.0}'):  # a damaged probe.json
        (run / "probe.json").write_bytes(bad)
        capsys.readouterr()
        assert evaluate_cli.main(["--probe", str(run / "last.pt")]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run / 'probe.json'}: damaged" in line and "delete it" in line, line
        assert (run / "probe.json").read_bytes() == bad                            # left as it was


def test_linear_probe_separable_features_and_shuffled_labels():
    """Linearly separable by construction -> ~100 %; the same features with shuffled labels -> chance on held-out
    data."""
    g = torch.Generator().manual_seed(0)
    n, d, classes = 1200, 64, 8
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)                   # labels = argmax of a linear map,
    x, xv = (torch.randn(4 * n, d, generator=g, dtype=torch.float64) for _ in range(2))  # kept where it has a margin
    x, xv = (v[(v @ w).topk(2).values.diff().abs().squeeze(1) > 2][:n] for v in (x, xv))
    y, yv = (x @ w).argmax(1), (xv @ w).argmax(1)
    res = evaluate_cli.linear_probe(100 * x + 3, y, 100 * xv + 3, yv, classes)       # scale / shift: standardised
    assert res["top1"] >= 95 and res["train_top1"] == 100
    shuffled = y[torch.randperm(n, generator=g)]
    res = evaluate_cli.linear_probe(x, shuffled, xv, yv, classes)
    assert res["top1"] < 100 / classes + 5, res                                        # chance: 12.5 %
    again = evaluate_cli.linear_probe(x, shuffled, xv, yv, classes)
    assert again == res                                                                # one fixed, deterministic recipe


def test_probe_memory_does_not_grow_with_the_split():
    """--data: the probe trains on PROBE_PER_CLASS images per class (a fixed shuffle), whatever the split's size, and
    holds their features in fp32: ImageNet-sized splits cost what 100 images per class cost"""
    import argparse
    sizes = {}
    for per_class in (150, 1500):                                                  # a 10x larger split
        d = data.Data.__new__(data.Data)
        d.args, d.classes = argparse.Namespace(data="DIR", img_size=16), [f"c{c}" for c in range(100)]
        d._train = [(f"c{c}/{i}.JPEG", c) for c in range(100) for i in range(per_class)]
        probe_set = d.probe()
        counts = np.bincount([label for _, label in probe_set.samples], minlength=100)
        assert (counts == data.PROBE_PER_CLASS).all()
        assert len(d.probe(250).samples) == 250 and len(d.probe(0).samples) == len(d._train)
        sizes[per_class] = len(probe_set)
    assert sizes[150] == sizes[1500] == 100 * data.PROBE_PER_CLASS
    # the features held: fp32, n x 2 dim
    model = vl.VisionMamba(TINY_STUDENT)
    loader = [(torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8), torch.zeros(50, dtype=torch.long), [])] * 4
    args = train.parse_args(["--amp", "none"])
    x, y = evaluate_cli.probe_features(model, loader, args, distributed.Ctx())
    assert x.dtype == torch.float32 and x.shape == (200, 2 * TINY_STUDENT.dim) and len(y) == 200


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_eval_teacher_norm_sets_the_pixels_the_model_sees(tmp_path, capsys):
    """eval.py --teacher-norm: the model gets exactly (pixels - mean) / std of the named statistics, for a teacher file
    of another format and for our own checkpoint alike; a bad value is one line"""
    ours = tiny_teacher(tmp_path / "t.pt")
    scripted = tmp_path / "t.torchscript"
    model = vl.model_from_checkpoint(torch.load(ours, weights_only=True))
    torch.jit.trace(model.eval(), torch.rand(1, 3, 16, 16), strict=False).save(str(scripted))
    for path in (ours, str(scripted)):
        default, _ = evaluate_cli.load_model(path)
        half, _ = evaluate_cli.load_model(path, norm="half")
        assert tuple(default.cfg.pixel_mean) == vl.IMAGENET_MEAN
        assert tuple(half.cfg.pixel_mean) == tuple(half.cfg.pixel_std) == (0.5, 0.5, 0.5)
        x = torch.rand(2, 3, 16, 16)
        assert torch.allclose(vl.normalize(x, half), 2 * x - 1)
    assert evaluate_cli.main(["--ckpt", ours, "--teacher-norm", "0.5,0.5/1,1,1"]) == 2
    assert "--teacher-norm '0.5,0.5/1,1,1'" in one_error_line(capsys.readouterr().err)
