"""Feature taps shared by every teacher family: forward hooks that read named modules, resize them to the
student's strides in the hook and end the forward after the last tap (early exit); the automatic choice of one
block per student level; and the fingerprints that say when two teachers give the same features.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UserError

logger = logging.getLogger("dreamteacher")

__all__ = ["FeatureTaps", "resize_to_stride", "default_tap_names", "describe_tap", "select_taps",
           "state_fingerprint"]


class _StopForward(Exception):
    """Raised by the last tap's hook to end the forward early; caught by :meth:`FeatureTaps.run`."""


def _first_tensor(output: Any) -> torch.Tensor:
    """The first tensor in a module output (a tensor, a tuple/list, a dict or a diffusers ``BaseOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # diffusers BaseOutput is an OrderedDict
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            try:
                return _first_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"expected a module output holding a tensor, got {type(output).__name__}")


def _target_size(image_size: Sequence[int], stride: int) -> tuple[int, int]:
    # ceil(H / s) is the size a conv net with 'same' padding produces (a ResNet on 64x96 at stride 32 gives 2x3).
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def resize_to_stride(feature: torch.Tensor, image_size: Sequence[int], stride: int) -> torch.Tensor:
    """Resize a feature map ``[B, C, h, w]`` to ``[B, C, ceil(H / stride), ceil(W / stride)]``.

    Shrinking averages over areas (``avg_pool2d`` with an integer factor, ``adaptive_avg_pool2d`` otherwise);
    enlarging is bilinear (``align_corners=False``). A feature already at the target size is returned as is.
    """
    size = _target_size(image_size, stride)
    h, w = feature.shape[-2:]
    if (h, w) == size:
        return feature
    if h >= size[0] and w >= size[1]:
        if h % size[0] == 0 and w % size[1] == 0 and h // size[0] == w // size[1]:
            return F.avg_pool2d(feature, h // size[0])
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def describe_tap(info: dict) -> str:
    """One line about a tap from its ``feature_info`` entry: ADM block (when known), module, channels, strides."""
    name = f"{info['block']} ({info['module']})" if info.get("block") else info["module"]
    native = info.get("native_reduction")
    stride = f"native stride {native}, read at stride {info['reduction']}" if native is not None \
        else f"stride {info['reduction']}"
    return f"{name}: {info['num_chs']} channels, {stride}"


def default_tap_names(model: nn.Module) -> list[str]:
    """The decoder blocks of a diffusers UNet (``up_blocks.0`` ... ``up_blocks.{n-1}``)."""
    up = getattr(model, "up_blocks", None)
    if up is None:
        raise UserError(f"taps: {type(model).__name__} has no up_blocks; name the modules to tap explicitly")
    return [f"up_blocks.{i}" for i in range(len(up))]


class FeatureTaps:
    """Forward hooks that collect the outputs of named modules, resized to requested strides.

    Features are collected in call order; for a tuple output the first tensor is kept. Each feature is resized in
    the hook (see :func:`resize_to_stride`) when :meth:`run` is given the input image size, then cast to ``dtype``.
    A bfloat16 or float16 model's features are upcast to float32 before the resize.
    The internal buffer is emptied whenever features are handed out, so nothing is retained between calls.

    With ``early_exit=True``, :meth:`run` ends the forward as soon as every tapped module has produced its output:
    the last hook raises a private exception that :meth:`run` catches. Each tapped module must run once per forward.

    Args:
        model: the module to tap.
        names: dotted module names (``model.get_submodule``); default :func:`default_tap_names`.
        strides: one output stride (relative to the input image) per name, or None to keep native resolution.
        dtype: cast the features to this dtype (e.g. ``torch.bfloat16``), or None to keep the model's (float32 for a
            half-precision model).
        early_exit: stop the forward after the last tap inside :meth:`run`.

    Example::

        with FeatureTaps(unet, ["up_blocks.0", "up_blocks.1"], strides=[8, 4], early_exit=True) as taps:
            _, feats = taps.run(lambda: unet(x_t, t), image_size=x_t.shape[-2:])
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None, *,
                 strides: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                 early_exit: bool = False) -> None:
        self.names = list(names) if names is not None else default_tap_names(model)
        if not self.names:
            raise UserError("names: expected at least one module to tap")
        if len(set(self.names)) != len(self.names):
            raise UserError(f"names: duplicate module names in {self.names}")
        if strides is not None:
            strides = [int(s) for s in strides]
            if len(strides) != len(self.names):
                raise UserError(f"strides: expected {len(self.names)} strides (one per tap), got {len(strides)}")
            if any(s <= 0 for s in strides):
                raise UserError(f"strides: expected positive integers, got {strides}")
        self.strides = strides
        self.dtype = dtype
        self.early_exit = bool(early_exit)
        self.enabled = True
        self._stride_of = dict(zip(self.names, strides)) if strides is not None else {}
        self._buffer: list[torch.Tensor] = []
        self._order: list[str] = []
        self._image_size: tuple[int, int] | None = None
        self._armed = False
        self.last_order: list[str] = []
        modules = []
        for name in self.names:  # resolve every name before registering, so a bad name leaves no hook behind
            try:
                modules.append(model.get_submodule(name))
            except AttributeError as e:
                raise UserError(f"names: {type(model).__name__} has no module {name!r}") from e
        self._handles = [m.register_forward_hook(partial(self._hook, n)) for n, m in zip(self.names, modules)]

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return None
        feat = _first_tensor(output)
        if feat.dtype in (torch.bfloat16, torch.float16):
            # A half-precision teacher's features leave in float32: the resize averages (or interpolates) in float32
            # and the target is not rounded to 8 bits of mantissa a second time (the whitening is float32 too).
            feat = feat.float()
        if self._image_size is not None and name in self._stride_of:
            feat = resize_to_stride(feat, self._image_size, self._stride_of[name])
        if self.dtype is not None:
            feat = feat.to(self.dtype)
        self._buffer.append(feat)
        self._order.append(name)
        if self._armed and len(self._buffer) == len(self.names):
            raise _StopForward
        return None

    def run(self, forward: Callable[[], Any], image_size: Sequence[int] | None = None
            ) -> tuple[Any, list[torch.Tensor]]:
        """Call ``forward()`` and return ``(output, features)``.

        Args:
            forward: a closure running the model (e.g. ``lambda: unet(x_t, t)``).
            image_size: ``(H, W)`` of the input image the strides refer to; None keeps native resolution.

        Returns:
            The forward's output (None when it was cut short by the early exit) and the features in call order.
        """
        self._buffer, self._order = [], []
        self._image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
        self._armed = self.early_exit
        output = None
        try:
            output = forward()
        except _StopForward:
            pass
        finally:
            self._armed = False
            self._image_size = None
        order = self._order
        #: Names of the modules whose features the last :meth:`run` returned, in that (call) order.
        self.last_order = list(order)
        feats = self.pop()
        if sorted(order) != sorted(self.names):
            missing = [n for n in self.names if n not in order]
            raise RuntimeError(f"FeatureTaps: expected each tapped module to run once, got {order} "
                               f"(not run: {missing})")
        return output, feats

    def pop(self) -> list[torch.Tensor]:
        """Hand out the collected features (call order) and empty the buffer."""
        feats, self._buffer, self._order = self._buffer, [], []
        return feats

    @property
    def call_order(self) -> list[str]:
        """Names of the modules whose features are in the buffer, in call order."""
        return list(self._order)

    def remove(self) -> None:
        """Remove every hook and drop any buffered feature."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._buffer, self._order = [], []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"FeatureTaps(names={self.names}, strides={self.strides}, dtype={self.dtype}, "
                f"early_exit={self.early_exit})")


def _jsonable(config: Any) -> Any:
    """A diffusers config (FrozenDict with tuples) as plain JSON data, without bookkeeping keys."""
    if config is None:
        return None
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if k not in ("_name_or_path",
                                                                                    "_diffusers_version",
                                                                                    "_use_default_values")},
                                 sort_keys=True, default=str))


def state_fingerprint(module: nn.Module, extra: Any = None) -> str:
    """sha256 (hex) of a module's state_dict (names, dtypes, shapes, bytes) and optional JSON-able ``extra``."""
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()



def select_taps(native_strides: Sequence[int], student_strides: Sequence[int]) -> list[int]:
    """Indices (into the candidates, in call order) of one teacher block per student level.

    The paper reads ADM decoder blocks one octave finer than the student's C2-C5, so the target native stride of a
    student level at stride ``s`` is ``s / 2``. Candidates are taken in call order (the decoder runs coarse to fine)
    and matched to the student levels coarse to fine, minimising the total ``|log2(native) - log2(s / 2)|``; ties
    go to the earliest blocks (an earlier early exit).
    """
    targets = sorted(student_strides, reverse=True)  # coarse to fine, like the decoder's call order
    if len(native_strides) < len(targets):
        raise UserError(f"teacher.taps: the teacher has {len(native_strides)} candidate blocks, fewer than the "
                         f"{len(targets)} student levels; name the taps explicitly")
    best, best_cost = None, math.inf
    for combo in itertools.combinations(range(len(native_strides)), len(targets)):
        cost = sum(abs(math.log2(native_strides[j]) - math.log2(s / 2)) for j, s in zip(combo, targets))
        if cost < best_cost - 1e-9:
            best, best_cost = combo, cost
    by_stride = dict(zip(targets, best))
    return [by_stride[s] for s in student_strides]


def call_order(module: nn.Module, names: Sequence[str], run: Callable[[], Any], *, option: str = "taps") -> list[str]:
    """The order in which the named submodules of ``module`` run during ``run()`` (a dry run), each name once;
    :class:`UserError` naming ``option`` for a module that did not run. Taps are built in this order, so a teacher's
    features come out in call order."""
    seen: list[str] = []
    handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.append(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise UserError(f"{option}: modules {missing} did not run in the teacher's forward")
    return list(dict.fromkeys(seen))
