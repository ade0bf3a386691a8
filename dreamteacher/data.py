"""Datasets: folders of images (recursive), returned as ``[3, H, W]`` float tensors in ``[-1, 1]``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

logger = logging.getLogger("dreamteacher")

#: File suffixes read as images (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def _load_rgb(path: Path, resolution: int):
    """Decode, convert to RGB, resize the short side to ``resolution`` (bicubic) and center-crop a square."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> ``[3, H, W]`` uint8 tensor."""
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` in ``[0, 255]`` -> float32 in ``[-1, 1]``."""
    return images.float().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive, sorted by relative path), resized and center-cropped to a square.

    Files whose header PIL cannot read are skipped at construction (their count is logged); a file that passes the
    header check but fails to decode raises an error naming it.

    Args:
        root: folder to scan.
        resolution: output side length.
        uint8: return ``[3, H, W]`` uint8 (the feature cache stores these) instead of float32 in ``[-1, 1]``.

    Returns per item:
        ``[3, resolution, resolution]`` float32 in ``[-1, 1]`` (or uint8 in ``[0, 255]``).
    """

    def __init__(self, root: str | os.PathLike, resolution: int, *, uint8: bool = False) -> None:
        from PIL import Image, UnidentifiedImageError

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a directory")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
        self.resolution = resolution
        self.uint8 = uint8
        candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.files: list[Path] = []
        self.skipped: list[Path] = []
        for path in candidates:
            try:
                with Image.open(path) as img:
                    img.size  # noqa: B018 -- the header is parsed lazily
                self.files.append(path)
            except (OSError, UnidentifiedImageError, ValueError):
                self.skipped.append(path)
        if self.skipped:
            logger.warning("%s: skipped %d unreadable file(s) (first: %s)", self.root, len(self.skipped),
                           self.skipped[0])
        logger.info("%s: %d images at %dx%d", self.root, len(self.files), resolution, resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            img = _load_rgb(path, self.resolution)
        except OSError as e:
            raise RuntimeError(f"{path}: cannot decode image ({e})") from e
        x = image_to_tensor(img)
        return x if self.uint8 else to_unit_range(x)

    def relative_paths(self) -> list[str]:
        """The files as POSIX paths relative to ``root``, in dataset order."""
        return [p.relative_to(self.root).as_posix() for p in self.files]
