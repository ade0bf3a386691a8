"""The frozen teacher's GroupNorm + SiLU pairs through :func:`dtkernels.group_norm_act`, by module replacement.

A diffusers UNet normalizes and activates every residual block twice and its output once; each pair reads and
writes the whole feature map two or three times in eager PyTorch (GroupNorm, the time-embedding scale / shift, SiLU).
:func:`fuse_teacher_ops` makes these places one pass of :func:`dtkernels.group_norm_act` (statistics in float32):

* each diffusers ``ResnetBlock2D`` whose norms are affine ``nn.GroupNorm`` and whose nonlinearity is ``nn.SiLU``:
  ``norm1`` + SiLU, and ``norm2`` + SiLU with the time embedding as diffusers applies it (``"scale_shift"``:
  ``norm2(h) * (1 + scale) + shift`` inside the op; ``"default"``: ``h + temb`` added before ``norm2``, as diffusers
  does). The block's class becomes :class:`FusedResnetBlock2D`, a subclass whose ``forward`` is diffusers' own, step
  by step, with the two pairs through the op (up / down sampling, dropout, shortcut and output scale unchanged);
* a ``UNet2DModel`` / ``UNet2DConditionModel``'s ``conv_norm_out`` + ``conv_act`` (affine ``nn.GroupNorm`` then
  ``nn.SiLU``): the norm becomes :class:`FusedGroupNormSiLU` (norm and SiLU in one call) and the activation
  :class:`SiLUFusedIntoNorm`, which hands the norm's output on untouched.

Only classes change (``module.__class__``): no parameter, buffer or submodule is added, removed or renamed, so the
state_dict (its keys, values and the teacher fingerprints made from it) is the same (the output pair also shares a
plain ``_fused_handoff`` attribute, outside the state_dict), and deep copies, pickles and ``save_pretrained`` keep
working. Blocks of another make (a subclass of ``ResnetBlock2D``, another norm or activation, ``eps`` 0) are left as
they are and counted by :func:`fusion_report`.

A place whose modules have a forward hook or pre-hook when :func:`fuse_teacher_ops` runs (``norm1``, ``norm2``,
``nonlinearity``; ``conv_norm_out``, ``conv_act``: a feature tap on them, say) stays stock, so the hook sees what it
expects; a fused place whose modules got a hook since is restored by the next call. Hooks added to them after the
fusion do not fire (``norm1`` is not called) or see the fused value (``conv_norm_out``'s output is activated): the
decision is made once, so that watching a module never changes the teacher's bits. At call time, a place falls back
to diffusers' own computation, bit for bit, only where the op cannot run: grad mode with an input or parameter that
requires grad (the op is inference-only), or a dtype the op does not take (it takes float32, bfloat16, float16 and
float64 inputs, with parameters in that dtype or float32).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

import dtkernels

__all__ = ["fuse_teacher_ops", "unfuse_teacher_ops", "fusion_report", "FusedResnetBlock2D", "FusedGroupNormSiLU",
           "SiLUFusedIntoNorm"]

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _hooked(*modules: nn.Module) -> bool:
    """Whether one of ``modules`` has a forward hook or forward pre-hook (a feature tap, say)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _op_takes(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether ``dtkernels.group_norm_act`` computes this call as the stock modules would, and may be called at all:
    a non-empty ``[B, C, ...]`` of a dtype it takes, parameters in x's dtype or its compute dtype on x's device,
    ``[B, C]`` scale / shift (checked by the caller's shapes), and no gradient needed."""
    if x.dtype not in _X_DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    allowed = (x.dtype, torch.float64 if x.dtype == torch.float64 else torch.float32)
    for p in params:
        if p is None:
            continue
        if p.dtype not in allowed or p.device != x.device or (grad and p.requires_grad):
            return False
    return True


def _norm_act(norm: nn.GroupNorm, act: nn.Module, x: torch.Tensor, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """``act(norm(x) * (1 + scale) + shift)`` (without scale / shift: ``act(norm(x))``) through the op when it
    applies, else by the modules themselves exactly as diffusers writes it. ``scale``, ``shift``: ``[B, C]``."""
    per_sample = (x.shape[0], x.shape[1])
    if _op_takes(x, norm.weight, norm.bias, scale, shift) and (
            scale is None or (tuple(scale.shape) == per_sample and tuple(shift.shape) == per_sample)):
        return dtkernels.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, scale=scale,
                                        shift=shift, act="silu")
    y = norm(x)
    if scale is not None:
        y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return act(y)


def _affine_group_norm(m: Any) -> bool:
    return type(m) is nn.GroupNorm and m.affine and m.eps > 0  # the op takes eps > 0 only


class FusedResnetBlock2D(ResnetBlock2D):
    """A diffusers ``ResnetBlock2D`` whose GroupNorm + SiLU pairs run through :func:`dtkernels.group_norm_act`: its
    forward is diffusers' (0.42, ``models/resnet.py``) with ``norm1`` + SiLU and ``norm2`` (+ the time embedding) +
    SiLU through :func:`_norm_act`."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("scale", None) is not None or (temb is not None and temb.dim() != 2):
            return super().forward(input_tensor, temb, *args, **kwargs)  # diffusers' own, deprecation note included

        hidden_states = _norm_act(self.norm1, self.nonlinearity, input_tensor)

        if self.upsample is not None:
            # upsample_nearest_nhwc fails with large batch sizes (diffusers issue 984)
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)  # [B, C] ([B, 2C] for scale_shift); diffusers adds [:, :, None, None]

        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb[:, :, None, None]
            hidden_states = _norm_act(self.norm2, self.nonlinearity, hidden_states)
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = _norm_act(self.norm2, self.nonlinearity, hidden_states, time_scale, time_shift)
        else:
            hidden_states = _norm_act(self.norm2, self.nonlinearity, hidden_states)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        return (input_tensor + hidden_states) / self.output_scale_factor


class _Handoff:
    """Shared by a fused ``conv_norm_out`` and its ``conv_act``: the output the norm already activated, if any."""

    __slots__ = ("act", "ref")

    def __init__(self, act: nn.Module) -> None:
        self.act = act
        self.ref: weakref.ref | None = None

    # A weak reference cannot be copied or pickled, and a pending hand-off means nothing outside the forward.
    def __getstate__(self) -> dict:
        return {"act": self.act}

    def __setstate__(self, state: dict) -> None:
        self.act, self.ref = state["act"], None


class FusedGroupNormSiLU(nn.GroupNorm):
    """A UNet's ``conv_norm_out`` that also applies the SiLU of the ``conv_act`` after it, in one
    :func:`dtkernels.group_norm_act`; where the op does not apply it is the plain GroupNorm and ``conv_act`` applies
    the SiLU, as unfused."""

    _fused_handoff: _Handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handoff = self._fused_handoff
        handoff.ref = None
        if not _op_takes(x, self.weight, self.bias):
            return super().forward(x)
        out = dtkernels.group_norm_act(x, self.num_groups, self.weight, self.bias, eps=self.eps, act="silu")
        handoff.ref = weakref.ref(out)
        return out


class SiLUFusedIntoNorm(nn.SiLU):
    """A UNet's ``conv_act`` whose SiLU :class:`FusedGroupNormSiLU` applied: the tensor that norm just returned
    passes through; any other input gets the SiLU."""

    _fused_handoff: _Handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handoff = self._fused_handoff
        ref, handoff.ref = handoff.ref, None
        if ref is not None and ref() is x:
            return x
        return super().forward(x)


def _norm_out_fusable(unet: nn.Module) -> bool:
    norm, act = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    return (type(unet) in (UNet2DModel, UNet2DConditionModel) and _affine_group_norm(norm) and type(act) is nn.SiLU
            and not _hooked(norm, act))


def _resnet_fusable(block: nn.Module) -> bool:
    return (type(block) is ResnetBlock2D and _affine_group_norm(block.norm1)
            and _affine_group_norm(block.norm2) and type(block.nonlinearity) is nn.SiLU
            and block.time_embedding_norm in ("default", "scale_shift")
            and not _hooked(block.norm1, block.norm2, block.nonlinearity))


def _restore_norm_out(unet: nn.Module) -> None:
    unet.conv_norm_out.__class__ = nn.GroupNorm
    unet.conv_act.__class__ = nn.SiLU
    del unet.conv_norm_out._fused_handoff, unet.conv_act._fused_handoff


def fusion_report(model: nn.Module) -> dict[str, int]:
    """What :func:`fuse_teacher_ops` did to ``model`` (or would leave alone):

    ``resnet_blocks``: fused ``ResnetBlock2D`` (two places each); ``resnet_blocks_unfused``: ``ResnetBlock2D`` (and
    subclasses) left stock, fusable or not; ``norm_out``: fused ``conv_norm_out`` + ``conv_act`` pairs;
    ``norm_out_unfused``: UNets (``UNet2DModel`` / ``UNet2DConditionModel``) whose pair is stock; ``places``: the
    number of places that run through the op (``2 * resnet_blocks + norm_out``)."""
    report = {"resnet_blocks": 0, "resnet_blocks_unfused": 0, "norm_out": 0, "norm_out_unfused": 0}
    for m in model.modules():
        if type(m) is FusedResnetBlock2D:
            report["resnet_blocks"] += 1
        elif isinstance(m, ResnetBlock2D):
            report["resnet_blocks_unfused"] += 1
        if isinstance(m, (UNet2DModel, UNet2DConditionModel)):
            report["norm_out" if type(getattr(m, "conv_norm_out", None)) is FusedGroupNormSiLU
                   else "norm_out_unfused"] += 1
    report["places"] = 2 * report["resnet_blocks"] + report["norm_out"]
    return report


def fuse_teacher_ops(unet: nn.Module) -> int:
    """Run the frozen ``unet``'s GroupNorm + SiLU pairs through :func:`dtkernels.group_norm_act` (see the module
    docstring): every plain diffusers ``ResnetBlock2D`` (``norm1`` + SiLU, ``norm2`` + time embedding + SiLU) and the
    UNet's ``conv_norm_out`` + ``conv_act``. Works on any module holding such blocks (the whole teacher too).

    Places whose modules have forward (pre-)hooks stay stock (see the module docstring). Idempotent: places fused by
    an earlier call stay as they are (unless hooked since). The state_dict is unchanged.

    Returns:
        The number of places that run through the op after the call (two per fused residual block, one per output
        pair; those fused earlier included, so a second call returns the same number). :func:`fusion_report` has
        the details, including the blocks left stock.

    Raises:
        ValueError: a parameter of ``unet`` requires grad (the op is inference-only: freeze the model with
            ``requires_grad_(False)`` and run it under ``torch.inference_mode()`` / ``torch.no_grad()``).
    """
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet: expected an nn.Module, got {type(unet).__name__}")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"fuse_teacher_ops: {len(trainable)} parameter(s) of the {type(unet).__name__} require grad "
                         f"(first: {trainable[0]!r}); dtkernels.group_norm_act is inference-only (no gradient is "
                         "defined), so only a frozen teacher is fused: call .requires_grad_(False) first and run it "
                         "under torch.inference_mode(), or keep the stock modules to train it")
    for m in unet.modules():
        if type(m) is FusedResnetBlock2D and _hooked(m.norm1, m.norm2, m.nonlinearity):
            m.__class__ = ResnetBlock2D  # hooked since an earlier call: the hook sees what it expects
        if type(getattr(m, "conv_norm_out", None)) is FusedGroupNormSiLU and _hooked(m.conv_norm_out, m.conv_act):
            _restore_norm_out(m)
        if _resnet_fusable(m):
            m.__class__ = FusedResnetBlock2D
        if _norm_out_fusable(m):
            handoff = _Handoff(m.conv_act)
            m.conv_norm_out.__class__ = FusedGroupNormSiLU
            m.conv_act.__class__ = SiLUFusedIntoNorm
            m.conv_norm_out._fused_handoff = handoff
            m.conv_act._fused_handoff = handoff
    return fusion_report(unet)["places"]


def unfuse_teacher_ops(unet: nn.Module) -> int:
    """Undo :func:`fuse_teacher_ops`: every fused module becomes its stock diffusers / torch class again.

    Returns:
        The number of places restored (0 for a model that was not fused)."""
    restored = 0
    for m in unet.modules():
        if type(m) is FusedResnetBlock2D:
            m.__class__ = ResnetBlock2D
            restored += 2
        if type(getattr(m, "conv_norm_out", None)) is FusedGroupNormSiLU:
            _restore_norm_out(m)
            restored += 1
    return restored
