"""The named modes of the dtkernels ops, and the one place where each name gets its integer value.

The ops take a mode as an ``int`` (an op schema has no enum type), so each mode is an :class:`enum.IntEnum`: the
Python layers and the tests use the members, the Triton kernels receive ``int(member)`` as a ``tl.constexpr`` and
compare it with constants defined from these members, and ``csrc/utils.h`` has a matching ``enum class`` for the C++
kernels (tests/test_modes.py checks that the two agree and that no kernel compares a mode with a bare number).

Public functions take the user-facing names (``whiten="channel"``, ``at_mode="paper"``, ``reduction="mean"``);
:meth:`Whitening.from_arg` and its siblings turn them into members, with an error that names the argument.
"""

from __future__ import annotations

import enum

__all__ = ["Whitening", "AtMode", "Reduction", "Activation"]


class _Mode(enum.IntEnum):
    """A mode whose members have a user-facing name (:attr:`arg`); ``_ARG`` is the argument name in errors."""

    @property
    def arg(self) -> str | None:
        """The name public functions accept for this member (``None`` for :attr:`Whitening.NONE` and
        :attr:`Activation.NONE`)."""
        return None if self.name == "NONE" and type(self) in (Whitening, Activation) else self.name.lower()

    @classmethod
    def args(cls) -> tuple[str | None, ...]:
        """Every user-facing name, in member order."""
        return tuple(m.arg for m in cls)

    @classmethod
    def from_arg(cls, value: object) -> _Mode:
        """The member named ``value`` (a user-facing name, or a member).

        Raises:
            ValueError: naming the argument and the accepted names.
        """
        if isinstance(value, cls):
            return value
        by_arg = _BY_ARG.get(cls)
        if by_arg is None:  # built once per mode (this runs on every loss call)
            by_arg = _BY_ARG[cls] = {m.arg: m for m in cls}
        if isinstance(value, (str, type(None))) and value in by_arg:
            return by_arg[value]
        raise ValueError(f"{_EXPECTED[cls.__name__]}, got {value!r}")


_BY_ARG: dict[type, dict[str | None, _Mode]] = {}

#: The error text of each mode's argument (the argument name and the accepted names).
_EXPECTED = {
    "Whitening": "whiten: expected one of 'channel', 'sample' or None",
    "AtMode": "at_mode: expected 'paper' or 'mean_sq'",
    "Reduction": "reduction: expected 'mean', 'sum' or 'none'",
    "Activation": "act: expected 'silu' or None",
}


class Whitening(_Mode):
    """How ``fused_feat_loss`` whitens the teacher (a LayerNorm without affine parameters)."""

    NONE = 0  # identity (public name: None)
    CHANNEL = 1  # over C at each (b, h, w)
    SAMPLE = 2  # over (C, H, W) of each sample


class AtMode(_Mode):
    """The attention-transfer term of ``fused_feat_loss``."""

    PAPER = 0  # mean_b ||q(s_b) - q(t_b)||_2
    MEAN_SQ = 1  # mean_{b, hw} (q(s) - q(t))**2


class Reduction(_Mode):
    """The reduction of ``soft_ce`` over positions."""

    NONE = 0  # the per-position map
    MEAN = 1  # over (valid) positions
    SUM = 2


class Activation(_Mode):
    """The activation ``group_norm_act`` applies after the normalization (and the scale / shift)."""

    NONE = 0  # identity (public name: None)
    SILU = 1  # x * sigmoid(x)
