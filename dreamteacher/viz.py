"""Pictures: PCA of teacher and student features (the paper's qualitative figure), masks, and loss curves.

PNG files via matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("dreamteacher")

__all__ = ["pca_rgb", "feature_figure", "loss_curves", "student_teacher_features", "mask_palette"]

#: Figure geometry: each panel is PANEL inches wide at DPI dots per inch.
PANEL, DPI = 1.6, 100


def pca_rgb(features: torch.Tensor, *, basis: dict | None = None) -> tuple[torch.Tensor, dict]:
    """First three principal components of ``features [N, C, H, W]`` as RGB ``[N, H, W, 3]`` in [0, 1].

    Components come from all pixels of all N images (centered), each signed so its largest-magnitude loading is
    positive (deterministic) and mapped to [0, 1] between its 1st and 99th percentile over all N images, so the
    images share one colour mapping. Pass the returned ``basis`` to project a second feature set with the same C
    (e.g. the student's prediction of the teacher's features) with the same components and scaling.

    Returns:
        ``(rgb, basis)``.
    """
    if features.dim() != 4:
        raise ValueError(f"features: expected [N, C, H, W], got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    pixels = features.detach().double().permute(0, 2, 3, 1).reshape(-1, c)
    if basis is None:
        mean = pixels.mean(0)
        _, _, vh = torch.linalg.svd(pixels - mean, full_matrices=False)
        comps = vh[:3]
        if comps.shape[0] < 3:  # fewer than 3 channels: pad with zero components
            comps = torch.cat([comps, comps.new_zeros(3 - comps.shape[0], c)])
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)).squeeze(1))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
        proj = (pixels - mean) @ comps.T
        lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
        basis = {"mean": mean, "components": comps, "lo": lo, "hi": hi}
    elif basis["mean"].shape[0] != c:
        raise ValueError(f"features: the basis has {basis['mean'].shape[0]} channels, the features {c}")
    proj = (pixels - basis["mean"]) @ basis["components"].T
    rgb = ((proj - basis["lo"]) / (basis["hi"] - basis["lo"]).clamp_min(1e-12)).clamp(0, 1)
    return rgb.reshape(n, h, w, 3).float(), basis


def mask_palette(num_classes: int):
    """A fixed categorical palette ``[K, 3]`` in [0, 1] (background black)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colours = [(0.0, 0.0, 0.0)] + [cmap(i % 10)[:3] for i in range(max(num_classes - 1, 0))]
    return torch.tensor(colours[:num_classes])


def _masks_rgb(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    palette = mask_palette(num_classes)
    m = masks.long().clamp(0, num_classes)  # ignore ids (e.g. 255) -> an extra white entry
    palette = torch.cat([palette, torch.ones(1, 3)])
    return palette[m]


def _upsample_rgb(rgb: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(rgb.permute(0, 3, 1, 2), size=tuple(size), mode="nearest").permute(0, 2, 3, 1)


def feature_figure(images: torch.Tensor, teacher_feats: torch.Tensor, student_feats: torch.Tensor,
                   gt_masks: torch.Tensor | None, pred_masks: torch.Tensor | None, path: str | os.PathLike, *,
                   class_names: Sequence[str]) -> Path:
    """One row per image: input, PCA of the teacher features, PCA of the student's prediction of them (projected
    on the teacher's components, so equal colours mean equal features), ground truth, prediction.

    Args:
        images: ``[N, 3, H, W]`` in [-1, 1].
        teacher_feats, student_feats: ``[N, C, h, w]`` (same C).
        gt_masks, pred_masks: ``[N, H, W]`` class ids, or None to leave the column out.

    The PNG is ``PANEL * columns`` by ``PANEL * N + 0.5`` inches at ``DPI`` (160 x 160 pixels per panel plus a
    50-pixel legend strip).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = images.shape[0]
    size = images.shape[-2:]
    t_rgb, basis = pca_rgb(teacher_feats)
    s_rgb, _ = pca_rgb(student_feats, basis=basis)
    columns = [("input", ((images.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)),
               ("teacher PCA", _upsample_rgb(t_rgb, size)), ("student PCA", _upsample_rgb(s_rgb, size))]
    k = len(class_names)
    if gt_masks is not None:
        columns.append(("ground truth", _masks_rgb(gt_masks.cpu(), k)))
    if pred_masks is not None:
        columns.append(("prediction", _masks_rgb(pred_masks.cpu(), k)))
    fig, axes = plt.subplots(n, len(columns), figsize=(PANEL * len(columns), PANEL * n + 0.5), dpi=DPI,
                             squeeze=False)
    for i in range(n):
        for j, (title, pics) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(pics[i].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    if gt_masks is not None or pred_masks is not None:
        palette = mask_palette(k)
        fig.legend(handles=[Patch(color=palette[c].tolist(), label=name) for c, name in enumerate(class_names)],
                   loc="lower center", ncol=min(k, 6), fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.3 / (PANEL * n + 0.5), bottom=0.5 / (PANEL * n + 0.5),
                        wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _read_log(path: Path) -> list[dict]:
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float)):
            records.append(r)
        else:
            bad += 1
    if bad:
        logger.warning("%s: skipped %d malformed lines", path, bad)
    return records


def loss_curves(logs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> Path:
    """Loss vs step of every JSON-lines log (total loss, log scale); panels for the per-level whitened MSE and
    attention-transfer terms, and the soft-label term of mixed distillation, when the logs have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not logs:
        raise ValueError("logs: expected at least one NAME -> log.jsonl")
    data = {}
    for name, p in logs.items():
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"logs[{name!r}]: {p}: no such file")
        data[name] = _read_log(p)
    panels = [("loss", "total loss")]
    if any("mse" in r for rs in data.values() for r in rs):
        panels.append(("mse", "whitened MSE per level"))
    if any("at" in r for rs in data.values() for r in rs):
        panels.append(("at", "attention transfer per level"))
    if any("ld" in r for rs in data.values() for r in rs):
        panels.append(("ld", "soft-label term (mixed)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=DPI, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, rs in data.items():
            rs = [r for r in rs if key in r]
            if not rs:
                continue
            steps = [r["step"] for r in rs]
            if isinstance(rs[0][key], list):
                for lvl in range(len(rs[0][key])):
                    ax.plot(steps, [r[key][lvl] for r in rs], label=f"{name} L{lvl}", lw=1)
            else:
                ax.plot(steps, [r[key] for r in rs], label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


@torch.inference_mode()
def student_teacher_features(checkpoint: str | os.PathLike, images: torch.Tensor, *, seed: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The finest level's teacher features, whitened as the run's loss whitens them (``loss.whiten``: what the
    student regresses), and the student's prediction of them, for ``images [N, 3, H, W]``, from a pretraining
    checkpoint.

    Returns ``(teacher [N, C, h, w], student [N, C, h, w])``.
    """
    from .config import config_from_dict
    from .regressor import FeatureRegressor
    from .student import StudentBackbone
    from .train import DistillationModel, build_teacher, load_checkpoint

    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint: {checkpoint} is not a dreamteacher pretrain checkpoint")
    cfg = config_from_dict(state["config"])
    device = torch.device("cpu")
    student = StudentBackbone(cfg.model.student, reductions=tuple(cfg.model.reductions))
    strides = [info["reduction"] for info in student.feature_info]
    teacher, order = build_teacher(cfg, device, strides)
    channels = [teacher.feature_info[order[lvl]]["num_chs"] for lvl in range(len(strides))]
    regressor = FeatureRegressor(student.feature_info, channels, width=cfg.model.width,
                                 pool_sizes=cfg.model.pool_sizes)
    head = state["model"].get("logit_head.weight")
    model = DistillationModel(student, regressor, num_classes=None if head is None else head.shape[0],
                              width=cfg.model.width)
    model.load_state_dict(state["model"])
    model.eval()
    feats = teacher(images, seed=seed)
    out = model(images)
    preds = out[0] if isinstance(out, tuple) else out
    t = feats[order[0]].float()
    if cfg.loss.whiten == "channel":
        t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=cfg.loss.eps).permute(0, 3, 1, 2)
    elif cfg.loss.whiten == "sample":
        t = F.layer_norm(t, t.shape[1:], eps=cfg.loss.eps)
    return t, preds[0].float()
