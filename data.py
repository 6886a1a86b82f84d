"""
The data of a run: the demo's procedural images, image folders, the sets / loaders / unreadable-image handling of a
run, and the training augmentations (per image on PIL, per batch on pixels), every draw seeded so that a resumed run
repeats them.
"""
import copy, functools, math, os, random, re, signal, sys, warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from tqdm import tqdm

import vitlinearizer as vl
from distributed import UserError, stop_together

PROBE_PER_CLASS = 100      # --data: the probe's training images per class (ImageNet-1k: 100 k images; a ViT-B's
                           # [class, mean patch] features 100 k x 1,536: 0.6 GB fp32, 1.2 GB in the fp64 solver)
# Threads: the demo's models are tiny, so a second thread gains little on a quiet CPU and costs a lot on a busy one
# (tiny ops spread over busy cores wait for each other: README, "The built-in demo"); and the figures it prints depend
# on the thread count (float sums in another order), so it is fixed. --data runs default to the cores they may use.
DEMO_THREADS = 1


# ----------------------------------------------------------------------------------------------------------------
# The demo's procedural images

class RelationsDemo(Dataset):
    """Procedural images, deterministic from (n, seed), any resolution, no download.
    Coloured squares on a noisy background. The class is the direction (8 sectors) from the first to the second square
    of a colour pair: red -> blue, and with pairs=2 also yellow -> cyan, which points the same way. No single patch
    decides the label: a relation between two distant parts of the image does, so token-to-token dependencies (what
    the method transfers) matter. Tasks (DEMO_TASKS):
      "relations" (pairs=1, distractors=2): one pair among distractor squares. With 75 % of the patches masked, one or
        both squares of the pair are often hidden, so the label often does not survive the masking of distillation.
      "pairs" (pairs=2, distractors=0): two pairs that agree, so the evidence is redundant, as in natural images: with
        75 % of the patches masked at least one whole pair stays visible in most images (`visible_pair_fraction`).
    Square centres (n, 2 * pairs + distractors, 2) and half sides (n,) are kept in .centers / .half (image units)."""
    classes = ["E", "NE", "N", "NW", "W", "SW", "S", "SE"]
    COLORS = np.array([[.9, .1, .1], [.1, .2, .95], [.1, .8, .1], [.95, .85, .1], [.9, .2, .9], [.1, .85, .9],
                       [.9, .9, .9]])
    PAIRS = [(0, 1), (3, 5)]                                                # colours: red -> blue, yellow -> cyan

    def __init__(self, n, img_size, seed=0, distractors=2, half_side=(0.09, 0.11), directions=8, pairs=1):
        if not 1 <= pairs <= len(self.PAIRS):
            raise ValueError(f"RelationsDemo: pairs must be 1..{len(self.PAIRS)}, got {pairs}")
        rng = np.random.default_rng(seed)
        k = 2 * pairs + distractors
        half = rng.uniform(*half_side, size=(n, 1))                         # half side of every square, in image units
        labels = rng.integers(0, directions, size=n)
        lo, hi = half_side[1] + 0.02, 0.98 - half_side[1]                   # square centres stay inside the image
        centers, todo = np.zeros((n, k, 2)), np.arange(n)
        while len(todo):                                                    # rejection sampling, all images at once
            m, pts = len(todo), []
            for _ in range(pairs):
                ang = np.radians(360 / directions * (labels[todo] + rng.uniform(-1 / 3, 1 / 3, size=m)))
                a = rng.uniform(lo, hi, size=(m, 2))
                b = a + rng.uniform(0.35, 0.75, size=(m, 1)) * np.stack([np.cos(ang), -np.sin(ang)], 1)  # y grows down
                pts += [a[:, None], b[:, None]]
            pts = np.concatenate(pts + [rng.uniform(lo, hi, size=(m, distractors, 2))], 1)
            gap = np.abs(pts[:, :, None] - pts[:, None]).max(-1) + 9 * np.eye(k)  # Chebyshev distance between squares
            ok = ((pts > lo) & (pts < hi)).all((1, 2)) & (gap.min((1, 2)) > 2.5 * half[todo, 0])
            centers[todo[ok]] = pts[ok]
            todo = todo[~ok]
        pair_colors = self.COLORS[[c for p in self.PAIRS[:pairs] for c in p]]
        others = self.COLORS[[c for c in range(len(self.COLORS)) if c not in sum(self.PAIRS[:pairs], ())]]
        colors = np.concatenate([np.broadcast_to(pair_colors, (n, 2 * pairs, 3)),
                                 others[rng.integers(0, len(others), size=(n, distractors))]], 1)
        colors = np.clip(colors + rng.normal(0, 0.05, size=colors.shape), 0, 1)
        xs = (np.arange(img_size) + 0.5) / img_size                         # pixel centres (S,)
        img = rng.uniform(0.1, 0.4, size=(n, 1, 1, 3)) + rng.normal(0, 0.06, size=(n, img_size, img_size, 3))
        for j in range(k):                                                  # paint square j of every image
            inx = np.abs(xs[None] - centers[:, j, 0:1]) < half              # (n, S)
            iny = np.abs(xs[None] - centers[:, j, 1:2]) < half
            inside = (iny[:, :, None] & inx[:, None, :])[..., None]         # (n, S, S, 1)
            img = np.where(inside, colors[:, j, None, None, :], img)
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)           # (n, S, S, 3)
        self.images = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels)
        self.centers, self.half, self.pairs, self.img_size = centers, half[:, 0], pairs, img_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):                                             # key = (index, augmentation seed or None)
        i = key[0]
        return self.images[i], int(self.labels[i]), None                    # no augmentation: a flip changes the class

    def visible_pair_fraction(self, patch_size, ratio, repeats=10, seed=0):
        """Fraction of (image, random mask) draws in which at least one colour pair keeps a visible patch on each of
        its two squares when round(ratio * N) of the N patches are masked: how often the label can survive masking."""
        g, n = self.img_size // patch_size, len(self)
        xs = (np.arange(self.img_size) + 0.5) / self.img_size
        cover = []                                                          # (n, g, g) patches each square touches
        for j in range(2 * self.pairs):
            inx = (np.abs(xs[None] - self.centers[:, j, 0:1]) < self.half[:, None]).reshape(n, g, patch_size).any(2)
            iny = (np.abs(xs[None] - self.centers[:, j, 1:2]) < self.half[:, None]).reshape(n, g, patch_size).any(2)
            cover.append((iny[:, :, None] & inx[:, None, :]).reshape(n, g * g))
        hits = 0
        for r in range(repeats):
            visible = ~vl.sample_mask(n, (g, g), ratio, generator=torch.Generator().manual_seed(seed + r)).numpy()
            seen = [(c & visible).any(1) for c in cover]
            hits += np.any([seen[2 * p] & seen[2 * p + 1] for p in range(self.pairs)], 0).sum()
        return hits / (repeats * n)


DEMO_TASKS = {"relations": dict(pairs=1, distractors=2), "pairs": dict(pairs=2, distractors=0)}


class UnlabelledImages(Dataset):
    """Images without labels (a uint8 tensor (n, 3, H, W)): what the distill stage reads on the demo. It has no labels
    to give: __getitem__ returns (image, error)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        return self.images[key[0]], None


def demo_images(n, img_size, seed, task, chunk=4096):
    """n fresh procedural images of a demo task, without their labels (uint8 (n, 3, H, W)), made chunk by chunk so a
    large pool never holds more than one chunk's float pixels; deterministic from (n, img_size, seed, task)."""
    parts = [RelationsDemo(min(chunk, n - lo), img_size, seed=[seed, lo], **DEMO_TASKS[task]).images
             for lo in range(0, n, chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)


def demo_set(args, split):
    """a labelled demo set: train (the students' labelled images), val (held out), teacher (the teacher's), probe (the
    linear probe's training images). Seeds: demo_seed + 0 / 1 / 2 / 4 (+ 3: the unlabelled distillation pool)."""
    n, offset = dict(train=(args.demo_train, 0), val=(args.demo_val, 1), teacher=(args.demo_teacher_train, 2),
                     probe=(args.demo_probe, 4))[split]
    return RelationsDemo(n, args.img_size, seed=args.demo_seed + offset, **DEMO_TASKS[args.demo_task])


# ----------------------------------------------------------------------------------------------------------------
# Image folders

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
MEAN, STD = vl.IMAGENET_MEAN, vl.IMAGENET_STD          # RandAugment's fill; a model's input: vl.normalize


def hidden(name):
    """a name that starts with "." is not data: macOS's AppleDouble files ("._cat.JPEG", beside each image copied
    from a Mac; not images), .DS_Store, .ipynb_checkpoints/, editors' and sync tools' copies. Skipped as files and
    as folders (a hidden folder is neither a class nor walked), as ls and shell globs leave them out."""
    return name.startswith(".")


def list_split(root, split):
    """-> (classes, [(path, label)]) of root/split/<class>/*, with a one-line error for a missing or empty folder."""
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise UserError(f"data folder {d} does not exist (expected {root}/train/<class>/*.JPEG and "
                        f"{root}/val/<class>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not hidden(e.name))
    if not classes:
        raise UserError(f"data folder {d} has no class sub-folders")
    samples = []
    for label, c in enumerate(classes):
        try:
            files = sorted(e.path for e in os.scandir(os.path.join(d, c))
                           if e.is_file() and e.name.lower().endswith(IMG_EXT) and not hidden(e.name))
        except OSError as e:                                                # permissions
            raise UserError(f"class folder {os.path.join(d, c)}: cannot read it ({e.strerror})") from None
        if not files and split == "train":
            raise UserError(f"class folder {os.path.join(d, c)} has no images ({', '.join(IMG_EXT)})")
        samples += [(f, label) for f in files]
    if not samples:
        raise UserError(f"data folder {d} has no images")
    return classes, samples


def check_folder(path, flag, hint=""):
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: {'not a folder' if os.path.exists(path) else 'no such folder'}{hint}")


def to_rgb(im):
    """A decoded image as 8-bit RGB. Integer and float grey images are scaled to 0..255 (convert("RGB") would clip
    them at 255): I;16 (16-bit) from 0..65535; I (32-bit: what older Pillow makes of a 16-bit PNG) from 0..65535 if a
    value is over 255, else as is; F from 0..1 if no value is over 1, else 0..255; values outside the range clip."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32)
        if im.mode == "F":
            top = 1.0 if a.max() <= 1 else 255.0
        else:
            top = 255.0 if im.mode == "I" and a.max() <= 255 else 65535.0
        im = Image.fromarray(np.clip(a * (255 / top), 0, 255).round().astype(np.uint8))
    return im.convert("RGB")


def crop_box(w, h, g: random.Random):
    """RandomResizedCrop's box (scale 0.08-1, ratio 3/4-4/3), as torchvision draws it."""
    for _ in range(10):
        area = w * h * g.uniform(0.08, 1.0)
        ratio = math.exp(g.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = g.randint(0, w - cw), g.randint(0, h - ch)
            return x, y, x + cw, y + ch
    s = min(w, h)                                                           # fallback: central square
    return (w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2


class ImageFolder(Dataset):
    """DIR/<class>/* decoded with Pillow, turned upright as their EXIF orientation says, converted to RGB (to_rgb).
    train: random-resized-crop (bicubic) + flip with probability hflip, then `augment` (RandAugment / 3-Augment), all
    from a per-(seed, epoch, index) RNG, so a resumed run sees the same images.
    eval: resize to size/crop_ratio then centre crop (interpolation: "bicubic" or "bilinear"). An unreadable image
    gives None (skipped and counted by collate)."""

    def __init__(self, samples, classes, img_size, train, augment=None, hflip=0.5, crop_ratio=0.875,
                 interpolation="bicubic"):
        self.samples, self.classes, self.size, self.train = samples, classes, img_size, train
        self.augment, self.hflip, self.crop_ratio = augment, hflip, crop_ratio
        self.resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        i, seed = key
        path, label = self.samples[i]
        try:
            with warnings.catch_warnings():                                 # over Image.MAX_IMAGE_PIXELS (a bomb?):
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error before decoding, no warning
                with Image.open(path) as im:
                    im = to_rgb(ImageOps.exif_transpose(im))                # upright, as the camera's EXIF says
        except Exception as e:                                              # truncated, corrupt, not an image, ...
            return None, label, f"{path}: {type(e).__name__}: {e}"
        w, h = im.size
        if self.train:
            g = random.Random(seed)
            box = crop_box(w, h, g)
            im = im.resize((self.size, self.size), Image.BICUBIC, box=box)
            if g.random() < self.hflip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            if self.augment is not None:
                im = self.augment(im, g)
        else:
            s = min(w, h) * self.crop_ratio                                 # == resize(size/ratio) + centre crop(size)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            im = im.resize((self.size, self.size), self.resample, box=box)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1), label, None


class UnlabelledFolder(ImageFolder):
    """Image files without labels (any folder of images): training transform, __getitem__ -> (image, error)."""

    def __init__(self, paths, img_size):
        super().__init__([(p, None) for p in paths], None, img_size, True)

    def __getitem__(self, key):
        image, _, error = super().__getitem__(key)
        return image, error


def list_images(root):
    """every image file under root (any depth, sorted), with a one-line error when there is none"""
    if not os.path.isdir(root):
        raise UserError(f"--distill-data {root}: no such folder")
    files, seen = [], set()
    for d, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(n for n in dirs if not hidden(n))                  # the first of two links to a folder wins
        if os.path.realpath(d) in seen:                                     # a symlink loop, or a folder seen before
            dirs.clear()
            continue
        seen.add(os.path.realpath(d))
        files += [os.path.join(d, f) for f in names if f.lower().endswith(IMG_EXT) and not hidden(f)
                  and os.path.isfile(os.path.join(d, f))]                   # not a pipe (it would block), a device
    files.sort()
    if not files:
        raise UserError(f"--distill-data {root}: no images in it ({', '.join(IMG_EXT)})")
    return files


# ----------------------------------------------------------------------------------------------------------------
# A run's sets, loaders, unreadable images

def collate(batch):
    """-> uint8 images (B,3,H,W), labels (B,), [error strings of the skipped images]; an unlabelled set's items are
    (image, error) and give (images, errors): no labels exist to pass on"""
    good = [b for b in batch if b[0] is not None]
    bad = [b[-1] for b in batch if b[0] is None]
    images = torch.stack([b[0] for b in good]) if good else torch.zeros(0, dtype=torch.uint8)
    if len(batch[0]) == 2:
        return images, bad
    return images, torch.tensor([b[1] for b in good], dtype=torch.long), bad


def to_pixels(x, device):
    """uint8 (B,3,H,W) on host -> float pixels in [0, 1] on device; each model normalises them its own way
    (vl.normalize: its pixel mean / std)"""
    return x.to(device, non_blocking=True).float().div_(255)


class BatchSampler:
    """Per-epoch shuffled, rank-sharded batches of (index, augmentation seed). Global batch s of epoch e is
    perm_e[s*GB:(s+1)*GB], rank r takes its r-th slice; start_batch skips what a resumed run already did.
    repeats r > 1 (DeiT's repeated augmentation): every image of perm_e stands r times in a row, each copy with its
    own augmentation seed, and the list is cut to n, so an epoch keeps its length and sees about n / r distinct images;
    the copies of an image share a global batch (one gradient step), on one rank or straddling two."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, train=True, repeats=1):
        self.n, self.bs, self.rank, self.world, self.seed, self.train = n, batch_size, rank, world, seed, train
        self.repeats = repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch

    def __len__(self):
        if self.train:
            return self.n // (self.bs * self.world)
        return math.ceil(len(range(self.rank, self.n, self.world)) / self.bs)

    def __iter__(self):
        if not self.train:                                                  # eval: every image once, strided over ranks
            idx = list(range(self.rank, self.n, self.world))
            for b in range(0, len(idx), self.bs):
                yield [(i, None) for i in idx[b:b + self.bs]]
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.bs * self.world
        copies = [(i, c) for i in perm for c in range(self.repeats)][:self.n] if self.repeats > 1 else None
        for s in range(self.start, len(self)):
            lo = s * gb + self.rank * self.bs
            if copies is None:
                yield [(i, hash((self.seed, self.epoch, i))) for i in perm[lo:lo + self.bs]]
            else:
                yield [(i, hash((self.seed, self.epoch, i, c))) for i, c in copies[lo:lo + self.bs]]


class Data:
    """The sets of a run, each built on first use (a large distillation pool is only made when a stage reads it).
    train / val / probe: labelled (image, label, error); distill: unlabelled (image, error), what distillation reads:
    demo: a pool of --demo-pool fresh images (0: the students' labelled images, labels dropped); --data: every image
    under --distill-data (default DIR/train, labels unused)."""

    def __init__(self, args):
        self.args = args
        if args.data is not None:
            self.classes, self._train = list_split(args.data, "train")
            vclasses, self._val = list_split(args.data, "val")
            if vclasses != self.classes:
                a, b = sorted(set(self.classes) - set(vclasses)), sorted(set(vclasses) - set(self.classes))
                raise UserError(f"train and val class folders differ: only in train {a[:5]}"
                                f"{'...' if len(a) > 5 else ''}, only in val {b[:5]}{'...' if len(b) > 5 else ''}")
            if args.distill_data is not None:
                list_images(args.distill_data)                              # fail fast, before any stage trains
        else:
            self.classes = RelationsDemo.classes

    @functools.cached_property
    def train(self):
        a = self.args
        return demo_set(a, "train") if a.data is None else ImageFolder(self._train, self.classes, a.img_size, True)

    @functools.cached_property
    def val(self):
        a = self.args
        return demo_set(a, "val") if a.data is None else ImageFolder(self._val, self.classes, a.img_size, False)

    @functools.cached_property
    def teacher_train(self):                                                # demo: the teacher's larger labelled set
        return demo_set(self.args, "teacher") if self.args.data is None and self.args.demo_teacher_train else self.train

    @functools.cached_property
    def distill(self):
        a = self.args
        if a.data is not None:
            return UnlabelledFolder(list_images(a.distill_data or os.path.join(a.data, "train")), a.img_size)
        if a.demo_pool:
            return UnlabelledImages(demo_images(a.demo_pool, a.img_size, a.demo_seed + 3, a.demo_task))
        return UnlabelledImages(self.train.images)

    def probe(self, limit=None):
        """the linear probe's labelled training images (evaluation transform): demo: --demo-probe fresh images;
        --data: `limit` images of the train split, class-balanced (each class's first of a fixed shuffle; None:
        PROBE_PER_CLASS per class, so the probe's memory does not grow with the split; 0: the whole split)"""
        a = self.args
        if a.data is None:
            return demo_set(a, "probe")
        samples = self._train
        limit = PROBE_PER_CLASS * len(self.classes) if limit is None else limit
        if limit and limit < len(samples):
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
            share = [limit // len(self.classes) + (c < limit % len(self.classes)) for c in range(len(self.classes))]
            keep = []
            for i in order:                                                 # each class its share (or all it has)
                if share[samples[i][1]] > 0:
                    share[samples[i][1]] -= 1
                    keep.append(i)
            samples = [samples[i] for i in sorted(keep)]
        return ImageFolder(samples, self.classes, a.img_size, False)


def get_data(args):
    return Data(args)


def make_loader(ds, args, ctx, train):
    sampler = BatchSampler(len(ds), args.batch_size, ctx.rank, ctx.world, args.seed, train,
                           repeats=args.repeated_aug if train else 1)
    return DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0,
                      generator=torch.Generator(),                          # leaves the global RNG alone
                      worker_init_fn=quiet_on_sigterm)


def quiet_on_sigterm(worker_id):
    """a DataLoader worker ends quietly on SIGTERM (a scheduler signals every process of the job), as on Ctrl-C: the
    training process says what happened (main), not torch's 'worker killed by signal'"""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


class BadImages:
    """Counts the unreadable images a rank skipped, warns once per epoch, and stops when more than max_frac of them
    are bad (checked from 1000 images on, and at the end of every epoch: at least 3 bad ones). A training batch with
    no readable image (empty_batches) is skipped by a single process; under torchrun its rank steps on a stand-in that
    weighs nothing. With repeated augmentation every image comes `repeats` times: each copy counts 1 / repeats."""

    def __init__(self, max_frac, repeats=1):
        self.max_frac, self.seen, self.bad, self.first, self.empty_batches = max_frac, 0, 0, None, 0
        self.repeats, self.pending = repeats, None

    def add(self, n_good, errors):
        self.seen += (n_good + len(errors)) / self.repeats
        self.bad += len(errors) / self.repeats
        self.first = self.first or (errors[0] if errors else None)
        if self.seen >= 1000:
            self.check()

    def check(self):
        if self.bad > max(2, self.max_frac * self.seen):
            raise UserError(f"{round(self.bad)} of {round(self.seen)} images could not be read (more than "
                            f"--max-bad-frac {self.max_frac}); first: {self.first}")

    def add_batch(self, n_good, errors, ctx):
        """a training batch, counted on this rank alone (no collective, so no extra synchronisation per step): a
        UserError is raised at once by a single process, else kept for `sync` (every log line and checkpoint), which
        stops every rank. -> whether this rank has no readable image in it (a single process skips the batch; with
        several ranks it takes a step on a stand-in image that weighs nothing, so DDP's ranks stay in step)"""
        try:
            self.add(n_good, errors)
        except UserError as e:
            if ctx.world == 1:
                raise
            self.pending = self.pending or e
        self.empty_batches += not n_good
        return not n_good

    def sync(self, ctx):
        """collective: an error kept by add_batch on any rank stops every rank"""
        stop_together(self.pending, ctx)

    def end_pass(self, what, ctx):
        """the end of an epoch or of an evaluation: every rank checks its share, rank 0 reports its own; all count
        afresh"""
        if self.pending is not None:
            raise self.pending
        self.check()
        if ctx.main and (self.bad or self.empty_batches):
            empty = f"; {self.empty_batches} batch(es) with no readable image skipped" if self.empty_batches else ""
            share = " (rank 0's share)" if ctx.world > 1 else ""
            tqdm.write(f"warning: skipped {round(self.bad)} unreadable image(s) of {round(self.seen)} in {what}{share} "
                       f"(first: {self.first}){empty}", file=sys.stderr)
        self.seen = self.bad = self.empty_batches = 0
        self.first = None


# ----------------------------------------------------------------------------------------------------------------
# Augmentations
# The DeiT / timm training augmentations, following torchvision's and timm's definitions (timm's RandAugment,
# RandomErasing and Mixup; DeiT III's 3-Augment). They are written out here because torchvision is not a dependency:
# no torchvision wheel pairs with the CPU build of torch that CI installs (it fails to import beside it).
# Per image on PIL inside ImageFolder (RandAugment or 3-Augment, after crop and flip), then per batch on the pixels in
# [0, 1] (random erasing, then mixup / cutmix). Every draw comes from a seeded generator (per image: seed, epoch,
# index; per batch: seed, step, rank), so a resumed run repeats them.

FILL = tuple(round(255 * m) for m in MEAN)                                  # uncovered pixels get the mean colour


def _signed(v, g):
    return -v if g.random() < 0.5 else v


def _factor(m, inc, g):
    """Color / Contrast / Brightness / Sharpness factor: 0.1 .. 1.9 growing with m, or (increasing) 1 +- 0.9 m"""
    return max(0.1, 1.0 + _signed(0.9 * m, g)) if inc else 0.1 + 1.8 * m


def _fill(im):
    return FILL if len(im.getbands()) == 3 else round(sum(FILL) / 3)


def _affine(im, coeffs):
    return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=_fill(im))


def _posterize(im, bits):
    """keep the top `bits` bits; 0 bits (the top magnitude of the increasing variant) gives black, as older Pillow
    did"""
    return ImageOps.posterize(im, bits) if bits > 0 else Image.new(im.mode, im.size)


def _solarize_add(im, add, thresh=128):
    return im.point([min(255, i + add) if i < thresh else i for i in range(256)] * len(im.getbands()))


# RandAugment's 15 ops: name -> f(image, level m in [0, 1] = magnitude / 10, increasing, rng), each keeping size and
# mode. Increasing (inc1): posterize keeps 4 .. 0 bits, solarize's threshold falls 256 .. 0, the enhancements move
# away from 1.
RAND_OPS = {
    "AutoContrast": lambda im, m, inc, g: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, inc, g: ImageOps.equalize(im),
    "Invert": lambda im, m, inc, g: ImageOps.invert(im),
    "Rotate": lambda im, m, inc, g: im.rotate(_signed(30 * m, g), resample=Image.BICUBIC, fillcolor=_fill(im)),
    "Posterize": lambda im, m, inc, g: _posterize(im, 4 - int(4 * m) if inc else int(4 * m)),
    "Solarize": lambda im, m, inc, g: ImageOps.solarize(im, 256 - int(256 * m) if inc else int(256 * m)),
    "SolarizeAdd": lambda im, m, inc, g: _solarize_add(im, int(110 * m)),
    "Color": lambda im, m, inc, g: ImageEnhance.Color(im).enhance(_factor(m, inc, g)),
    "Contrast": lambda im, m, inc, g: ImageEnhance.Contrast(im).enhance(_factor(m, inc, g)),
    "Brightness": lambda im, m, inc, g: ImageEnhance.Brightness(im).enhance(_factor(m, inc, g)),
    "Sharpness": lambda im, m, inc, g: ImageEnhance.Sharpness(im).enhance(_factor(m, inc, g)),
    "ShearX": lambda im, m, inc, g: _affine(im, (1, _signed(0.3 * m, g), 0, 0, 1, 0)),
    "ShearY": lambda im, m, inc, g: _affine(im, (1, 0, 0, _signed(0.3 * m, g), 1, 0)),
    "TranslateXRel": lambda im, m, inc, g: _affine(im, (1, 0, _signed(0.45 * m, g) * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im, m, inc, g: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * m, g) * im.size[1])),
}


class RandAugment:
    """timm's RandAugment from a spec such as DeiT's 'rand-m9-mstd0.5-inc1': n ops (default 2) drawn with replacement
    from RAND_OPS, each applied with probability p (0.5) at magnitude m (of 10; default 10). With mstd > 0 every op
    draws its magnitude from N(m, mstd) (uniform on [0, m] when mstd > 100), clipped to [0, 10]. inc1: the variants
    whose strength increases with the magnitude."""

    def __init__(self, spec):
        self.m, self.n, self.p, self.mstd, self.inc = 10.0, 2, 0.5, 0.0, False
        head, *parts = spec.split("-")
        hits = [re.fullmatch(r"(mstd|m|p)(\d+(?:\.\d+)?)|(inc|n)(\d+)", part) for part in parts]
        if head != "rand" or not all(hits):
            raise ValueError(f"--aa {spec!r} is not a RandAugment spec rand-m<magnitude>[-n<ops>][-p<prob>]"
                             "[-mstd<std>][-inc<0|1>] (e.g. rand-m9-mstd0.5-inc1), 3augment or none")
        for key, val in ([g for g in h.groups() if g is not None] for h in hits):
            if key == "n":
                self.n = int(val)
            elif key == "inc":
                self.inc = int(val) > 0
            else:
                setattr(self, key, float(val))

    def __call__(self, im, g):
        for name in g.choices(list(RAND_OPS), k=self.n):
            if self.p < 1 and g.random() > self.p:
                continue
            m = g.uniform(0, self.m) if self.mstd > 100 else g.gauss(self.m, self.mstd) if self.mstd > 0 else self.m
            im = RAND_OPS[name](im, min(max(m, 0.0), 10.0) / 10, self.inc, g)
        return im


class ThreeAugment:
    """DeiT III's 3-Augment as Adventurer trains with it: one of grayscale, solarize (threshold 128) and Gaussian blur
    (radius 0.1 .. 2), chosen uniformly, then colour jitter: brightness, contrast and saturation each scaled by
    U(1 - jitter, 1 + jitter), in random order."""

    def __init__(self, jitter=0.3):
        self.jitter = jitter

    def __call__(self, im, g):
        k = g.randrange(3)
        if k == 0:
            im = ImageOps.grayscale(im).convert(im.mode)
        elif k == 1:
            im = ImageOps.solarize(im, 128)
        else:
            im = im.filter(ImageFilter.GaussianBlur(g.uniform(0.1, 2.0)))
        for enhance in g.sample([ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color], 3):
            im = enhance(im).enhance(g.uniform(1 - self.jitter, 1 + self.jitter))
        return im


def image_augment(spec):
    """--aa -> ImageFolder's per-image augmentation (None for 'none'); ValueError for a bad spec"""
    if spec in (None, "", "none"):
        return None
    return ThreeAugment() if spec == "3augment" else RandAugment(spec)


def random_erase(x, prob, g, gen, cfg=None):
    """timm's RandomErasing as DeiT uses it (mode 'pixel', one box), in place on a normalised batch (B, C, H, W): with
    probability prob an image gets one box of 2 % .. 1/3 of its area, aspect ratio log-uniform in 0.3 .. 1/0.3, at a
    uniform position, filled with N(0, 1) noise per pixel and channel (up to 10 draws for a box that fits).
    cfg: x holds pixels in [0, 1] for a model of this config: the noise is pixel_mean + pixel_std N(0, 1), N(0, 1)
    once the model normalises it. g: random.Random for the boxes; gen: torch.Generator on x's device for the noise.
    -> [(top, left, h, w) or None]"""
    B, _, H, W = x.shape
    boxes = []
    for _ in range(B):
        box = None
        if g.random() <= prob:
            for _ in range(10):
                area = g.uniform(0.02, 1 / 3) * H * W
                aspect = math.exp(g.uniform(math.log(0.3), math.log(1 / 0.3)))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < H and w < W:
                    box = (g.randint(0, H - h), g.randint(0, W - w), h, w)
                    break
        boxes.append(box)
    if any(boxes):
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        if cfg is not None:
            noise = noise * torch.tensor(cfg.pixel_std, device=x.device).view(1, 3, 1, 1) \
                + torch.tensor(cfg.pixel_mean, device=x.device).view(1, 3, 1, 1)
        noise = noise.to(x.dtype)
        for b, box in enumerate(boxes):
            if box:
                t, l, h, w = box
                x[b, :, t:t + h, l:l + w] = noise[b, :, t:t + h, l:l + w]
    return boxes


def mix_batch(x, y, num_classes, mixup, cutmix, switch_prob, smoothing, g):
    """timm's Mixup in 'batch' mode (DeiT: mixup 0.8, cutmix 1.0, switch prob 0.5): image i is mixed with image B-1-i.
    Cutmix (with probability switch_prob when both are on) draws lam ~ Beta(cutmix, cutmix) and pastes the partner's
    box, sides int(sqrt(1 - lam) x the image's), centred at a uniform pixel and clipped at the borders; lam becomes the
    share of pixels kept. Mixup blends whole images with lam ~ Beta(mixup, mixup). Targets: lam t(y) + (1 - lam)
    t(partner), t = one-hot with label smoothing (off = smoothing / classes, on = 1 - smoothing + off).
    -> (images, soft targets (B, classes), lam, cutmix box (y0, y1, x0, x1) or None)"""
    use_cutmix = cutmix > 0 and (mixup <= 0 or g.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam, box = g.betavariate(alpha, alpha), None
    if use_cutmix:
        H, W = x.shape[-2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = g.randrange(H), g.randrange(W)
        box = y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    off = smoothing / num_classes
    t = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)
    return x, lam * t + (1 - lam) * t.flip(0), lam, box


def with_augmentation(ds, args):
    """a stage's training set with that stage's per-image augmentation (image folders; the demo is not augmented)"""
    if not isinstance(ds, ImageFolder):
        return ds
    ds = copy.copy(ds)
    ds.augment, ds.hflip = image_augment(args.aa), args.hflip
    return ds


def batch_augment(args, n_classes, stage, rank, cfg=None):
    """-> f(x, y, step) -> (x, y) for a training batch of pixels in [0, 1]: random erasing (noise in the trained
    model's normalisation, cfg's), then (labelled stages, where y becomes soft targets) mixup / cutmix, from
    generators seeded by (seed, step, rank)"""
    mix = stage != "distill" and (args.mixup > 0 or args.cutmix > 0)

    def augment(x, y, step):
        if args.erase_prob > 0:
            key = hash((args.seed, step, rank, 1)) & (2**63 - 1)
            random_erase(x, args.erase_prob, random.Random(key), torch.Generator(x.device).manual_seed(key), cfg)
        if mix:
            x, y, _, _ = mix_batch(x, y, n_classes, args.mixup, args.cutmix, args.mixup_switch_prob,
                                   args.label_smoothing, random.Random(hash((args.seed, step, rank, 2))))
        return x, y
    return augment
