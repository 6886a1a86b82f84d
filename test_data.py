"""Tests of data.py: the demo's procedural images and tasks, image folders, the recipe's augmentations and the
repeated-augmentation sampler."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import vitlinearizer as vl
from conftest import HERE, write_tree


def test_demo_data_is_deterministic_and_relational():
    a, b = data.RelationsDemo(50, 32, seed=3), data.RelationsDemo(50, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (50, 3, 32, 32) and a.images.dtype == torch.uint8
    assert data.RelationsDemo(4, 48, seed=3).images.shape == (4, 3, 48, 48)           # any resolution
    big = data.RelationsDemo(800, 16, seed=0)
    assert set(big.labels.tolist()) == set(range(8)) and big.labels.bincount().min() > 60


def test_image_folder_transforms(tmp_path):
    root = write_tree(tmp_path / "d", corrupt=0)
    classes, samples = data.list_split(root, "train")
    assert classes == ["cat", "dog", "fox"] and len(samples) == 12
    tr, ev = data.ImageFolder(samples, classes, 16, True), data.ImageFolder(samples, classes, 16, False)
    for i in range(5):                                                                 # every mode -> RGB uint8
        x, y, e = tr[(i, 123)]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and e is None
        assert torch.equal(x, tr[(i, 123)][0])                                         # augmentation from the seed
        assert torch.equal(ev[(i, None)][0], ev[(i, None)][0])
    assert not all(torch.equal(tr[(0, s)][0], tr[(0, 123)][0]) for s in range(5))


def test_a_symlink_loop_in_the_image_folder_does_not_hang_the_walk(tmp_path):
    """--distill-data (and DIR/train, which distillation walks by default) with links back up the tree: two links per
    level make 2^40 paths before the kernel's ELOOP; each folder is walked once, each image listed once; a named pipe
    called *.jpg is not listed"""
    root = write_tree(tmp_path / "d", corrupt=0)
    for c in ("cat", "dog"):
        os.symlink("..", tmp_path / "d" / "train" / c / "up")
        os.symlink("../..", tmp_path / "d" / "train" / c / "up2")
    os.symlink(tmp_path / "d" / "val", tmp_path / "d" / "train" / "fox" / "val")  # a 2nd way to a folder: walked once
    os.mkfifo(tmp_path / "d" / "train" / "fox" / "pipe.jpg")                 # opening it would wait for a writer
    code = f"import sys; sys.path.insert(0, {HERE!r}); import data; print(len(data.list_images({str(root)!r})))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.split()[-1] == "24", p.stderr[-2000:]         # train and val, once each


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path):
    """macOS AppleDouble files ("._0.JPEG" beside each image copied from a Mac: not images), .DS_Store and hidden
    folders (.ipynb_checkpoints) are left out of the class folders, the classes and the --distill-data walk"""
    root = write_tree(tmp_path / "d", corrupt=0)
    want_split, want_walk = data.list_split(root, "train"), data.list_images(root)
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 60
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "d" / split / c / "._0.JPEG").write_bytes(apple_double)
            (tmp_path / "d" / split / c / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    hidden = tmp_path / "d" / "train" / ".ipynb_checkpoints"                          # would be a class of its own
    hidden.mkdir()
    rgb_image().save(hidden / "x.png")
    (tmp_path / "d" / "train" / "fox" / ".thumbs").mkdir()                             # would be walked
    rgb_image().save(tmp_path / "d" / "train" / "fox" / ".thumbs" / "0.png")
    classes, samples = data.list_split(root, "train")
    assert (classes, samples) == want_split and data.list_images(root) == want_walk
    assert data.list_split(root, "val")[0] == classes
    ds = data.ImageFolder(samples, classes, 16, False)
    assert all(ds[(i, None)][2] is None for i in range(len(ds)))                      # every listed file decodes


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """a phone photo stored sideways with EXIF Orientation 6 (turn 90 degrees clockwise to view) is read upright"""
    upright = np.zeros((16, 16, 3), dtype=np.uint8)
    upright[:8, :, 0] = upright[8:, :, 2] = 255                                        # red top half, blue bottom
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)              # a quarter turn anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6                                                                   # Orientation
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "plain.jpg", quality=95)                                    # the same pixels, no tag
    ds = data.ImageFolder([(str(tmp_path / "photo.jpg"), 0), (str(tmp_path / "plain.jpg"), 0)], ["c"], 16, False,
                          crop_ratio=1.0)

    def diff(x, ref):
        return np.abs(x.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).mean()
    assert diff(ds[(0, None)][0], upright) < 10 and diff(ds[(1, None)][0], np.asarray(stored)) < 10
    assert diff(ds[(0, None)][0], np.asarray(stored)) > 60


def test_integer_and_float_grey_images_are_scaled_not_clipped(tmp_path):
    """one grey ramp 0..255 stored as 16-bit (I;16), 32-bit integer (I) at 0..65535 and at 0..255, and float (F) at
    0..1 and at 0..255 reads back as the ramp (convert("RGB") alone clips I at 255, and turns F 0..1 black); values
    outside the range clip"""
    ramp = np.arange(256).reshape(16, 16)
    wide = (ramp * 257).astype(np.int32)
    wide[0, 0], wide[0, 1] = -1000, 70_000                                             # out of range
    clipped = ramp.copy()
    clipped[0, 0], clipped[0, 1] = 0, 255
    cases = {"i16.png": ((ramp * 257).astype(np.uint16), "I;16 I", ramp),                # older Pillow: mode I
             "i16.tif": ((ramp * 257).astype(np.uint16), "I;16", ramp),
             "i_wide.tif": (wide, "I", clipped), "i_byte.tif": (ramp.astype(np.int32), "I", ramp),
             "f_unit.tif": ((ramp / 255).astype(np.float32), "F", ramp),
             "f_byte.tif": (ramp.astype(np.float32), "F", ramp)}
    for name, (pixels, mode, want) in cases.items():
        Image.fromarray(pixels).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            assert im.mode in mode.split(), name
        x, _, error = data.ImageFolder([(str(tmp_path / name), 0)], ["c"], 16, False, crop_ratio=1.0)[(0, None)]
        assert error is None and (x == torch.from_numpy(want).to(torch.uint8)).all(), name   # grey: R = G = B


def rgb_image(h=20, w=24, seed=0, mode="RGB"):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_ops_keep_size_and_mode(mode):
    import random
    im = rgb_image(mode=mode)
    for name, op in data.RAND_OPS.items():
        for m in (0.0, 0.37, 1.0):
            for inc in (False, True):
                out = op(im, m, inc, random.Random(0))
                assert out.size == im.size and out.mode == im.mode, (name, m, inc)
    out = data.ThreeAugment()(im.convert("RGB"), random.Random(0))
    assert out.size == im.size and out.mode == "RGB"


def test_randaugment_ops_compute_what_timm_documents():
    """pixel ops against numpy written from the op definitions; translate by a whole number of pixels against a shift"""
    import random
    im = rgb_image()
    a = np.asarray(im).astype(int)

    def op(name, m, inc=True):
        return np.asarray(data.RAND_OPS[name](im, m, inc, random.Random(0))).astype(int)
    assert (op("Invert", 0.3) == 255 - a).all()
    t = 256 - int(256 * 0.6)                                                           # solarize, increasing
    assert (op("Solarize", 0.6) == np.where(a >= t, 255 - a, a)).all()
    assert (op("Solarize", 0.6, False) == np.where(a >= int(256 * 0.6), 255 - a, a)).all()
    bits = 4 - int(4 * 0.6)                                                            # posterize keeps the top bits
    assert (op("Posterize", 0.6) == a & (0xFF << (8 - bits) & 0xFF)).all()
    assert (op("Posterize", 1.0) == 0).all()                                            # 0 bits at the top magnitude
    assert (op("SolarizeAdd", 0.5) == np.where(a < 128, np.minimum(255, a + 55), a)).all()
    w = im.size[0]                                                                      # 24 px: 0.45 * 24 * m = 9 px
    m = 9 / (0.45 * w)
    shifted = op("TranslateXRel", m)
    fill = np.array(data.FILL)
    left = np.concatenate([a[:, 9:], np.broadcast_to(fill, (a.shape[0], 9, 3))], 1)    # content moves left
    right = np.concatenate([np.broadcast_to(fill, (a.shape[0], 9, 3)), a[:, :-9]], 1)
    assert (shifted == left).all() or (shifted == right).all()
    e = np.asarray(data.RAND_OPS["Brightness"](im, 0.5, False, random.Random(0))).astype(int)   # factor 0.1 + 0.9
    assert np.abs(e - np.clip(np.round(a * 1.0), 0, 255)).max() <= 1


def test_randaugment_draws_ops_and_magnitudes_as_specified(monkeypatch):
    import random
    seen = []
    monkeypatch.setattr(data, "RAND_OPS", {n: (lambda n: lambda im, m, inc, g: seen.append((n, m, inc)) or im)(n)
                                            for n in data.RAND_OPS})
    ra, g = data.RandAugment("rand-m9-mstd0.5-inc1"), random.Random(0)
    for _ in range(4000):
        ra(None, g)
    names, ms, incs = zip(*seen)
    assert all(incs) and abs(len(seen) / (4000 * 2) - 0.5) < 0.02                     # 2 ops per image, each p = 0.5
    counts = np.bincount([list(data.RAND_OPS).index(n) for n in names], minlength=15)
    assert len(counts) == 15 and counts.min() > 0.8 * len(seen) / 15                    # all 15, uniformly
    ms = np.array(ms)
    assert (abs(ms.mean() - 0.9) < 0.005 and abs(ms[ms < 1].std() - 0.05) < 0.01
            and ms.max() == 1.0)                                                       # N(9, .5) / 10, clipped
    seen.clear()
    fixed = data.RandAugment("rand-m5-n3-p1.0")
    fixed(None, g)
    assert [(m, inc) for _, m, inc in seen] == [(0.5, False)] * 3


def test_randaugment_in_the_image_folder_is_seeded_per_sample_and_epoch(tmp_path):
    root = write_tree(tmp_path / "d", corrupt=0)
    classes, samples = data.list_split(root, "train")
    ds = data.ImageFolder(samples, classes, 16, True, augment=data.image_augment("rand-m9-mstd0.5-inc1"))
    plain = data.ImageFolder(samples, classes, 16, True)
    sampler = data.BatchSampler(len(samples), 4, seed=3)
    keys = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys[epoch] = dict(k for batch in sampler for k in batch)                         # index -> augmentation seed
    for i in keys[0]:
        a = ds[(i, keys[0][i])][0]
        assert torch.equal(a, ds[(i, keys[0][i])][0]) and a.shape == (3, 16, 16) and a.dtype == torch.uint8
        if i in keys[1]:
            assert not torch.equal(a, ds[(i, keys[1][i])][0])                           # another epoch: another draw
    images = [ds[(0, s)][0] for s in range(12)]
    assert len({x.numpy().tobytes() for x in images}) == 12                             # samples differ
    assert sum(not torch.equal(ds[(0, s)][0], plain[(0, s)][0]) for s in range(12)) >= 6   # ops applied on top of crop


def test_random_erasing_boxes_respect_the_area_and_aspect_bounds():
    import random
    B, H, W = 2000, 32, 40
    x = torch.zeros(B, 3, H, W)
    boxes = data.random_erase(x, 0.25, random.Random(0), torch.Generator().manual_seed(0))
    erased = [b for b in boxes if b]
    assert abs(len(erased) / B - 0.25) < 0.03
    areas = []
    for img, box in zip(x, boxes):
        changed = (img != 0).any(0)
        if box is None:
            assert not changed.any()
            continue
        t, l, h, w = box
        expect = torch.zeros(H, W, dtype=torch.bool)
        expect[t:t + h, l:l + w] = True
        assert torch.equal(changed, expect)                                             # one box, inside the image
        slack = 0.5 * (h + w) + 0.25                                                    # sides are rounded
        assert 0.02 * H * W - slack <= h * w <= H * W / 3 + slack and h < H and w < W
        assert 0.3 * (1 - 1 / min(h, w)) ** 2 <= h / w <= (1 + 1 / min(h, w)) ** 2 / 0.3
        areas.append(h * w / (H * W))
    noise = x[x != 0]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02                      # per-pixel N(0, 1)
    assert 0.1 < np.mean(areas) < 0.25 and min(areas) < 0.05 and max(areas) > 0.28
    y = torch.zeros(B, 3, H, W)
    assert (data.random_erase(y, 0.25, random.Random(0), torch.Generator().manual_seed(0)) == boxes
            and torch.equal(x, y))


def test_cutmix_box_area_equals_its_label_weight():
    import random
    B, H, W, C = 6, 20, 28, 10
    for seed in range(300):
        x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, W).clone()   # image b is all b
        y = torch.tensor([3, 1, 4, 1, 5, 9])
        out, t, lam, box = data.mix_batch(x, y, C, 0.0, 1.0, 0.5, 0.0, random.Random(seed))
        assert box is not None
        for b in range(B):
            from_partner = (out[b, 0] == B - 1 - b).float().mean().item()
            assert from_partner == pytest.approx(1 - lam)                                # pasted share = partner weight
            assert out[b, 0][(out[b, 0] != b) & (out[b, 0] != B - 1 - b)].numel() == 0
            expect = torch.zeros(C)
            expect[y[b]] += lam
            expect[y[B - 1 - b]] += 1 - lam
            assert torch.allclose(t[b], expect)


def test_mixup_blends_images_and_targets_convexly_with_label_smoothing():
    import random
    B, C, s = 8, 5, 0.1
    x = torch.randn(B, 3, 8, 8)
    y = torch.randint(0, C, (B,))
    kinds = []
    for seed in range(400):
        out, t, lam, box = data.mix_batch(x.clone(), y, C, 0.8, 1.0, 0.5, s, random.Random(seed))
        kinds.append(box is not None)
        assert 0 <= lam <= 1 and torch.allclose(t.sum(1), torch.ones(B)) and (t >= s / C - 1e-7).all()
        smooth = F.one_hot(y, C).float() * (1 - s) + s / C                                  # independent smoothing
        assert torch.allclose(t, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
        if box is None:
            assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert abs(np.mean(kinds) - 0.5) < 0.08                                                # switch probability 0.5
    lams = [data.mix_batch(x.clone(), y, C, 0.8, 0.0, 0.5, s, random.Random(k))[2] for k in range(4000)]
    assert abs(np.mean(lams) - 0.5) < 0.02 and abs(np.var(lams) - 1 / (4 * (2 * 0.8 + 1))) < 0.01   # Beta(.8, .8)


def test_repeated_augmentation_sampler():
    n, bs, world, r = 30, 4, 2, 3
    batches = {}
    for rank in range(world):
        s = data.BatchSampler(n, bs, rank, world, seed=1, repeats=r)
        s.set_epoch(2)
        batches[rank] = list(s)
    assert all(len(b) == n // (bs * world) == len(data.BatchSampler(n, bs, 0, world)) for b in batches.values())
    stream = [k for step in zip(*batches.values()) for rank_batch in step for k in rank_batch]   # global order
    idx = [i for i, _ in stream]
    assert len(stream) == (n // (bs * world)) * bs * world
    runs = [idx[k:k + r] for k in range(0, len(idx), r)]
    assert all(len(set(run)) == 1 for run in runs)                                      # r copies in a row
    assert len(set(idx)) == len(runs)                                                   # ... of distinct images
    assert all(len({seed for i, seed in stream if i == j}) == r for j in idx[:-(len(idx) % r) or None])  # own seeds
    s1 = data.BatchSampler(n, bs, 0, 1, seed=1)                                         # repeats 1: a permutation
    assert sorted(i for b in s1 for i, _ in b) == sorted(set(i for b in s1 for i, _ in b))


def sector_of(vec):
    """direction class (8 sectors, y grows down) of image-plane vectors"""
    return np.round(np.degrees(np.arctan2(-vec[..., 1], vec[..., 0])) / 45).astype(int) % 8


def test_demo_tasks_deterministic_and_every_pair_points_the_labels_way():
    for task, kw in data.DEMO_TASKS.items():
        a, b = data.RelationsDemo(300, 32, seed=5, **kw), data.RelationsDemo(300, 32, seed=5, **kw)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert not torch.equal(a.images, data.RelationsDemo(300, 32, seed=6, **kw).images)
        for p in range(kw["pairs"]):                                                   # independent of the sampler
            assert (sector_of(a.centers[:, 2 * p + 1] - a.centers[:, 2 * p]) == a.labels.numpy()).all()
        red = (a.images[:, 0] > 170) & (a.images[:, 1] < 90) & (a.images[:, 2] < 90)   # the red square is painted there
        i = np.arange(300)
        assert red[i, (a.centers[:, 0, 1] * 32).astype(int), (a.centers[:, 0, 0] * 32).astype(int)].all()
    pairs = data.RelationsDemo(200, 32, seed=0, **data.DEMO_TASKS["pairs"])
    yellow = pairs.centers[:, 2]
    assert ((pairs.images[np.arange(200), :, (yellow[:, 1] * 32).astype(int), (yellow[:, 0] * 32).astype(int)].float()
             - torch.tensor([.95, .85, .1]) * 255).abs() < 40).all()


def test_pairs_task_keeps_a_whole_pair_visible_under_heavy_masking():
    """The claim the README makes for the demo task: with 75 % of the patches masked, at least one pair keeps a visible
    patch on both its squares in most images (pairs), far more often than the one-pair relations task."""
    rel = data.RelationsDemo(1000, 32, seed=0, **data.DEMO_TASKS["relations"])
    pairs = data.RelationsDemo(1000, 32, seed=0, **data.DEMO_TASKS["pairs"])
    assert rel.visible_pair_fraction(4, 0.0) == pairs.visible_pair_fraction(4, 0.0) == 1.0
    assert pairs.visible_pair_fraction(4, 1.0) == 0.0
    f_rel, f_pairs = rel.visible_pair_fraction(4, 0.75), pairs.visible_pair_fraction(4, 0.75)
    assert f_pairs > 0.8 and f_rel < 0.7, (f_rel, f_pairs)
    # independent count for one image and one mask: patches under each square, by brute force over pixels
    mask = vl.sample_mask(1, (8, 8), 0.75, generator=torch.Generator().manual_seed(0))[0].view(8, 8).numpy()
    c, h = pairs.centers[0], pairs.half[0]
    seen = []
    for j in range(4):
        pix = [(y, x) for y in range(32) for x in range(32)
               if abs((x + 0.5) / 32 - c[j, 0]) < h and abs((y + 0.5) / 32 - c[j, 1]) < h]
        seen.append(any(not mask[y // 4, x // 4] for y, x in pix))
    one = data.RelationsDemo(1, 32, seed=0)                                            # the method on that same mask
    one.centers, one.half, one.pairs, one.labels = pairs.centers[:1], pairs.half[:1], 2, pairs.labels[:1]
    assert one.visible_pair_fraction(4, 0.75, repeats=1) == float((seen[0] and seen[1]) or (seen[2] and seen[3]))
