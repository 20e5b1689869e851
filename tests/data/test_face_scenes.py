"""FaceScenesDataModule: synthetic LFW face scenes (RGB and RAW), identity splits, and the WIDER FACE path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import lfw_subset

from plpriv.data import FaceScenesDataModule
from plpriv.data.face_scenes import read_wider_annotations

SMALL = {"num_train": 24, "num_val": 8, "num_test": 8, "image_size": 64, "face_size": (12, 32), "batch_size": 8}


def test_rgb_scenes_hold_the_lfw_faces_in_their_boxes():
    dm = FaceScenesDataModule(raw=False, **SMALL)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    faces = torch.as_tensor(lfw_subset()[:100], dtype=torch.float32)
    train_faces = faces[dm.identity_splits["faces"][0]]
    n_boxes = 0
    for image, target in zip(images, targets):
        assert target["labels"].eq(0).all()
        for x0, y0, x1, y1 in target["boxes"].tolist():
            side = x1 - x0
            assert side == y1 - y0 and 12 <= side <= 32 and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            s = int(side)
            crop = image[:, int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2].mean(0)  # inside the feathered edge
            refs = torch.nn.functional.interpolate(torch.cat([train_faces, train_faces.flip(-1)])[:, None], size=(s, s),
                                                   mode="bilinear", antialias=True)[:, 0, 2:-2, 2:-2]
            c = torch.stack([torch.corrcoef(torch.stack([crop.flatten(), f.flatten()]))[0, 1] for f in refs])
            assert c.max() > 0.8  # the box holds one of the training identities
            n_boxes += 1
    assert n_boxes > 0


def test_identity_splits_are_disjoint_and_raw_boxes_follow_the_planes():
    dm = FaceScenesDataModule(raw=True, binning=2, **SMALL)
    dm.setup()
    train, val, test = dm.identity_splits["faces"]
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and len(train) + len(val) + len(test) == 100
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 4, 16, 16) and dm.in_chans == 4 and dm.input_size == 16  # 64 / (2 * 2)
    rgb = FaceScenesDataModule(raw=False, **SMALL)
    rgb.setup()
    _, rgb_targets = next(iter(rgb.val_dataloader()))
    for a, b in zip(targets, rgb_targets):  # same scenes, boxes scaled by 1/4
        torch.testing.assert_close(a["boxes"] * 4, b["boxes"])
    again = FaceScenesDataModule(raw=True, binning=2, **SMALL)
    again.setup()
    assert torch.equal(next(iter(again.val_dataloader()))[0], images)  # seeded


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="face_size"):
        FaceScenesDataModule(face_size=(2, 10))
    with pytest.raises(ValueError, match="binning"):
        FaceScenesDataModule(image_size=100, binning=4)


def _write_wider(root, split: str, entries: list[tuple[str, list[str]]]) -> None:
    (root / "wider_face_split").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, rows in entries:
        (root / f"WIDER_{split}" / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 80, 3), 128, np.uint8)).save(root / f"WIDER_{split}" / "images" / name)
        lines += [name, str(len(rows))] + (rows or ["0 0 0 0 0 0 0 0 0 0"])
    (root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt").write_text("\n".join(lines) + "\n")


def test_wider_face_annotation_format_and_datamodule(tmp_path):
    # x y w h blur expression illumination invalid occlusion pose; the second box is flagged invalid
    entries = [("0--Parade/a.jpg", ["10 4 20 16 0 0 0 0 0 0", "30 5 8 8 0 0 0 1 0 0", "60 20 2 2 0 0 0 0 0 0"]),
               ("1--Handshaking/b.jpg", [])]
    _write_wider(tmp_path, "train", entries)
    _write_wider(tmp_path, "val", entries[:1])
    parsed = read_wider_annotations(tmp_path / "wider_face_split" / "wider_face_train_bbx_gt.txt")
    assert [p[0] for p in parsed] == ["0--Parade/a.jpg", "1--Handshaking/b.jpg"]
    assert parsed[0][1].tolist() == [[10, 4, 30, 20], [60, 20, 62, 22]] and parsed[1][1].shape == (0, 4)
    dm = FaceScenesDataModule(wider_root=str(tmp_path), image_size=32, min_face=4, raw=False, batch_size=2)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)
    boxes = {len(t["boxes"]): t["boxes"] for t in targets}
    # 80x40 -> 32x32: x * 0.4, y * 0.8; the 2x2 face becomes 0.8 x 1.6 < min_face and is dropped
    torch.testing.assert_close(boxes[1], torch.tensor([[4.0, 3.2, 12.0, 16.0]]))
    raw = FaceScenesDataModule(wider_root=str(tmp_path), image_size=32, min_face=4, batch_size=1)
    raw.setup()
    image, target = raw.val_dataset[0]
    assert image.shape == (4, 16, 16)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 1.6, 6.0, 8.0]]))
    with pytest.raises(ValueError, match="wider_root"):
        FaceScenesDataModule(wider_root=str(tmp_path / "missing")).setup()
