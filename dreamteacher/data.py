"""Datasets: folders of images (recursive), returned as ``[3, H, W]`` float tensors in ``[-1, 1]``; the built-in
procedural shapes dataset (image + segmentation mask); prefetching, resumable, distributed loaders."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


#: What marks a folder written by ``dreamteacher cache-features`` (:mod:`dreamteacher.feature_cache`): its manifest
#: file and the manifest's format name. Here, so that data and the cache need not import each other.
FEATURE_CACHE_FORMAT = "dreamteacher-feature-cache"
FEATURE_CACHE_MANIFEST = "manifest.json"


def is_feature_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``write_feature_cache`` (it has a manifest of this format)."""
    import json

    try:
        return json.loads((Path(path) / FEATURE_CACHE_MANIFEST).read_text()).get("format") == FEATURE_CACHE_FORMAT
    except (OSError, ValueError, AttributeError):  # no manifest, unreadable, not JSON, not a JSON object
        return False


def check_image_folder(root: str | os.PathLike, option: str) -> Path:
    """``root`` as a Path, or :class:`~dreamteacher.config.UserPathError` naming ``option`` when it is not a folder of
    images: missing, not a directory, or a feature cache (which holds features, not images)."""
    from .config import UserPathError

    path = Path(root)
    if not path.is_dir():
        raise UserPathError(f"{option}: {root} is not a directory (expected a folder of images)")
    if is_feature_cache(path):
        raise UserPathError(f"{option}: {root} is a feature cache written by `dreamteacher cache-features`, not a "
                            "folder of images; give the folder of images (e.g. the one the cache was made from), "
                            "or, to pretrain from the cache, pass it as data.cache (--data.cache=DIR)")
    return path


def load_image_folder(root: str | os.PathLike, resolution: int, option: str, *, uint8: bool = False
                      ) -> ImageFolderDataset:
    """:class:`ImageFolderDataset` of ``root``, or :class:`~dreamteacher.config.UserError` naming ``option`` when
    ``root`` is not a folder of images (:func:`check_image_folder`) or holds no readable image."""
    from .config import UserError

    folder = ImageFolderDataset(check_image_folder(root, option), resolution, uint8=uint8)
    if len(folder) == 0:
        skipped = f" ({len(folder.skipped)} unreadable image files skipped)" if folder.skipped else ""
        raise UserError(f"{option}: no readable images under {root}{skipped}; expected a folder of "
                        f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files (searched recursively)")
    return folder


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
            from .config import UserPathError

            raise UserPathError(f"root: {self.root} is not a directory")
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


# ------------------------------------------------------------------------------------------------ unreadable files
class SkipUnreadable(Dataset):
    """Wraps a dataset whose items can fail to decode (a corrupt file that passed the header check): such an item is
    replaced by the next readable one (deterministically), logged and counted, so an epoch never crashes.

    Args:
        dataset: the wrapped dataset (e.g. :class:`ImageFolderDataset`).
        max_tries: consecutive unreadable items tolerated before giving up with an error.

    Attributes:
        failures: indices that failed in this process (DataLoader workers each keep their own count and log each).
    """

    def __init__(self, dataset: Dataset, max_tries: int = 16) -> None:
        self.dataset = dataset
        self.max_tries = max_tries
        self.failures: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        error: Exception | None = None
        for k in range(self.max_tries):
            j = (index + k) % n
            try:
                return self.dataset[j]
            except (RuntimeError, OSError, ValueError) as e:
                error = e
                self.failures.append(j)
                logger.warning("skipping unreadable item %d (%d so far in this process): %s", j, len(self.failures), e)
        raise RuntimeError(f"{self.max_tries} consecutive unreadable items from index {index}") from error


# ------------------------------------------------------------------------------------------------ procedural shapes
#: Class ids of :class:`ProceduralShapes` masks; the class is the shape, never the colour.
SHAPE_CLASSES = ("background", "circle", "bar", "triangle", "ring", "cross")


def _shape_mask(kind: int, u, v):
    """Inside test of a unit shape in its local frame (``u``, ``v`` in units of the shape's radius)."""
    import numpy as np

    if kind == 1:  # circle
        return u * u + v * v <= 1.0
    if kind == 2:  # bar: a 2 x 0.66 rectangle, elongated so that it differs from the circle at a coarse stride
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.33)
    if kind == 3:  # equilateral triangle with circumradius 1
        return (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * np.abs(u))
    if kind == 4:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if kind == 5:  # cross (plus sign)
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"kind: expected a shape class in 1..{len(SHAPE_CLASSES) - 1}, got {kind}")


def render_shapes(shapes: list[dict], size: int, background=None, noise: float = 0.0, rng=None):
    """Paint shapes (later ones on top) over a background; return ``(image [H, W, 3] in [0, 1], mask [H, W])``.

    Each shape is ``{"kind", "cx", "cy", "radius", "angle", "color", "shade"}`` (pixels, radians, RGB in [0, 1],
    shade: a linear brightness ramp across the shape). The mask holds the kind of the topmost shape per pixel.
    """
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = np.zeros((size, size, 3), np.float32) if background is None else background.astype(np.float32).copy()
    mask = np.zeros((size, size), np.int64)
    for s in shapes:
        c, si = np.cos(s["angle"]), np.sin(s["angle"])
        dx, dy = (xx - s["cx"]) / s["radius"], (yy - s["cy"]) / s["radius"]
        u, v = c * dx + si * dy, -si * dx + c * dy
        inside = _shape_mask(int(s["kind"]), u, v)
        color = np.asarray(s["color"], np.float32)[None, :] * (1.0 + s.get("shade", 0.0) * u[inside][:, None] * 0.5)
        image[inside] = color
        mask[inside] = int(s["kind"])
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), mask


class ProceduralShapes(Dataset):
    """Built-in segmentation dataset generated on the fly: coloured shapes on smooth backgrounds, no download.

    Image ``i`` is a pure function of ``(seed, i)``. Each image holds 1 to ``max_shapes`` shapes of the classes in
    :data:`SHAPE_CLASSES` (circle, bar, triangle, ring, cross) with random colour, size, position and a brightness
    ramp, overlapping (the later shape wins), over a low-contrast background (smooth noise blended with a faint
    grating), plus pixel noise. Colours are drawn independently of the class (only kept apart from the background's
    mean colour, so that every shape is visible), so only shape tells the classes apart.

    Objects keep a canonical orientation up to ``max_angle`` (radians), as the objects of the aligned datasets that
    generative pretraining is known to work on (faces, cars) do; ``max_angle=math.pi`` rotates them freely.
    Measured on this dataset (docs/demo.md, "The data"): with free rotation an interpreter on the shipped teacher's
    features confuses the classes far more, at every label budget.

    Args:
        length: number of images.
        image_size: side of the square images.
        seed: generator seed.
        max_shapes: most shapes per image.
        noise: std of the Gaussian pixel noise (images in [0, 1] before the map to [-1, 1]).
        max_angle: rotations are drawn uniformly in ``[-max_angle, max_angle]``.

    Returns per item:
        ``(image [3, H, W] float32 in [-1, 1], mask [H, W] int64)`` with 0 = background, k = ``SHAPE_CLASSES[k]``.
    """

    num_classes = len(SHAPE_CLASSES)
    #: Least max-abs RGB difference between a shape's colour and its background's mean colour.
    MIN_CONTRAST = 0.4

    def __init__(self, length: int = 10000, image_size: int = 64, *, seed: int = 0, max_shapes: int = 3,
                 noise: float = 0.02, max_angle: float = 0.25) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected a positive integer, got {length!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes: expected a positive integer, got {max_shapes!r}")
        if not 0.0 <= max_angle <= math.pi:
            raise ValueError(f"max_angle: expected radians in [0, pi], got {max_angle!r}")
        self.length, self.image_size, self.seed = length, image_size, int(seed)
        self.max_shapes, self.noise, self.max_angle = max_shapes, noise, float(max_angle)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int):
        import numpy as np

        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, int(index)])

    def scene(self, index: int, rng=None):
        """``(background [H, W, 3] in [0, 1], shapes)`` of image ``index``: what :meth:`__getitem__` renders."""
        import numpy as np

        rng = rng if rng is not None else self._rng(index)
        background, bg_mean = self._background(rng)
        size = self.image_size
        out = []
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            for _try in range(20):  # rejection: a colour far enough from the background to be seen
                color = rng.uniform(0.0, 1.0, 3)
                if np.abs(color - bg_mean).max() >= self.MIN_CONTRAST:
                    break
            out.append({"kind": int(rng.integers(1, len(SHAPE_CLASSES))),
                        "cx": float(rng.uniform(0.15, 0.85) * size), "cy": float(rng.uniform(0.15, 0.85) * size),
                        "radius": float(rng.uniform(0.15, 0.30) * size),
                        "angle": float(rng.uniform(-self.max_angle, self.max_angle)),
                        "color": color.tolist(), "shade": float(rng.uniform(-0.3, 0.3))})
        return background, out

    def shapes(self, index: int) -> list[dict]:
        """The shape parameters of image ``index``."""
        return self.scene(index)[1]

    def _background(self, rng):
        """Smooth noise (a bilinearly upsampled 4x4 grid) blended with a faint grating, between two close colours:
        ``([H, W, 3] in [0, 1], its mean colour)``."""
        import numpy as np

        size = self.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        gx = np.linspace(0, 3, size, dtype=np.float32)
        i0 = np.minimum(gx.astype(int), 2)
        f = gx - i0
        rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
        smooth = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
        theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(1.0, 4.0), rng.uniform(0, 2 * math.pi)
        grating = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        t = (0.7 * smooth + 0.3 * grating)[..., None]
        c1 = rng.uniform(0, 1, 3).astype(np.float32)
        c2 = np.clip(c1 + rng.uniform(-0.25, 0.25, 3).astype(np.float32), 0, 1)
        return c1 * (1 - t) + c2 * t, (c1 + c2) / 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        rng = self._rng(index)
        background, shapes = self.scene(index, rng)
        image, mask = render_shapes(shapes, self.image_size, background, self.noise, rng)
        x = torch.from_numpy(image).permute(2, 0, 1).contiguous().mul_(2.0).sub_(1.0)
        return x, torch.from_numpy(mask)


#: Seeds of the built-in dataset's three disjoint roles: unlabeled pretraining images use the pretraining config's
#: ``data.seed`` (0 by default); labelled images (interpreter training, fine-tuning) come from a pool drawn with
#: :data:`LABELLED_POOL_SEED`; held-out evaluation images from :data:`TEST_SEED`.
LABELLED_POOL_SEED = 1
TEST_SEED = 2
#: Images in the labelled pool of the built-in dataset.
LABELLED_POOL_SIZE = 10_000
#: The last ``VALIDATION_SIZE`` images of the labelled pool are its validation split: every tuned choice (learning
#: rate, steps) is made on them, never on the test split. Label budgets draw from the images before them.
VALIDATION_SIZE = 256


def validation_indices(pool_size: int = LABELLED_POOL_SIZE, n_val: int = VALIDATION_SIZE) -> list[int]:
    """Indices of the labelled pool's validation split: its last ``n_val`` images (disjoint from every label budget
    drawn by :func:`labelled_indices` with its default pool size)."""
    if not 0 < n_val < pool_size:
        raise ValueError(f"n_val: expected an integer in [1, {pool_size}), got {n_val!r}")
    return list(range(pool_size - n_val, pool_size))


def labelled_indices(n: int, seed: int, pool_size: int = LABELLED_POOL_SIZE - VALIDATION_SIZE) -> list[int]:
    """The ``n`` labelled images of a label budget: the first ``n`` of a permutation of ``range(pool_size)`` drawn
    with ``seed`` (by default the labelled pool less its validation split).

    Budgets are nested for one seed (the 8 images of ``n=8`` are the first 8 of ``n=32``), so a larger budget only
    adds labels. Used by the feature interpreter and the downstream evaluation alike.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= pool_size:
        raise ValueError(f"n: expected an integer label budget in [1, {pool_size}], got {n!r}")
    perm = torch.randperm(pool_size, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n].tolist()


# ------------------------------------------------------------------------------------------------ augmentation
def crop_flip_params(batch: int, height: int, width: int, generator: torch.Generator, *,
                     scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                     flip_prob: float = 0.5) -> list[tuple[int, int, int, int, bool]]:
    """``(top, left, crop_height, crop_width, flip)`` per image, drawn from ``generator``.

    As torchvision's ``RandomResizedCrop.get_params``: up to 10 draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio (width / height) in ``ratio`` for a crop that fits, else the largest centred crop with
    the ratio clamped to ``ratio``; then a flip with probability ``flip_prob``."""
    h, w = height, width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def uniform() -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    params = []
    for _ in range(batch):
        for _ in range(10):
            area = h * w * (scale[0] + (scale[1] - scale[0]) * uniform())
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform())
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (), generator=generator))
                break
        else:  # no fit in 10 draws: the largest centred crop of the clamped ratio
            if w / h < ratio[0]:
                cw, ch = w, round(w / ratio[0])
            elif w / h > ratio[1]:
                cw, ch = round(h * ratio[1]), h
            else:
                cw, ch = w, h
            top, left = (h - ch) // 2, (w - cw) // 2
        params.append((top, left, ch, cw, uniform() < flip_prob))
    return params


def crop_flip(images: torch.Tensor, params: list[tuple[int, int, int, int, bool]]) -> torch.Tensor:
    """Crop each image of ``[B, C, H, W]`` to its ``(top, left, crop_height, crop_width, flip)``, resize the crop to
    ``H x W`` (bilinear, ``align_corners=False``, no antialiasing: torchvision's ``resized_crop`` of a tensor with
    ``antialias=False``) and flip it horizontally if asked; on the images' device."""
    import torch.nn.functional as F

    b, _, h, w = images.shape
    if len(params) != b:
        raise ValueError(f"params: expected {b} crops (one per image), got {len(params)}")
    out = torch.empty_like(images)
    for i, (top, left, ch, cw, flip) in enumerate(params):
        crop = images[i:i + 1, :, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return out


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator, *,
                             scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip_prob: float = 0.5) -> torch.Tensor:
    """Random resized crop + horizontal flip of each image of a batch ``[B, C, H, W]``, at the batch's own size
    (:func:`crop_flip_params`, then :func:`crop_flip`). Every draw comes from ``generator`` (a CPU generator), so a
    seeded generator gives the same views on any device and a resumed run replays them exactly."""
    b, _, h, w = images.shape
    return crop_flip(images, crop_flip_params(b, h, w, generator, scale=scale, ratio=ratio, flip_prob=flip_prob))



class RandomResizedCropFlip:
    """``data.augment`` as one object, used where views are made: the online pretraining targets
    (:class:`~dreamteacher.model.OnlineTargets`, a float batch ``[B, 3, R, R]`` per step) and ``cache-features
    --augment`` (:func:`~dreamteacher.feature_cache.write_feature_cache`'s per-view hook, a uint8 image ``[3, R,
    R]``, returned as uint8: the stored pixels are what the teacher and later the student see).

    ``config`` (JSON data) is what the cache's manifest records, so a cache can be compared with a pretraining
    config's ``data.augment`` / ``crop_scale`` / ``crop_ratio`` / ``flip_prob`` (:meth:`from_config`)."""

    name = "random_resized_crop_flip"

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_prob: float = 0.5) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_prob = float(flip_prob)

    @classmethod
    def from_config(cls, data_cfg: Any) -> RandomResizedCropFlip:
        """From a ``DataConfig`` (``data.crop_scale``, ``data.crop_ratio``, ``data.flip_prob``)."""
        return cls(data_cfg.crop_scale, data_cfg.crop_ratio, data_cfg.flip_prob)

    @property
    def config(self) -> dict:
        return {"name": self.name, "scale": list(self.scale), "ratio": list(self.ratio), "flip_prob": self.flip_prob}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A batch ``[B, C, H, W]`` (float) or one image ``[C, H, W]`` (float or uint8, returned in its dtype:
        uint8 is resized in float32 and rounded back)."""
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        as_uint8 = batch.dtype == torch.uint8
        out = random_resized_crop_flip(batch.float() if as_uint8 else batch, generator, scale=self.scale,
                                       ratio=self.ratio, flip_prob=self.flip_prob)
        if as_uint8:
            out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(scale={self.scale}, ratio={self.ratio}, flip_prob={self.flip_prob})"


# ------------------------------------------------------------------------------------------------ loaders
class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """A :class:`DistributedSampler` that can start an epoch part-way (``start``: samples of this rank to skip), so a
    resumed run sees exactly the batches an uninterrupted one would. Works without a process group when
    ``num_replicas`` and ``rank`` are given (1 and 0 for a single process)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _worker_init(worker_id: int) -> None:
    """Loader workers outlive the stop signals that are meant for the main process.

    Ctrl-C goes to the whole process group, and so does a scheduler's SIGTERM (SLURM signals every process of the
    job step): the main process stops the run at a step boundary, writes its checkpoint and shuts the workers down
    itself. A worker that died on the signal would turn that into a DataLoader error and the checkpoint would be
    lost. SIGINT and SIGUSR1 are ignored. SIGTERM is ignored unless the parent sent it: the parent's ``terminate()``
    (multiprocessing's exit handler, which then joins its daemon workers) must still end the worker, or the process
    would hang at exit. The sender is read with ``sigwaitinfo`` on a thread; without it (not Linux), SIGTERM keeps
    its default action.
    """
    import signal
    import threading

    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        return
    parent = os.getppid()

    def wait_for_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:  # the parent's terminate(): end as SIGTERM does by default
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread takes the next one
                os.kill(os.getpid(), signal.SIGTERM)

    # A forked worker inherits the main process's handler (StopFlag's); the default action is what ends it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the thread: only sigwaitinfo sees it
    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def build_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0, prefetch_factor: int = 2,
                 shuffle: bool = True, drop_last: bool = True, rank: int | None = None,
                 world_size: int | None = None, pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
    """A prefetching DataLoader over this process's shard of ``dataset``.

    The sampler is a :class:`ResumableDistributedSampler` (rank and world size from the initialised process group,
    else 0 and 1): call ``loader.sampler.set_epoch(e)`` and ``loader.sampler.set_start(k)`` before iterating.
    Memory is pinned when CUDA is available (unless ``pin_memory`` says otherwise); workers stay alive across epochs.
    """
    import torch.distributed as dist

    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else 0
        world_size = dist.get_world_size() if initialised else 1
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": True, "worker_init_fn": _worker_init}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, drop_last=drop_last, **kwargs)
