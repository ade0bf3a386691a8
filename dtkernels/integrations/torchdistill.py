"""torchdistill losses that run on the dtkernels ops.

Importing this module registers four mid-level losses with torchdistill's registry
(``torchdistill.losses.registry.register_mid_level_loss``), so a YAML config names them after one line::

    dependencies:
      - name: 'dtkernels.integrations.torchdistill'

=========================  ==================================================================================
``FusedATLoss``            torchdistill's ``ATLoss``: same kwargs (``at_pairs`` with ``teacher`` / ``student``
                           ``io`` + ``path`` and a ``weight`` per pair; ``mode: 'code' | 'paper'``), same value
                           and student gradients, every pair in one ``fused_feat_loss`` call.
``FusedKDLoss``            torchdistill's ``KDLoss``: same kwargs (module paths and io, ``temperature``,
                           ``alpha``, ``beta``, ``reduction``, extra kwargs to ``CrossEntropyLoss``), same value and
                           gradients; the soft term runs on ``dtkernels.soft_ce``.
``FusedLogitStdKDLoss``    torchdistill's ``LogitStdKDLoss`` (KD on standardized logits, ``eps``) on ``soft_ce``.
``DreamTeacherFeatLoss``   ``dtkernels.fused_feat_loss`` over ``feat_pairs`` of student / teacher io paths:
                           whitened MSE + attention transfer, pair weights as level weights.
=========================  ==================================================================================

How the numbers line up (the tests check each against torchdistill itself):

* ``ATLoss`` ``'code'``: per pair ``mean_{b,hw} (q(s) - q(t))**2`` with ``q = normalize(mean_c x**2)``; the channel
  mean and the op's channel sum give the same unit-norm map, so this is ``at_mode="mean_sq"``. ``'paper'``: per pair
  ``sum_b ||q(s_b) - q(t_b)||_2``, the weighted sum divided by the first pair's batch size: ``at_mode="paper"``
  (a mean over b) with the pair's weight scaled by its batch size over the first pair's. Pair weights become the
  op's level weights and ``at_weight`` their sum, because the op normalises level weights to sum to 1.
* ``KDLoss``'s soft term is ``KL(p_t || p_s)`` at temperature T: the soft cross-entropy ``H(p_t, p_s)`` (``soft_ce``,
  which also writes the student gradient) minus the teacher's entropy ``H(p_t)``, a constant for the student
  computed from the teacher logits without grad; then KLDivLoss's reduction (``batchmean``: / batch size). See
  :func:`dtkernels.integrations.losses.soft_kl_div`; a wider AT teacher goes through
  :func:`~dtkernels.integrations.losses.at_teacher_like`.

Bad configs fail with an error naming the loss, the pair and the key: an io path that no forward hook filled, a
feature pair whose shapes do not pair, an unsupported mode or reduction, a negative weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import functional
from ..modes import AtMode, Whitening
from .losses import at_teacher_like, soft_kl_div

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as e:  # the optional extra is missing: say which one
    raise ImportError("dtkernels.integrations.torchdistill needs torchdistill, which is not installed "
                      f"({e}); pip install 'dtkernels[torchdistill]'") from e

__all__ = ["FusedATLoss", "FusedKDLoss", "FusedLogitStdKDLoss", "DreamTeacherFeatLoss"]

IoDict = Mapping[str, Mapping[str, Any]]

_AT_MODES = {"code": "mean_sq", "paper": "paper"}
#: KLDivLoss reductions soft_ce can reproduce (its ``"none"`` is one value per position, KLDivLoss's per element).
_KD_REDUCTIONS = ("batchmean", "mean", "sum")


class _Side(NamedTuple):
    """One side (student or teacher) of a configured pair: where its tensor sits in torchdistill's io dict."""

    where: str  # the config key that names it, e.g. "at_pairs.pair1.student"
    path: str  # module path in the io dict ('.' is the model's own output)
    io: str  # 'input' or 'output'


def _parse_side(loss: str, where: str, config: object) -> _Side:
    if not isinstance(config, Mapping):
        raise ValueError(f"{loss}: {where}: expected a mapping with keys 'io' and 'path', got {config!r}")
    for key in ("io", "path"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"{loss}: {where}.{key}: expected a string (e.g. io: 'output', path: 'layer3'), "
                             f"got {config.get(key)!r}")
    return _Side(where, config["path"], config["io"])


def _parse_weight(loss: str, where: str, config: Mapping) -> float:
    weight = config.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{loss}: {where}.weight: expected a finite number, got {weight!r}")
    if weight < 0:
        # The op's level weights are non-negative; a negative pair weight would need a second call.
        raise ValueError(f"{loss}: {where}.weight: expected a number >= 0, got {weight!r}")
    return float(weight)


def _parse_pairs(loss: str, key: str, pairs: object) -> list[tuple[_Side, _Side, float]]:
    """``{name: {student: {io, path}, teacher: {io, path}, weight}}`` -> ``[(student, teacher, weight)]``."""
    if not isinstance(pairs, Mapping) or len(pairs) == 0:
        raise ValueError(f"{loss}: {key}: expected a non-empty mapping of pair name -> {{student, teacher, weight}}, "
                         f"got {pairs!r}")
    parsed = []
    for name, config in pairs.items():
        where = f"{key}.{name}"
        if not isinstance(config, Mapping):
            raise ValueError(f"{loss}: {where}: expected a mapping with keys 'student', 'teacher' and optionally "
                             f"'weight', got {config!r}")
        for side in ("student", "teacher"):
            if side not in config:
                raise ValueError(f"{loss}: {where}.{side}: missing (expected {{io: ..., path: ...}})")
        parsed.append((_parse_side(loss, f"{where}.student", config["student"]),
                       _parse_side(loss, f"{where}.teacher", config["teacher"]), _parse_weight(loss, where, config)))
    return parsed


def _extract(loss: str, io_dict: IoDict, side: _Side, model: str, path_key: str = ".path",
             io_key: str = ".io") -> torch.Tensor:
    """The tensor at ``io_dict[side.path][side.io]``, or an error naming the config key and what was hooked."""
    if side.path not in io_dict:
        hooked = sorted(io_dict)
        raise ValueError(f"{loss}: {side.where}{path_key}: {side.path!r} is not in the {model}'s io dict (paths with "
                       f"recorded io: {hooked}); add it to the {model}'s forward_hook in the train config")
    entry = io_dict[side.path]
    if side.io not in entry:
        raise ValueError(f"{loss}: {side.where}{io_key}: the {model}'s io dict has no {side.io!r} for path "
                       f"{side.path!r} (it has {sorted(entry)}); hook it under forward_hook.{side.io}")
    value = entry[side.io]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{loss}: {side.where}: expected a tensor at {side.path!r} ({side.io}), "
                        f"got {type(value).__name__}")
    return value


def _check_feature_pair(loss: str, where: str, s: torch.Tensor, t: torch.Tensor, *, same_channels: bool) -> None:
    """Shapes that pair: ``[B, C, H, W]`` each, same B, H, W (and C unless the loss allows otherwise), same device."""
    for side, x in (("student", s), ("teacher", t)):
        if x.dim() != 4:
            raise ValueError(f"{loss}: {where}.{side}: expected a 4-D feature map [B, C, H, W], got shape "
                             f"{tuple(x.shape)}")
    s_key = tuple(s.shape) if same_channels else (s.shape[0], *s.shape[2:])
    t_key = tuple(t.shape) if same_channels else (t.shape[0], *t.shape[2:])
    if s_key != t_key:
        what = "shape" if same_channels else "batch size and spatial size (B, H, W)"
        raise ValueError(f"{loss}: {where}: the student and teacher feature maps do not pair: expected the same "
                         f"{what}, got student {tuple(s.shape)} and teacher {tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"{loss}: {where}: student ({s.device}) and teacher ({t.device}) are on different devices")


class FusedATLoss(nn.Module):
    """torchdistill's ``ATLoss`` (attention transfer) on :func:`dtkernels.fused_feat_loss`: every pair in one call.

    Same kwargs, value and student gradients as ``torchdistill.losses.mid_level.ATLoss`` in both modes. The teacher
    may have a different channel count than the student (as with ``ATLoss``): its attention map depends only on its
    per-position channel energy, so it is passed to the op as that energy, broadcast over the student's channels
    without a copy.

    Args:
        at_pairs: ``{name: {teacher: {io, path}, student: {io, path}, weight: w}}``; feature maps ``[B, C, H, W]``.
        mode: ``'code'`` (the authors' code: mean of squared map differences) or ``'paper'`` (Eq. 2: L2 norm of the
            difference, summed over the batch and divided by the first pair's batch size).
        **kwargs: accepted and ignored, as ``ATLoss`` does.
    """

    def __init__(self, at_pairs: Mapping[str, Mapping], mode: str = "code", **kwargs: Any) -> None:
        super().__init__()
        name = type(self).__name__
        if mode not in _AT_MODES:
            raise ValueError(f"{name}: mode: expected 'code' or 'paper' (ATLoss's modes), got {mode!r}")
        self.at_pairs = at_pairs
        self.mode = mode
        self._pairs = _parse_pairs(name, "at_pairs", at_pairs)

    def forward(self, student_io_dict: IoDict, teacher_io_dict: IoDict, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The AT loss over all pairs (0-dim; float32 for half features)."""
        name = type(self).__name__
        students, teachers, weights = [], [], []
        for s_side, t_side, weight in self._pairs:
            s = _extract(name, student_io_dict, s_side, "student")
            t = _extract(name, teacher_io_dict, t_side, "teacher")
            where = s_side.where.rsplit(".", 1)[0]
            _check_feature_pair(name, where, s, t, same_channels=False)
            students.append(s)
            # A wider teacher becomes a view with the student's shape and the same attention map; also the
            # student's dtype (e.g. a float32 teacher next to an autocast student: the op takes one dtype).
            teachers.append(at_teacher_like(t.detach(), s))
            weights.append(weight)
        if self.mode == "paper":
            # ATLoss sums over the batch and divides by the first pair's batch size; the op takes a mean per level.
            batch0 = students[0].shape[0]
            weights = [w * s.shape[0] / batch0 for w, s in zip(weights, students)]
        total = sum(weights)
        if total == 0.0:  # every weight 0: a zero loss that still reaches the student, as ATLoss's 0 * loss does
            return functional.fused_feat_loss(students, teachers, mse_weight=0.0, at_weight=0.0, whiten=None)
        return functional.fused_feat_loss(students, teachers, mse_weight=0.0, at_weight=total, at_p=2.0,
                                          at_mode=_AT_MODES[self.mode], whiten=None, level_weights=weights)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pairs={[s.where.rsplit('.', 1)[0] for s, _, _ in self._pairs]}"


class FusedKDLoss(nn.Module):
    """torchdistill's ``KDLoss`` (Hinton's knowledge distillation) with the soft term on :func:`dtkernels.soft_ce`.

    ``alpha * CE(student, targets) + beta * T**2 * KL(softmax(t/T) || softmax(s/T))``; only the KL term when
    ``alpha`` is None or 0 or there are no targets (as ``KDLoss`` does). Same value and gradients as ``KDLoss``.

    Args:
        student_module_path, student_module_io: where the student logits ``[N, K]`` (or ``[B, K, ...]``, classes on
            axis 1) sit in the student's io dict.
        teacher_module_path, teacher_module_io: the same for the teacher.
        temperature: ``T > 0``.
        alpha: weight of the hard cross-entropy (None: soft term only).
        beta: weight of the soft term; default ``1 - alpha``.
        reduction: KLDivLoss's ``'batchmean'`` (default; the cross-entropy then uses ``'mean'``), ``'mean'`` or
            ``'sum'``. ``'none'`` is refused: KLDivLoss returns one value per element, soft_ce one per position.
        **kwargs: passed to ``nn.CrossEntropyLoss`` (e.g. ``label_smoothing``), as ``KDLoss`` does.
    """

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, temperature: float, alpha: float | None = None, beta: float | None = None,
                 reduction: str = "batchmean", **kwargs: Any) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{name}: temperature: expected a number > 0, got {temperature!r}")
        if reduction not in _KD_REDUCTIONS:
            raise ValueError(f"{name}: reduction: expected one of {list(_KD_REDUCTIONS)}, got {reduction!r} "
                             "('none' would be KLDivLoss's per-element map; soft_ce gives one value per position)")
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self._student = _Side("student_module", student_module_path, student_module_io)
        self._teacher = _Side("teacher_module", teacher_module_path, teacher_module_io)
        self.temperature = temperature
        self.alpha = alpha
        # KDLoss computes 1 - alpha eagerly (a TypeError for alpha=None); beta only matters when alpha is set.
        self.beta = (1 - alpha if alpha is not None else None) if beta is None else beta
        self.reduction = reduction
        self.cross_entropy_loss = nn.CrossEntropyLoss(reduction="mean" if reduction == "batchmean" else reduction,
                                                      **kwargs)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the softmaxes see (identity here; :class:`FusedLogitStdKDLoss` standardizes them)."""
        return logits

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``KLDivLoss(reduction)(log_softmax(s/T, 1), softmax(t/T, 1))`` on the transformed logits."""
        return soft_kl_div(self.transform_logits(student_logits), self.transform_logits(teacher_logits.detach()),
                           temperature=self.temperature, reduction=self.reduction)

    def forward(self, student_io_dict: IoDict, teacher_io_dict: IoDict, targets: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """The KD loss (0-dim)."""
        name = type(self).__name__
        student_logits = _extract(name, student_io_dict, self._student, "student", "_path", "_io")
        teacher_logits = _extract(name, teacher_io_dict, self._teacher, "teacher", "_path", "_io")
        if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
            raise ValueError(f"{name}: the student logits at student_module_path {self.student_module_path!r} "
                             f"({self.student_module_io}) and the teacher logits at teacher_module_path "
                             f"{self.teacher_module_path!r} ({self.teacher_module_io}) do not pair: expected one "
                             f"shape [N, K, ...], got {tuple(student_logits.shape)} and "
                             f"{tuple(teacher_logits.shape)}")
        soft_loss = self.soft_loss(student_logits, teacher_logits)
        if self.alpha is None or self.alpha == 0 or targets is None:
            return soft_loss
        hard_loss = self.cross_entropy_loss(student_logits, targets)
        return self.alpha * hard_loss + self.beta * (self.temperature ** 2) * soft_loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}"


class FusedLogitStdKDLoss(FusedKDLoss):
    """torchdistill's ``LogitStdKDLoss`` (KD on standardized logits, Sun et al. 2024) with the soft term on
    :func:`dtkernels.soft_ce`: logits become ``(z - mean(z)) / (eps + std(z))`` over the last axis before the
    temperature. Same kwargs, value and gradients as ``LogitStdKDLoss``."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, temperature: float, eps: float = 1e-7, alpha: float | None = None,
                 beta: float | None = None, reduction: str = "batchmean", **kwargs: Any) -> None:
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io, temperature,
                         alpha=alpha, beta=beta, reduction=reduction, **kwargs)
        self.eps = eps

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        # The last axis, as LogitStdKDLoss writes it (the class axis for [N, K] logits).
        return (logits - logits.mean(dim=-1, keepdim=True)) / (self.eps + logits.std(dim=-1, keepdim=True))


class DreamTeacherFeatLoss(nn.Module):
    """:func:`dtkernels.fused_feat_loss` over configured student / teacher io paths (DreamTeacher's feature loss).

    ``sum_l w_l * (mse_weight * mse_l + at_weight * at_l) / sum_l w_l`` over the pairs, ``w_l`` the pairs' weights
    (see the definition of ``fused_feat_loss`` in docs/api.md). Each student feature map must have its teacher's
    shape (put a regressor or 1x1 adapter in the student for that: torchdistill's ``adaptations`` / ``sequential``).

    Args:
        feat_pairs: ``{name: {student: {io, path}, teacher: {io, path}, weight: w}}``; weights ``>= 0`` with a
            positive sum.
        mse_weight, at_weight, at_p, at_mode, whiten, eps: as in :func:`dtkernels.fused_feat_loss`
            (``at_mode: 'paper' | 'mean_sq'``, ``whiten: 'channel' | 'sample' | null``).
    """

    def __init__(self, feat_pairs: Mapping[str, Mapping], mse_weight: float = 1.0, at_weight: float = 10.0,
                 at_p: float = 2.0, at_mode: str = "paper", whiten: str | None = "channel", eps: float = 1e-5,
                 **kwargs: Any) -> None:
        super().__init__()
        name = type(self).__name__
        if kwargs:  # unlike torchdistill's own losses, refuse unknown keys: a typo would silently change the loss
            raise ValueError(f"{name}: unknown kwargs {sorted(kwargs)}; expected feat_pairs, mse_weight, at_weight, "
                             "at_p, at_mode, whiten, eps")
        # Checked now, not at the first step: the messages already name the key ("at_mode: expected ...").
        try:
            AtMode.from_arg(at_mode)
            Whitening.from_arg(whiten)
            for key, value, minimum, strict in (("mse_weight", mse_weight, 0.0, False),
                                                ("at_weight", at_weight, 0.0, False), ("at_p", at_p, 1.0, False),
                                                ("eps", eps, 0.0, True)):
                functional._check_number(value, key, minimum=minimum, strict=strict)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
        self._pairs = _parse_pairs(name, "feat_pairs", feat_pairs)
        if sum(w for _, _, w in self._pairs) <= 0:
            raise ValueError(f"{name}: feat_pairs: the pair weights must have a positive sum, got "
                             f"{[w for _, _, w in self._pairs]}")
        self.feat_pairs = feat_pairs
        self.options = {"mse_weight": mse_weight, "at_weight": at_weight, "at_p": at_p, "at_mode": at_mode,
                        "whiten": whiten, "eps": eps}

    def forward(self, student_io_dict: IoDict, teacher_io_dict: IoDict, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The feature loss over all pairs, one fused call (0-dim)."""
        name = type(self).__name__
        students, teachers = [], []
        for s_side, t_side, _ in self._pairs:
            s = _extract(name, student_io_dict, s_side, "student")
            t = _extract(name, teacher_io_dict, t_side, "teacher")
            _check_feature_pair(name, s_side.where.rsplit(".", 1)[0], s, t, same_channels=True)
            students.append(s)
            teachers.append(t.detach().to(s.dtype))
        return functional.fused_feat_loss(students, teachers, level_weights=[w for _, _, w in self._pairs],
                                          **self.options)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{options}, pairs={[s.where.rsplit('.', 1)[0] for s, _, _ in self._pairs]}"


for _loss in (FusedATLoss, FusedKDLoss, FusedLogitStdKDLoss, DreamTeacherFeatLoss):
    register_mid_level_loss(_loss)
