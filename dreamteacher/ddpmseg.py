"""DDPM-segmentation's pixel-classifier protocol (Baranchuk et al., "Label-Efficient Semantic Segmentation with
Diffusion Models", ICLR 2022), streamed in bounded memory.

The protocol: each labelled image is noised once per timestep (t = 50, 150, 250, one noise tensor shared by every
image and timestep: their ``share_noise``), the frozen UNet runs once per timestep, the outputs of chosen decoder
blocks (ADM ``output_blocks`` 5, 6, 7, 8, 12 for their 256x256 models: 8448 channels over the three timesteps) are
upsampled bilinearly to the image and concatenated per pixel. An ensemble of 10 MLPs (C -> 128 -> 32 -> K with ReLU
then BatchNorm; C -> 256 -> 128 -> K for 30 classes or more) is trained on the shuffled labelled pixels (Adam 1e-3,
batches of 64, cross-entropy, at most 100 epochs, stopped once more than 50 batches after the fourth epoch brought no
new lowest batch loss) and a test pixel is labelled by the ensemble's majority vote (ties: the smallest class id, as
their ``torch.mode``). Classes with fewer than 20 pixels in a training image are ignored in that image.

Their code holds ``[N, C, H, W]`` float32 features of the whole labelled set at once (2.2 GB per 256x256 image,
~210 GB for 50 images by their README). Here nothing of that size exists:

* training: per image, the native block maps are computed, each block is upsampled alone (the original's
  ``F.interpolate``, so the values are the same bits) and only a seeded sample of labelled pixels is copied into one
  preallocated buffer; ``buffer_mb`` bounds that buffer, and a budget too small for the sample is refused up front;
* prediction: per test image, the pixels are classified in chunks of at most the buffer's rows, each block upsampled
  again per chunk; features, labels and votes of an image are dropped before the next.

:func:`materialised_pixel_classifiers` is the original's layout (every pixel of every image at once), kept as the
reference the tests compare the streaming path with, bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UserError
from .teachers.adm import DDPMSEG_TAPS

logger = logging.getLogger("dreamteacher")

__all__ = ["DDPMSEG_STEPS", "PixelClassifierSettings", "pixel_classifier", "train_ensemble", "vote",
           "feature_dim", "block_maps", "clean_mask", "sample_pixels", "training_pixels", "collect_pixels",
           "predict_image", "fit_pixel_classifiers", "predict_images", "evaluate_pixel_classifiers",
           "materialised_pixel_classifiers", "ddpmseg_teacher", "ddpmseg_row", "peak_rss_bytes"]

#: DDPM-segmentation's diffusion steps (experiments/*/ddpm.json).
DDPMSEG_STEPS = (50, 150, 250)
_MIB = 1 << 20
_LABEL_DTYPE = torch.long  # cross_entropy's target dtype; 8 bytes a row next to 4 x C of features


@dataclass(frozen=True)
class PixelClassifierSettings:
    """The protocol's settings; the defaults are DDPM-segmentation's (experiments/*/ddpm.json, train_interpreter.py)
    except the two that bound memory.

    Args:
        steps: diffusion timesteps the UNet runs at (features concatenated in this order, blocks in call order).
        blocks: the UNet modules to read: ADM block names for a converted guided-diffusion teacher, diffusers module
            paths otherwise; None: :data:`~dreamteacher.teachers.adm.DDPMSEG_TAPS` for a converted ADM teacher,
            every ``up_blocks.i`` for a diffusers one (only :func:`ddpmseg_teacher` reads it).
        model_num: MLPs in the ensemble.
        batch_size, lr, max_epochs: Adam's batches (the last partial batch of an epoch is dropped), learning rate
            and the epoch cap.
        warm_epochs, patience: stopping is checked from epoch ``warm_epochs`` (0-based) on; a model stops after more
            than ``patience`` batches in a row without a new lowest batch loss.
        init_std: the Linear layers' weights are drawn N(0, init_std), biases 0; BatchNorm keeps torch's init.
        min_class_pixels: a class with fewer pixels than this in a training image is ignored in that image.
        pixels_per_image: labelled pixels sampled per training image (all of an image's labelled pixels when it has
            fewer); None: as many as the buffer holds for the given images (every labelled pixel when they fit).
        buffer_mb: MiB bound of the training buffer (pixel features + labels) and of each test-time chunk.
        seed: makes the noise, the pixel samples, the initialisations and the batch orders.
        ignore_index: label of pixels that are neither trained on nor scored.
    """

    steps: tuple[int, ...] = DDPMSEG_STEPS
    blocks: tuple[str, ...] | None = None
    model_num: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_epochs: int = 100
    warm_epochs: int = 4
    patience: int = 50
    init_std: float = 0.02
    min_class_pixels: int = 20
    pixels_per_image: int | None = None
    buffer_mb: float = 1024.0
    seed: int = 0
    ignore_index: int = 255

    def __post_init__(self) -> None:
        # Checked here so a bad value is refused before any teacher forward.
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"{name}: expected an integer >= {low}, got {v!r}")

        for name, low in (("model_num", 1), ("batch_size", 1), ("max_epochs", 1), ("warm_epochs", 0),
                          ("patience", 0), ("min_class_pixels", 0), ("seed", 0), ("ignore_index", 0)):
            integer(name, low)
        if self.pixels_per_image is not None:
            integer("pixels_per_image", 1)
        steps = tuple(self.steps) if isinstance(self.steps, (list, tuple)) else None
        if not steps or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in steps) \
                or len(set(steps)) != len(steps):
            raise UserError(f"steps: expected distinct integer timesteps >= 0, e.g. {list(DDPMSEG_STEPS)}, "
                            f"got {self.steps!r}")
        object.__setattr__(self, "steps", steps)
        if self.blocks is not None:
            if isinstance(self.blocks, str) or not self.blocks or not all(isinstance(b, str) for b in self.blocks):
                raise UserError(f"blocks: expected a list of module names, e.g. {list(DDPMSEG_TAPS)}, "
                                f"got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(self.blocks))
        for name in ("lr", "init_std", "buffer_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UserError(f"{name}: expected a positive number, got {v!r}")

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer_mb * _MIB)


def _mib_at_least(nbytes: int) -> str:
    """``nbytes`` in MiB rounded up to 0.01, for a "expected buffer_mb >= ..." that is enough."""
    return f"{math.ceil(nbytes / _MIB * 100) / 100:g}"


def _derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed for one role (``"noise"``, ``("sample", i)``, ``("model", m)``): each image's sample and each
    model's draws depend on the seed and their own index only, not on how many came before."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------------ classifier
def pixel_classifier(dim: int, num_classes: int) -> nn.Sequential:
    """DDPM-segmentation's pixel MLP (itself DatasetGAN's): Linear, ReLU, BatchNorm twice, then the class layer;
    128 and 32 hidden units below 30 classes, 256 and 128 from 30 on."""
    hidden = (128, 32) if num_classes < 30 else (256, 128)
    return nn.Sequential(nn.Linear(dim, hidden[0]), nn.ReLU(), nn.BatchNorm1d(hidden[0]),
                         nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.BatchNorm1d(hidden[1]),
                         nn.Linear(hidden[1], num_classes))


def _init_classifier(model: nn.Sequential, std: float, gen: torch.Generator) -> None:
    """Their ``init_weights('normal', 0.02)``: Linear weights N(0, std), biases 0. It only touches BatchNorm2d, so
    the BatchNorm1d layers keep torch's init (scale 1, shift 0)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std, generator=gen)
            nn.init.zeros_(m.bias)


def _train_one(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, s: PixelClassifierSettings,
               gen: torch.Generator) -> dict[str, Any]:
    """Their training loop for one model: shuffled batches (last partial one dropped), Adam, cross-entropy, early
    stop on the batch loss. Batches are gathered rows of the buffer, so the buffer is never copied whole."""
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    model.train()
    n, batches = x.shape[0], x.shape[0] // s.batch_size
    best, since_best, iters, epoch, stopped = math.inf, 0, 0, 0, False
    for epoch in range(s.max_epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for b in range(batches):
            idx = order[b * s.batch_size:(b + 1) * s.batch_size]
            loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            iters += 1
            if epoch >= s.warm_epochs:
                value = loss.item()
                if value < best:
                    best, since_best = value, 0
                else:
                    since_best += 1
                if since_best > s.patience:
                    stopped = True
                    break
        if stopped:
            break
    if not math.isfinite(loss.item()):
        from .faults import Diverged

        raise Diverged(f"lr: the pixel classifier diverged (loss {loss.item()}); lower lr ({s.lr:g})")
    return {"iterations": iters, "epochs": epoch + 1, "early_stopped": stopped, "final_loss": loss.item()}


def train_ensemble(x: torch.Tensor, y: torch.Tensor, num_classes: int, s: PixelClassifierSettings
                   ) -> tuple[list[nn.Sequential], list[dict[str, Any]]]:
    """``model_num`` MLPs trained one after the other on the pixel rows ``x [P, C]`` (float32) with labels
    ``y [P]``; model ``m``'s initialisation and batch order come from ``(seed, m)`` only. Returns the models in eval
    mode (frozen) and one record per model (iterations, epochs, whether it stopped early)."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x, y: expected [P, C] features and [P] labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < s.batch_size:
        raise UserError(f"batch_size: the labelled pixels ({x.shape[0]}) do not fill one batch of {s.batch_size}; "
                        "raise pixels_per_image or buffer_mb, or lower batch_size")
    models, records = [], []
    for m in range(s.model_num):
        gen = torch.Generator().manual_seed(_derive_seed(s.seed, "model", m))
        model = pixel_classifier(x.shape[1], num_classes)
        _init_classifier(model, s.init_std, gen)
        model = model.to(x.device)
        records.append(_train_one(model, x, y, s, gen))
        models.append(model.eval().requires_grad_(False))
    return models, records


def vote(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote of ``labels [P, M]`` (M models' class ids per pixel) -> ``[P]``; a tie goes to the smallest
    class id, which is what the original's ``torch.mode`` returns."""
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.int32, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.int32))
    return counts.argmax(1)  # argmax returns the first of equal maxima


def _classify(models: Sequence[nn.Module], x: torch.Tensor, num_classes: int) -> torch.Tensor:
    with torch.inference_mode():
        return vote(torch.stack([m(x).argmax(1) for m in models], 1), num_classes)


# ------------------------------------------------------------------------------------------------ features
def feature_dim(teacher, s: PixelClassifierSettings) -> int:
    """Channels per pixel: every tapped block's channels, once per timestep (8448 for DDPM-segmentation's)."""
    return len(s.steps) * sum(info["num_chs"] for info in teacher.feature_info)


def block_maps(teacher, image: torch.Tensor, s: PixelClassifierSettings) -> list[torch.Tensor]:
    """Native-resolution maps ``[1, C_l, h_l, w_l]`` of one image ``[3, H, W]``: for each step, the tapped blocks in
    call order (the original's order). One image per call with the same noise seed for every image and step: their
    ``share_noise`` (the noise is keyed by the seed and the element index)."""
    seed = _derive_seed(s.seed, "noise")
    maps = []
    for t in s.steps:
        maps += [f.float() for f in teacher(image[None], t=t, seed=seed)]  # their hooks keep float32
    return maps


def _upsampled_rows(maps: Sequence[torch.Tensor], size: tuple[int, int], pixels: torch.Tensor | slice,
                    out: torch.Tensor) -> None:
    """``out[p] = concat_l upsample(map_l)[:, pixels[p]]``: each map upsampled alone (their ``F.interpolate``,
    bilinear, align_corners False, on the whole map so the bits are theirs) and dropped before the next, so the
    full-resolution copy alive at any time is one block's."""
    off = 0
    for m in maps:
        c = m.shape[1]
        up = F.interpolate(m, size=size, mode="bilinear", align_corners=False).reshape(c, -1)
        cols = up[:, pixels] if isinstance(pixels, slice) else up.index_select(1, pixels)
        out[:, off:off + c].copy_(cols.t())
        off += c
        del up, cols


def clean_mask(mask: torch.Tensor, s: PixelClassifierSettings) -> torch.Tensor:
    """A training mask with each class of fewer than ``min_class_pixels`` pixels set to ``ignore_index`` (their
    "delete small annotation")."""
    mask = mask.clone()
    ids, counts = torch.unique(mask, return_counts=True)
    for k, n in zip(ids.tolist(), counts.tolist()):
        if k != s.ignore_index and n < s.min_class_pixels:
            mask[mask == k] = s.ignore_index
    return mask


def sample_pixels(mask: torch.Tensor, ignore_index: int, k: int | None, seed: int) -> torch.Tensor:
    """Flat indices (ascending) of ``k`` labelled pixels of ``mask`` (those not ``ignore_index``) drawn uniformly
    without replacement with ``seed``; every labelled pixel when ``k`` is None or the mask has no more than ``k``.
    Uniform keeps, in expectation, the class mix the original trains on (every pixel, shuffled)."""
    valid = torch.nonzero(mask.reshape(-1) != ignore_index).reshape(-1)
    if k is None or valid.numel() <= k:
        return valid
    pick = torch.randperm(valid.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    return valid[pick.sort().values]


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``: KiB on Linux, bytes on macOS)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# ------------------------------------------------------------------------------------------------ streaming path
def _check_data(images: torch.Tensor, masks: torch.Tensor | None, num_classes: int, s: PixelClassifierSettings,
                what: str) -> None:
    """Images ``[N, 3, H, W]`` floating, masks ``[N, H, W]`` integer ids in ``[0, K)`` or ``ignore_index``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() \
            or images.shape[0] == 0:
        raise UserError(f"{what}_images: expected a floating tensor [N, 3, H, W] in [-1, 1] with N >= 1, got "
                        f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if masks is None:
        return
    if not isinstance(masks, torch.Tensor) or masks.shape != (images.shape[0], *images.shape[2:]) \
            or masks.is_floating_point():
        raise UserError(f"{what}_masks: expected integer class ids of shape {(images.shape[0], *images.shape[2:])}, "
                        f"got {tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}")
    ids = masks[masks != s.ignore_index]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise UserError(f"{what}_masks: expected class ids in [0, {num_classes}) or ignore_index {s.ignore_index}, "
                        f"found {int(ids.min())}..{int(ids.max())}")


def _check_teacher(teacher, s: PixelClassifierSettings) -> None:
    """The protocol reads blocks at native resolution and noises once per step with ``teacher(x, t=, seed=)``."""
    from .teachers.diffusion import DiffusionTeacher

    if not isinstance(teacher, DiffusionTeacher):
        raise UserError(f"teacher: expected a DiffusionTeacher, got {type(teacher).__name__}")
    if teacher.taps.strides is not None:
        raise UserError("teacher: expected taps at native resolution (strides=None): DDPM-segmentation upsamples "
                        "each block from its own size; build it with ddpmseg_teacher or DiffusionTeacher(taps=...)")
    if teacher.mode != "stochastic" or teacher.n_noise != 1:
        raise UserError(f"teacher: expected mode='stochastic' and n_noise=1 (one noising per step), got "
                        f"mode={teacher.mode!r}, n_noise={teacher.n_noise}")
    if max(s.steps) >= teacher.num_train_timesteps:
        raise UserError(f"steps: expected timesteps in [0, {teacher.num_train_timesteps}) (the teacher's schedule), "
                        f"got {list(s.steps)}")


def training_pixels(masks: torch.Tensor, dim: int, s: PixelClassifierSettings
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, int]]:
    """The cleaned training masks, the pixels sampled from each (flat indices, ascending) and the buffer plan.

    Everything is decided from the masks before any teacher forward, so a buffer too small is refused at once."""
    n = masks.shape[0]
    row_bytes = dim * 4 + torch.empty((), dtype=_LABEL_DTYPE).element_size()
    capacity = s.buffer_bytes // row_bytes
    mib = f"buffer_mb: {s.buffer_mb:g} MiB holds {capacity} pixel rows of {dim} float32 features + a label " \
          f"({row_bytes} bytes each)"
    k = s.pixels_per_image
    if k is None:
        k = capacity // n
        if k < 1:
            raise UserError(f"{mib}, fewer than one pixel per image for {n} images; expected buffer_mb >= "
                            f"{_mib_at_least(n * row_bytes)}")
    elif k > capacity:
        raise UserError(f"{mib}; one image's sample of pixels_per_image={k} pixels needs "
                        f"{k * row_bytes / _MIB:.2f} MiB; expected buffer_mb >= {_mib_at_least(k * row_bytes)} "
                        f"or pixels_per_image <= {capacity}")
    cleaned = [clean_mask(m, s) for m in masks]
    pixels = [sample_pixels(m, s.ignore_index, k, _derive_seed(s.seed, "sample", i)) for i, m in enumerate(cleaned)]
    total = sum(p.numel() for p in pixels)
    if total > capacity:
        raise UserError(f"{mib}; the {n} images' samples (pixels_per_image={k}) are {total} pixels, "
                        f"{total * row_bytes / _MIB:.2f} MiB; expected buffer_mb >= "
                        f"{_mib_at_least(total * row_bytes)} or pixels_per_image <= {capacity // n}")
    if total == 0:
        raise UserError(f"train_masks: no labelled pixels (every pixel is ignore_index {s.ignore_index} or in a "
                        f"class of fewer than min_class_pixels={s.min_class_pixels} pixels)")
    return cleaned, pixels, {"pixels_per_image": k, "capacity_rows": capacity, "row_bytes": row_bytes,
                             "buffer_rows": total}


def collect_pixels(teacher, images: torch.Tensor, masks: torch.Tensor, num_classes: int,
                   s: PixelClassifierSettings) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training buffer: ``x [P, C]`` float32 features and ``y [P]`` labels of the sampled pixels, image by
    image (rows in image order, pixels ascending), filled in place; at most ``buffer_mb`` together.

    Returns the buffer and a record: the plan (:func:`training_pixels`), the bytes of the buffer, of one image's
    native block maps and of the largest upsampled block (the transient per image), and seconds per image."""
    _check_teacher(teacher, s)
    _check_data(images, masks, num_classes, s, "train")
    dim = feature_dim(teacher, s)
    cleaned, pixels, plan = training_pixels(masks, dim, s)
    device = teacher.device
    x = torch.empty(plan["buffer_rows"], dim, device=device)
    y = torch.empty(plan["buffer_rows"], dtype=_LABEL_DTYPE, device=device)
    size = (images.shape[-2], images.shape[-1])
    row, seconds, native, upsample = 0, [], 0, 0
    for i in range(images.shape[0]):
        start = time.perf_counter()
        maps = block_maps(teacher, images[i], s)
        native = max(native, sum(m.numel() * m.element_size() for m in maps))
        upsample = max(upsample, max(m.shape[1] for m in maps) * size[0] * size[1] * 4)
        n = pixels[i].numel()
        _upsampled_rows(maps, size, pixels[i].to(device), x[row:row + n])
        y[row:row + n] = cleaned[i].reshape(-1)[pixels[i]].to(device)
        row += n
        del maps
        seconds.append(time.perf_counter() - start)
    buffer = x.untyped_storage().nbytes() + y.untyped_storage().nbytes()
    record = {**plan, "feature_dim": dim, "buffer_bytes": buffer, "buffer_limit_bytes": s.buffer_bytes,
              "native_bytes": native, "upsample_bytes": upsample, "seconds_per_image": seconds}
    return x, y, record


def predict_image(models: Sequence[nn.Module], teacher, image: torch.Tensor, num_classes: int,
                  s: PixelClassifierSettings, chunk: torch.Tensor) -> torch.Tensor:
    """Ensemble labels ``[H, W]`` of one image ``[3, H, W]``: its block maps are computed once, then the pixels are
    classified ``chunk.shape[0]`` rows at a time (``chunk [R, C]``: a workspace reused across images), every block
    upsampled again per chunk, so no ``[H * W, C]`` tensor exists unless the chunk holds a whole image."""
    maps = block_maps(teacher, image, s)
    size = (image.shape[-2], image.shape[-1])
    total, rows = size[0] * size[1], chunk.shape[0]
    pred = torch.empty(total, dtype=torch.long, device=chunk.device)
    for a in range(0, total, rows):
        b = min(a + rows, total)
        _upsampled_rows(maps, size, slice(a, b), chunk[:b - a])
        pred[a:b] = _classify(models, chunk[:b - a], num_classes)
    return pred.view(size)


def fit_pixel_classifiers(teacher, images: torch.Tensor, masks: torch.Tensor, num_classes: int,
                          s: PixelClassifierSettings | None = None
                          ) -> tuple[list[nn.Sequential], list[dict[str, Any]], dict[str, Any]]:
    """Streaming training: :func:`collect_pixels` then :func:`train_ensemble`; the buffer is released before
    returning. Returns the models (eval mode), their training records and the memory record."""
    s = s or PixelClassifierSettings()
    x, y, record = collect_pixels(teacher, images, masks, num_classes, s)
    start = time.perf_counter()
    models, runs = train_ensemble(x, y, num_classes, s)
    record["train_seconds"] = time.perf_counter() - start
    del x, y
    return models, runs, record


def predict_images(models: Sequence[nn.Module], teacher, images: torch.Tensor, num_classes: int,
                   s: PixelClassifierSettings | None = None, *, on_image=None) -> torch.Tensor:
    """Streaming prediction of ``images [N, 3, H, W]`` -> ``[N, H, W]`` labels, in chunks of at most ``buffer_mb``
    (the training buffer's rows, capped at one image). ``on_image(i, labels)``: called per image, so a caller can
    score and drop each prediction instead of keeping them (the returned tensor is then empty)."""
    s = s or PixelClassifierSettings()
    _check_teacher(teacher, s)
    _check_data(images, None, num_classes, s, "test")
    dim = feature_dim(teacher, s)
    rows = min(images.shape[-2] * images.shape[-1], s.buffer_bytes // (dim * 4))
    if rows < 1:
        raise UserError(f"buffer_mb: {s.buffer_mb:g} MiB holds no pixel row of {dim} float32 features "
                        f"({dim * 4} bytes); expected buffer_mb >= {_mib_at_least(dim * 4)}")
    chunk = torch.empty(rows, dim, device=teacher.device)
    out = []
    for i in range(images.shape[0]):
        labels = predict_image(models, teacher, images[i], num_classes, s, chunk)
        if on_image is None:
            out.append(labels.cpu())
        else:
            on_image(i, labels.cpu())
    return torch.stack(out) if out else torch.empty(0, *images.shape[-2:], dtype=torch.long)


# ------------------------------------------------------------------------------------------------ evaluation
def _original_miou(cm: torch.Tensor, ignore_index: int) -> float:
    """Their ``compute_iou``: ``I / (1e-8 + U)`` per class other than the ignore label, a class absent from truth and
    prediction counting as 0, averaged over every class (the repo's mIoU leaves such classes out instead)."""
    cm = cm.double()
    tp = cm.diag()
    iou = tp / (1e-8 + cm.sum(0) + cm.sum(1) - tp)
    keep = [k for k in range(cm.shape[0]) if k != ignore_index]
    return float(iou[keep].mean())


def evaluate_pixel_classifiers(teacher, train_images: torch.Tensor, train_masks: torch.Tensor,
                               test_images: torch.Tensor, test_masks: torch.Tensor, num_classes: int,
                               s: PixelClassifierSettings | None = None, *, background_index: int | None = 0
                               ) -> dict[str, Any]:
    """DDPM-segmentation's protocol on one labelled set, streamed: the ensemble trained on sampled pixels of
    ``train_images`` / ``train_masks`` and scored on ``test_images`` / ``test_masks`` one image at a time.

    Returns the evaluation's numbers in the form the interpreter's row uses (``test_miou``, ``test_fg_miou``, per
    class ``iou``, as :func:`dreamteacher.evaluate.iou_from_confusion` and
    :func:`~dreamteacher.evaluate.foreground_miou` compute them), ``miou_all_classes`` (the original's averaging),
    the settings, the ensemble's training records, the memory record of :func:`collect_pixels` with the
    process's peak RSS, and seconds."""
    from .evaluate import confusion_matrix, foreground_miou, iou_from_confusion

    s = s or PixelClassifierSettings()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    _check_data(test_images, test_masks, num_classes, s, "test")
    start = time.perf_counter()
    models, runs, memory = fit_pixel_classifiers(teacher, train_images, train_masks, num_classes, s)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    t0 = time.perf_counter()
    predict_images(models, teacher, test_images, num_classes, s,
                   on_image=lambda i, labels: cm.add_(confusion_matrix(labels, test_masks[i], num_classes,
                                                                       s.ignore_index)))
    predict_s = time.perf_counter() - t0
    iou, miou = iou_from_confusion(cm)
    memory["peak_rss_bytes"] = peak_rss_bytes()
    per_image = memory.pop("seconds_per_image")
    seconds = {"extract_per_train_image": sum(per_image) / len(per_image), "train": memory.pop("train_seconds"),
               "predict_per_test_image": predict_s / test_images.shape[0], "total": time.perf_counter() - start}
    logger.info("ddpmseg: %d labelled images, %d sampled pixels, mIoU %.2f%% (%.0f s, peak RSS %.0f MiB)",
                train_images.shape[0], memory["buffer_rows"], 100 * miou, seconds["total"],
                memory["peak_rss_bytes"] / _MIB)
    return {"protocol": "ddpmseg", "labels": int(train_images.shape[0]), "n_test": int(test_images.shape[0]),
            "test_miou": miou, "test_fg_miou": foreground_miou(iou, background_index), "iou": iou,
            "miou_all_classes": _original_miou(cm, s.ignore_index), "settings": asdict(s), "models": runs,
            "memory": memory, "seconds": seconds}


def materialised_pixel_classifiers(teacher, images: torch.Tensor, masks: torch.Tensor, test_images: torch.Tensor,
                                   num_classes: int, s: PixelClassifierSettings,
                                   pixels: Sequence[torch.Tensor] | None = None
                                   ) -> tuple[list[nn.Sequential], torch.Tensor]:
    """The original's layout, for tests only: ``[N, C, H, W]`` features of every training image at once (memory
    ``N * C * H * W * 4`` bytes), flattened pixel-major as their ``prepare_data`` does, the labelled pixels kept
    (or only ``pixels[i]`` of image ``i``: the same set a sampled streaming run used), the ensemble trained on them,
    and each test image's ``[H * W, C]`` features classified whole. Returns the models and ``[N, H, W]`` labels."""
    _check_teacher(teacher, s)
    size = (images.shape[-2], images.shape[-1])

    def features(image: torch.Tensor) -> torch.Tensor:  # [C, H, W], their collect_features
        return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0]
                          for m in block_maps(teacher, image, s)], 0)

    feats = torch.stack([features(img) for img in images])
    dim = feats.shape[1]
    x_all = feats.permute(1, 0, 2, 3).reshape(dim, -1).permute(1, 0)
    y_all = torch.stack([clean_mask(m, s) for m in masks]).reshape(-1).to(x_all.device)
    if pixels is None:
        keep = y_all != s.ignore_index
    else:
        keep = torch.zeros_like(y_all, dtype=torch.bool)
        for i, p in enumerate(pixels):
            keep[i * size[0] * size[1] + p.to(keep.device)] = True
    models, _ = train_ensemble(x_all[keep], y_all[keep].to(_LABEL_DTYPE), num_classes, s)
    del feats, x_all
    preds = [_classify(models, features(img).reshape(dim, -1).permute(1, 0), num_classes).view(size).cpu()
             for img in test_images]
    return models, torch.stack(preds)


def ddpmseg_teacher(path: str, blocks: Sequence[str] | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, fused_ops: bool = True):
    """The teacher directory's UNet tapped at ``blocks`` at native resolution (no resize in the hook, early exit
    after the last block). ``blocks`` None: DDPM-segmentation's ``output_blocks`` 5, 6, 7, 8, 12 for a teacher
    converted by ``dreamteacher convert-adm``, every decoder block (``up_blocks.i``) for a diffusers one."""
    from .teachers.adm import read_adm_taps
    from .teachers.diffusion import DiffusionTeacher, candidate_taps, check_teacher_dir

    root = check_teacher_dir(path, "teacher.path")
    if blocks is None:
        blocks = DDPMSEG_TAPS if read_adm_taps(root) is not None else \
            [n for n in candidate_taps(root) if n.startswith("up_blocks.")]
    from .config import options_named

    with options_named({"taps": "blocks"}):  # the message names this function's argument
        teacher = DiffusionTeacher.from_pretrained(root, taps=list(blocks), early_exit=True, fused_ops=fused_ops)
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)


def ddpmseg_row(cfg, *, labels: int, label_seed: int = 0, n_test: int = 256,
                settings: PixelClassifierSettings | None = None, images: str | None = None, masks: str | None = None,
                test_images: str | None = None, test_masks: str | None = None,
                num_classes: int | None = None) -> dict[str, Any]:
    """The protocol as one row of the evaluation: the teacher of ``cfg.teacher.path`` (:func:`ddpmseg_teacher`,
    ``settings.blocks``, ``cfg.teacher`` dtype and fused_ops, ``cfg.run.device``), the ``labels`` images of label
    seed ``label_seed`` that the interpreter and the backbones train on, scored on the same held-out split.

    Built-in data: ``labelled_indices(labels, label_seed)`` of the labelled pool, the first ``n_test`` images of
    the test split. Folders: ``images`` / ``masks`` for training, ``test_images`` / ``test_masks`` for the score.
    Returns :func:`evaluate_pixel_classifiers`'s record plus ``label_seed``, ``images`` (the labelled indices,
    built-in data) and the teacher."""
    from .data import TEST_SEED, ProceduralShapes, labelled_indices
    from .interpreter import _labelled_data
    from .runtime import setup_distributed
    from .teachers.build import DTYPES, resolve_dtype

    s = settings or PixelClassifierSettings()
    if (images is None) != (test_images is None):
        raise UserError("test_images: expected a test folder exactly when training folders (images) are given")
    x, y, class_names = _labelled_data(cfg, labels, label_seed, images, masks)
    if test_images is None:
        test = ProceduralShapes(n_test, cfg.data.image_size, seed=TEST_SEED)
    else:
        from .evaluate import SegmentationFolder

        test = SegmentationFolder(test_images, test_masks, cfg.data.image_size)
    items = [test[i] for i in range(min(n_test, len(test)))]
    tx, ty = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else int(y[y != s.ignore_index].max()) + 1
    device = setup_distributed(cfg.run.device).device
    teacher = ddpmseg_teacher(cfg.teacher.path, s.blocks, device=device,
                              dtype=DTYPES[resolve_dtype(cfg.teacher.dtype, device)], fused_ops=cfg.teacher.fused_ops)
    row = evaluate_pixel_classifiers(teacher, x, y, tx, ty, num_classes, s)
    row.update({"label_seed": label_seed, "teacher": {"path": str(cfg.teacher.path), "blocks": teacher.taps.names,
                                                      "fingerprint": teacher.identity()["fingerprint"]}})
    if images is None:
        row["images"] = labelled_indices(labels, label_seed)
    return row
