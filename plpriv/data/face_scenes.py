"""Face-detection scenes: scikit-image's bundled LFW faces pasted into backgrounds, optionally as sensor RAW.

Each scene is ``image_size`` x ``image_size`` sRGB: a random crop of a bundled scikit-image sample image (those with
a person in them, ``astronaut`` and ``camera``, are left out: their faces would be unlabelled), 0-3 LFW faces at
random scales/positions and 0-3 LFW non-face crops as distractors, each tinted with the same random skin-like tint and
pasted with a feathered edge, so neither colour nor a square border tells a face. The 100 faces and 100 non-faces are
split by identity index into train/val/test. With ``raw=True`` scenes go through :func:`plpriv.data.raw.unprocess`
(packed RGGB, noise, ADC, binning) and boxes are rescaled to the RAW planes. ``wider_root`` reads WIDER FACE instead.

Items are ``(image, target)``: float32 ``[C, H, W]`` in [0, 1] (C = 3 RGB or 4 packed RAW) and
``{"boxes": [K, 4] xyxy pixels of that image, "labels": [K] zeros}``; loaders collate into ``(images, [targets])``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from plpriv.data.base import EpochSeededRandomSampler, ImageDataModule, seeded_split
from plpriv.data.raw import unprocess

BACKGROUNDS = ("coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "brick", "grass", "gravel",
               "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "cell")
Target = dict[str, Tensor]


def detection_collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[Tensor, list[Target]]:
    """Stack images, keep the per-image targets as a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class DetectionDataset(Dataset):
    """In-memory images ``[N, C, H, W]`` with a target dict each."""

    def __init__(self, images: Tensor, targets: list[Target]) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Target]:
        return self.images[i], self.targets[i]


def _backgrounds() -> list[Tensor]:
    from skimage import data

    out = []
    for name in BACKGROUNDS:
        im = torch.as_tensor(np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0)
        im = im[..., :3].permute(2, 0, 1) if im.ndim == 3 else im.expand(3, -1, -1)
        scale = 256 / min(im.shape[1:])  # shrink once to a 256-pixel short side: crops are then cheap to resize
        if scale < 1:
            size = (round(im.shape[1] * scale), round(im.shape[2] * scale))
            im = F.interpolate(im[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(im.contiguous())
    return out


def _resize(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _feather(size: int, edge: int = 2) -> Tensor:
    ramp = torch.clamp((torch.minimum(torch.arange(size), torch.arange(size).flip(0)).float() + 0.5) / edge, 0, 1)
    return ramp[:, None] * ramp[None, :]


def _iou_any(box: list[float], others: list[list[float]]) -> bool:
    for o in others:
        if min(box[2], o[2]) > max(box[0], o[0]) and min(box[3], o[3]) > max(box[1], o[1]):
            return True
    return False


def make_scenes(
    n: int, faces: Tensor, nonfaces: Tensor, backgrounds: list[Tensor], image_size: int, face_size: tuple[int, int],
    max_faces: int, generator: torch.Generator,
) -> tuple[Tensor, list[Target]]:
    """``n`` sRGB scenes ``[n, 3, S, S]`` in [0, 1] and their face boxes (xyxy pixels)."""
    rand = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # noqa: E731
    images = torch.empty(n, 3, image_size, image_size)
    targets: list[Target] = []
    for i in range(n):
        bg = backgrounds[randint(0, len(backgrounds) - 1)]
        c = randint(min(image_size, *bg.shape[1:]), min(bg.shape[1:]))
        y0, x0 = randint(0, bg.shape[1] - c), randint(0, bg.shape[2] - c)
        scene = _resize(bg[:, y0 : y0 + c, x0 : x0 + c], image_size) * (0.6 + 0.6 * rand())
        placed: list[list[float]] = []
        boxes: list[list[float]] = []
        kinds = [True] * randint(0, max_faces) + [False] * randint(0, 3)
        for is_face in kinds:
            pool = faces if is_face else nonfaces
            s = randint(*face_size)
            for _ in range(20):  # rejection sampling of a free spot
                x, y = randint(0, image_size - s), randint(0, image_size - s)
                box = [float(x), float(y), float(x + s), float(y + s)]
                if not _iou_any(box, placed):
                    break
            else:
                continue
            patch = pool[randint(0, len(pool) - 1)]
            patch = patch.flip(-1) if rand() < 0.5 else patch
            tint = torch.tensor([1.0, 0.75 + 0.15 * rand(), 0.6 + 0.2 * rand()]).view(3, 1, 1) * (0.7 + 0.5 * rand())
            patch = _resize(patch[None].expand(3, -1, -1), s) * tint
            alpha = _feather(s)
            region = scene[:, y : y + s, x : x + s]
            scene[:, y : y + s, x : x + s] = alpha * patch + (1 - alpha) * region
            placed.append(box)
            if is_face:
                boxes.append(box)
        images[i] = scene.clamp(0, 1)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                        "labels": torch.zeros(len(boxes), dtype=torch.long)})
    return images, targets


def read_wider_annotations(path: str | os.PathLike) -> list[tuple[str, Tensor]]:
    """WIDER FACE ``wider_face_*_bbx_gt.txt``: per image a relative path, a count, then ``count`` lines of
    ``x y w h blur expression illumination invalid occlusion pose`` (one zero line when the count is 0).
    Returns ``(path, boxes xyxy)`` with invalid boxes dropped."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    out, i = [], 0
    while i < len(lines):
        name, count = lines[i], int(lines[i + 1])
        rows = lines[i + 2 : i + 2 + max(count, 1)]
        i += 2 + max(count, 1)
        boxes = []
        for row in rows[:count]:
            v = [float(t) for t in row.split()]
            if len(v) < 4 or v[2] <= 0 or v[3] <= 0 or (len(v) >= 8 and v[7] == 1):  # w, h > 0; invalid flag
                continue
            boxes.append([v[0], v[1], v[0] + v[2], v[1] + v[3]])
        out.append((name, torch.tensor(boxes, dtype=torch.float32).view(-1, 4)))
    return out


class WiderFaceDataset(Dataset):
    """WIDER FACE images resized to ``image_size`` squared (boxes rescaled, faces under ``min_face`` px dropped)."""

    def __init__(self, root: str | os.PathLike, split: str, image_size: int, min_face: float, raw: bool,
                 raw_kwargs: dict[str, Any], seed: int) -> None:
        root = Path(root)
        ann = root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
        if not ann.is_file():
            raise ValueError(f"WIDER FACE annotations not found at {ann}: `wider_root` must hold wider_face_split/ "
                             f"and WIDER_{split}/images/")
        self.items = read_wider_annotations(ann)
        self.images_dir = root / f"WIDER_{split}" / "images"
        self.image_size, self.min_face, self.raw, self.raw_kwargs, self.seed = image_size, min_face, raw, raw_kwargs, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Target]:
        from PIL import Image

        name, boxes = self.items[i]
        with Image.open(self.images_dir / name) as im:
            rgb = torch.as_tensor(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = rgb.shape[1:]
        image = F.interpolate(rgb[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)[0]
        boxes = boxes * torch.tensor([self.image_size / w, self.image_size / h] * 2)
        boxes = boxes[((boxes[:, 2:] - boxes[:, :2]) >= self.min_face).all(1)]
        if self.raw:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)  # per item: deterministic, worker-safe
            image, _ = unprocess(image.clamp(0, 1), gen, **self.raw_kwargs)
            boxes = boxes / (self.image_size / image.shape[-1])
        return image, {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)}


class FaceScenesDataModule(ImageDataModule):
    """Synthetic face scenes (default) or WIDER FACE (``wider_root``), as RGB or packed sensor RAW.

    Args:
        num_train, num_val, num_test: scenes per split (synthetic only).
        image_size: scene side in sRGB pixels (RAW planes are ``image_size / (2 binning)``).
        face_size: range of pasted face sides in sRGB pixels.
        max_faces: at most this many faces per scene (0 to max, uniform).
        raw: convert to packed RAW; ``noise``, ``bit_depth``, ``black_level``, ``binning`` set the sensor.
        val_fraction, test_fraction: identity split of the 100 LFW faces and 100 non-faces.
        wider_root: folder with WIDER FACE's ``wider_face_split/`` and ``WIDER_{train,val}/images/``; test = val
            (WIDER's test boxes are not public). ``min_face``: smallest kept face side after resizing.
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        image_size: int = 128,
        face_size: tuple[int, int] = (16, 48),
        max_faces: int = 3,
        raw: bool = True,
        noise: bool = True,
        bit_depth: int | None = 10,
        black_level: float = 64.0,
        binning: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        wider_root: str | None = None,
        min_face: float = 8.0,
        seed: int = 0,
        num_workers: int = 0,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, duplicate_indices=duplicate_indices,
                         duplicate_factor=duplicate_factor, drop_last=drop_last)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        lo, hi = face_size
        if wider_root is None and not 4 <= lo <= hi <= image_size:
            raise ValueError(f"`face_size` must satisfy 4 <= min <= max <= image_size={image_size}, got {face_size!r}")
        if image_size % (2 * binning):
            raise ValueError(f"`image_size` {image_size} must be divisible by 2 * binning = {2 * binning}")
        if not 0 <= max_faces <= 10:
            raise ValueError(f"`max_faces` must be in 0..10, got {max_faces!r}")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.image_size, self.face_size, self.max_faces = image_size, (int(lo), int(hi)), max_faces
        self.raw = raw
        self.raw_kwargs = {"noise": noise, "bit_depth": bit_depth, "black_level": black_level, "binning": binning}
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.wider_root, self.min_face = wider_root, min_face

    @property
    def in_chans(self) -> int:
        return 4 if self.raw else 3

    @property
    def input_size(self) -> int:
        """Side of the images the loaders yield."""
        return self.image_size // (2 * self.raw_kwargs["binning"]) if self.raw else self.image_size

    def _build(self) -> None:
        if self.wider_root is not None:
            common = (self.image_size, self.min_face, self.raw, self.raw_kwargs)
            self.train_base = WiderFaceDataset(self.wider_root, "train", *common, seed=self.seed)
            self.val_dataset = WiderFaceDataset(self.wider_root, "val", *common, seed=self.seed + 1)
            self.test_dataset = self.val_dataset
            return
        from skimage.data import lfw_subset

        lfw = torch.as_tensor(lfw_subset(), dtype=torch.float32)  # (200, 25, 25): 100 faces, then 100 non-faces
        fractions = [self.val_fraction, self.test_fraction]
        face_split = seeded_split(100, fractions, self.seed)
        other_split = seeded_split(100, fractions, self.seed + 1)
        self.identity_splits = {"faces": face_split, "nonfaces": other_split}  # LFW indices per split (train, val, test)
        backgrounds = _backgrounds()
        for k, (split, n) in enumerate((("train", self.num_train), ("val", self.num_val), ("test", self.num_test))):
            gen = torch.Generator().manual_seed(self.seed * 1000 + k)
            faces, nonfaces = lfw[face_split[k]], lfw[100:][other_split[k]]
            if len(faces) == 0 or len(nonfaces) == 0:
                raise ValueError(f"the {split} split has no LFW identities: raise `{split}_fraction`")
            images, targets = make_scenes(n, faces, nonfaces, backgrounds, self.image_size, self.face_size,
                                          self.max_faces, gen)
            if self.raw:
                images, _ = unprocess(images, gen, **self.raw_kwargs)
                scale = self.image_size / images.shape[-1]
                targets = [{"boxes": t["boxes"] / scale, "labels": t["labels"]} for t in targets]
            dataset = DetectionDataset(images, targets)
            if split == "train":
                self.train_base = dataset
            else:
                setattr(self, f"{split}_dataset", dataset)

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "train")
        return DataLoader(dataset, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(dataset, seed=self.seed),  # type: ignore[arg-type]
                          num_workers=self.num_workers, drop_last=self.drop_last, collate_fn=detection_collate,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=detection_collate)
