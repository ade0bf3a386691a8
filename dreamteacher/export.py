"""``dreamteacher export``: the student of a pretraining checkpoint as a plain timm state_dict, checked before it is
written (see :func:`export_backbone`)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .config import UserError, config_from_dict
from .faults import _os_error_of, check_finite_state, write_failed
from .runtime import load_checkpoint
from .serialization import (
    save_plain,
)
from .student import StudentBackbone

logger = logging.getLogger("dreamteacher")

__all__ = ["EXPORT_SUFFIXES", "export_backbone"]


#: File name suffixes :func:`export_backbone` writes: safetensors (the default) or torch.save of plain tensors.
EXPORT_SUFFIXES = (".safetensors", ".pth", ".pt")


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    check_features: bool = True, details: dict | None = None, ema: bool = False) -> Path:
    """Write the student of a pretraining checkpoint keyed by timm's own names, checked before anything is written.

    The file loads strictly into ``timm.create_model(name, pretrained=False, num_classes=0)`` pruned after the
    student's last level (:func:`~dreamteacher.student.exported_model`, recipe in
    :func:`~dreamteacher.student.loading_recipe`), whose ``forward_intermediates`` then equals the student's maps
    bitwise, and with ``strict=False`` into the model with its default head, all tensors loaded (head and layers after
    the last level left at timm's initialisation: they were never trained). An export that would load short of that
    is refused (:meth:`~dreamteacher.student.StudentBackbone.check_export`).

    Args:
        checkpoint: a ``dreamteacher pretrain`` checkpoint.
        out: ``.safetensors`` (metadata: timm model name, out_indices, reductions, timm version) or ``.pth`` /
            ``.pt`` (``torch.save`` of plain tensors). Default: ``backbone.safetensors`` in the run directory
            (next to ``checkpoints/``).
        check_features: also compare the loaded timm model's features with the student's (one forward each).
        details: if given, updated with the check's report (tensor counts, the head-ful model's missing keys) and
            ``timm_model``, ``out_indices``, ``reductions``.
        ema: export the moving average of the student's weights (``run.ema_decay``) instead of the weights
            themselves; default file ``backbone_ema.safetensors``.

    Raises:
        ValueError: ``out`` with another suffix, a student that cannot be exported, or a failed load check.
    """
    ckpt = Path(checkpoint)
    if out is None:
        out = ((ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
               / ("backbone_ema.safetensors" if ema else "backbone.safetensors"))
    out = Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise UserError(f"out: expected a file name ending in {' or '.join(EXPORT_SUFFIXES)}, got {str(out)!r}")
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    student = StudentBackbone(cfg.model.student, reductions=tuple(cfg.model.reductions))
    prefix = "student."
    weights = state["model"]
    if ema:
        weights = state.get("ema")
        if not isinstance(weights, dict) or not weights:
            raise UserError(f"ema: {ckpt} holds no moving average of the student (it was trained with "
                            "run.ema_decay=0); export without --ema, or pretrain with --run.ema_decay=0.999")
    student.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    sd = student.export_state_dict()
    check_finite_state(sd.items(), what=f"{ckpt}{' (EMA)' if ema else ''}",
                       hint="The run that wrote it diverged; export an earlier checkpoint (run.keep_checkpoints).")
    report = student.check_export(sd, check_features=check_features)
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            try:
                save_file(sd, str(tmp), metadata=student.export_metadata())
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        else:
            save_plain(out, sd)
    except (OSError, RuntimeError) as e:  # torch.save's writer reports an OSError as a RuntimeError
        cause = _os_error_of(e)
        if cause is None:
            raise
        if cause.errno in full:  # the disk, a quota or the file-size limit: nothing is wrong with the path itself
            raise write_failed(out, cause, what="backbone export", intact=f"The checkpoint {ckpt} is untouched",
                               then="free space and run the same command again") from e
        # a read-only or missing place, a file where a folder should be
        raise UserError(f"out: cannot write {out} ({cause.strerror or cause}); give a writable file path") from e
    logger.info("exported %s (%s, %d tensors, out_indices %s) from %s", out, student.name, len(sd),
                list(student.out_indices), ckpt)
    if details is not None:
        details.update(report, timm_model=student.name, out_indices=list(student.out_indices),
                       reductions=list(student.reductions))
    return out
