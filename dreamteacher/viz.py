"""Pictures: PCA of teacher and student features (the paper's qualitative figure), masks, and loss curves.

Everything is drawn on a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas and saved as PNG: no
display, no pyplot global state, no backend switch that could disturb a caller's own plotting.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("dreamteacher")

__all__ = ["PCABasis", "fit_pca_basis", "pca_rgb", "mask_palette", "feature_figure", "feature_figure_size",
           "loss_curves", "load_pretrain_checkpoint", "build_distillation", "student_teacher_features"]

#: Figure geometry of :func:`feature_figure`: each panel is PANEL inches square at DPI dots per inch, below a
#: TITLE_STRIP-inch row of column titles; the mask legend takes LEGEND_PAD + LEGEND_ROW inches per row of up to
#: LEGEND_COLUMNS class names (LEGEND_PAD alone without masks).
PANEL, DPI, TITLE_STRIP, LEGEND_PAD, LEGEND_ROW, LEGEND_COLUMNS = 1.6, 100, 0.3, 0.15, 0.22, 6
#: One panel of :func:`loss_curves` is CURVE_PANEL inches (width, height).
CURVE_PANEL = (4.0, 3.2)
#: Mask id drawn white and skipped by the per-image IoU (evaluate's default ignore index).
IGNORE_INDEX = 255
# torch.quantile refuses inputs above 2**24 elements; beyond that the percentiles come from an even subsample.
_QUANTILE_LIMIT = 2**24


# ------------------------------------------------------------------------------------------------ PCA
@dataclass(frozen=True)
class PCABasis:
    """Three principal directions of a feature set and the colour scaling fitted on it.

    Attributes:
        mean: ``[C]`` float64 pixel mean.
        components: ``[3, C]`` float64 unit directions (zero rows when C < 3), each signed so its largest-magnitude
            loading is positive.
        lo, hi: ``[3]`` float64 1st and 99th percentiles of the projections: they map to 0 and 1.
        explained: ``[3]`` fraction of the total variance along each component.
    """

    mean: torch.Tensor
    components: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    explained: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, H, W, 3]`` float64 coordinates along the components (not yet scaled)."""
        pixels = _pixels(features, "features")
        if pixels.shape[1] != self.channels:
            raise ValueError(f"features: the basis was fitted on {self.channels} channels, the features have "
                             f"{pixels.shape[1]}")
        n, _, h, w = features.shape
        return ((pixels - self.mean) @ self.components.T).reshape(n, h, w, 3)


def _pixels(features: torch.Tensor, name: str) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N * H * W, C]`` float64 on the CPU, after the checks every PCA entry point needs."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name}: expected a tensor [N, C, H, W], got {got}")
    if features.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(features.shape)}")
    if features.is_complex() or features.dtype == torch.bool:
        raise ValueError(f"{name}: expected real numbers, got {features.dtype}")
    pixels = features.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return pixels


def _percentiles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1st and 99th percentile of each column of ``[P, 3]``."""
    step = math.ceil(values.shape[0] / _QUANTILE_LIMIT)
    sample = values[::step]
    return torch.quantile(sample, 0.01, dim=0), torch.quantile(sample, 0.99, dim=0)


def fit_pca_basis(features: torch.Tensor) -> PCABasis:
    """Fit :class:`PCABasis` on all pixels of all images of ``features [N, C, H, W]``.

    The directions are the top eigenvectors of the pooled pixel covariance (``C x C``, float64): the same
    directions an SVD of the centered pixels gives, for ``N * H * W * C**2`` work and ``C**2`` memory.
    """
    pixels = _pixels(features, "features")
    c = pixels.shape[1]
    mean = pixels.mean(0)
    centered = pixels - mean
    cov = centered.T @ centered / pixels.shape[0]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    k = min(3, c)
    comps = evecs[:, -k:].flip(1).T.contiguous()  # [k, C], largest variance first
    top = evals[-k:].flip(0).clamp_min(0)
    # eigh's sign is arbitrary; fixing it makes the colours of a feature set reproducible across runs and machines.
    lead = comps.gather(1, comps.abs().argmax(1, keepdim=True)).squeeze(1)
    comps = comps * torch.where(lead < 0, -1.0, 1.0).to(comps)[:, None]
    total = evals.clamp_min(0).sum()
    explained = top / total if total > 0 else torch.zeros_like(top)
    if k < 3:  # fewer than 3 channels: the missing colour channels stay at a constant 0
        comps = torch.cat([comps, comps.new_zeros(3 - k, c)])
        explained = torch.cat([explained, explained.new_zeros(3 - k)])
    lo, hi = _percentiles(centered @ comps.T)
    return PCABasis(mean=mean, components=comps, lo=lo, hi=hi, explained=explained)


def pca_rgb(features: torch.Tensor, *, basis: PCABasis | torch.Tensor | None = None) -> torch.Tensor:
    """First three principal components of ``features [N, C, H, W]`` as RGB ``[N, H, W, 3]`` float32 in [0, 1].

    Components come from all pixels of all N images (centered); each is mapped to [0, 1] between its 1st and 99th
    percentile over all N images (values outside are clipped), so the images share one colour mapping.

    Args:
        features: ``[N, C, H, W]``.
        basis: None to fit the components on ``features`` itself; a :class:`PCABasis` (:func:`fit_pca_basis`) or
            another feature set ``[M, C, H', W']`` with the same C to project ``features`` on *its* components and
            colour scaling, e.g. the student's prediction on the teacher's basis, so equal colours mean equal
            features.

    Returns:
        ``[N, H, W, 3]`` float32 in [0, 1].
    """
    if basis is None:
        basis = fit_pca_basis(features)
    elif isinstance(basis, torch.Tensor):
        basis = fit_pca_basis(basis)
    elif not isinstance(basis, PCABasis):
        raise ValueError(f"basis: expected None, a PCABasis or a feature tensor [N, C, H, W], got "
                         f"{type(basis).__name__}")
    proj = basis.project(features)
    # A component with no spread (constant features, or C < 3) maps to 0 instead of dividing by zero.
    span = (basis.hi - basis.lo).clamp_min(1e-12)
    return ((proj - basis.lo) / span).clamp_(0, 1).float()


# ------------------------------------------------------------------------------------------------ masks
def mask_palette(num_classes: int) -> torch.Tensor:
    """A fixed categorical palette ``[K, 3]`` float32 in [0, 1]: class 0 (background) black, then tab10, the light
    halves of tab20 and Set3 (32 distinct colours), repeating after that."""
    import matplotlib

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    colours = [(0.0, 0.0, 0.0), *matplotlib.colormaps["tab10"].colors,
               *matplotlib.colormaps["tab20"].colors[1::2], *matplotlib.colormaps["Set3"].colors[:11]]
    if num_classes > len(colours):
        logger.warning("mask_palette: %d classes share %d colours; some classes look alike", num_classes,
                       len(colours))
    return torch.tensor([colours[0], *(colours[1 + (k - 1) % (len(colours) - 1)] for k in range(1, num_classes))],
                        dtype=torch.float32)


def _check_masks(masks: torch.Tensor, name: str, n: int, size: Sequence[int], num_classes: int) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"{name}: expected class ids [N, H, W], got {got}")
    if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of class ids, got {masks.dtype}")
    if masks.shape[0] != n or tuple(masks.shape[1:]) != tuple(size):
        raise ValueError(f"{name}: expected [{n}, {size[0]}, {size[1]}] (one mask per image, at the image size), got "
                         f"{tuple(masks.shape)}")
    masks = masks.cpu().long()
    bad = ((masks < 0) | (masks >= num_classes)) & (masks != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"{name}: class id {int(masks[bad][0])} is outside [0, {num_classes}) of the "
                         f"{num_classes} class_names (and is not the ignore id {IGNORE_INDEX})")
    return masks


def _masks_rgb(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N, H, W]`` checked class ids -> ``[N, H, W, 3]``; the ignore id is white."""
    palette = torch.cat([mask_palette(num_classes), torch.ones(1, 3)])
    return palette[torch.where(masks == IGNORE_INDEX, num_classes, masks)]


def _image_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of one ``[H, W]`` prediction over the classes present in its ground truth or prediction."""
    keep = target != IGNORE_INDEX
    p, t = pred[keep], target[keep]
    ious = []
    for k in range(num_classes):
        union = ((p == k) | (t == k)).sum()
        if union > 0:
            ious.append(float(((p == k) & (t == k)).sum()) / float(union))
    return sum(ious) / len(ious) if ious else float("nan")


# ------------------------------------------------------------------------------------------------ feature figure
def feature_figure_size(num_images: int, num_columns: int, num_classes: int | None) -> tuple[int, int]:
    """Pixel size (width, height) of :func:`feature_figure`'s PNG.

    Width ``PANEL * num_columns * DPI``; height ``(TITLE_STRIP + PANEL * num_images + legend) * DPI`` with
    ``legend = LEGEND_PAD + LEGEND_ROW * ceil(num_classes / LEGEND_COLUMNS)`` when masks are drawn
    (``num_classes`` not None), ``LEGEND_PAD`` otherwise. Each panel is 160 x 160 pixels.
    """
    rows = math.ceil(num_classes / LEGEND_COLUMNS) if num_classes else 0
    height = TITLE_STRIP + PANEL * num_images + LEGEND_PAD + LEGEND_ROW * rows
    return round(PANEL * num_columns * DPI), round(height * DPI)


def _corner_text(ax: Any, text: str) -> None:
    ax.text(0.03, 0.04, text, transform=ax.transAxes, fontsize=7, color="white", va="bottom", ha="left",
            bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "linewidth": 0})


def feature_figure(images: torch.Tensor, teacher_feats: torch.Tensor, student_feats: torch.Tensor,
                   gt_masks: torch.Tensor | None, pred_masks: torch.Tensor | None, path: str | os.PathLike, *,
                   class_names: Sequence[str]) -> Path:
    """The paper's qualitative figure: one row per image; columns input, PCA of the teacher features, PCA of the
    student's prediction of them projected on the *teacher's* components and colour scale (equal colours mean equal
    features), ground truth, prediction (each mask column left out when its masks are None).

    The student panel's corner gives that image's MSE between the two feature maps (the loss's MSE term when the
    teacher features are the whitened targets); the prediction panel's gives its mean IoU over the classes present
    in its ground truth or prediction. Masks use :func:`mask_palette` with a legend of ``class_names``; the ignore id
    255 is white.

    Args:
        images: ``[N, 3, H, W]`` in [-1, 1] (the datasets' range).
        teacher_feats, student_feats: ``[N, C, h, w]`` (same shape), drawn nearest-upsampled to ``H x W``.
        gt_masks, pred_masks: ``[N, H, W]`` integer class ids in ``[0, len(class_names))`` (or 255), or None.
        path: the PNG to write (parent directories are created).
        class_names: one name per class id (needed when a mask is drawn).

    Returns:
        ``path``. The PNG is :func:`feature_figure_size` pixels: 160 x 160 per panel (``PANEL`` = 1.6 inches at
        ``DPI`` = 100) plus a 30-pixel title strip and the legend strip (15 pixels, plus 22 per legend row of up to
        6 class names when masks are drawn).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected [N, 3, H, W], got {got}")
    n, size = images.shape[0], tuple(images.shape[-2:])
    if n == 0:
        raise ValueError("images: expected at least one image")
    for name, feats in (("teacher_feats", teacher_feats), ("student_feats", student_feats)):
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[0] != n:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"{name}: expected [{n}, C, h, w] (one map per image), got {got}")
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(f"student_feats: expected the teacher's shape {tuple(teacher_feats.shape)}, got "
                         f"{tuple(student_feats.shape)}")
    drawn = [(name, m) for name, m in (("gt_masks", gt_masks), ("pred_masks", pred_masks)) if m is not None]
    class_names = [str(c) for c in class_names] if class_names is not None else []
    k = len(class_names)
    if drawn and k == 0:
        raise ValueError("class_names: expected one name per class id to draw masks, got none")
    masks = {name: _check_masks(m, name, n, size, k) for name, m in drawn}

    basis = fit_pca_basis(teacher_feats)
    t_rgb = pca_rgb(teacher_feats, basis=basis)
    s_rgb = pca_rgb(student_feats, basis=basis)
    mse = (student_feats.detach().double().cpu() - teacher_feats.detach().double().cpu()).pow(2).mean((1, 2, 3))
    var = ", ".join(f"{100 * float(v):.0f}" for v in basis.explained)

    def up(rgb: torch.Tensor) -> torch.Tensor:
        return F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)

    columns: list[tuple[str, torch.Tensor, list[str] | None]] = [
        ("input", ((images.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), None),
        (f"teacher PCA ({var}% var)", up(t_rgb), None),
        ("student, teacher's PCA", up(s_rgb), [f"MSE {float(v):.3g}" for v in mse])]
    if "gt_masks" in masks:
        columns.append(("ground truth", _masks_rgb(masks["gt_masks"], k), None))
    if "pred_masks" in masks:
        notes = None
        if "gt_masks" in masks:
            notes = [f"mIoU {100 * _image_miou(p, t, k):.0f}%" for p, t in zip(masks["pred_masks"], masks["gt_masks"])]
        columns.append(("prediction", _masks_rgb(masks["pred_masks"], k), notes))

    width_px, height_px = feature_figure_size(n, len(columns), k if drawn else None)
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    height = height_px / DPI
    bottom = (height - TITLE_STRIP - PANEL * n) / height
    fig.subplots_adjust(left=0.02 / len(columns), right=1 - 0.02 / len(columns), top=1 - TITLE_STRIP / height,
                        bottom=bottom, wspace=0.05, hspace=0.05)
    axes = fig.subplots(n, len(columns), squeeze=False)
    for j, (title, pics, notes) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(pics[i].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if notes is not None:
                _corner_text(ax, notes[i])
        axes[0, j].set_title(title, fontsize=8)
    if drawn:
        palette = mask_palette(k)
        fig.legend(handles=[Patch(color=palette[c].tolist(), label=name) for c, name in enumerate(class_names)],
                   loc="lower center", ncol=min(k, LEGEND_COLUMNS), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.0), borderaxespad=0.2, handlelength=1.2, columnspacing=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------------ loss curves
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_record(record: Any) -> bool:
    """A log record has a finite numeric step and a numeric loss; its optional per-level terms (``mse``, ``at``)
    are lists of numbers and its label term (``ld``) a number."""
    if not isinstance(record, dict) or not _is_number(record.get("step")) or not _is_number(record.get("loss")):
        return False
    if not math.isfinite(record["step"]):
        return False
    for key in ("mse", "at"):
        if key in record and not (isinstance(record[key], list) and all(_is_number(v) for v in record[key])):
            return False
    return "ld" not in record or _is_number(record["ld"])


def _read_log(path: Path) -> list[dict]:
    """The valid records of a JSON-lines log, sorted by step; malformed lines are skipped and counted."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if _valid_record(record):
                records.append(record)
            else:
                bad += 1
    if bad:
        logger.warning("%s: skipped %d malformed lines", path, bad)
    # A resumed run appends to the same log; sorting keeps its curve drawn left to right.
    return sorted(records, key=lambda r: r["step"])


def _centred_mean(values: Sequence[float], half: int, *, log: bool) -> list[float]:
    """Moving average over ``2 * half + 1`` points centred on each point, the window shrinking symmetrically at the
    ends (a trailing average would lag behind a falling loss); geometric (in log space) for a log axis. Non-finite
    values are left out of every window."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & ((v > 0) if log else True)
    x = np.where(ok, np.log(np.where(ok, v, 1.0)) if log else v, 0.0)
    sums, counts = np.concatenate([[0.0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(v))
    h = np.minimum(half, np.minimum(i, len(v) - 1 - i))
    lo, hi = i - h, i + h + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums[hi] - sums[lo]) / (counts[hi] - counts[lo])
    return (np.exp(mean) if log else mean).tolist()


def _plot_series(ax: Any, steps: Sequence[float], values: Sequence[float], *, log: bool, **style: Any) -> None:
    """A logged series; long noisy ones (>= 40 points) are drawn faint with a centred moving average over about 5%
    of the points on top, so the trend is visible without hiding the logged values."""
    half = len(values) // 40
    if half >= 1:
        ax.plot(steps, values, alpha=0.25, lw=0.8, color=style.get("color"), ls=style.get("ls", "-"))
        ax.plot(steps, _centred_mean(values, half, log=log), lw=1.3, **style)
    else:
        ax.plot(steps, values, lw=1.3, **style)


def loss_curves(logs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """Loss vs step of JSON-lines logs (``dreamteacher pretrain``'s, ``train-teacher``'s, ``train-interpreter``'s or
    any log of ``{"step", "loss", ...}`` records).

    Panels: the total loss of every log; the per-level whitened MSE (``mse``) and attention-transfer (``at``) terms
    and the label term of mixed distillation (``ld``) when some log has them. In the total-loss panel each log has
    its colour; in the per-level panels colour is the level (L0 = finest) and line style the log. Axes are log-scale
    when every value drawn is positive. Series of 40 points or more are drawn faint under a centred moving average
    (geometric on log axes) over about 5% of their points. Malformed lines are skipped with a logged count.

    Args:
        logs: display name -> path of a JSON-lines log.
        path: the PNG to write; ``CURVE_PANEL`` inches per panel at ``DPI`` (400 x 320 pixels per panel).

    Returns:
        ``path``.
    """
    from matplotlib import ticker
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not isinstance(logs, Mapping) or not logs:
        raise ValueError("logs: expected a non-empty mapping NAME -> log.jsonl")
    data: dict[str, list[dict]] = {}
    for name, p in logs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"logs: expected non-empty names, got {name!r}")
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"logs[{name!r}]: {p}: no such file")
        data[name] = _read_log(p)
        if not data[name]:
            logger.warning("logs[%r]: %s has no valid {\"step\", \"loss\"} record; not drawn", name, p)
    if not any(data.values()):
        raise ValueError(f"logs: none of {', '.join(map(repr, data))} has a valid {{\"step\", \"loss\"}} record")
    data = {name: records for name, records in data.items() if records}

    panels = [("loss", "total loss")] + [(key, title) for key, title in (
        ("mse", "whitened MSE per level"), ("at", "attention transfer per level"),
        ("ld", "soft-label term (mixed)")) if any(key in r for rs in data.values() for r in rs)]
    log_colours = {name: f"C{i % 10}" for i, name in enumerate(data)}
    styles = ["-", "--", ":", "-."]

    fig = Figure(figsize=(CURVE_PANEL[0] * len(panels), CURVE_PANEL[1]), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels):
        # (log name, level or None, steps, values) of every curve of this panel
        series: list[tuple[str, int | None, list[float], list[float]]] = []
        for name, records in data.items():
            rs = [r for r in records if key in r]
            if rs and key in ("mse", "at"):
                for lvl in range(max(len(r[key]) for r in rs)):
                    pts = [(r["step"], r[key][lvl]) for r in rs if len(r[key]) > lvl]
                    series.append((name, lvl, [s for s, _ in pts], [v for _, v in pts]))
            elif rs:
                series.append((name, None, [r["step"] for r in rs], [r[key] for r in rs]))
        finite = [v for *_, values in series for v in values if math.isfinite(v)]
        log = bool(finite) and min(finite) > 0
        levels = 1 + max((lvl for _, lvl, _, _ in series if lvl is not None), default=-1)
        with_key = list(dict.fromkeys(name for name, *_ in series))  # the logs that have this term
        log_styles = {name: styles[i % len(styles)] for i, name in enumerate(with_key)}
        for name, lvl, steps, values in series:
            if lvl is None:
                _plot_series(ax, steps, values, log=log, color=log_colours[name], label=name)
            else:
                _plot_series(ax, steps, values, log=log, color=f"C{lvl % 10}", ls=log_styles[name])
        if log:
            ax.set_yscale("log")
            # Plain numbers (0.1, 2, 3) instead of 10^-1 and 2x10^0; within about a decade every minor tick is
            # labelled, or the axis would show one label or none.
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            if math.log10(max(finite) / min(finite)) <= 1.2:
                ax.yaxis.set_minor_formatter(plain)
            else:
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        elif finite:
            logger.debug("loss_curves: %s has values <= 0, drawn on a linear axis", key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
        ax.tick_params(labelsize=8, which="both")
        if key in ("mse", "at"):
            handles = [Line2D([], [], color=f"C{lvl % 10}", lw=1.5, label=f"L{lvl}") for lvl in range(levels)]
            if len(with_key) > 1:  # line styles tell the logs apart only when several logs have this term
                handles += [Line2D([], [], color="0.3", ls=log_styles[name], lw=1.2, label=name) for name in with_key]
            ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 5 else 1, framealpha=0.8)
        else:
            ax.legend(fontsize=7, framealpha=0.8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------------ checkpoint features
def load_pretrain_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """A ``dreamteacher pretrain`` checkpoint (``OUT/checkpoints/last.pt``), checked to hold ``model`` and
    ``config``, read weights-only (never runs code from the file); a
    :class:`~dreamteacher.serialization.LoadError` for anything else."""
    from .serialization import load_checkpoint

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path}: no such file")
    return load_checkpoint(path, what="checkpoint")


def build_distillation(cfg: Any, device: torch.device | str = "cpu", *, num_classes: int | None = None,
                       pretrained: bool | None = None) -> tuple[torch.nn.Module, torch.nn.Module, list[int]]:
    """The frozen teacher and the trainable :class:`~dreamteacher.model.DistillationModel` (student + regressor,
    plus the logit head of mixed distillation when ``num_classes`` is given) of a pretraining config, built the way
    ``pretrain()`` builds them.

    This is the model-building block of ``pretrain()`` as a function; it could move to train.py and serve both.

    Returns:
        ``(model, teacher, order)``: ``teacher(x)[order[l]]`` is the target of student level ``l``.
    """
    from .model import DistillationModel, teacher_for
    from .regressor import FeatureRegressor
    from .student import StudentBackbone

    device = torch.device(device)
    student = StudentBackbone(cfg.model.student, pretrained=cfg.model.pretrained if pretrained is None else pretrained,
                              reductions=tuple(cfg.model.reductions))
    strides = [info["reduction"] for info in student.feature_info]
    teacher, order = teacher_for(cfg, device, strides)
    teacher_channels = [teacher.feature_info[order[lvl]]["num_chs"] for lvl in range(len(strides))]
    regressor = FeatureRegressor(student.feature_info, teacher_channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    model = DistillationModel(student, regressor, num_classes=num_classes, width=cfg.model.width).to(device)
    return model, teacher, order


@torch.inference_mode()
def student_teacher_features(checkpoint: str | os.PathLike | Mapping[str, Any], images: torch.Tensor, *,
                             seed: int = 0, teacher_path: str | os.PathLike | None = None,
                             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The finest level's teacher target and the student's prediction of it, from a pretraining checkpoint.

    The teacher target is whitened as the run's loss whitens it (``loss.whiten``, by default a LayerNorm over
    channels without affine parameters, via ``dtkernels.reference.whiten``, the loss's own definition): that is what
    the student regresses. The teacher's noise is drawn with ``seed`` (the same pictures on every call).

    Args:
        checkpoint: path of ``OUT/checkpoints/last.pt`` or the dict :func:`load_pretrain_checkpoint` returns.
        images: ``[N, 3, H, W]`` in [-1, 1].
        seed: key of the teacher's q_sample noise.
        teacher_path: the teacher's directory, when it is no longer at the checkpoint config's ``teacher.path``.
        device: where to run both models.

    Returns:
        ``(teacher [N, C, h, w], student [N, C, h, w])`` float32 on the CPU, ``h = H / r`` for the finest student
        stride ``r``.
    """
    from dtkernels.reference import whiten

    from .config import config_from_dict

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a floating tensor [N, 3, H, W] in [-1, 1], got {got}")
    state = checkpoint if isinstance(checkpoint, Mapping) else load_pretrain_checkpoint(checkpoint)
    where = "checkpoint" if isinstance(checkpoint, Mapping) else f"checkpoint {checkpoint}"
    cfg = config_from_dict(state["config"])
    if cfg.teacher.kind != "diffusion":
        raise ValueError(f"checkpoint: the {where} was trained from a generator teacher (teacher.kind="
                         f"{cfg.teacher.kind}); these pictures read real images through a diffusion teacher")
    if teacher_path is not None:
        if not Path(teacher_path).is_dir():
            raise FileNotFoundError(f"teacher_path: {teacher_path} is not a directory")
        cfg.teacher.path = str(teacher_path)
    elif not cfg.teacher.path or not Path(cfg.teacher.path).is_dir():
        raise FileNotFoundError(f"teacher_path: the {where} was trained with teacher.path={cfg.teacher.path!r}, "
                                "which is not a directory here; pass the teacher's current directory")
    head = state["model"].get("logit_head.weight")
    model, teacher, order = build_distillation(cfg, device, num_classes=None if head is None else head.shape[0],
                                               pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint: the {where}'s weights do not fit the model its config describes: {e}") from e
    model.eval()
    images = images.to(device=device, dtype=torch.float32)
    targets = teacher(images, seed=seed)
    out = model(images)
    preds = out[0] if isinstance(out, tuple) else out
    target = whiten(targets[order[0]].float(), cfg.loss.whiten, cfg.loss.eps)
    return target.float().cpu(), preds[0].float().cpu()
