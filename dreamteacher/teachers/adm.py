"""guided-diffusion (ADM) checkpoints as exact diffusers teachers, and ADM block names as feature taps.

openai's guided-diffusion ``UNetModel`` (the pixel-space teachers of DDPM-segmentation and DreamTeacher:
``ffhq.pt``, ``lsun_*.pt``, ``256x256_diffusion_uncond.pt``) is saved as a plain ``state_dict``. Its layers are
those of diffusers' ``UNet2DModel`` under other names, with three differences this module settles:

* **attention** keeps ``q``, ``k`` and ``v`` in one 1x1 ``qkv`` convolution laid out per head as
  ``(heads, 3, head_dim)`` (the "legacy" order, the default) or ``(3, heads, head_dim)``
  (``--use_new_attention_order True``); diffusers has three ``Linear`` layers. The output projection and norm map
  one to one; its ``1/sqrt(sqrt(d))`` scaling of both ``q`` and ``k`` is the same product as diffusers' ``1/sqrt(d)``.
* **layout**: ``input_blocks.N`` / ``middle_block`` / ``output_blocks.N`` sequential lists become
  ``down_blocks.L`` / ``mid_block`` / ``up_blocks.L``; :func:`adm_layout` walks the ADM constructor's loops and
  yields, per ADM tensor, the diffusers tensor it becomes, and per ADM block, the diffusers module whose output
  equals the block's output (``adm_taps.json``).
* **what diffusers cannot say**: one ``attention_head_dim`` for every level, a time embedding as wide as the first
  level, GroupNorm with 32 groups: flags that need anything else are refused (:class:`ADMConversionError`), never
  converted into a different model.

Everything else matches by construction: cos-first sinusoidal time embedding with no frequency shift, scale-shift or
additive time conditioning, 3x3 strided-conv / average-pool downsampling, nearest-neighbour upsampling with or
without a conv, residual up/down blocks (``--resblock_updown``), GroupNorm(32, eps 1e-5), skip concatenation order.

The conversion streams: the checkpoint is memory-mapped, and each diffusers tensor is made from its ADM tensor(s)
and written straight into the safetensors file, so the peak memory is about one checkpoint's size.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import shlex
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import UserError

logger = logging.getLogger("dreamteacher")

__all__ = ["ADMConversionError", "ADMFlags", "ADMLayout", "parse_adm_flags", "adm_layout", "convert_adm",
           "read_adm_taps", "translate_adm_taps", "ADM_TAPS_FILE", "ADM_RECORD_FILE", "IGNORED_FLAGS",
           "DDPMSEG_FLAGS", "DDPMSEG_TAPS"]

ADM_TAPS_FILE = "adm_taps.json"
ADM_RECORD_FILE = "adm_conversion.json"
_TAPS_FORMAT = "dreamteacher.adm_taps"

#: DDPM-segmentation's MODEL_FLAGS for its ADM teachers (Baranchuk et al., scripts of the ddpm-segmentation repo).
DDPMSEG_FLAGS = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
                 "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
                 "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                 "--use_scale_shift_norm True")
#: The decoder blocks DDPM-segmentation reads (at t = 50, 150, 250).
DDPMSEG_TAPS = ("output_blocks.5", "output_blocks.6", "output_blocks.7", "output_blocks.8", "output_blocks.12")

# guided-diffusion's model_and_diffusion_defaults(): what a flag left out means.
_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "class_cond": False, "use_checkpoint": False, "use_scale_shift_norm": True, "resblock_updown": False,
    "use_fp16": False, "use_new_attention_order": False, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
#: Flags read and deliberately ignored: they change how the original trains or samples, not what one forward
#: computes in float32.
IGNORED_FLAGS: dict[str, str] = {
    "dropout": "dropout is off at inference",
    "use_fp16": "the original's runtime dtype, recorded as use_fp16 in adm_conversion.json (its float32 weights are "
                "kept; pass --dtype to store others)",
    "use_checkpoint": "gradient checkpointing, training memory only",
    "timestep_respacing": "sampling with fewer steps; features are read at the full schedule's t",
    "use_kl": "a training loss",
    "rescale_learned_sigmas": "a training loss weight",
}
# Sampling / training script options that appear next to the model flags in the original's commands.
_SCRIPT_FLAGS = frozenset({
    "batch_size", "num_samples", "use_ddim", "clip_denoised", "model_path", "classifier_path", "classifier_scale",
    "lr", "weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "fp16_scale_growth", "data_dir", "schedule_sampler", "sigma_small",
})
# ADM's channel_mult when --channel_mult is left empty, by image size (script_util.create_model).
_DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                         64: (1, 2, 3, 4)}
_GROUPS = 32  # ADM's normalization(): GroupNorm32(32, channels), eps 1e-5, computed in float32
_EPS = 1e-5


class ADMConversionError(UserError):
    """Flags or a checkpoint that cannot become an exactly equal diffusers ``UNet2DModel``; the message names the
    flag or tensor."""


def _bool(name: str, text: str) -> bool:
    # guided-diffusion's str2bool
    low = text.lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise ADMConversionError(f"--flags: --{name}: expected a boolean (True/False), got {text!r}")


@dataclass(frozen=True)
class ADMFlags:
    """The model and diffusion flags of a guided-diffusion checkpoint, parsed as its scripts parse them.

    ``channel_mult`` is resolved (the image-size default when the flag is empty) and ``attention_ds`` holds the
    downsample factors ``image_size // r`` of ``--attention_resolutions``.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_ds: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    learn_sigma: bool
    class_cond: bool
    diffusion_steps: int
    noise_schedule: str
    predict_xstart: bool
    rescale_timesteps: bool
    text: str = ""
    given: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        """JSON data: the flags as given, as resolved, and which were ignored and why."""
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_ds"] = list(self.attention_ds)
        return data


def _use_fp16_record(parsed: ADMFlags) -> dict:
    """What the checkpoint's ``--use_fp16`` said and what it means for this teacher (the record of the conversion)."""
    value = _typed_value("use_fp16", parsed.given["use_fp16"]) if "use_fp16" in parsed.given else False
    if value:
        meaning = ("the original ran this checkpoint's convolutions and attention in float16, with GroupNorm "
                   "statistics in float32 (guided-diffusion's convert_to_fp16 and GroupNorm32); the file holds "
                   "float32 weights. A half-precision teacher is therefore this model's own runtime: "
                   "teacher.dtype=auto runs it in bfloat16 on a GPU and on CPUs that multiply bfloat16 natively, "
                   "float32 elsewhere; normalisation statistics stay float32 either way")
    else:
        meaning = ("the original ran this checkpoint in float32; teacher.dtype=auto still chooses bfloat16 on a GPU "
                   "and on CPUs that multiply bfloat16 natively (benchmarks/teacher_precision.py measures the price)")
    return {"value": value, "given": "use_fp16" in parsed.given, "meaning": meaning}


def _split_flags(text: str) -> dict[str, str]:
    """The ``--name value`` / ``--name=value`` pairs of ``text`` as given, so a malformed command fails here, by
    token, before any value is read."""
    try:
        tokens = shlex.split(text or "")
    except ValueError as e:
        raise ADMConversionError(f"--flags: cannot split {text!r} into flags ({e})") from e
    given: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ADMConversionError(f"--flags: expected --name value pairs, got {tok!r} (flags as in guided-"
                                     "diffusion's README, e.g. --image_size 256 --num_channels 256)")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ADMConversionError(f"--flags: --{name} has no value")
            value = tokens[i + 1]
            i += 1
        given[name.replace("-", "_")] = value  # a repeated flag: the last one wins, as with argparse
        i += 1
    return given


def _typed_value(name: str, value: str) -> Any:
    """``value`` as the type of the flag's guided-diffusion default, so a bad value names its flag."""
    default = _DEFAULTS[name]
    if isinstance(default, bool):
        return _bool(name, value)
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ADMConversionError(f"--flags: --{name}: expected an integer, got {value!r}") from None
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ADMConversionError(f"--flags: --{name}: expected a number, got {value!r}") from None
    return value


def _resolve_flags(given: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Defaults overlaid with the typed given flags, and the flags ignored with why: script options and foreign
    flags are recorded rather than refused, a near-miss of a model flag is refused as a typo."""
    values = dict(_DEFAULTS)
    ignored: dict[str, str] = {}
    for name, value in given.items():
        if name in _DEFAULTS:
            values[name] = _typed_value(name, value)
            if name in IGNORED_FLAGS:
                ignored[name] = IGNORED_FLAGS[name]
        elif name in _SCRIPT_FLAGS:
            ignored[name] = "a sampling/training script option"
        else:
            close = difflib.get_close_matches(name, list(_DEFAULTS), n=1, cutoff=0.8)
            if close:
                raise ADMConversionError(f"--flags: unknown flag --{name}; did you mean --{close[0]}?")
            logger.warning("--flags: --%s is not a guided-diffusion model flag; ignored", name)
            ignored[name] = "not a guided-diffusion model flag"
    return values, ignored


def _channel_mult(values: dict[str, Any], size: int) -> tuple[float, ...]:
    """The per-level width multipliers, the image size's default when the flag is empty (as create_model does)."""
    if values["channel_mult"] == "":
        if size not in _DEFAULT_CHANNEL_MULT:
            raise ADMConversionError(f"--flags: --image_size {size} has no default channel_mult in guided-diffusion "
                                     f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}); give --channel_mult")
        return _DEFAULT_CHANNEL_MULT[size]
    try:
        mult = tuple(int(m) for m in values["channel_mult"].split(","))
    except ValueError:
        raise ADMConversionError(f"--flags: --channel_mult: expected integers separated by commas, got "
                                 f"{values['channel_mult']!r}") from None
    if not mult or any(m < 1 for m in mult):
        raise ADMConversionError(f"--flags: --channel_mult: expected positive integers, got {mult}")
    return mult


def _attention_resolutions(values: dict[str, Any]) -> list[int]:
    """The resolutions of ``--attention_resolutions``, checked, so a bad list fails before the layout walk."""
    try:
        resolutions = [int(r) for r in str(values["attention_resolutions"]).split(",")]
    except ValueError:
        raise ADMConversionError(f"--flags: --attention_resolutions: expected integers separated by commas, got "
                                 f"{values['attention_resolutions']!r}") from None
    if any(r < 1 for r in resolutions):
        raise ADMConversionError(f"--flags: --attention_resolutions: expected positive resolutions, got {resolutions}")
    return resolutions


def parse_adm_flags(text: str) -> ADMFlags:
    """Parse guided-diffusion flags as its README and DDPM-segmentation's scripts write them.

    ``--name value`` or ``--name=value``; booleans as ``True``/``False`` (also yes/no, t/f, 1/0). Flags left out
    take guided-diffusion's ``model_and_diffusion_defaults``. :data:`IGNORED_FLAGS` and the sampling/training
    script options are accepted and recorded as ignored; an unknown flag is ignored with a warning unless it looks
    like a misspelt model flag, which is an error.

    Raises:
        ADMConversionError: a malformed or misspelt flag, a bad value, or class-conditional flags.
    """
    given = _split_flags(text)
    values, ignored = _resolve_flags(given)
    if values["class_cond"]:
        raise ADMConversionError(
            "--flags: --class_cond True: class-conditional ADM models are not supported (DreamTeacher encodes "
            "unlabelled images); convert the unconditional checkpoint instead, e.g. 256x256_diffusion_uncond.pt "
            "with --class_cond False")
    size = values["image_size"]
    if size < 1:
        raise ADMConversionError(f"--flags: --image_size: expected a positive integer, got {size}")
    mult = _channel_mult(values, size)
    resolutions = _attention_resolutions(values)
    for name in ("num_channels", "num_res_blocks", "diffusion_steps"):
        if values[name] < 1:
            raise ADMConversionError(f"--flags: --{name}: expected a positive integer, got {values[name]}")
    if values["noise_schedule"] not in ("linear", "cosine"):
        raise ADMConversionError(f"--flags: --noise_schedule: expected linear or cosine, got "
                                 f"{values['noise_schedule']!r}")
    return ADMFlags(
        image_size=size, num_channels=values["num_channels"], num_res_blocks=values["num_res_blocks"],
        channel_mult=tuple(mult), attention_ds=tuple(size // r for r in resolutions), num_heads=values["num_heads"],
        num_head_channels=values["num_head_channels"], num_heads_upsample=values["num_heads_upsample"],
        use_scale_shift_norm=values["use_scale_shift_norm"], resblock_updown=values["resblock_updown"],
        use_new_attention_order=values["use_new_attention_order"], learn_sigma=values["learn_sigma"],
        class_cond=False, diffusion_steps=values["diffusion_steps"], noise_schedule=values["noise_schedule"],
        predict_xstart=values["predict_xstart"], rescale_timesteps=values["rescale_timesteps"], text=text or "",
        given=given, ignored=ignored)


# ------------------------------------------------------------------------------------------------ layout
#: How a diffusers tensor is made from its ADM tensor: ("copy",), ("squeeze",) (a 1x1 Conv1d weight as a Linear's),
#: or ("qkv", part, heads, legacy) (q/k/v = part 0/1/2 of a fused qkv weight or bias).
Transform = tuple


@dataclass
class ADMLayout:
    """What one set of flags means on both sides.

    Attributes:
        adm_shapes: every ADM ``state_dict`` tensor's shape, in the original's module order.
        plan: ``(diffusers name, ADM name, transform)`` per diffusers tensor.
        diffusers_shapes: the diffusers tensor shapes the plan produces.
        taps: ADM block name (``input_blocks.N``, ``middle_block``, ``output_blocks.N``) -> diffusers module path.
        blocks: per ADM block: ``name``, ``module``, ``channels``, ``stride`` (its downsample factor).
        unet_config: ``UNet2DModel`` keyword arguments.
        head_dim: the attention head width of every attention layer.
    """

    adm_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    plan: list[tuple[str, str, Transform]] = field(default_factory=list)
    diffusers_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    taps: dict[str, str] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    unet_config: dict = field(default_factory=dict)
    head_dim: int = 0

    def _add(self, adm: str, dif: str, shape: tuple[int, ...], transform: Transform = ("copy",),
             dif_shape: tuple[int, ...] | None = None) -> None:
        self.adm_shapes.setdefault(adm, shape)
        self.plan.append((dif, adm, transform))
        self.diffusers_shapes[dif] = dif_shape if dif_shape is not None else shape

    def norm(self, adm: str, dif: str, ch: int) -> None:
        self._add(f"{adm}.weight", f"{dif}.weight", (ch,))
        self._add(f"{adm}.bias", f"{dif}.bias", (ch,))

    def conv(self, adm: str, dif: str, cout: int, cin: int, k: int) -> None:
        self._add(f"{adm}.weight", f"{dif}.weight", (cout, cin, k, k))
        self._add(f"{adm}.bias", f"{dif}.bias", (cout,))

    def linear(self, adm: str, dif: str, cout: int, cin: int) -> None:
        self._add(f"{adm}.weight", f"{dif}.weight", (cout, cin))
        self._add(f"{adm}.bias", f"{dif}.bias", (cout,))

    def resblock(self, adm: str, dif: str, cin: int, cout: int, temb: int, scale_shift: bool) -> None:
        """ADM ``ResBlock`` -> diffusers ``ResnetBlock2D`` (up/down variants have the same tensors)."""
        self.norm(f"{adm}.in_layers.0", f"{dif}.norm1", cin)
        self.conv(f"{adm}.in_layers.2", f"{dif}.conv1", cout, cin, 3)
        self.linear(f"{adm}.emb_layers.1", f"{dif}.time_emb_proj", 2 * cout if scale_shift else cout, temb)
        self.norm(f"{adm}.out_layers.0", f"{dif}.norm2", cout)
        self.conv(f"{adm}.out_layers.3", f"{dif}.conv2", cout, cout, 3)
        if cin != cout:  # ADM's 1x1 skip_connection (use_conv is never set by create_model)
            self.conv(f"{adm}.skip_connection", f"{dif}.conv_shortcut", cout, cin, 1)

    def attention(self, adm: str, dif: str, ch: int, heads: int, legacy: bool) -> None:
        """ADM ``AttentionBlock`` -> diffusers ``Attention`` (group norm, to_q/k/v, to_out.0)."""
        self.norm(f"{adm}.norm", f"{dif}.group_norm", ch)
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            self._add(f"{adm}.qkv.weight", f"{dif}.{name}.weight", (3 * ch, ch, 1), ("qkv", part, heads, legacy),
                      (ch, ch))
            self._add(f"{adm}.qkv.bias", f"{dif}.{name}.bias", (3 * ch,), ("qkv", part, heads, legacy), (ch,))
        self._add(f"{adm}.proj_out.weight", f"{dif}.to_out.0.weight", (ch, ch, 1), ("squeeze",), (ch, ch))
        self._add(f"{adm}.proj_out.bias", f"{dif}.to_out.0.bias", (ch,))

    def block(self, name: str, module: str, channels: int, stride: int) -> None:
        self.taps[name] = module
        self.blocks.append({"name": name, "module": module, "channels": channels, "stride": stride})


def _heads(flags: ADMFlags, ch: int, upsample: bool, where: str) -> int:
    """Number of heads of an ADM attention layer on ``ch`` channels (AttentionBlock's rule)."""
    if flags.num_head_channels != -1:
        if flags.num_head_channels < 1 or ch % flags.num_head_channels:
            raise ADMConversionError(f"--flags: --num_head_channels {flags.num_head_channels} does not divide the "
                                     f"{ch} channels of the attention in {where}")
        return ch // flags.num_head_channels
    heads = flags.num_heads_upsample if upsample and flags.num_heads_upsample != -1 else flags.num_heads
    if heads < 1 or ch % heads:
        flag = "--num_heads_upsample" if upsample and flags.num_heads_upsample != -1 else "--num_heads"
        raise ADMConversionError(f"--flags: {flag} {heads} does not divide the {ch} channels of the attention in "
                                 f"{where}")
    return heads


def _level_widths(flags: ADMFlags) -> list[int]:
    """Channels per level, refused where diffusers' time embedding (sized by level 0) or 32-group norms differ."""
    mc = flags.num_channels
    mult = flags.channel_mult
    widths = [int(m * mc) for m in mult]
    if widths[0] != mc:
        raise ADMConversionError(
            f"--flags: channel_mult[0] = {mult[0]} makes the first level {widths[0]} channels wide while the time "
            f"embedding is --num_channels = {mc} wide; diffusers UNet2DModel sizes its time embedding by its first "
            f"level, so this model (e.g. guided-diffusion's 512x512 default channel_mult) cannot be converted exactly")
    for w in [*widths]:
        if w % _GROUPS:
            raise ADMConversionError(f"--flags: a level of {w} channels (--num_channels {mc} x channel_mult "
                                     f"{list(mult)}) is not divisible by ADM's {_GROUPS} normalization groups")
    return widths


def _lay_encoder(lay: ADMLayout, flags: ADMFlags, widths: list[int], attn_levels: list[bool],
                 head_widths: dict[str, int]) -> tuple[int, list[int]]:
    """Time embedding, ``conv_in`` and the ``input_blocks``, in ADM's order; returns the last block's channels and
    every input block's output channels (ADM's ``input_block_chans``, the skips the decoder pops)."""
    temb, ss, legacy = 4 * flags.num_channels, flags.use_scale_shift_norm, not flags.use_new_attention_order
    lay.linear("time_embed.0", "time_embedding.linear_1", temb, flags.num_channels)
    lay.linear("time_embed.2", "time_embedding.linear_2", temb, temb)
    lay.conv("input_blocks.0.0", "conv_in", widths[0], 3, 3)
    lay.block("input_blocks.0", "conv_in", widths[0], 1)
    chans = [widths[0]]
    ch, idx = widths[0], 1
    for level, width in enumerate(widths):
        ds = 2 ** level
        for j in range(flags.num_res_blocks):
            adm, dif = f"input_blocks.{idx}", f"down_blocks.{level}"
            lay.resblock(f"{adm}.0", f"{dif}.resnets.{j}", ch, width, temb, ss)
            ch = width
            module = f"{dif}.resnets.{j}"
            if attn_levels[level]:
                heads = _heads(flags, ch, False, adm)
                head_widths[adm] = ch // heads
                lay.attention(f"{adm}.1", f"{dif}.attentions.{j}", ch, heads, legacy)
                module = f"{dif}.attentions.{j}"
            lay.block(adm, module, ch, ds)
            chans.append(ch)
            idx += 1
        if level != len(widths) - 1:
            adm, dif = f"input_blocks.{idx}", f"down_blocks.{level}.downsamplers.0"
            if flags.resblock_updown:
                lay.resblock(f"{adm}.0", dif, ch, ch, temb, ss)
            else:
                lay.conv(f"{adm}.0.op", f"{dif}.conv", ch, ch, 3)
            lay.block(adm, dif, ch, 2 * ds)
            chans.append(ch)
            idx += 1
    return ch, chans


def _lay_middle(lay: ADMLayout, flags: ADMFlags, ch: int, levels: int, head_widths: dict[str, int]) -> None:
    """ADM's ``middle_block`` (resblock, attention, resblock) as diffusers' ``mid_block``, one tap for the three."""
    temb, ss, legacy = 4 * flags.num_channels, flags.use_scale_shift_norm, not flags.use_new_attention_order
    lay.resblock("middle_block.0", "mid_block.resnets.0", ch, ch, temb, ss)
    heads = _heads(flags, ch, False, "middle_block")
    head_widths["middle_block"] = ch // heads
    lay.attention("middle_block.1", "mid_block.attentions.0", ch, heads, legacy)
    lay.resblock("middle_block.2", "mid_block.resnets.1", ch, ch, temb, ss)
    lay.block("middle_block", "mid_block", ch, 2 ** (levels - 1))


def _lay_decoder(lay: ADMLayout, flags: ADMFlags, widths: list[int], attn_levels: list[bool], ch: int,
                 chans: list[int], head_widths: dict[str, int]) -> int:
    """The ``output_blocks`` as diffusers' ``up_blocks``, popping the encoder's skips; a level's upsampler sits in
    its last block, so that block's tap is the upsampler at the next stride. Returns the last block's channels."""
    temb, ss, legacy = 4 * flags.num_channels, flags.use_scale_shift_norm, not flags.use_new_attention_order
    idx = 0
    for up, level in enumerate(reversed(range(len(widths)))):
        width = widths[level]
        dif_block = f"up_blocks.{up}"
        for i in range(flags.num_res_blocks + 1):
            adm = f"output_blocks.{idx}"
            skip = chans.pop()
            lay.resblock(f"{adm}.0", f"{dif_block}.resnets.{i}", ch + skip, width, temb, ss)
            ch = width
            module, sub = f"{dif_block}.resnets.{i}", 1
            if attn_levels[level]:
                heads = _heads(flags, ch, True, adm)
                head_widths[adm] = ch // heads
                lay.attention(f"{adm}.1", f"{dif_block}.attentions.{i}", ch, heads, legacy)
                module, sub = f"{dif_block}.attentions.{i}", 2
            stride = 2 ** level
            if level and i == flags.num_res_blocks:
                dif = f"{dif_block}.upsamplers.0"
                if flags.resblock_updown:
                    lay.resblock(f"{adm}.{sub}", dif, ch, ch, temb, ss)
                else:
                    lay.conv(f"{adm}.{sub}.conv", f"{dif}.conv", ch, ch, 3)
                module, stride = dif, stride // 2
            lay.block(adm, module, ch, stride)
            idx += 1
    return ch


def _one_head_dim(flags: ADMFlags, head_widths: dict[str, int]) -> int:
    """The single attention head width diffusers can express; refused when ADM's layers differ (``--num_heads``)."""
    distinct = sorted(set(head_widths.values()))
    if len(distinct) != 1:
        per = ", ".join(f"{k}: {v}" for k, v in head_widths.items())
        raise ADMConversionError(
            f"--flags: --num_heads {flags.num_heads} gives attention layers different head widths ({per}); diffusers "
            "UNet2DModel has one attention_head_dim for every layer, so this model cannot be converted exactly (a "
            "model trained with --num_head_channels has one width everywhere)")
    return distinct[0]


def _unet_config(flags: ADMFlags, widths: list[int], attn: list[bool], head_dim: int) -> dict:
    """The ``UNet2DModel`` keyword arguments that build the model the layout's plan fills."""
    updown = flags.resblock_updown
    return {
        "sample_size": flags.image_size, "in_channels": 3, "out_channels": 6 if flags.learn_sigma else 3,
        "center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
                             for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
                           for a in reversed(attn)],
        "block_out_channels": widths, "layers_per_block": flags.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv", "dropout": 0.0, "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": _GROUPS, "attn_norm_num_groups": _GROUPS,
        "norm_eps": _EPS, "resnet_time_scale_shift": "scale_shift" if flags.use_scale_shift_norm else "default",
        "add_attention": True,
    }


def adm_layout(flags: ADMFlags) -> ADMLayout:
    """Walk guided-diffusion's ``UNetModel`` constructor for ``flags`` and lay out both models side by side.

    Raises:
        ADMConversionError: flags whose model ``UNet2DModel`` cannot express exactly (head widths that differ
            between attention layers, a first level narrower or wider than ``--num_channels``, channel counts that
            32 groups do not divide).
    """
    widths = _level_widths(flags)
    lay = ADMLayout()
    head_widths: dict[str, int] = {}  # ADM block -> the head width of its attention, in module order
    attn_levels = [2 ** level in flags.attention_ds for level in range(len(widths))]
    ch, chans = _lay_encoder(lay, flags, widths, attn_levels, head_widths)
    _lay_middle(lay, flags, ch, len(widths), head_widths)
    ch = _lay_decoder(lay, flags, widths, attn_levels, ch, chans, head_widths)
    lay.norm("out.0", "conv_norm_out", ch)
    lay.conv("out.2", "conv_out", 6 if flags.learn_sigma else 3, widths[0], 3)
    lay.head_dim = _one_head_dim(flags, head_widths)
    lay.unet_config = _unet_config(flags, widths, attn_levels, lay.head_dim)
    return lay


# ------------------------------------------------------------------------------------------------ tensors
def _make(tensor: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The diffusers tensor from its ADM tensor."""
    kind = transform[0]
    if kind == "copy":
        return tensor
    if kind == "squeeze":  # Conv1d(k=1) weight [C, C, 1] -> Linear weight [C, C]
        return tensor[..., 0]
    if kind == "qkv":
        _, part, heads, legacy = transform
        ch = tensor.shape[0] // 3
        head_dim = ch // heads
        rest = tensor.shape[1:]
        if tensor.dim() == 3:  # Conv1d weight [3C, C, 1] -> drop the kernel axis
            tensor, rest = tensor[..., 0], tensor.shape[1:2]
        if legacy:  # output channels laid out (heads, 3, head_dim)
            return tensor.reshape(heads, 3, head_dim, *rest)[:, part].reshape(ch, *rest)
        return tensor.reshape(3, ch, *rest)[part]  # (3, heads, head_dim)
    raise ValueError(f"unknown transform {transform!r}")


def check_adm_state(state: Mapping[str, torch.Tensor], layout: ADMLayout, source: str = "checkpoint") -> None:
    """Refuse a state_dict whose tensors are not exactly those the flags describe, naming the first difference.

    Raises:
        ADMConversionError: a missing, extra or differently shaped tensor.
    """
    for name, shape in layout.adm_shapes.items():
        tensor = state.get(name)
        if tensor is None:
            raise ADMConversionError(f"{source}: tensor {name} {list(shape)} that the flags describe is missing "
                                     f"({_flag_hint(name)})")
        if tuple(tensor.shape) != shape:
            raise ADMConversionError(f"{source}: tensor {name} has shape {list(tensor.shape)} but the flags give "
                                     f"{list(shape)}; check {_flag_hint(name)}")
    extra = [k for k in state if k not in layout.adm_shapes]
    if extra:
        hint = ("it is class-conditional (label_emb): convert an unconditional checkpoint"
                if any(k.startswith("label_emb") for k in extra) else f"check {_flag_hint(extra[0])}")
        raise ADMConversionError(f"{source}: tensor {extra[0]} {list(state[extra[0]].shape)} is not part of the "
                                 f"model the flags describe ({len(extra)} such tensors); {hint}")


def _flag_hint(name: str) -> str:
    if ".qkv." in name or ".proj_out." in name or ".norm." in name:
        return "--attention_resolutions, --num_channels, --channel_mult"
    if "emb_layers" in name:
        return "--use_scale_shift_norm, --num_channels"
    if name.startswith("out.2"):
        return "--learn_sigma"
    if "skip_connection" in name or name.startswith(("input_blocks", "output_blocks")):
        return "--num_res_blocks, --channel_mult, --num_channels, --attention_resolutions, --resblock_updown"
    return "--num_channels, --channel_mult, --image_size"


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       tensors: Iterator[torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor (header first, from the known shapes), never holding the model.

    The format: 8-byte little-endian header length, a JSON header (padded with spaces to 8 bytes) giving each
    tensor's dtype, shape and byte range, then the tensors' bytes back to back.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for (name, shape), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape):  # the layout promised this shape in the header
                raise RuntimeError(f"{name}: made shape {tuple(tensor.shape)}, header says {shape}")
            data = tensor.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file, read in chunks (the page cache holds it, not this process)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _scheduler(flags: ADMFlags):
    """A DDPMScheduler with guided-diffusion's beta schedule for ``--diffusion_steps`` and ``--noise_schedule``."""
    from diffusers import DDPMScheduler

    steps = flags.diffusion_steps
    common = {"num_train_timesteps": steps, "clip_sample": True,
              "variance_type": "learned_range" if flags.learn_sigma else "fixed_large",
              "prediction_type": "sample" if flags.predict_xstart else "epsilon"}
    if flags.noise_schedule == "linear":  # Ho et al.'s 1e-4 .. 0.02, stretched to any number of steps
        scale = 1000 / steps
        return DDPMScheduler(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02, **common)
    # cosine: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, betas capped at 0.999 (diffusers' squaredcos_cap_v2)
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", **common)


def convert_adm(checkpoint: str | os.PathLike, out: str | os.PathLike, flags: str | ADMFlags, *,
                dtype: torch.dtype = torch.float32, overwrite: bool = False,
                say: Callable[[str], None] | None = None) -> dict:
    """Convert a guided-diffusion ``UNetModel`` state_dict into a diffusers directory.

    Writes ``out/unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, loadable by
    ``UNet2DModel.from_pretrained``), ``out/scheduler/`` (a ``DDPMScheduler`` with the original's schedule),
    ``out/model_index.json`` (a ``DDPMPipeline``), ``out/adm_taps.json`` (ADM block name -> diffusers module path,
    channels and stride of every block) and ``out/adm_conversion.json`` (source path and sha256, flags as given and
    resolved, ignored flags).

    Args:
        checkpoint: the ``.pt`` state_dict (read weights-only, memory-mapped), or a safetensors file.
        out: the directory to write (must be empty or absent unless ``overwrite``).
        flags: the model flags (text as in guided-diffusion's README) or parsed :class:`ADMFlags`.
        dtype: the dtype stored (float32 by default: the original runs in float32 unless ``--use_fp16``).
        overwrite: replace the files of an existing conversion in ``out``.
        say: where progress lines go (the CLI prints them).

    Returns:
        The record written to ``adm_conversion.json`` plus ``out``.

    Raises:
        ADMConversionError: flags that cannot be converted exactly, or a checkpoint that does not match them.
        LoadError: a checkpoint that is not a weights-only loadable state_dict.
    """
    from ..serialization import LoadError, load_file

    say = say or (lambda _: None)
    parsed = flags if isinstance(flags, ADMFlags) else parse_adm_flags(flags)
    if parsed.rescale_timesteps and parsed.diffusion_steps != 1000:
        raise ADMConversionError("--flags: --rescale_timesteps True with --diffusion_steps "
                                 f"{parsed.diffusion_steps}: the model was called with t * 1000 / "
                                 f"{parsed.diffusion_steps}, which a diffusers teacher does not do")
    if dtype not in _ST_DTYPES:
        raise ADMConversionError(f"--dtype: expected float32, float16 or bfloat16, got {dtype}")
    layout = adm_layout(parsed)
    src = Path(checkpoint)
    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise UserError(f"--out: {root} exists and is not empty; give a new directory or --overwrite")

    say(f"reading {src} (weights only, memory-mapped)")
    state = load_file(src, what="checkpoint", mmap=True)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
        kind = type(state).__name__
        keys = f" with keys {sorted(state)[:5]}" if isinstance(state, Mapping) else ""
        raise LoadError(f"checkpoint: {src} holds a {kind}{keys}, not a plain state_dict of tensors (guided-"
                        "diffusion saves model.state_dict() with torch.save)", path=src)
    check_adm_state(state, layout, source=f"checkpoint {src}")
    # The plan must produce exactly the tensors diffusers' UNet2DModel has (built on the meta device: no memory).
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**layout.unet_config)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if expected != layout.diffusers_shapes:
        diff = sorted(set(expected.items()) ^ set(layout.diffusers_shapes.items()))[:3]
        raise RuntimeError(f"ADM layout and the installed diffusers UNet2DModel disagree (first: {diff}); this "
                           "diffusers version is not supported by the converter")

    root.mkdir(parents=True, exist_ok=True)
    (root / "unet").mkdir(exist_ok=True)
    sha = sha256_file(src)
    unet.save_config(str(root / "unet"))
    entries = [(dif, layout.diffusers_shapes[dif]) for dif, _, _ in layout.plan]
    meta = {"format": "pt", "converted_from": src.name, "source_sha256": sha}
    tmp = root / "unet" / ".diffusion_pytorch_model.safetensors.tmp"
    say(f"writing {root / 'unet'} ({len(entries)} tensors, {str(dtype).replace('torch.', '')})")
    _write_safetensors(tmp, entries, dtype, (_make(state[adm], tr) for _, adm, tr in layout.plan), meta)
    os.replace(tmp, root / "unet" / "diffusion_pytorch_model.safetensors")
    del state

    _scheduler(parsed).save_pretrained(str(root / "scheduler"))
    import diffusers

    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, indent=2) + "\n")
    taps = {"format": _TAPS_FORMAT, "version": 1, "taps": layout.taps, "blocks": layout.blocks,
            "note": "ADM block name -> diffusers module whose forward output equals that block's output; stride is "
                    "the block's downsample factor relative to the input image"}
    (root / ADM_TAPS_FILE).write_text(json.dumps(taps, indent=1) + "\n")
    record = {"format": "dreamteacher.adm_conversion", "version": 1, "source": str(src), "source_sha256": sha,
              "source_bytes": src.stat().st_size, "flags": parsed.text, "resolved_flags": parsed.record(),
              "ignored_flags": parsed.ignored, "dtype": str(dtype).replace("torch.", ""),
              "use_fp16": _use_fp16_record(parsed),
              "attention_order": "legacy (heads, 3, head_dim)" if not parsed.use_new_attention_order
              else "new (3, heads, head_dim)", "attention_head_dim": layout.head_dim,
              "diffusers_version": diffusers.__version__}
    (root / ADM_RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    say(f"wrote {root}: unet/, scheduler/, {ADM_TAPS_FILE} ({len(layout.taps)} blocks), {ADM_RECORD_FILE}")
    return {**record, "out": str(root)}


# ------------------------------------------------------------------------------------------------ tap names
def read_adm_taps(root: str | os.PathLike) -> dict | None:
    """The ``adm_taps.json`` of a converted teacher directory (its ``taps`` and ``blocks``), or None."""
    root = Path(root)
    for cand in (root / ADM_TAPS_FILE, root.parent / ADM_TAPS_FILE if root.name == "unet" else None):
        if cand is not None and cand.is_file():
            data = json.loads(cand.read_text())
            if data.get("format") != _TAPS_FORMAT or not isinstance(data.get("taps"), dict):
                raise UserError(f"teacher: {cand} is not an adm_taps.json written by `dreamteacher convert-adm`")
            return data
    return None


def translate_adm_taps(names: list[str], adm: Mapping[str, Any] | None, option: str = "taps") -> list[str]:
    """Replace ADM block names (``output_blocks.5``) by the diffusers module paths they map to; other names pass.

    Raises:
        UserError: an ADM-looking name the teacher does not have, or ADM names for a teacher not converted from ADM.
    """
    out = []
    for name in names:
        if name.startswith(("input_blocks.", "output_blocks.")) or name == "middle_block":
            if adm is None:
                raise UserError(f"{option}: {name!r} is an ADM block name, but this teacher has no {ADM_TAPS_FILE} "
                                "(convert guided-diffusion checkpoints with `dreamteacher convert-adm`)")
            if name not in adm["taps"]:
                known = [n for n in adm["taps"] if n.split(".")[0] == name.split(".")[0]]
                raise UserError(f"{option}: the converted ADM teacher has no block {name!r} (it has "
                                f"{known[0]} ... {known[-1]})" if known else f"{option}: no block {name!r}")
            out.append(adm["taps"][name])
        else:
            out.append(name)
    return out
