"""Data for the tools: ImageFolder splits, Fashion-MNIST, the batches the trainers draw.

- ImageFolder: `scan_image_folder` (each image file once, links followed), `SafeImageFolder`
  (unreadable images are None, `collate` drops and counts them), `ShardSampler` (evaluation: every
  sample once over the ranks), `folder_dataset` (with a model's timm transforms);
- Fashion-MNIST (Debian's `dataset-fashion-mnist` IDX files): `fashion_mnist`, `to_model_input`,
  `FashionMnist` (test split at a model's size), `FashionTrain` (training split through a
  transform), `fashion_batches` (endless shuffled shards, no augmentation);
- `LoaderBatches`: endless shuffled full batches of this rank's shard of a dataset (the trainers);
- LLaVA prompts for `atp-train`: `synthetic_batches`, `jsonl_batches`.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------- ImageFolder splits

def scan_image_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]], List[str]]:
    """Classes, `(path, class index)` samples and repeated links of an ImageFolder split.

    Classes and image extensions are torchvision ImageFolder's, and links are followed as there,
    but every image file is counted once. ImageFolder walks a directory link loop (`class_a/loop
    -> ..`) again and again and labels every file it reaches by the class folder it went through:
    a folder of 15 images becomes 615 samples, most of them under the wrong class. Here every
    real folder is walked once and every file is taken once (by its real path), labelled by the
    class folder it really lies in. A file whose real path is outside every class folder (class
    folders or images linked in from elsewhere, a common layout) takes the class folder it was
    reached through, the first in sorted order if several reach it. The links that led to
    something already counted are returned (relative to `root`) so the caller can say so.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

    classes, _ = find_classes(root)
    class_of_dir = {os.path.realpath(os.path.join(root, c)): i for i, c in enumerate(classes)}
    walked = {os.path.realpath(root), *class_of_dir}
    found: Dict[str, Tuple[str, int]] = {}  # real path -> (path it was reached by, class)
    repeats: List[str] = []

    @functools.lru_cache(maxsize=None)
    def class_of(folder: str) -> Optional[int]:
        """The class folder that `folder` (a real path) lies in, if any."""
        if folder in class_of_dir:
            return class_of_dir[folder]
        parent = os.path.dirname(folder)
        return None if parent == folder else class_of(parent)

    for index, name in enumerate(classes):
        for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
            kept = []
            for sub in sorted(subfolders):
                real = os.path.realpath(os.path.join(folder, sub))
                if real in walked:  # a loop, or a folder that is (or will be) walked on its own
                    repeats.append(os.path.relpath(os.path.join(folder, sub), root))
                else:
                    walked.add(real)
                    kept.append(sub)
            subfolders[:] = kept
            real_folder = os.path.realpath(folder)
            for file in sorted(files):
                if not has_file_allowed_extension(file, IMG_EXTENSIONS):
                    continue
                path = os.path.join(folder, file)
                # one lstat per plain file: resolving every path in full is slow on ImageNet-size folders
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folder, file)
                if real in found:
                    repeats.append(os.path.relpath(path, root))
                else:
                    home = class_of(os.path.dirname(real))
                    found[real] = (path, index if home is None else home)
    samples = sorted(found.values(), key=lambda s: (s[1], s[0]))
    return classes, samples, repeats


class SafeImageFolder(Dataset):
    """An ImageFolder (each file once, see `scan_image_folder`) that yields None for images it
    cannot decode instead of raising."""

    def __init__(self, root: str, transform) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a directory")
        try:
            self.classes, self.samples, self.repeats = scan_image_folder(root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--data {root!r} holds no class folders with images ({e})") from None
        counted = {target for _, target in self.samples}
        empty = [c for i, c in enumerate(self.classes) if i not in counted]
        if empty:
            raise FileNotFoundError(f"--data {root!r}: class folder(s) {empty[:5]} hold no images of their own "
                                    "(linked files count once, under the class folder they lie in)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, target
        return self.transform(img), target


def collate(batch):
    good = [(x, y) for x, y in batch if x is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: every sample exactly once over all ranks (no padding)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_transform(config: Dict[str, Any], augment: Dict[str, Any]):
    """timm's training transform for a data config, with the authors' augmentation (`augment`:
    `auto_augment`, `re_prob`, ...: `timm.data.create_transform` arguments)."""
    import timm.data
    transform = timm.data.create_transform(**dict(config, **augment), is_training=True)
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # RandAugment's / AutoAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
    return transform


def posterize_any_bits(img, bits: int, **_):
    """timm's posterize, with 0 bits kept as Pillow kept them before it refused them (a black
    image): timm's increasing posterize reaches 0 bits at magnitude 10, which RandAugment's
    magnitude noise (`mstd`) samples now and then, and Pillow 10+ raises there."""
    from PIL import Image, ImageOps
    return ImageOps.posterize(img, bits) if bits >= 1 else Image.new(img.mode, img.size)


def folder_dataset(model, root: str, training: bool = False, augment: Optional[Dict[str, Any]] = None
                   ) -> "SafeImageFolder":
    """An ImageFolder split with `model`'s timm transforms (`training`: the training transforms,
    with `augment`'s `create_transform` arguments)."""
    import timm.data
    config = timm.data.resolve_data_config({}, model=model)
    transform = (train_transform(config, augment or {}) if training
                 else timm.data.create_transform(**config, is_training=False))
    return SafeImageFolder(root, transform)


class LoaderBatches:
    """Endless shuffled full batches of this rank's share of `dataset` (`torch` DataLoader, a
    DistributedSampler under torchrun, a new shuffle each pass). Unreadable images (None from
    `SafeImageFolder`) leave their batch and are counted in `skipped` (each time one comes up); a
    batch left with fewer than `min_batch` images is skipped, and a whole pass without one batch
    to train on is an error naming `name`, never an endless loop. `steps`: batches per pass."""

    def __init__(self, dataset, batch_size: int, workers: int, rank: int, world: int, seed: int,
                 min_batch: int = 1, name: str = "") -> None:
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        self.dataset, self.name, self.min_batch, self.skipped = dataset, name, min_batch, 0
        self.sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1 else None
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=self.sampler is None, sampler=self.sampler,
                                 num_workers=workers, drop_last=True, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(seed))
        if len(self.loader) == 0:  # drop_last left nothing
            raise ValueError(f"{len(dataset)} image(s) make no full batch of {batch_size} per process; "
                             f"lower --batch-size")
        self.steps = len(self.loader)

    def __iter__(self):
        epoch = 0
        while True:
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            used = 0
            for images, labels, skipped in self.loader:
                self.skipped += skipped
                if images is not None and len(images) >= self.min_batch:
                    used += 1
                    yield images, labels
            if used == 0:
                raise ValueError(f"--data {self.name!r}: a whole pass gave no batch of at least {self.min_batch} "
                                 f"readable image(s) ({self.skipped} unreadable image(s) skipped so far)")
            epoch += 1


def folder_batches(model, root: str, batch_size: int, workers: int, rank: int, world: int, seed: int,
                   training: bool = False, min_batch: int = 1, augment: Optional[Dict[str, Any]] = None):
    """(batches, number of classes) of an ImageFolder split, with the model's own transforms
    (`training`: timm's training augmentation, with `augment`'s `create_transform` arguments)."""
    dataset = folder_dataset(model, root, training, augment)
    return LoaderBatches(dataset, batch_size, workers, rank, world, seed, min_batch, name=root), len(dataset.classes)


# --------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str, count: int, root: Path = FASHION_DIR) -> Tuple[np.ndarray, np.ndarray]:
    """The first `count` images and labels of `split` ("train" or "test")."""
    prefix = "train" if split == "train" else "t10k"
    files = [root / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: apt-get install dataset-fashion-mnist")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if count > len(labels):
        raise ValueError(f"asked for {count} {split} images; Fashion-MNIST has {len(labels)}")
    return images[:count], labels[:count].astype(np.int64)


def to_model_input(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 `[N, 28, 28]` -> normalised `[N, 3, size, size]` float."""
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class FashionMnist(Dataset):
    """The first `count` Fashion-MNIST test images at `size` px (as `tome-plus fidelity` feeds them)."""

    classes = tuple(range(10))
    repeats: List[str] = []

    def __init__(self, count: int, size: int) -> None:
        self.images, self.labels = fashion_mnist("test", count)
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return to_model_input(self.images[index:index + 1], self.size)[0], int(self.labels[index])


def fashion_batches(size: int, batch_size: int, count: int, rank: int, world: int, seed: int,
                    min_batch: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of this rank's share of the first `count` training images (no
    augmentation); a last batch smaller than `min_batch` is left out (BatchNorm cannot train on
    one image)."""
    images, labels = fashion_mnist("train", count)
    images, labels = images[rank::world], labels[rank::world]
    if len(labels) < min_batch:
        raise ValueError(f"{len(labels)} training image(s) per process; need at least {min_batch}")
    generator = torch.Generator().manual_seed(seed + rank)
    while True:
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            if len(idx) >= min_batch:
                yield to_model_input(images[idx.numpy()], size), torch.from_numpy(labels[idx.numpy()])


def fashion_epoch_steps(count: int, batch_size: int, rank: int, world: int, min_batch: int = 1) -> int:
    """Batches per pass of `fashion_batches`."""
    full, rest = divmod(len(range(rank, count, world)), batch_size)
    return full + (1 if rest >= min_batch else 0)


class FashionTrain(torch.utils.data.Dataset):
    """Fashion-MNIST training images as RGB PIL images through a (timm training) transform."""

    def __init__(self, count: int, transform) -> None:
        self.images, self.labels = fashion_mnist("train", count)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


# --------------------------------------------------------------------- LLaVA prompts (atp-train)

def synthetic_batches(config, batch_size: int, seed: int, device: str) -> Iterator[Dict[str, torch.Tensor]]:
    """Random images and prompts with the processor's placeholder count; the loss on the text."""
    from .hf_shapes import make_inputs  # transformers is imported only for a LLaVA
    step = 0
    while True:
        ids, mask, pixels = make_inputs(config, batch_size, text_tokens=16, device=device, seed=seed + step)
        labels = torch.where(ids == config.image_token_id, -100, ids)
        yield dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        step += 1


def jsonl_batches(path: str, processor, batch_size: int, rank: int, world: int, device: str
                  ) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches of this rank's lines of a JSON-lines file; labels cover the answer's tokens only."""
    from PIL import Image
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][rank::world]
    if not rows:
        raise ValueError(f"{path} has no samples for rank {rank} of {world}")
    while True:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [Image.open(r["image"]).convert("RGB") for r in chunk]
            prompts = [r["prompt"] for r in chunk]
            full = [p + " " + r["answer"] for p, r in zip(prompts, chunk)]
            inputs = processor(images=images, text=full, return_tensors="pt", padding=True)
            prompt_lens = [len(processor(images=im, text=p, return_tensors="pt")["input_ids"][0])
                           for im, p in zip(images, prompts)]
            labels = inputs["input_ids"].clone()
            for i, n in enumerate(prompt_lens):
                pad = int((inputs["attention_mask"][i] == 0).sum()) if processor.tokenizer.padding_side == "left" else 0
                labels[i, :pad + n] = -100
            labels[inputs["attention_mask"] == 0] = -100
            inputs["labels"] = labels
            yield {k: v.to(device) for k, v in inputs.items()}
