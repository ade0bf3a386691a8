"""Frozen teachers: diffusers UNets (pixel or latent space) and GAN generators, read through feature taps.

DreamTeacher encodes a real image ``x0`` by one-step noising to ``x_t`` (``t = 150`` for ImageNet in the paper),
runs the frozen denoiser once and keeps its decoder features at the strides the student needs. The teacher runs on
every training batch, so this path wastes nothing:

* the noise is drawn inside :func:`dtkernels.q_sample` (no ``randn_like`` tensor, no separate arithmetic passes);
* the UNet forward stops as soon as the last tapped module has run (early exit): later decoder blocks and the output
  conv never execute;
* each tapped feature is resized to its stride in the hook, so the full-resolution copy is not kept;
* the forward runs under :func:`torch.inference_mode` and nothing is retained between calls.

Images are ``[B, 3, H, W]`` floats in ``[-1, 1]`` (the range diffusers models are trained on).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dtkernels

logger = logging.getLogger("dreamteacher")

__all__ = [
    "FeatureTaps",
    "DiffusionTeacher",
    "GeneratorTeacher",
    "default_tap_names",
    "resize_to_stride",
    "state_fingerprint",
]

#: Encoding modes of :class:`DiffusionTeacher`.
MODES = ("stochastic", "deterministic")
#: The paper's noise level for ImageNet-scale teachers.
DEFAULT_T = 150
UNCOND_EMBEDDING_FILE = "uncond_embedding.safetensors"


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


def default_tap_names(model: nn.Module) -> list[str]:
    """The decoder blocks of a diffusers UNet (``up_blocks.0`` ... ``up_blocks.{n-1}``)."""
    up = getattr(model, "up_blocks", None)
    if up is None:
        raise ValueError(f"taps: {type(model).__name__} has no up_blocks; name the modules to tap explicitly")
    return [f"up_blocks.{i}" for i in range(len(up))]


class FeatureTaps:
    """Forward hooks that collect the outputs of named modules, resized to requested strides.

    Features are collected in call order; for a tuple output the first tensor is kept. Each feature is resized in
    the hook (see :func:`resize_to_stride`) when :meth:`run` is given the input image size, then cast to ``dtype``.
    The internal buffer is emptied whenever features are handed out, so nothing is retained between calls.

    With ``early_exit=True``, :meth:`run` ends the forward as soon as every tapped module has produced its output:
    the last hook raises a private exception that :meth:`run` catches. Each tapped module must run once per forward.

    Args:
        model: the module to tap.
        names: dotted module names (``model.get_submodule``); default :func:`default_tap_names`.
        strides: one output stride (relative to the input image) per name, or None to keep native resolution.
        dtype: cast the features to this dtype (e.g. ``torch.bfloat16``), or None to keep the model's.
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
            raise ValueError("names: expected at least one module to tap")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names: duplicate module names in {self.names}")
        if strides is not None:
            strides = [int(s) for s in strides]
            if len(strides) != len(self.names):
                raise ValueError(f"strides: expected {len(self.names)} strides (one per tap), got {len(strides)}")
            if any(s <= 0 for s in strides):
                raise ValueError(f"strides: expected positive integers, got {strides}")
        self.strides = strides
        self.dtype = dtype
        self.early_exit = bool(early_exit)
        self.enabled = True
        self._stride_of = dict(zip(self.names, strides)) if strides is not None else {}
        self._buffer: list[torch.Tensor] = []
        self._order: list[str] = []
        self._image_size: tuple[int, int] | None = None
        self._armed = False
        modules = []
        for name in self.names:  # resolve every name before registering, so a bad name leaves no hook behind
            try:
                modules.append(model.get_submodule(name))
            except AttributeError as e:
                raise ValueError(f"names: {type(model).__name__} has no module {name!r}") from e
        self._handles = [m.register_forward_hook(partial(self._hook, n)) for n, m in zip(self.names, modules)]

    def _hook(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return None
        feat = _first_tensor(output)
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


def _load_embedding(source: torch.Tensor | str | os.PathLike) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    from .serialization import load_file

    path = Path(source)
    tensors = load_file(path, what="text_embedding")  # safetensors or weights-only torch.save, never runs code
    if isinstance(tensors, dict):
        if "embedding" in tensors:
            return tensors["embedding"]
        if len(tensors) != 1:
            raise ValueError(f"text_embedding: {path} holds {sorted(tensors)}; expected one tensor or 'embedding'")
        return next(iter(tensors.values()))
    if not isinstance(tensors, torch.Tensor):
        raise TypeError(f"text_embedding: {path} holds a {type(tensors).__name__}, expected a tensor")
    return tensors


class DiffusionTeacher(nn.Module):
    """A frozen diffusers denoiser with its noise schedule, returning decoder features at the student's strides.

    Pixel space: a ``UNet2DModel``. Latent space (Stable Diffusion style): a ``UNet2DConditionModel`` plus an
    ``AutoencoderKL``; images are encoded to the latent mean times ``vae.config.scaling_factor`` and the UNet is
    conditioned on an unconditional (empty-prompt) text embedding (zeros ``[1, 1, cross_attention_dim]`` by default).

    Encoding modes:
        ``"stochastic"``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` by :func:`dtkernels.q_sample`, then one
        UNet forward; with ``n_noise > 1`` the features of several noise draws are averaged.
        ``"deterministic"``: DDIM inversion from ``x0`` to ``t`` in ``ddim_steps`` steps (the UNet runs
        ``ddim_steps + 1`` times), then the tapped forward at ``t``; the paper's ablation.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (any module with the same call signature).
        scheduler: a diffusers scheduler (its config is read into a ``DDPMScheduler``); default DDPM, 1000 steps.
        vae: an ``AutoencoderKL`` for latent-space teachers.
        text_embedding: ``[L, D]`` or ``[1, L, D]`` tensor, or a ``.pt``/``.safetensors`` file holding it.
        taps: module names inside ``unet`` to read; default its ``up_blocks``.
        strides: output stride per tap relative to the input image (e.g. the student's 4, 8, 16, 32); None keeps
            each feature at its native resolution.
        t: noise level in ``[0, T)``.
        mode: ``"stochastic"`` or ``"deterministic"``.
        n_noise: noise draws averaged in stochastic mode.
        ddim_steps: inversion steps in deterministic mode.
        early_exit: stop the UNet forward after the last tapped module.
        feature_dtype: cast the returned features (e.g. ``torch.bfloat16``); None keeps the model's dtype.

    Shapes:
        input ``[B, 3, H, W]`` in ``[-1, 1]``; output: one ``[B, C_l, ceil(H / s_l), ceil(W / s_l)]`` per tap.
    """

    def __init__(self, unet: nn.Module, scheduler: Any = None, *, vae: nn.Module | None = None,
                 text_embedding: torch.Tensor | str | os.PathLike | None = None, taps: Sequence[str] | None = None,
                 strides: Sequence[int] | None = None, t: int = DEFAULT_T, mode: str = "stochastic",
                 n_noise: int = 1, ddim_steps: int = 10, early_exit: bool = True,
                 feature_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.scheduler = DDPMScheduler.from_config(scheduler.config) if scheduler is not None else DDPMScheduler()
        # A plain attribute, not a buffer: ``teacher.to(torch.bfloat16)`` must not round the noise schedule.
        self._alphas_cumprod = {torch.device("cpu"): self.scheduler.alphas_cumprod.detach().to("cpu", torch.float32)}
        self.num_train_timesteps = int(self.scheduler.alphas_cumprod.numel())
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")

        cross_dim = getattr(unet, "config", {}).get("cross_attention_dim")
        self.conditional = cross_dim is not None and "encoder_hidden_states" in _forward_params(unet)
        if self.conditional:
            if isinstance(cross_dim, (list, tuple)):
                cross_dim = cross_dim[0]
            if text_embedding is None:
                emb = torch.zeros(1, 1, int(cross_dim))
            else:
                emb = _load_embedding(text_embedding).detach().float()
            if emb.dim() == 2:
                emb = emb.unsqueeze(0)
            if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[-1] != int(cross_dim):
                raise ValueError(f"text_embedding: expected [L, {cross_dim}] or [1, L, {cross_dim}], "
                                 f"got {tuple(emb.shape)}")
            self.register_buffer("uncond_embedding", emb.to(next(unet.parameters()).dtype))
        elif text_embedding is not None:
            raise ValueError("text_embedding: the UNet takes no encoder_hidden_states (not a conditional UNet)")

        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.t = self._check_t(t)
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
            raise ValueError(f"n_noise: expected an integer >= 1, got {n_noise!r}")
        self.n_noise = n_noise
        if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or ddim_steps < 1:
            raise ValueError(f"ddim_steps: expected an integer >= 1, got {ddim_steps!r}")
        self.ddim_steps = ddim_steps
        self.feature_dtype = feature_dtype
        # The teacher casts after averaging draws, so the taps keep the model's dtype.
        self.taps = FeatureTaps(unet, taps, strides=strides, early_exit=early_exit)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self._feature_info: list[dict] | None = None
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, unet_config: dict, *, scheduler_config: dict | None = None, vae_config: dict | None = None,
                    **kwargs) -> DiffusionTeacher:
        """Build a randomly initialised teacher from diffusers configs (tiny ones for tests).

        The UNet class is ``unet_config["_class_name"]`` when given, else ``UNet2DConditionModel`` when a
        ``vae_config`` is given and ``UNet2DModel`` otherwise. ``kwargs`` go to the constructor.
        """
        import diffusers

        unet_config = dict(unet_config)
        name = unet_config.pop("_class_name", "UNet2DConditionModel" if vae_config is not None else "UNet2DModel")
        unet = getattr(diffusers, name).from_config(unet_config)
        scheduler = diffusers.DDPMScheduler.from_config(scheduler_config) if scheduler_config else None
        vae = diffusers.AutoencoderKL.from_config(vae_config) if vae_config is not None else None
        return cls(unet, scheduler, vae=vae, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> DiffusionTeacher:
        """Load from a local directory (never the hub).

        Layouts: a pipeline directory (``unet/``, ``scheduler/``, optional ``vae/`` and ``uncond_embedding.safetensors``
        as written by :meth:`save_pretrained` or a diffusers pipeline), or a bare UNet directory (``config.json`` +
        weights, optional ``scheduler_config.json`` beside it). ``kwargs`` go to the constructor.
        """
        import diffusers

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"path: {root} is not a directory")
        unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
        if not (unet_dir / "config.json").is_file():
            raise FileNotFoundError(f"path: no UNet config.json in {root} or {root / 'unet'}")
        class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
        unet_cls = getattr(diffusers, class_name, None)
        if unet_cls is None:
            raise ValueError(f"path: {unet_dir / 'config.json'} names an unknown diffusers class {class_name!r}")
        # diffusers defaults to low_cpu_mem_usage=True and, without `accelerate` installed, warns at every load
        # before falling back; ask for what will happen.
        load = {"local_files_only": True, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
        unet = unet_cls.from_pretrained(str(unet_dir), **load)
        scheduler = None
        for cand in (root / "scheduler", root):
            if (cand / "scheduler_config.json").is_file():
                scheduler = diffusers.DDPMScheduler.from_pretrained(str(cand), local_files_only=True)
                break
        if scheduler is None:
            logger.warning("no scheduler_config.json in %s: using DDPMScheduler() defaults (1000 linear steps)", root)
        vae = None
        if (root / "vae" / "config.json").is_file():
            vae = diffusers.AutoencoderKL.from_pretrained(str(root / "vae"), **load)
        if "text_embedding" not in kwargs and (root / UNCOND_EMBEDDING_FILE).is_file():
            kwargs["text_embedding"] = root / UNCOND_EMBEDDING_FILE
        teacher = cls(unet, scheduler, vae=vae, **kwargs)
        teacher.source = str(root)  # where it came from, for humans (the feature cache records it)
        return teacher

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the pipeline layout :meth:`from_pretrained` reads (``unet/``, ``scheduler/``, ``vae/``, embedding)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(root / "unet"))
        self.scheduler.save_pretrained(str(root / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(root / "vae"))
        if self.conditional:
            from safetensors.torch import save_file

            save_file({"embedding": self.uncond_embedding.detach().cpu().contiguous()},
                      str(root / UNCOND_EMBEDDING_FILE))

    # ------------------------------------------------------------------------------------------------ frozen module
    def train(self, mode: bool = True) -> DiffusionTeacher:
        """The teacher is frozen: it always stays in eval mode."""
        return super().train(False)

    def _check_t(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"t: expected an integer in [0, {self.num_train_timesteps}), got {t!r}")
        return t

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def alphas_cumprod(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The schedule's ``[T]`` cumulative alphas in float32 on ``device`` (cached per device)."""
        device = torch.device(device)
        if device not in self._alphas_cumprod:
            self._alphas_cumprod[device] = self._alphas_cumprod[torch.device("cpu")].to(device)
        return self._alphas_cumprod[device]

    def identity(self) -> dict:
        """What makes two teachers give the same features: class names, configs and a hash of all weights."""
        configs = {
            "unet_class": type(self.unet).__name__,
            "unet": _jsonable(getattr(self.unet, "config", None)),
            "scheduler": _jsonable(self.scheduler.config),
            "vae_class": type(self.vae).__name__ if self.vae is not None else None,
            "vae": _jsonable(self.vae.config) if self.vae is not None else None,
        }
        return {"class": type(self).__name__, "fingerprint": state_fingerprint(self, configs), **configs}

    def extraction_config(self) -> dict:
        """The feature-extraction settings (taps, strides, t, mode, draws, steps, dtype) as JSON data."""
        return {"taps": list(self.taps.names), "strides": self.taps.strides, "t": self.t, "mode": self.mode,
                "n_noise": self.n_noise, "ddim_steps": self.ddim_steps if self.mode == "deterministic" else None,
                "feature_dtype": str(self.feature_dtype or self.dtype).replace("torch.", "")}

    # ------------------------------------------------------------------------------------------------ features
    @property
    def feature_info(self) -> list[dict]:
        """Per tapped level, like timm's: ``num_chs``, ``reduction`` (the output stride), ``module``, plus
        ``native_reduction`` (the stride before resizing). Found by a dry run on a tiny input (cached)."""
        if self._feature_info is None:
            self._feature_info = self._dry_run()
        return [dict(info) for info in self._feature_info]

    @torch.inference_mode()
    def _dry_run(self) -> list[dict]:
        n_levels = len(self.unet.config.block_out_channels) if hasattr(self.unet, "config") else 4
        size = max(2 ** (n_levels - 1) * 2, 8)
        in_ch = self.unet.config.in_channels if hasattr(self.unet, "config") else 3
        x = torch.zeros(1, in_ch, size, size, device=self.device, dtype=self.dtype)
        tt = torch.full((1,), self.t, dtype=torch.long, device=self.device)
        _, native = self.taps.run(lambda: self._unet_call(x, tt), image_size=None)
        image = size * self.latent_factor
        strides = self.taps.strides or [None] * len(native)
        info = []
        for name, feat, stride in zip(self.taps.names, native, strides):
            native_r = image // feat.shape[-1]
            info.append({"num_chs": int(feat.shape[1]), "reduction": int(stride or native_r), "module": name,
                         "native_reduction": int(native_r)})
        return info

    def _unet_call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.conditional:
            cond = self.uncond_embedding.expand(x.shape[0], -1, -1)
            out = self.unet(x, t, encoder_hidden_states=cond)
        else:
            out = self.unet(x, t)
        return _first_tensor(out)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> the UNet's clean input ``x0`` (the images, or scaled VAE latents)."""
        x = images.to(device=self.device, dtype=self.dtype)
        if self.vae is None:
            return x
        latents = self.vae.encode(x).latent_dist.mode()
        shift = self.vae.config.get("shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor

    def _as_eps(self, model_out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted eps) from the UNet output for the scheduler's prediction type."""
        model_out = model_out[:, : x_t.shape[1]]  # learned-variance UNets output [eps, variance]
        a, b = abar.sqrt(), (1.0 - abar).sqrt()
        if self.prediction_type == "epsilon":
            return (x_t - b * model_out) / a, model_out
        if self.prediction_type == "v_prediction":
            return a * x_t - b * model_out, a * model_out + b * x_t
        if self.prediction_type == "sample":
            return model_out, (x_t - a * model_out) / b
        raise ValueError(f"scheduler: unsupported prediction_type {self.prediction_type!r}")

    def ddim_invert(self, x0: torch.Tensor, t: int, steps: int | None = None) -> torch.Tensor:
        """Deterministic encoding: DDIM inversion of ``x0`` from timestep 0 to ``t`` (DDIMInverseScheduler's step).

        Each step evaluates the UNet at the current level ``s`` and moves to the next level ``s'`` along the
        predicted noise: ``x_{s'} = sqrt(abar_{s'}) x0_pred + sqrt(1 - abar_{s'}) eps_pred``.
        """
        steps = steps or self.ddim_steps
        grid = torch.linspace(0, t, steps + 1).round().long().unique().tolist()
        x = x0
        ac = self.alphas_cumprod(x0.device)
        was = self.taps.enabled
        self.taps.enabled = False
        try:
            for s, s_next in zip(grid[:-1], grid[1:]):
                ts = torch.full((x.shape[0],), s, dtype=torch.long, device=x.device)
                out = self._unet_call(x, ts).float()
                x0_pred, eps = self._as_eps(out, x.float(), ac[s])
                x = (ac[s_next].sqrt() * x0_pred + (1.0 - ac[s_next]).sqrt() * eps).to(x0.dtype)
        finally:
            self.taps.enabled = was
        return x

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, *, t: int | None = None, seed: int | None = None,
                mode: str | None = None, n_noise: int | None = None) -> list[torch.Tensor]:
        """Teacher features of real images.

        Args:
            images: ``[B, 3, H, W]`` in ``[-1, 1]``.
            t: noise level (default the teacher's ``t``).
            seed: key of the q_sample noise stream (draw ``i`` uses ``seed + i``); None draws one from torch's
                default generator, so ``torch.manual_seed`` makes runs repeatable.
            mode: override the encoding mode.
            n_noise: override the number of averaged draws (stochastic mode).

        Returns:
            One ``[B, C_l, H_l, W_l]`` feature per tap, in call order (see :attr:`feature_info`).
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("images: expected a floating tensor [B, 3, H, W] in [-1, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        t = self.t if t is None else self._check_t(t)
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        n_noise = n_noise or self.n_noise
        image_size = images.shape[-2:]
        x0 = self.encode_images(images)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        if mode == "deterministic":
            x_t = self.ddim_invert(x0, t)
            feats = self._features(x_t, tt, image_size)
        else:
            feats = None
            for i in range(n_noise):
                s = None if seed is None else (seed + i) % 2**64
                x_t = dtkernels.q_sample(x0, tt, self.alphas_cumprod(x0.device), seed=s)
                draw = self._features(x_t, tt, image_size)
                if feats is None:
                    feats = [f.float() if n_noise > 1 else f for f in draw]
                else:
                    for acc, f in zip(feats, draw):
                        acc.add_(f)
            if n_noise > 1:
                feats = [f.div_(n_noise).to(self.dtype) for f in feats]
        if self.feature_dtype is not None:
            feats = [f.to(self.feature_dtype) for f in feats]
        return feats

    def _features(self, x_t: torch.Tensor, t: torch.Tensor, image_size: Sequence[int]) -> list[torch.Tensor]:
        return self.taps.run(lambda: self._unet_call(x_t, t), image_size=image_size)[1]

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, t={self.t}, n_noise={self.n_noise}, taps={self.taps.names}, "
                f"strides={self.taps.strides}, early_exit={self.taps.early_exit}, latent={self.vae is not None}")


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


class GeneratorTeacher(nn.Module):
    """A frozen GAN-style generator: sample ``z``, synthesize images and record features at named modules.

    The paper's synthesized feature datasets: the generator's own features are the distillation targets for the
    images it made. No early exit here: the images are the generator's last output.

    Args:
        generator: any module mapping ``z [B, latent_dim]`` to images ``[B, 3, H, W]`` (or a tuple starting with
            them).
        taps: dotted module names inside ``generator``.
        latent_dim: size of ``z``.
        strides: output stride per tap relative to the generated image, or None for native resolution.
        feature_dtype: cast the features (e.g. ``torch.bfloat16``).
    """

    def __init__(self, generator: nn.Module, taps: Sequence[str], *, latent_dim: int,
                 strides: Sequence[int] | None = None, feature_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim!r}")
        self.generator = generator
        self.latent_dim = latent_dim
        self.taps = FeatureTaps(generator, taps, strides=strides, dtype=feature_dtype, early_exit=False)
        self._image_size: tuple[int, int] | None = None
        self._feature_info: list[dict] | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> GeneratorTeacher:
        """The teacher is frozen: it always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.inference_mode()
    def _dry_run(self) -> None:
        z = torch.zeros(1, self.latent_dim, device=self.device)
        images, native = self.taps.run(lambda: _first_tensor(self.generator(z)), image_size=None)
        self._image_size = (int(images.shape[-2]), int(images.shape[-1]))
        strides = self.taps.strides or [None] * len(native)
        self._feature_info = []
        for name, feat, stride in zip(self.taps.names, native, strides):
            native_r = self._image_size[1] // feat.shape[-1]
            self._feature_info.append({"num_chs": int(feat.shape[1]), "reduction": int(stride or native_r),
                                       "module": name, "native_reduction": int(native_r)})

    @property
    def feature_info(self) -> list[dict]:
        """``num_chs``, ``reduction``, ``module`` (and ``native_reduction``) per tap, from a dry run."""
        if self._feature_info is None:
            self._dry_run()
        return [dict(info) for info in self._feature_info]

    @torch.inference_mode()
    def forward(self, batch_size: int | None = None, *, z: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample ``z ~ N(0, I)`` (or use the given ``z [B, latent_dim]``) and return ``(images, features)``."""
        if self._image_size is None:
            self._dry_run()
        if z is None:
            if batch_size is None:
                raise ValueError("batch_size: expected a batch size when z is not given")
            z = torch.randn(batch_size, self.latent_dim, generator=generator,
                            device=generator.device if generator is not None else "cpu").to(self.device)
        elif z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected [B, {self.latent_dim}], got {tuple(z.shape)}")
        images, feats = self.taps.run(lambda: _first_tensor(self.generator(z)), image_size=self._image_size)
        return images, feats
