"""Tests of vitlinearizer.py: teachers loaded from files the real libraries wrote and against independent models, the
student, the masks and the losses against the paper's formulas written out with loops."""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tracemalloc
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlinearizer as vl
from scan_kernel import selective_scan_ref
from conftest import TINY_ADVENTURER, TINY_STUDENT, TINY_TEACHER, random_vit_state_dict, ZOO, TINY, run_train


def timm_reference_forward(sd, images, heads, eps=1e-6, act=F.gelu):
    """The timm ViT forward written out by hand: explicit softmax attention, exact-erf GELU (or the given act)."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    x = (F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
         .flatten(2).transpose(1, 2))
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    B, L, D = x.shape
    if "norm_pre.weight" in sd:                                                        # timm's CLIP ViTs
        x = F.layer_norm(x, (D,), sd["norm_pre.weight"], sd["norm_pre.bias"], eps)
    hidden = []
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (D,), w["norm1.weight"], w["norm1.bias"], eps)
        q, k, v = (h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).split(D, -1)
        q, k, v = (t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1)
        x = x + ((att @ v).transpose(1, 2).reshape(B, L, D) @ w["attn.proj.weight"].T + w["attn.proj.bias"])
        h = F.layer_norm(x, (D,), w["norm2.weight"], w["norm2.bias"], eps)
        h = act(h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"])
        x = x + (h @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"])
        hidden.append(x)
    tokens = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps)
    return tokens, tokens[:, 0] @ sd["head.weight"].T + sd["head.bias"], hidden


@pytest.mark.parametrize("wrap", [False, True])
def test_teacher_from_timm_state_dict_matches_reference(tmp_path, wrap):
    sd = random_vit_state_dict()
    path = tmp_path / "vit.pth"
    torch.save({"model": sd} if wrap else sd, path)                                    # DeiT wraps in "model"
    teacher = vl.load_teacher(str(path))
    assert (teacher.cfg.dim, teacher.cfg.depth, teacher.cfg.heads, teacher.cfg.patch_size, teacher.cfg.img_size,
            teacher.cfg.num_classes) == (32, 2, 1, 4, 16, 7)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    images = torch.randn(2, 3, 16, 16)
    tokens, logits, hidden = timm_reference_forward(sd, images, heads=1)
    out = teacher(images)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.hidden, hidden):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_teacher_from_timm_clip_state_dict_matches_reference(tmp_path):
    """timm's CLIP ViT layout, written by hand: norm_pre, no patch-embedding bias, LayerNorm eps 1e-5; a bare timm file
    runs GELU as timm does, act="quick_gelu" selects OpenAI's activation. (Files timm wrote: the zoo section.)"""
    sd = random_vit_state_dict(dim=64)
    sd["norm_pre.weight"], sd["norm_pre.bias"] = 1 + 0.1 * torch.randn(64), torch.randn(64)
    sd["patch_embed.proj.bias"] = torch.zeros(64)                                      # the reference's conv bias
    torch.save({k: v for k, v in sd.items() if k != "patch_embed.proj.bias"}, tmp_path / "clip_timm.pth")
    images = torch.randn(2, 3, 16, 16)
    tokens, _, _ = timm_reference_forward(sd, images, heads=1, eps=1e-5)
    teacher = vl.load_teacher(str(tmp_path / "clip_timm.pth"))
    cfg = teacher.cfg
    assert (cfg.act, cfg.eps, cfg.patch_bias, cfg.norm_pre) == ("gelu", 1e-5, False, True)
    torch.testing.assert_close(teacher(images).tokens, tokens, atol=1e-4, rtol=1e-4)

    def quick_gelu(x):
        return x * torch.sigmoid(1.702 * x)
    tokens, _, _ = timm_reference_forward(sd, images, heads=1, eps=1e-5, act=quick_gelu)
    teacher = vl.load_teacher(str(tmp_path / "clip_timm.pth"), act="quick_gelu")
    torch.testing.assert_close(teacher(images).tokens, tokens, atol=1e-4, rtol=1e-4)


class CLIPVisualRef(nn.Module):
    """An OpenAI-CLIP image tower with the original module names, written with nn.MultiheadAttention."""

    def __init__(self, width=64, layers=2, patch=4, grid=4, out_dim=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(1 + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            block.attn = nn.MultiheadAttention(width, width // 64, batch_first=True)
            block.mlp = nn.Module()
            block.mlp.c_fc, block.mlp.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            self.transformer.resblocks.append(block)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))
        for p in self.parameters():                                                    # no parameter at its init value
            p.data += 0.05 * torch.randn_like(p)

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        for b in self.transformer.resblocks:
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, need_weights=False)[0]
            h = b.mlp.c_fc(b.ln_2(x))
            x = x + b.mlp.c_proj(h * torch.sigmoid(1.702 * h))                         # QuickGELU
        return self.ln_post(x)                                                         # every token's final feature


class CLIPRef(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = CLIPVisualRef()
        self.logit_scale = nn.Parameter(torch.ones(()))                                # a text-side key, ignored
        self.token_embedding = nn.Embedding(10, 8)

    def forward(self, images):
        return self.visual(images)


@pytest.mark.parametrize("torchscript", [False, True])
def test_teacher_from_openai_clip_matches_reference(tmp_path, torchscript):
    torch.manual_seed(0)
    clip = CLIPRef().eval()
    images = torch.randn(2, 3, 16, 16)
    path = tmp_path / "clip.pt"
    if torchscript:                                                                    # how OpenAI ships its weights
        torch.jit.save(torch.jit.trace(clip, images), str(path))
    else:
        torch.save(clip.state_dict(), path)
    teacher = vl.load_teacher(str(path))
    assert (teacher.cfg.act, teacher.cfg.norm_pre,
            teacher.cfg.heads, teacher.cfg.num_classes) == ("quick_gelu", True, 1, 0)
    with torch.no_grad():
        want = clip(images)
    out = teacher(images)
    assert out.logits is None
    torch.testing.assert_close(out.tokens, want, atol=1e-4, rtol=1e-4)


def test_own_checkpoint_round_trip_and_new_head(tmp_path):
    teacher = vl.ViT(TINY_TEACHER)
    path = tmp_path / "own.pt"
    torch.save({"kind": "vit", "config": vl.asdict(teacher.cfg), "model": teacher.state_dict(), "step": 3}, path)
    loaded = vl.load_teacher(str(path))
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images).tokens, teacher(images).tokens)
    assert vl.load_teacher(str(path), num_classes=9)(images).logits.shape == (2, 9)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    sd = random_vit_state_dict()
    del sd["blocks.1.norm2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["head.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.norm2\.bias.*unexpected: blocks\.0\.extra\.weight.*"
                                         r"mis-shaped: head\.bias"):
        vl.load_teacher(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vl.load_teacher(str(tmp_path / "nope.pth"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a ViT layout this loader knows.*first keys: something"):
        vl.load_teacher(str(tmp_path / "other.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        vl.load_teacher(str(tmp_path / "garbage.pth"))
    torch.save({"kind": "vit", "config": {"dim": 8, "wings": 2}, "model": {}}, tmp_path / "cfg.pth")
    with pytest.raises(ValueError, match="unknown config fields.*wings"):
        vl.load_teacher(str(tmp_path / "cfg.pth"))


def test_resolution_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        vl.ViT(TINY_TEACHER)(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        vl.VisionMamba(TINY_STUDENT)(torch.randn(1, 3, 16, 10))


def test_teacher_runs_at_other_resolutions_with_interpolated_positions():
    teacher = vl.ViT(TINY_TEACHER)
    out = teacher(torch.randn(2, 3, 24, 32))                                           # 6 x 8 grid from a 4 x 4 one
    assert out.tokens.shape == (2, 1 + 48, 32)
    pos = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 3)
    torch.testing.assert_close(vl.resize_pos_embed(pos, (4, 4)), pos)                   # same grid: unchanged
    flat = torch.full((1, 16, 3), 2.5)
    torch.testing.assert_close(vl.resize_pos_embed(flat, (7, 5)), torch.full((1, 35, 3), 2.5))


with open(os.path.join(ZOO, "manifest.json")) as _f:
    ZOO_MANIFEST = json.load(_f)


ZOO_INPUTS = torch.load(os.path.join(ZOO, "inputs.pt"), weights_only=True)              # size -> images (fp16-exact)


def zoo_golden(name, file="golden.pt"):
    return torch.load(os.path.join(ZOO, name, file), weights_only=True)


def assert_matches_library(got, want):
    """Within 1e-5 of the library's largest value (measured: 0 for timm and the DINOv2 hub code, <= 6e-7 for
    transformers and open_clip, whose attention differs in rounding)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", sorted(ZOO_MANIFEST["fixtures"]))
def test_teacher_zoo_matches_the_library_that_wrote_it(name):
    """A tiny random-weight model of a real library class, saved in that library's own format: load_teacher infers
    the architecture the library built and gives the library's class and patch tokens, every block's output and the
    logits, at every resolution the library ran it (its own position-embedding resampling included)."""
    entry = ZOO_MANIFEST["fixtures"][name]
    teacher = vl.load_teacher(os.path.join(ZOO, entry["spec"]), **entry["load"])
    expect = dict(entry["expect"])
    assert (teacher.cfg.layer_scale > 0) == expect.pop("layer_scale", False)
    assert {k: getattr(teacher.cfg, k) for k in expect} == expect
    for size, want in zoo_golden(name).items():
        out = teacher(ZOO_INPUTS[size].float())
        tokens, hidden = out.tokens, out.hidden
        if not teacher.cfg.class_token:                    # the class slot is the mean patch token, in every layer
            for t in [tokens, *hidden]:
                torch.testing.assert_close(t[:, 0], t[:, 1:].mean(1))
            tokens, hidden = tokens[:, 1:], [h[:, 1:] for h in hidden]
        assert_matches_library(tokens, want["tokens"])
        assert len(hidden) == len(want["hidden"])
        for h, w in zip(hidden, want["hidden"]):
            assert_matches_library(h, w)
        if "logits" in want:
            assert_matches_library(out.logits, want["logits"])


def test_openai_clip_in_timm_runs_quickgelu_and_act_gelu_gives_timms_own_forward():
    """timm builds vit_*_clip_224 with GELU and notes that the .openai weights are natively QuickGELU: we follow the
    note (the golden tokens come from timm's *_clip_quickgelu_* model); act="gelu" reproduces timm's own forward."""
    folder = os.path.join(ZOO, "timm_clip_openai")
    teacher = vl.load_teacher(folder, act="gelu")
    out, want = teacher(ZOO_INPUTS[16].float()), zoo_golden("timm_clip_openai", "golden_timm_gelu.pt")[16]
    assert_matches_library(out.tokens, want["tokens"])
    assert_matches_library(out.logits, want["logits"])
    assert (zoo_golden("timm_clip_openai")[16]["tokens"] - want["tokens"]).abs().max() > 1e-2   # the choice matters


def test_timm_hub_folder_written_before_timm_recorded_model_args(tmp_path):
    """Older timm Hub configs have no model_args and no notes: the OpenAI tag still selects QuickGELU (the head count
    then follows the width's convention, so this tiny model needs heads=2)."""
    shutil.copytree(os.path.join(ZOO, "timm_clip_openai"), tmp_path / "clip")
    cfg = json.load(open(tmp_path / "clip" / "config.json"))
    del cfg["model_args"], cfg["pretrained_cfg"]["notes"]
    json.dump(cfg, open(tmp_path / "clip" / "config.json", "w"))
    teacher = vl.load_teacher(str(tmp_path / "clip"), heads=2)
    assert teacher.cfg.act == "quick_gelu"
    assert_matches_library(teacher(ZOO_INPUTS[16].float()).tokens, zoo_golden("timm_clip_openai")[16]["tokens"])


def test_timm_name_takes_heads_act_and_notes_from_timms_model(monkeypatch):
    """timm:NAME through a stand-in timm module (timm is not installed in CI) with timm's create_model interface,
    holding the weights and the pretrained_cfg timm wrote for vit_base_patch16_clip_224.openai."""
    folder = os.path.join(ZOO, "timm_clip_openai")
    sd = vl.read_safetensors(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        pretrained_cfg = json.load(f)["pretrained_cfg"]                                # tag "openai", QuickGELU note

    class FakeTimmViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.pretrained_cfg = pretrained_cfg
            self.blocks = [nn.Module()]
            self.blocks[0].mlp, self.blocks[0].attn = nn.Module(), nn.Module()
            self.blocks[0].mlp.act, self.blocks[0].attn.num_heads = nn.GELU(), 2      # what timm builds for the name

        def state_dict(self):
            return sd

    calls = []
    fake = type(sys)("timm")
    fake.create_model = lambda name, pretrained: calls.append((name, pretrained)) or FakeTimmViT()
    monkeypatch.setitem(sys.modules, "timm", fake)
    teacher = vl.load_teacher("timm:vit_base_patch16_clip_224.openai")
    assert calls == [("vit_base_patch16_clip_224.openai", True)]
    cfg = teacher.cfg
    assert (cfg.heads, cfg.act, cfg.eps, cfg.patch_bias) == (2, "quick_gelu", 1e-5, False)
    assert_matches_library(teacher(ZOO_INPUTS[16].float()).tokens, zoo_golden("timm_clip_openai")[16]["tokens"])
    for pretrained_cfg, act in (({"tag": "laion2b_s34b_b88k"}, "gelu"),                 # timm's module's act
                                ({"tag": "metaclip_400m", "notes": ["natively QuickGELU, use quickgelu model "
                                                                    "variant for original results"]}, "quick_gelu"),
                                ({"tag": "openai"}, "quick_gelu")):                    # Hub configs without notes
        assert vl.load_teacher("timm:vit_base_patch16_clip_224").cfg.act == act, pretrained_cfg
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        vl.load_teacher("timm:vit_base_patch16_clip_224.openai")


def test_read_safetensors_without_the_package(tmp_path):
    """Our reader on a file the safetensors package wrote (every dtype, a scalar, an empty tensor, metadata); broken
    files get one error."""
    path = os.path.join(ZOO, "safetensors_dtypes", "dtypes.safetensors")
    got, want = vl.read_safetensors(path), zoo_golden("safetensors_dtypes", "values.pt")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    raw = open(path, "rb").read()
    fp8 = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    for bad in (b"x", raw[:-4], b"\x08" + b"\x00" * 7 + b"not json", len(fp8).to_bytes(8, "little") + fp8 + b"\x00"):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(ValueError, match="cannot read .* as safetensors"):
            vl.load_teacher(str(tmp_path / "bad.safetensors"))


def test_weights_files_that_lie_get_one_error_and_no_large_allocation(tmp_path):
    """A header that claims more than the file holds is checked against the file size before anything is allocated;
    an image, a truncated checkpoint or a Hub config.json that is not a JSON object get one error naming the file."""
    def safetensors(header, data=b""):
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        (tmp_path / "w.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + data)
    f32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}
    cases = [(lambda: (tmp_path / "w.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"),
              "header length 4611686018427387904 for a 10-byte file"),
             (lambda: safetensors({"w": f32([2**40], 0, 2**42)}, b"\0" * 16), "bytes 0..4398046511104 do not hold"),
             (lambda: safetensors({"w": f32([4], 0, 16), "v": f32([4], 8, 24)}, b"\0" * 24), "w and v overlap"),
             (lambda: safetensors({"w": f32([5], 0, 16)}, b"\0" * 16), "do not hold [5] F32"),
             (lambda: safetensors({"w": f32([-2, -2], 0, 16)}, b"\0" * 16), "not whole numbers >= 0"),
             (lambda: safetensors({"w": f32([4], 0.5, 16.5)}, b"\0" * 17), "not whole numbers >= 0"),
             (lambda: safetensors(b"[" * 100_000), "RecursionError")]
    for make, words in cases:
        make()
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="cannot read .* as safetensors: .*" + re.escape(words)):
                vl.load_teacher(str(tmp_path / "w.safetensors"))
            assert tracemalloc.get_traced_memory()[1] < 2**20, words
        finally:
            tracemalloc.stop()
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "cat.pt", format="JPEG")                 # an image by another name
    for name, kind in (("cat.png", "PNG"), ("cat.pt", "JPEG")):
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{name}': it is a {kind} image"):
            vl.load_teacher(str(tmp_path / name))
    torch.save(random_vit_state_dict(), tmp_path / "t.pth")
    whole = (tmp_path / "t.pth").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10):
        (tmp_path / "t.pth").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="truncated or damaged zip archive"):
            vl.load_teacher(str(tmp_path / "t.pth"))
    shutil.copytree(os.path.join(ZOO, "hf_vit"), tmp_path / "hub")
    for text, words in (("{not json", "config.json is not valid JSON"), ("[1, 2]", "config.json holds a JSON list")):
        (tmp_path / "hub" / "config.json").write_text(text)
        with pytest.raises(ValueError, match=words):
            vl.load_teacher(str(tmp_path / "hub"))


def test_a_bad_shard_index_gets_one_error_naming_it(tmp_path):
    """a sharded Hub folder (model.safetensors.index.json -> shard files) whose index is not JSON, or has no
    "weight_map" of tensor names to shard files: a ValueError naming the index and what is missing"""
    shutil.copytree(os.path.join(ZOO, "hf_dinov2"), tmp_path / "hub")
    index = tmp_path / "hub" / "model.safetensors.index.json"
    whole = json.loads(index.read_text())
    sd, _ = vl.read_checkpoint(str(tmp_path / "hub"))                                  # whole: every shard read
    assert sd.keys() == whole["weight_map"].keys()
    cases = [(index.read_text()[:40], "is not valid JSON"), ("[1, 2]", 'has no "weight_map"'),
             (json.dumps({"metadata": whole["metadata"]}), 'has no "weight_map"'),
             (json.dumps({**whole, "weight_map": list(whole["weight_map"])}), 'has no "weight_map"'),
             (json.dumps({**whole, "weight_map": {}}), 'has no "weight_map"'),
             (json.dumps({**whole, "weight_map": {k: 1 for k in whole["weight_map"]}}), 'has no "weight_map"')]
    for text, words in cases:
        index.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{index} {words}")):
            vl.load_teacher(str(tmp_path / "hub"))


def test_hub_folders_bad_configs_and_unknown_layouts_get_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        vl.load_teacher(str(tmp_path))
    shutil.copytree(os.path.join(ZOO, "hf_vit"), tmp_path / "vit")
    cfg = json.load(open(tmp_path / "vit" / "config.json"))
    json.dump({**cfg, "hidden_act": "relu"}, open(tmp_path / "vit" / "config.json", "w"))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        vl.load_teacher(str(tmp_path / "vit"))
    sd = vl.read_state_dict(os.path.join(ZOO, "timm_deit3", "model.safetensors"))
    sd["blocks.0.attn.q_bias"] = torch.zeros(8)                                        # e.g. BEiT's separate q bias
    torch.save(sd, tmp_path / "beit_like.pth")
    with pytest.raises(ValueError, match=r"does not fit ViT: unexpected: blocks\.0\.attn\.q_bias"):
        vl.load_teacher(str(tmp_path / "beit_like.pth"), heads=2)
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "clip_part.pth")
    with pytest.raises(ValueError,
                       match="looks like an OpenAI CLIP / open_clip checkpoint but has no 'class_embedding'"):
        vl.load_teacher(str(tmp_path / "clip_part.pth"))


def test_dinov2_shaped_teacher_runs_at_224_and_448_and_keeps_registers_in_the_forward():
    cfg = vl.ViTConfig(img_size=518, patch_size=14, dim=16, depth=1, heads=2, num_classes=0, registers=4,
                       layer_scale=1e-5, pos_antialias=True)
    teacher = vl.ViT(cfg).eval()
    for size in (224, 448, 518):                                                       # 37 x 37 native grid
        assert teacher(torch.randn(1, 3, size, size)).tokens.shape == (1, 1 + (size // 14) ** 2, 16)
    reg4 = vl.load_teacher(os.path.join(ZOO, "timm_dinov2_reg4"))
    images = ZOO_INPUTS[16].float()
    before = reg4(images).tokens
    with torch.no_grad():
        reg4.reg_token.add_(torch.randn(reg4.reg_token.shape, generator=torch.Generator().manual_seed(0)))
    assert before.shape == (2, 1 + 16, 8) and not torch.allclose(reg4(images).tokens, before, atol=1e-3)


def test_default_heads():
    widths = (192, 384, 768, 1024, 1152, 1280, 1408, 1536, 1664)
    assert [vl.default_heads(d) for d in widths] == [3, 6, 12, 16, 16, 16, 16, 24, 16]


def test_teacher_drop_path_is_stochastic_depth(tmp_path, capsys):
    torch.manual_seed(0)
    dropped = vl.ViT(replace(TINY_TEACHER, drop_path=0.3))
    plain = vl.ViT(TINY_TEACHER)
    plain.load_state_dict(dropped.state_dict())
    assert [b.drop_path for b in dropped.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])    # linear in depth
    x = torch.randn(8, 3, 16, 16)
    torch.testing.assert_close(dropped.eval()(x).tokens, plain.eval()(x).tokens)        # eval: every branch kept
    dropped.train()
    torch.manual_seed(1)
    a = dropped(x).tokens
    torch.manual_seed(2)
    assert not torch.allclose(a, dropped(x).tokens)                                    # train: random per sample
    torch.manual_seed(1)
    torch.testing.assert_close(dropped(x).tokens, a)
    two = vl.ViT(replace(TINY_TEACHER, depth=2, drop_path=1 - 1e-9)).train()           # rates 0, ~1: the last block's
    with torch.no_grad():                                                              # branches both drop
        torch.testing.assert_close(two(x).tokens, two.norm(two.eval()(x).hidden[0]))
    rc, _, err = run_train(capsys, "--stage", "teacher", "--drop-path", 0.1, "--out", tmp_path, *TINY,
                           "--teacher-epochs", 1)
    assert rc == 0, err
    assert torch.load(tmp_path / "teacher" / "last.pt", weights_only=True)["config"]["drop_path"] == 0.1


def test_distiller_loads_state_dicts_that_still_call_mp_proj_head():
    distiller = vl.Distiller(vl.ViT(TINY_TEACHER), vl.VisionMamba(TINY_STUDENT), stages=2)
    old = {k.replace("mp_proj.", "head.") if k.startswith("mp_proj.") else k: v
           for k, v in distiller.state_dict().items()}
    old["head.weight"] = torch.randn_like(old["head.weight"])
    distiller.load_state_dict(old)                                                     # strict
    torch.testing.assert_close(distiller.mp_proj.weight, old["head.weight"])


def test_own_teacher_checkpoints_from_before_the_zoo_still_load(tmp_path):
    teacher = vl.ViT(TINY_TEACHER)
    old = ("img_size", "patch_size", "dim", "depth", "heads", "mlp_ratio", "num_classes", "act", "norm_pre", "eps")
    cfg = {k: v for k, v in vl.asdict(teacher.cfg).items() if k in old}
    torch.save({"kind": "vit", "config": cfg, "model": teacher.state_dict()}, tmp_path / "old.pt")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vl.load_teacher(str(tmp_path / "old.pt"))(x).tokens, teacher(x).tokens)


def test_student_token_order_class_first_at_any_resolution():
    """With no blocks the output is norm(embedding): check the class token and the row-major patch order."""
    for size in (16, 24):
        student = vl.VisionMamba(replace(TINY_STUDENT, depth=0))
        images = torch.randn(2, 3, size, size)
        out = student(images)
        grid = size // 4
        patches = (F.conv2d(images, student.patch_embed.weight, student.patch_embed.bias, stride=4)
                   .flatten(2).transpose(1, 2))
        patches = patches + vl.resize_pos_embed(student.pos_embed, (grid, grid))
        want = torch.cat([(student.cls_token + student.pos_cls).expand(2, -1, -1), patches], 1)
        torch.testing.assert_close(out.tokens, student.norm(want))


def test_mask_tokens_replace_masked_patches_only():
    student = vl.VisionMamba(replace(TINY_STUDENT, depth=0))
    images = torch.randn(2, 3, 16, 16)
    mask = vl.sample_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    pixels = mask.view(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)       # (2, 1, 16, 16)
    a = student(images, mask).tokens[:, 1:]
    b = student(images + 5 * torch.randn_like(images) * pixels, mask).tokens[:, 1:]
    torch.testing.assert_close(a, b)                                                   # masked pixels are invisible
    unmasked = student(images).tokens[:, 1:]
    torch.testing.assert_close(a[~mask], unmasked[~mask])                              # depth 0: visible ones untouched
    assert not torch.allclose(a[mask], unmasked[mask])


def vim_flip_mixer(mixer, hidden):
    """Vim v2 written the original way: flip the sequence for the backward direction, causal conv, scan, flip back."""
    cfg = mixer.cfg
    R, N, K = mixer.dt_proj.shape[-1], cfg.d_state, cfg.d_conv
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)
    x, z = x.transpose(1, 2), z.transpose(1, 2)                                        # (B, E, L)
    ys = []
    for d, flip in ((0, False), (1, True)):
        xd, zd = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        u = F.silu(F.conv1d(xd, mixer.conv_weight[d].unsqueeze(1), mixer.conv_bias[d], padding=K - 1,
                            groups=xd.shape[1])[..., :xd.shape[-1]])
        dbl = torch.einsum("bel,re->blr", u, mixer.x_proj[d])
        dt, B, C = dbl.split([R, N, N], -1)
        delta = torch.einsum("blr,er->bel", dt, mixer.dt_proj[d])
        y = selective_scan_ref(u, delta, -torch.exp(mixer.A_log[d]), B.transpose(1, 2), C.transpose(1, 2), mixer.D[d],
                               zd, mixer.dt_bias[d], delta_softplus=True)
        ys.append(y.flip(-1) if flip else y)
    return mixer.out_proj(((ys[0] + ys[1]) / 2).transpose(1, 2))


def test_fused_bidirectional_mixer_equals_vims_flip_formulation():
    torch.manual_seed(0)
    mixer = vl.BiMamba(TINY_STUDENT, ("forward", "backward"))
    hidden = torch.randn(2, 9, 16)
    torch.testing.assert_close(mixer(hidden), vim_flip_mixer(mixer, hidden), atol=1e-5, rtol=1e-4)


def test_dt_bias_initialised_for_both_directions():
    mixer = vl.BiMamba(vl.MambaConfig(dim=64), ("forward", "backward"))
    dt = F.softplus(mixer.dt_bias)                                                     # (2, E)
    assert dt.shape == (2, 128) and dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    for d in range(2):                                                                 # log-uniform, not at zero init
        assert 1e-3 < dt[d].median() < 0.05 and dt[d].std() > 1e-3


@pytest.mark.parametrize("mode", ["fused", "alternate"])
def test_student_forward_backward_reference_equals_interpreted_kernel(mode):
    cfg = replace(TINY_STUDENT, img_size=8, depth=2, dim=8, d_state=2, bidirectional=mode)
    torch.manual_seed(0)
    ref = vl.VisionMamba(cfg)
    ker = vl.VisionMamba(replace(cfg, scan_backend="triton"))
    ker.load_state_dict(ref.state_dict())
    images = torch.randn(2, 3, 8, 8)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    outs = []
    for model in (ref, ker):
        out = model(images, mask)
        (out.logits.square().sum() + out.tokens.sum()).backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_student_presets_and_alternating_directions():
    assert [vl.STUDENT_PRESETS[n].dim for n in ("tiny", "small", "base")] == [192, 384, 768]
    assert vl.STUDENT_PRESETS["base_alt"].bidirectional == "alternate"
    student = vl.VisionMamba(replace(TINY_STUDENT, bidirectional="alternate"))
    assert [b.mixer.directions for b in student.blocks] == [("forward",), ("backward",)] * 2
    skip = student.no_weight_decay()
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias", "pos_embed", "cls_token"} <= skip
    assert "blocks.0.mixer.in_proj.weight" not in skip
    with pytest.raises(ValueError, match="bidirectional"):
        vl.VisionMamba(replace(TINY_STUDENT, bidirectional="sideways"))


def test_student_under_bf16_autocast_keeps_fp32_residual():
    student = vl.VisionMamba(TINY_STUDENT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(torch.randn(2, 3, 16, 16))
    assert all(h.dtype == torch.float32 for h in out.hidden) and torch.isfinite(out.logits.float()).all()


# ---------------------------------------------------------------------------------------------- Adventurer student

def public_adventurer_shapes(dim, depth, patch, img, classes, d_state=64, expand=2, headdim=64, ngroups=1, d_conv=4):
    """The state dict names and shapes of the public Adventurer (models_mamba.py: PatchEmbed.proj, cls_token, pos_embed
    of N+1, layers.i.{mixer, norm, mlp.w1/w2/w3, norm_mlp}, norm_f, head; mamba_custom.py's mixer: in_proj without
    bias, conv1d over x, B, C with bias, dt_bias, A_log, D per head, a gated RMSNorm weight, out_proj without bias)."""
    E, hidden = expand * dim, int(dim * 2.5)
    H, conv = E // headdim, E + 2 * ngroups * d_state
    shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "cls_token": (1, 1, dim), "pos_embed": (1, (img // patch) ** 2 + 1, dim), "norm_f.weight": (dim,),
              "head.weight": (classes, dim), "head.bias": (classes,)}
    for i in range(depth):
        shapes.update({f"layers.{i}.{k}": v for k, v in {
            "mixer.in_proj.weight": (2 * E + 2 * ngroups * d_state + H, dim), "mixer.conv1d.weight": (conv, 1, d_conv),
            "mixer.conv1d.bias": (conv,), "mixer.dt_bias": (H,), "mixer.A_log": (H,), "mixer.D": (H,),
            "mixer.norm.weight": (E,), "mixer.out_proj.weight": (dim, E), "norm.weight": (dim,),
            "mlp.w1.weight": (hidden, dim), "mlp.w1.bias": (hidden,), "mlp.w2.weight": (hidden, dim),
            "mlp.w2.bias": (hidden,), "mlp.w3.weight": (dim, hidden), "mlp.w3.bias": (dim,),
            "norm_mlp.weight": (dim,)}.items()})
    return shapes


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def public_adventurer_forward(sd, images, cfg, flips):
    """The public Adventurer forward restated from its code with plain tensors (no module of ours), the Mamba-2 mixer
    with mamba_ssm's semantics and a step-by-step SSD loop over every head. -> (logits, [class-first hidden states])"""
    P, N, G = cfg.headdim, cfg.d_state, cfg.ngroups
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([x.flatten(2).transpose(1, 2), sd["cls_token"].expand(len(x), -1, -1)], 1) + sd["pos_embed"]
    hidden = []
    for i, flip in enumerate(flips):
        p = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        u = rms(x, p["norm.weight"])
        if flip:
            u = torch.cat([u[:, :-1].flip(1), u[:, -1:]], 1)
        u = torch.cat([u.mean(1, keepdim=True), u], 1)                                 # heading average
        L, E = u.shape[1], p["mixer.norm.weight"].shape[0]
        H = E // P
        z, xBC, dt = (u @ p["mixer.in_proj.weight"].T).split([E, E + 2 * G * N, H], -1)
        xBC = F.conv1d(xBC.transpose(1, 2), p["mixer.conv1d.weight"], p["mixer.conv1d.bias"], padding=3,
                       groups=xBC.shape[-1])[..., :L].transpose(1, 2)                  # causal: first L outputs
        xs, Bs, Cs = F.silu(xBC).split([E, G * N, G * N], -1)
        dt = F.softplus(dt + p["mixer.dt_bias"])
        A = -torch.exp(p["mixer.A_log"])
        y = torch.zeros(len(x), L, E, dtype=x.dtype)
        for h in range(H):                                                             # each head, each step
            g = h // (H // G)
            state = torch.zeros(len(x), P, N, dtype=x.dtype)
            for t in range(L):
                xt = xs[:, t, h * P:(h + 1) * P]
                state = torch.exp(dt[:, t, h] * A[h])[:, None, None] * state + \
                    dt[:, t, h, None, None] * xt[:, :, None] * Bs[:, t, None, g * N:(g + 1) * N]
                y[:, t, h * P:(h + 1) * P] = (state @ Cs[:, t, g * N:(g + 1) * N, None])[..., 0] + p["mixer.D"][h] * xt
        gated = (y * F.silu(z)).unflatten(-1, (G, -1))
        out = rms(gated, 1).flatten(-2) * p["mixer.norm.weight"] @ p["mixer.out_proj.weight"].T
        out = out[:, 1:]
        if flip:
            out = torch.cat([out[:, :-1].flip(1), out[:, -1:]], 1)
        x = x + out
        m = rms(x, p["norm_mlp.weight"])
        w1, w2 = (m @ p[f"mlp.{w}.weight"].T + p[f"mlp.{w}.bias"] for w in ("w1", "w2"))
        x = x + (F.silu(w1) * w2) @ p["mlp.w3.weight"].T + p["mlp.w3.bias"]
        hidden.append(torch.cat([x[:, -1:], x[:, :-1]], 1))
    x = rms(x, sd["norm_f.weight"])
    return x[:, -1] @ sd["head.weight"].T + sd["head.bias"], hidden


def randomised(model, seed=0):
    """every parameter moved off its initial value (norm weights away from 1, biases from 0, D from 1, ...)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * (p.std() if p.numel() > 1 else 1.0)
                   + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("flip, ngroups", [("public", 1), ("alternate", 2)])
def test_adventurer_equals_the_public_forward_restated(flip, ngroups):
    cfg = replace(TINY_ADVENTURER, flip=flip, ngroups=ngroups)
    flips = [i // 2 == 1 for i in range(4)] if flip == "public" else [i % 2 == 1 for i in range(4)]
    torch.manual_seed(0)
    model = randomised(vl.Adventurer(cfg).double()).eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    logits, hidden = public_adventurer_forward(model.state_dict(), images, cfg, flips)
    out = model(images)
    torch.testing.assert_close(out.logits, logits, rtol=1e-9, atol=1e-9)
    for got, want in zip(out.hidden, hidden):                                          # class first, every block
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert [layer.flip for layer in model.layers] == flips


def test_adventurer_state_dict_has_the_public_names_and_sizes(tmp_path):
    for name, (dim, depth, patch) in {"adventurer_tiny": (256, 12, 16), "adventurer_base": (768, 12, 16),
                                      "adventurer_large": (1024, 24, 16), "adventurer_base_p8": (768, 12, 8)}.items():
        with torch.device("meta"):
            model = vl.Adventurer(vl.STUDENT_PRESETS[name])
        want = public_adventurer_shapes(dim, depth, patch, 224, 1000)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "mask_token"}
        assert got == want, name
        if name == "adventurer_base":                                                  # ~99 M, as published
            assert sum(math.prod(s) for s in want.values()) == 98_657_608
    # a released-style file ({"model", "args", ...}) with random weights loads exactly, the mask token added
    cfg = TINY_ADVENTURER
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in public_adventurer_shapes(16, 4, 4, 16, 5, 4, 2, 8).items()}
    torch.save({"model": sd, "args": argparse.Namespace(model="adventurer_tiny_patch16", lr=5e-4), "epoch": 3},
               tmp_path / "released.pth")
    model = vl.load_adventurer(str(tmp_path / "released.pth"), scan_backend="chunked", chunk_size=5)
    assert model.cfg == replace(cfg, chunk_size=5), model.cfg
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = public_adventurer_forward({k: v.double() for k, v in sd.items()}, images, cfg, [False, False, True, True])
    torch.testing.assert_close(model.double()(images).logits, want[0], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="mis-shaped: layers.0.mixer.D"):              # load_exact names the key
        torch.save({**sd, "layers.0.mixer.D": torch.ones(3)}, tmp_path / "bad.pth")
        vl.load_adventurer(str(tmp_path / "bad.pth"))


def test_adventurer_token_order_class_first_and_class_slot_last_at_any_resolution(tmp_path):
    """With no blocks the output is norm_f(embedding): the class token (its position: the table's LAST slot) comes out
    first, then the patches in row-major order; at another resolution only the patch grid is resampled."""
    torch.manual_seed(0)
    model = randomised(vl.Adventurer(replace(TINY_ADVENTURER, depth=0)))
    for size in (16, 24):
        images = torch.randn(2, 3, size, size)
        grid = size // 4
        patches = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4)
        patches = patches.flatten(2).transpose(1, 2) + vl.resize_pos_embed(model.pos_embed[:, :16], (grid, grid))
        want = torch.cat([(model.cls_token + model.pos_embed[:, 16:]).expand(2, -1, -1), patches], 1)
        torch.testing.assert_close(model(images).tokens, model.norm_f(want))
    ck = dict(kind="adventurer", config=asdict(model.cfg), model=model.state_dict())
    big = vl.model_from_checkpoint(ck, img_size=32)                                    # resampled once, class kept
    assert big.pos_embed.shape == (1, 65, 16) and torch.equal(big.pos_embed[:, -1], model.pos_embed[:, -1])
    torch.testing.assert_close(big.pos_embed[:, :64], vl.resize_pos_embed(model.pos_embed[:, :16], (8, 8)))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(big(x).tokens, model(x).tokens)


def test_adventurer_mask_tokens_replace_masked_patches_only():
    torch.manual_seed(0)
    model = vl.Adventurer(TINY_ADVENTURER).eval()
    images = torch.randn(2, 3, 16, 16)
    mask = vl.sample_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    pixels = mask.view(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)       # (2, 1, 16, 16)
    a = model(images, mask)
    torch.testing.assert_close(a.tokens, model(images + 5 * torch.randn_like(images) * pixels, mask).tokens)
    flat = vl.Adventurer(replace(TINY_ADVENTURER, depth=0))
    flat.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("layers.")})
    a, b = flat(images, mask).tokens[:, 1:], flat(images).tokens[:, 1:]
    torch.testing.assert_close(a[~mask], b[~mask])                                     # visible ones untouched
    torch.testing.assert_close(a[mask], flat.norm_f(flat.mask_token + flat.pos_embed[:, :16].expand(2, -1, -1))[mask])
    with pytest.raises(ValueError, match="mask must be"):
        model(images, mask[:, :5])


def test_adventurer_presets_flip_rules_weight_decay_and_errors():
    presets = [vl.STUDENT_PRESETS[f"adventurer_{n}"] for n in ("tiny", "small", "base", "large", "base_p8")]
    assert [(c.dim, c.depth, c.patch_size) for c in presets] == [(256, 12, 16), (512, 12, 16), (768, 12, 16),
                                                                 (1024, 24, 16), (768, 12, 8)]
    demo = vl.Adventurer(vl.STUDENT_PRESETS["adventurer_demo"])
    assert 1e5 < sum(p.numel() for p in demo.parameters()) < 2.5e5
    assert [b.flip for b in demo.layers] == [False, False, True, True, False, False]   # the public rule: n // 2 == 1
    alt = vl.Adventurer(replace(TINY_ADVENTURER, flip="alternate"))
    assert [b.flip for b in alt.layers] == [False, True, False, True]
    assert [b.drop_path for b in vl.Adventurer(replace(TINY_ADVENTURER, drop_path=0.3)).layers] == \
        pytest.approx([0, 0.1, 0.2, 0.3])                                             # linear, not shifted
    skip = alt.no_weight_decay()
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_bias", "layers.0.mixer.conv1d.bias",
            "layers.0.mixer.norm.weight", "layers.0.norm.weight", "layers.0.mlp.w1.bias", "norm_f.weight", "pos_embed",
            "cls_token", "mask_token", "head.bias"} <= skip
    assert not {"layers.0.mixer.in_proj.weight", "layers.0.mixer.conv1d.weight", "layers.0.mlp.w1.weight"} & skip
    for bad, words in ((dict(flip="sideways"), "flip"), (dict(scan_backend="triton"), "scan_backend"),
                       (dict(headdim=5), "multiple of headdim 5"), (dict(ngroups=3), "multiple of ngroups 3"),
                       (dict(img_size=18), "img_size 18 must be a multiple of patch_size 4")):
        with pytest.raises(ValueError, match=words):
            vl.Adventurer(replace(TINY_ADVENTURER, **bad))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        alt(torch.randn(1, 3, 18, 18))


def test_adventurer_under_bf16_autocast_keeps_fp32_residual_and_backends_agree():
    torch.manual_seed(0)
    model = vl.Adventurer(TINY_ADVENTURER)
    images = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert all(h.dtype == torch.float32 for h in out.hidden) and torch.isfinite(out.logits.float()).all()
    ref = vl.Adventurer(replace(TINY_ADVENTURER, scan_backend="reference"))
    ref.load_state_dict(model.state_dict())
    grads = []
    for m in (model, ref):
        m.zero_grad()
        m(images).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "layers.0.mixer.A_log" in grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["random", "block"])
def test_mask_counts_and_seeding(kind):
    for grid, ratio in (((14, 14), 0.75), ((8, 8), 0.5), ((4, 4), 0.9), ((3, 5), 0.0)):
        m = vl.sample_mask(16, grid, ratio, kind, generator=torch.Generator().manual_seed(1))
        assert m.shape == (16, grid[0] * grid[1]) and m.dtype == torch.bool
        assert (m.sum(1) == round(ratio * grid[0] * grid[1])).all()
    a, b, c = (vl.sample_mask(4, (14, 14), 0.75, kind, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def masked_neighbour_fraction(mask, grid):
    m = mask.view(-1, *grid).float()
    right = (m[:, :, 1:] * m[:, :, :-1]).sum()
    down = (m[:, 1:] * m[:, :-1]).sum()
    return float((right + down) / m.sum())


def test_block_masks_are_blocky():
    g = torch.Generator().manual_seed(0)
    block = vl.sample_mask(64, (14, 14), 0.4, "block", generator=g)
    rand = vl.sample_mask(64, (14, 14), 0.4, "random", generator=g)
    assert masked_neighbour_fraction(block, (14, 14)) > 1.5 * masked_neighbour_fraction(rand, (14, 14))


def test_stage_indices():
    assert vl.stage_indices(12, 4) == [2, 5, 8, 11]
    assert vl.stage_indices(24, 4) == [5, 11, 17, 23]
    with pytest.raises(ValueError, match="stages"):
        vl.stage_indices(3, 4)


def paper_activation_matching(t_feats, s_feats, mask):
    """The paper's L_act (vitlinearizer.py's docstring) written out with loops over images, stages and visible
    tokens."""
    total = 0.0
    for b in range(mask.shape[0]):
        visible = [0] + [1 + i for i in range(mask.shape[1]) if not mask[b, i]]
        for ft, fs in zip(t_feats, s_feats):
            def maps(f):
                rows = []
                for i in visible:
                    row = torch.stack([torch.dot(f[b, i], f[b, j]) / (f[b, i].norm() * f[b, j].norm())
                                       for j in visible])
                    rows.append(row / row.norm())
                return rows
            total += sum(1 - torch.dot(a, c) for a, c in zip(maps(ft), maps(fs))) / (len(t_feats) * len(visible))
    return total / mask.shape[0]


def test_activation_matching_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    s = [torch.randn(2, 7, 3, generator=g) for _ in range(3)]                          # other width: no projection
    mask = torch.tensor([[True, False, False, True, False, True], [False, True, True, True, False, False]])
    torch.testing.assert_close(vl.activation_matching_loss(t, s, mask), paper_activation_matching(t, s, mask),
                               atol=1e-5, rtol=1e-5)


def test_activation_matching_zero_for_rescaled_rotated_features_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 17, 8, generator=g) for _ in range(4)]
    Q = torch.linalg.qr(torch.randn(12, 8, generator=g))[0]                             # (12, 8) orthonormal columns
    scale = torch.rand(2, 17, 1, generator=g) + 0.1                                    # per-token positive scale
    s = [scale * (f @ Q.T) for f in t]                                                 # width 12, same cosine maps
    mask = vl.sample_mask(2, (4, 4), 0.5, generator=g)
    for scope in ("visible", "all", "cls"):
        assert vl.activation_matching_loss(t, s, mask, scope) < 1e-6
    noisy = [f + 0.5 * torch.randn(f.shape, generator=g) for f in s]
    assert vl.activation_matching_loss(t, noisy, mask) > 1e-3


def test_activation_matching_ignores_masked_tokens_unless_scope_all():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 17, 8, generator=g) for _ in range(2)]
    s = [torch.randn(2, 17, 6, generator=g) for _ in range(2)]
    mask = vl.sample_mask(2, (4, 4), 0.75, generator=g)
    changed = [f.clone() for f in s]
    for f in changed:
        f[:, 1:][mask] = torch.randn(int(mask.sum()), 6, generator=g)
    for scope in ("visible", "cls"):
        torch.testing.assert_close(vl.activation_matching_loss(t, s, mask, scope),
                                   vl.activation_matching_loss(t, changed, mask, scope))
    assert not torch.allclose(vl.activation_matching_loss(t, s, mask, "all"),
                              vl.activation_matching_loss(t, changed, mask, "all"))


def test_masked_prediction_counts_masked_tokens_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 8, generator=g), 3 * torch.randn(2, 16, 8, generator=g)
    mask = vl.sample_mask(2, (4, 4), 0.75, generator=g)
    loss = vl.masked_prediction_loss(pred, target, mask)
    want = torch.stack([F.smooth_l1_loss(pred[b, i], target[b, i]) for b in range(2) for i in range(16) if mask[b, i]])
    torch.testing.assert_close(loss, want.mean())
    changed = pred.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(vl.masked_prediction_loss(changed, target, mask), loss)


@pytest.mark.parametrize("target", ["post_norm", "pre_norm"])
def test_distiller_trains_student_and_mp_proj_never_the_teacher(target):
    teacher, student = vl.ViT(TINY_TEACHER), vl.VisionMamba(TINY_STUDENT)
    distiller = vl.Distiller(teacher, student, stages=2, target=target).train()
    assert not teacher.training and isinstance(distiller.mp_proj, nn.Linear)
    images = torch.randn(2, 3, 16, 16)
    mask = vl.sample_mask(2, (4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    out = distiller(images, mask)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], out["am"] + out["mp"])
    assert all(p.grad is None for p in teacher.parameters())
    assert distiller.mp_proj.weight.grad.abs().sum() > 0
    assert student.blocks[0].mixer.A_log.grad.abs().sum() > 0
    assert student.head.weight.grad is None                                           # labels play no part


# ----------------------------------------------------------------------------------------------- pixel mean / std

def with_pixel_file(tmp_path, family):
    """the fixture's weights with its library's pixel file beside them (tests/fixtures/teachers/pixels) -> spec"""
    entry = ZOO_MANIFEST["pixels"][family]
    weights = ZOO_MANIFEST["fixtures"][entry["weights"]]
    shutil.copytree(os.path.join(ZOO, entry["weights"]), tmp_path / entry["weights"])
    shutil.copy(os.path.join(ZOO, "pixels", family, entry["file"]), tmp_path / entry["weights"] / entry["file"])
    return str(tmp_path / weights["spec"]), weights["load"]


@pytest.mark.parametrize("family", sorted(ZOO_MANIFEST["pixels"]))
def test_each_family_gets_the_pixel_stats_its_library_declares(tmp_path, capsys, family):
    """timm's pretrained_cfg and transformers' preprocessor_config.json, as the libraries wrote them: the teacher's
    pixel mean / std, and its eval resize / crop where declared"""
    entry = ZOO_MANIFEST["pixels"][family]
    spec, load = with_pixel_file(tmp_path, family)
    teacher = vl.load_teacher(spec, **load)
    assert teacher.cfg.pixel_mean == pytest.approx(entry["mean"])
    assert teacher.cfg.pixel_std == pytest.approx(entry["std"])
    assert all(type(v) is float for v in teacher.cfg.pixel_mean + teacher.cfg.pixel_std)
    want = dict(crop_pct=entry["crop_pct"], interpolation=entry["interpolation"]) if entry["crop_pct"] else {}
    assert teacher.eval_transform == want
    assert "note" not in capsys.readouterr().err


IMAGENET, CLIP, HALF = (vl.IMAGENET_MEAN, vl.IMAGENET_STD), (vl.OPENAI_CLIP_MEAN, vl.OPENAI_CLIP_STD), (vl.HALF,) * 2


@pytest.mark.parametrize("name, want, note", [
    ("timm_clip_laion", CLIP, False), ("timm_siglip", HALF, False), ("timm_dinov2", IMAGENET, False),
    ("timm_dinov2_reg4", IMAGENET, False), ("timm_deit3", IMAGENET, False), ("hub_dinov2_reg4", IMAGENET, False),
    ("timm_vit_augreg", IMAGENET, True), ("timm_clip_openai", CLIP, False), ("open_clip_openai", CLIP, False),
    ("open_clip_laion_ls", HALF, False), ("hf_clip", CLIP, False), ("hf_siglip_vision", HALF, False),
    ("hf_dinov2", IMAGENET, False), ("hf_vit", IMAGENET, True)])
def test_files_without_a_pixel_file_get_their_familys_convention(capsys, name, want, note):
    """bare weights: the family the architecture names (CLIP towers: OpenAI's; SigLIP: 0.5; DINOv2, DeiT-III:
    ImageNet's); OpenAI's visual.* layout and open_clip: open_clip_config.json's preprocess_cfg, else OpenAI's
    constants; nothing to go by (a plain ViT): ImageNet's, with a one-line note"""
    entry = ZOO_MANIFEST["fixtures"][name]
    teacher = vl.load_teacher(os.path.join(ZOO, entry["spec"]), **entry["load"])
    assert (teacher.cfg.pixel_mean, teacher.cfg.pixel_std) == want
    err = capsys.readouterr().err
    assert ("no pixel mean / std declared" in err) == note and len(err.splitlines()) == note, err


def test_pixel_stats_override_and_own_checkpoints(tmp_path, capsys):
    entry = ZOO_MANIFEST["fixtures"]["timm_vit_augreg"]
    spec = os.path.join(ZOO, entry["spec"])
    teacher = vl.load_teacher(spec, pixel_mean=[0.5] * 3, pixel_std=(0.5, 0.5, 0.5), **entry["load"])
    assert (teacher.cfg.pixel_mean, teacher.cfg.pixel_std) == HALF and not capsys.readouterr().err   # no note
    with pytest.raises(ValueError, match="3 numbers each"):
        vl.load_teacher(spec, pixel_mean=(0.5, 0.5), **entry["load"])
    with pytest.raises(ValueError, match="std > 0"):
        vl.load_teacher(spec, pixel_std=(0.5, 0.5, 0), **entry["load"])
    # our checkpoints keep theirs; ones written before the fields existed load with ImageNet's
    cfg = vl.ViTConfig(**{**vl.asdict(TINY_TEACHER), "pixel_mean": CLIP[0], "pixel_std": CLIP[1]})
    torch.save({"kind": "vit", "config": vl.asdict(cfg), "model": vl.ViT(cfg).state_dict()}, tmp_path / "own.pt")
    own = vl.load_teacher(str(tmp_path / "own.pt")).cfg
    assert (own.pixel_mean, own.pixel_std) == CLIP
    old = {k: v for k, v in vl.asdict(cfg).items() if not k.startswith("pixel_")}
    torch.save({"kind": "vit", "config": old, "model": vl.ViT(cfg).state_dict()}, tmp_path / "old.pt")
    assert vl.load_teacher(str(tmp_path / "old.pt")).cfg.pixel_mean == IMAGENET[0]
    assert vl.load_teacher(str(tmp_path / "own.pt"), pixel_mean=vl.HALF).cfg.pixel_mean == vl.HALF


def recording(model, seen):
    """model whose forward records its input images"""
    real = model.forward

    def forward(images, *args):
        seen.append(images.detach().clone())
        return real(images, *args)
    model.forward = forward
    return model


def test_distiller_hands_each_model_its_own_normalisation():
    t_cfg = vl.ViTConfig(**{**vl.asdict(TINY_TEACHER), "pixel_mean": CLIP[0], "pixel_std": CLIP[1]})
    tea_in, stu_in = [], []
    distiller = vl.Distiller(recording(vl.ViT(t_cfg), tea_in), recording(vl.VisionMamba(TINY_STUDENT), stu_in),
                             stages=2)
    x = torch.rand(2, 3, 16, 16)                                                       # pixels in [0, 1]
    distiller(x, vl.sample_mask(2, (4, 4), 0.5))
    view = lambda t: torch.tensor(t).view(1, 3, 1, 1)                                 # noqa: E731
    assert torch.equal(tea_in[0], (x - view(CLIP[0])) / view(CLIP[1]))
    assert torch.equal(stu_in[0], (x - view(IMAGENET[0])) / view(IMAGENET[1]))


@pytest.mark.parametrize("cfg", [TINY_TEACHER, replace(TINY_STUDENT, scan_backend="chunked"), TINY_ADVENTURER],
                         ids=["vit", "vim", "adventurer"])
def test_activation_checkpointing_gives_the_same_values_and_gradients_and_keeps_less(cfg):
    """run_block with checkpointing, in training with drop path and (students) a mask: the outputs and every gradient
    equal those without it, bit for bit, and the tensors kept for the backward take a fraction of the bytes"""
    torch.manual_seed(0)
    model = vl.build_model(replace(cfg, drop_path=0.2)).train()
    x = torch.rand(2, 3, 16, 16)
    mask = vl.sample_mask(2, (4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    args = () if isinstance(model, vl.ViT) else (mask,)
    runs = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        torch.manual_seed(1)                                                         # the same drop-path draws
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, *args)
        (out.tokens.square().mean() + sum(h.square().mean() for h in out.hidden)).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out, grads, sum(kept.values())))
    (plain, g_plain, kept_plain), (ckpt, g_ckpt, kept_ckpt) = runs
    assert torch.equal(plain.tokens, ckpt.tokens) and all(map(torch.equal, plain.hidden, ckpt.hidden))
    assert g_plain.keys() == g_ckpt.keys() and all(torch.equal(g_plain[k], g_ckpt[k]) for k in g_plain)
    assert kept_ckpt < kept_plain / 5                                                 # tiny models: 12-18x less
