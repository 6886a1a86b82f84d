"""Shared by the tests (python -m pytest -q): the Triton interpreter switched on before scan_kernel is imported, the
CPU-dispatch fixture, tiny model configs, and the helpers more than one test file uses."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")          # before scan_kernel's @triton.jit decorators run

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import scan_kernel as sk
import train
import vitlinearizer as vl


HERE = os.path.dirname(os.path.abspath(__file__))


TINY_STUDENT = vl.MambaConfig(img_size=16, patch_size=4, dim=16, depth=4, d_state=4, num_classes=5,
                              scan_backend="reference")


TINY_ADVENTURER = vl.AdventurerConfig(img_size=16, patch_size=4, dim=16, depth=4, d_state=4, headdim=8, num_classes=5,
                                      chunk_size=5, scan_backend="chunked")


TINY_TEACHER = vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=4, heads=2, num_classes=5)


def random_vit_state_dict(dim=32, depth=2, patch=4, grid=4, classes=7, seed=0):
    """A timm-named ViT state dict with random weights (so LayerNorm / biases are not at their init values)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"cls_token": torch.randn(1, 1, dim, generator=g),
          "pos_embed": torch.randn(1, 1 + grid * grid, dim, generator=g),
          "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch, generator=g) * 0.1,
          "patch_embed.proj.bias": torch.randn(dim, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), "norm.bias": torch.randn(dim, generator=g),
          "head.weight": torch.randn(classes, dim, generator=g), "head.bias": torch.randn(classes, generator=g)}
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,),
              "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
              "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
              "norm2.weight": (dim,), "norm2.bias": (dim,),
              "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
              "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
    for i in range(depth):
        for k, s in shapes.items():
            w = torch.randn(*s, generator=g) * (0.1 if len(s) == 2 else 1.0)
            sd[f"blocks.{i}.{k}"] = 1 + 0.1 * w if k.startswith("norm") and k.endswith("weight") else w
    return sd


ZOO = os.path.join(HERE, "tests", "fixtures", "teachers")      # made by tests/fixtures/make_teacher_fixtures.py


@pytest.fixture
def cpu_dispatch(monkeypatch):
    """The scan dispatch a CPU user gets (backend "auto" = chunked), although this file set TRITON_INTERPRET."""
    monkeypatch.setattr(sk, "_INTERPRET", False)


TINY = ["--img-size", "16", "--batch-size", "16", "--demo-train", "64", "--demo-teacher-train", "64",
        "--demo-val", "32", "--demo-pool", "64", "--demo-probe", "32",
        "--stages", "2", "--student", "demo",
        "--teacher-opts", "dim=32,depth=2,heads=2", "--student-opts", "dim=32,depth=2,d_state=4,scan_backend=chunked",
        "--log-every", "1", "--lr", "2e-3", "--warmup-epochs", "0.5"]


def run_train(capsys, *argv):
    """train.main in this process -> (exit code, stdout, stderr)"""
    capsys.readouterr()
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_teacher(path, num_classes=8):
    """a random tiny ViT saved in our checkpoint format"""
    torch.manual_seed(0)
    cfg = vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=num_classes)
    torch.save(dict(kind="vit", config=dataclasses.asdict(cfg), model=vl.ViT(cfg).state_dict()), path)
    return str(path)


def one_error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_tree(root, n=4, classes=("cat", "dog", "fox"), corrupt=1):
    """ImageNet layout of JPEG / PNG files: RGB, grayscale, CMYK, RGBA, palette; `corrupt` unreadable files"""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "CMYK", "RGBA", "P"]
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                im = Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).convert(modes[i % 5])
                ext = "png" if modes[i % 5] in ("RGBA", "P", "L") else "JPEG"
                im.save(root / split / c / f"{i}.{ext}")
    for i in range(corrupt):
        (root / "train" / classes[i % len(classes)] / f"bad{i}.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg" * 10)
    return str(root)
