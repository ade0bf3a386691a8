"""Frozen diffusers denoisers (pixel-space UNet2DModel, latent-space UNet2DConditionModel + VAE) as teachers.

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
import inspect
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dtkernels

from ..config import UserError, UserPathError
from .taps import FeatureTaps, _first_tensor, _jsonable, state_fingerprint

logger = logging.getLogger("dreamteacher")

__all__ = ["DiffusionTeacher", "candidate_taps", "check_image_size", "check_teacher_dir", "encode_empty_prompt",
           "MODES", "DEFAULT_T", "CONDITIONINGS", "ZEROS_SOURCE", "UNCOND_EMBEDDING_FILE"]

#: Encoding modes of :class:`DiffusionTeacher`.
MODES = ("stochastic", "deterministic")
#: The paper's noise level for ImageNet-scale teachers.
DEFAULT_T = 150
UNCOND_EMBEDDING_FILE = "uncond_embedding.safetensors"


def _load_embedding(source: torch.Tensor | str | os.PathLike) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    from ..serialization import load_file

    path = Path(source)
    tensors = load_file(path, what="text_embedding")  # safetensors or weights-only torch.save, never runs code
    if isinstance(tensors, dict):
        if "embedding" in tensors:
            return tensors["embedding"]
        if len(tensors) != 1:
            raise UserError(f"text_embedding: {path} holds {sorted(tensors)}; expected one tensor or 'embedding'")
        return next(iter(tensors.values()))
    if not isinstance(tensors, torch.Tensor):
        raise TypeError(f"text_embedding: {path} holds a {type(tensors).__name__}, expected a tensor")
    return tensors


#: Values of ``conditioning`` (config ``teacher.conditioning``): how a conditional UNet gets its text embedding.
CONDITIONINGS = ("auto", "zeros")
#: The log's and ``conditioning_source``'s name for the explicit zeros opt-in.
ZEROS_SOURCE = "zeros (explicit opt-in)"
# Metadata marking an uncond_embedding.safetensors as this module's cache of a text encoder's empty-prompt embedding;
# only such files are ever overwritten.
_CACHE_MARK = "dreamteacher.empty_prompt_embedding"
# How the cached embedding is made; a change here must invalidate old caches.
_CACHE_RECIPE = "tokenizer('', padding=max_length, max_length=model_max_length, truncation) -> text_encoder[0] fp32"


def check_teacher_dir(path: str | os.PathLike, option: str = "path", set_as: str | None = None) -> Path:
    """``path`` as a Path when it is a local diffusers directory with a UNet config (``config.json`` or
    ``unet/config.json``); otherwise :class:`~dreamteacher.config.UserPathError` naming ``option``, saying that
    nothing is downloaded at run time and how to point at a local copy (a hub id like ``org/model`` gets the
    ``huggingface-cli download`` line for it). ``set_as``: how the message says to give a directory DIR (default
    ``{option}=DIR``)."""
    root = Path(path)
    text = str(path)
    if root.is_dir():
        if (root / "config.json").is_file() or (root / "unet" / "config.json").is_file():
            return root
        problem = f"is a directory with no UNet config.json (looked in {root} and {root / 'unet'})"
    elif root.exists():
        problem = "is a file, not a directory"
    else:
        problem = "is not a directory"
    hub_id = not root.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text) is not None
    if hub_id:
        problem += " here (it looks like a model hub id)"
    repo = text if hub_id else "ORG/MODEL"
    raise UserPathError(f"{option}: {text!r} {problem}. Teachers are read from a local diffusers directory and never "
                        f"downloaded at run time: download it where there is network (`huggingface-cli download "
                        f"{repo} --local-dir DIR`), copy DIR here and pass {set_as or f'{option}=DIR'}, or train "
                        "one with `dreamteacher train-teacher --out DIR`")


def check_image_size(teacher: DiffusionTeacher, size: int, option: str) -> int:
    """``size`` when the teacher's UNet runs the blocks it needs on ``size`` x ``size`` images; otherwise
    :class:`UserError` naming ``option``.

    Each down block halves the map (rounding up); each decoder block after the first concatenates the upsampled map
    with a skip of the level above, which fails unless that skip is twice as large. The blocks that must run are
    those up to the last tapped decoder block (with early exit in stochastic mode) or the whole UNet (DDIM inversion
    needs its output)."""
    levels = len(teacher.unet.config.block_out_channels)
    sizes = [-(-size // teacher.latent_factor)]
    for _ in range(levels - 1):
        sizes.append(-(-sizes[-1] // 2))
    last = levels - 1  # index of the last decoder block that runs
    if teacher.taps.early_exit and teacher.mode == "stochastic":
        blocks = [int(n.split(".")[1]) if n.startswith("up_blocks.") else 0 if n.startswith(("mid_block",
                  "down_blocks.", "conv_in", "time_")) else levels - 1 for n in teacher.taps.names]
        last = max(blocks)
    if all(sizes[levels - 1 - i] == 2 * sizes[levels - i] for i in range(1, last + 1)):
        return size
    multiple = teacher.latent_factor * 2 ** (levels - 1)
    latent = f" (after the VAE's /{teacher.latent_factor})" if teacher.latent_factor > 1 else ""
    below, above = size // multiple * multiple, (size // multiple + 1) * multiple
    raise UserError(f"{option}: the teacher's UNet cannot run on {size}x{size} images: it has {levels} levels and "
                    f"halves the image {levels - 1} times{latent}, so its skip connections need a multiple of "
                    f"{multiple}; use e.g. {' or '.join(str(v) for v in (below, above) if v > 0)}")


def _diffusers_load(cls, directory: Path, **kwargs) -> nn.Module:
    """``cls.from_pretrained(directory)``. diffusers reads safetensors, or ``.bin`` weights with ``weights_only=True``,
    so no code from the files runs; a file it refuses or cannot read becomes a LoadError naming the directory."""
    from ..serialization import LoadError

    try:
        return cls.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        causes = [e] + ([e.__cause__] if e.__cause__ is not None else [])
        detail = "; ".join(f"{type(c).__name__}: {str(c).strip().splitlines()[0][:200]}" for c in causes if str(c))
        raise LoadError(f"teacher.path: the weights in {directory} were not loaded ({detail}); weights are read as "
                        "safetensors or weights-only .bin files, never unpickled; use a diffusers directory saved "
                        "with save_pretrained", path=directory) from e


def _cross_attention_dim(unet: nn.Module) -> int | None:
    """The UNet's ``cross_attention_dim`` when it takes ``encoder_hidden_states`` (a conditional UNet), else None."""
    cross_dim = getattr(unet, "config", {}).get("cross_attention_dim")
    if cross_dim is None or "encoder_hidden_states" not in _forward_params(unet):
        return None
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    return int(cross_dim)


def _check_embedding(emb: torch.Tensor, cross_dim: int, what: str) -> torch.Tensor:
    """``[L, D]`` or ``[1, L, D]`` -> ``[1, L, D]`` float32, with ``D`` the UNet's ``cross_attention_dim``."""
    # A fresh copy: never the caller's storage, and never a tensor inside a file's read buffer, whose alignment
    # (it moves with the safetensors header length) changes which CPU kernel the attention runs and so its bits.
    emb = emb.detach().to(torch.float32, copy=True)
    if emb.dim() == 2:
        emb = emb.unsqueeze(0)
    if emb.dim() != 3 or emb.shape[0] != 1 or emb.shape[1] < 1 or emb.shape[-1] != cross_dim:
        raise UserError(f"text_embedding: {what} has shape {tuple(emb.shape)}; expected [L, {cross_dim}] or "
                         f"[1, L, {cross_dim}] (the UNet's cross_attention_dim is {cross_dim})")
    return emb


def _missing_conditioning(cross_dim: int, root: Path | None) -> str:
    """The refusal for a conditional UNet without a text embedding, naming the three ways to fix it."""
    where = f"the UNet of {root}" if root is not None else "the UNet"
    folder = str(root) if root is not None else "the teacher directory"
    return (f"conditioning: {where} is conditional (cross_attention_dim={cross_dim}) and no unconditional text "
            f"embedding was found; refusing to condition it on zeros silently. Fix one of: (1) add the pipeline's "
            f"text_encoder/ and tokenizer/ to {folder} (the empty prompt's embedding is computed from them); "
            f"(2) pass an embedding file of shape [L, {cross_dim}] or [1, L, {cross_dim}]: teacher.text_embedding=FILE "
            f"(pretrain), --text-embedding FILE (cache-features), text_embedding= (Python); (3) opt in to zeros: "
            f"teacher.conditioning=zeros (pretrain), --conditioning zeros (cache-features), conditioning='zeros' "
            f"(Python)")


def _text_encoder_key(root: Path) -> str:
    """sha256 over the recipe and the name, size and mtime of every file in ``text_encoder/`` and ``tokenizer/``.

    File stats, not contents: hashing a real text encoder (~0.5 GB) would cost about as much as running it once.
    """
    h = hashlib.sha256(_CACHE_RECIPE.encode())
    for sub in ("text_encoder", "tokenizer"):
        for f in sorted(p for p in (root / sub).rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cached_embedding(file: Path, key: str) -> torch.Tensor | None:
    """The embedding in ``file`` if it is this module's cache made from the same text encoder files, else None."""
    if not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get(_CACHE_MARK) != key or "embedding" not in f.keys():
                return None
            return f.get_tensor("embedding")
    except (OSError, ValueError, RuntimeError) as e:  # a truncated or foreign file: recompute
        logger.debug("ignoring unreadable embedding cache %s: %s", file, e)
        return None


def _write_cached_embedding(emb: torch.Tensor, dirs: Sequence[Path], key: str, meta: dict[str, str]) -> Path | None:
    """Write the cache into the first directory that is writable and holds no foreign uncond_embedding file.

    The write is atomic (a temporary file renamed), so processes of one run writing at once leave a whole file.
    Returns the file written, or None when no directory took it.
    """
    from safetensors.torch import save_file

    for d in dirs:
        target = d / UNCOND_EMBEDDING_FILE
        if target.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(target), framework="pt") as f:
                    ours = _CACHE_MARK in (f.metadata() or {})
            except (OSError, ValueError, RuntimeError):
                ours = False
            if not ours:  # a hand-made or saved embedding: never overwrite it
                continue
        tmp = d / f".{UNCOND_EMBEDDING_FILE}.{os.getpid()}.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            if not os.access(d, os.W_OK):
                continue
            save_file({"embedding": emb.contiguous()}, str(tmp), metadata={_CACHE_MARK: key, **meta})
            os.replace(tmp, target)
            return target
        except OSError as e:
            logger.debug("cannot cache the empty-prompt embedding in %s: %s", d, e)
            tmp.unlink(missing_ok=True)
    return None


def _saved_source(file: Path) -> str:
    """`` (saved from: <source>)`` when ``file`` records where its embedding came from (:meth:`save_pretrained`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, ValueError, RuntimeError):
        return ""
    return f" (saved from: {meta['source']})" if meta.get("source") else ""


def _pipeline_class(root: Path, component: str) -> str | None:
    """The transformers class a diffusers ``model_index.json`` names for ``component``, if any."""
    index = root / "model_index.json"
    if not index.is_file():
        return None
    entry = json.loads(index.read_text()).get(component)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "transformers" and entry[1]:
        return str(entry[1])
    return None


def encode_empty_prompt(root: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """The unconditional text embedding of a diffusers pipeline directory, as Stable Diffusion makes it.

    ``StableDiffusionPipeline.encode_prompt`` embeds the negative prompt ``""`` padded to the tokenizer's
    ``model_max_length`` and keeps the text encoder's ``last_hidden_state`` (output 0); this does the same with the
    directory's own ``tokenizer/`` and ``text_encoder/`` (classes from ``model_index.json``, else the saved configs),
    in float32 on CPU. ``transformers`` is imported here only.

    Returns:
        ``[1, L, D]`` float32 embedding (``L = model_max_length``, 77 for CLIP) and metadata saying how it was made.
    """
    root = Path(root)
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"conditioning: {root} has text_encoder/ and tokenizer/, which need `transformers` "
                          f"(pip install 'dtkernels[train]'); or pass teacher.text_embedding=FILE or "
                          f"teacher.conditioning=zeros") from e

    tok_name = _pipeline_class(root, "tokenizer") or "AutoTokenizer"
    enc_name = _pipeline_class(root, "text_encoder")
    if enc_name is None:
        archs = json.loads((root / "text_encoder" / "config.json").read_text()).get("architectures") or ["AutoModel"]
        enc_name = archs[0]
    tok_cls, enc_cls = getattr(transformers, tok_name, None), getattr(transformers, enc_name, None)
    if tok_cls is None or enc_cls is None:
        raise UserError(f"conditioning: {root} names transformers classes {tok_name!r} / {enc_name!r}, which the "
                         f"installed transformers {transformers.__version__} does not have")
    tokenizer = tok_cls.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    # float32: the embedding is computed once and cast to the teacher's dtype afterwards, and CPU half kernels are
    # neither fast nor available everywhere.
    text_encoder = enc_cls.from_pretrained(str(root / "text_encoder"), local_files_only=True).float().eval()
    max_length = int(tokenizer.model_max_length)
    if max_length > 100_000:  # a tokenizer saved without a limit reports a huge sentinel
        max_length = int(getattr(text_encoder.config, "max_position_embeddings", 77))
    tokens = tokenizer("", padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.inference_mode():
        emb = text_encoder(tokens.input_ids, attention_mask=mask)[0]
    meta = {"made_by": "dreamteacher.teachers.encode_empty_prompt", "prompt": "", "recipe": _CACHE_RECIPE,
            "teacher": str(root), "tokenizer_class": type(tokenizer).__name__,
            "text_encoder_class": type(text_encoder).__name__, "max_length": str(max_length),
            "transformers_version": transformers.__version__}
    return emb.detach().float().clone(), meta


def _empty_prompt_embedding(root: Path, fallback_dir: Path | None) -> tuple[torch.Tensor, str]:
    """The empty-prompt embedding of ``root``'s text encoder, from the cache when it is current; and its source."""
    key = _text_encoder_key(root)
    dirs = [root] + ([fallback_dir] if fallback_dir is not None else [])
    for d in dirs:
        emb = _read_cached_embedding(d / UNCOND_EMBEDDING_FILE, key)
        if emb is not None:
            return emb, f"text encoder of {root} (empty prompt), cached in {d / UNCOND_EMBEDDING_FILE}"
    emb, meta = encode_empty_prompt(root)
    meta["source"] = f"text encoder of {root} (empty prompt)"
    written = _write_cached_embedding(emb, dirs, key, meta)
    where = f"cached in {written}" if written is not None else "not cached (no writable directory)"
    return emb, f"text encoder of {root} (empty prompt), {where}"


class DiffusionTeacher(nn.Module):
    """A frozen diffusers denoiser with its noise schedule, returning decoder features at the student's strides.

    Pixel space: a ``UNet2DModel``. Latent space (Stable Diffusion style): a ``UNet2DConditionModel`` plus an
    ``AutoencoderKL``; images are encoded to the latent mean times ``vae.config.scaling_factor`` and the UNet is
    conditioned on the unconditional (empty-prompt) text embedding it was trained with: ``text_embedding``, or
    zeros ``[1, 1, cross_attention_dim]`` only when asked for by ``conditioning="zeros"``. A conditional UNet with
    neither is refused (:meth:`from_pretrained` also finds the embedding in the pipeline directory).

    Encoding modes:
        ``"stochastic"``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` by :func:`dtkernels.q_sample`, then one
        UNet forward; with ``n_noise > 1`` the features of several noise draws are averaged.
        ``"deterministic"``: DDIM inversion from ``x0`` to ``t`` in ``ddim_steps`` steps (the UNet runs
        ``ddim_steps + 1`` times), then the tapped forward at ``t``; the paper's ablation.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (any module with the same call signature).
        scheduler: a diffusers scheduler (its config is read into a ``DDPMScheduler``); default DDPM, 1000 steps.
        vae: an ``AutoencoderKL`` for latent-space teachers.
        text_embedding: ``[L, D]`` or ``[1, L, D]`` tensor, or a ``.pt``/``.safetensors`` file holding it, with
            ``D`` the UNet's ``cross_attention_dim``; conditional UNets only.
        conditioning: ``"auto"`` (use ``text_embedding``, required for a conditional UNet) or ``"zeros"`` (the
            explicit opt-in to a zero embedding; excludes ``text_embedding``). Unconditional UNets ignore it.
        conditioning_source: how ``text_embedding`` was made, kept as :attr:`conditioning_source` (for the log and
            the record); default: the file name, or ``"a tensor given by the caller"``.
        taps: module names inside ``unet`` to read; default its ``up_blocks``.
        strides: output stride per tap relative to the input image (e.g. the student's 4, 8, 16, 32); None keeps
            each feature at its native resolution.
        t: noise level in ``[0, T)``.
        mode: ``"stochastic"`` or ``"deterministic"``.
        n_noise: noise draws averaged in stochastic mode.
        ddim_steps: inversion steps in deterministic mode.
        early_exit: stop the UNet forward after the last tapped module.
        feature_dtype: cast the returned features (e.g. ``torch.bfloat16``); None keeps the model's dtype.
        fused_ops: run the UNet's GroupNorm + SiLU pairs (residual blocks and output) through
            :func:`dtkernels.group_norm_act` (:func:`~dreamteacher.teachers.fused.fuse_teacher_ops`; the state_dict
            is unchanged); False: the stock diffusers modules (a UNet fused earlier is restored). The features
            differ by float rounding only, so this is not part of :meth:`identity` or :meth:`extraction_config`.

    Shapes:
        input ``[B, 3, H, W]`` in ``[-1, 1]``; output: one ``[B, C_l, ceil(H / s_l), ceil(W / s_l)]`` per tap.
    """

    def __init__(self, unet: nn.Module, scheduler: Any = None, *, vae: nn.Module | None = None,
                 text_embedding: torch.Tensor | str | os.PathLike | None = None, conditioning: str = "auto",
                 conditioning_source: str | None = None, taps: Sequence[str] | None = None,
                 strides: Sequence[int] | None = None, t: int = DEFAULT_T, mode: str = "stochastic",
                 n_noise: int = 1, ddim_steps: int = 10, early_exit: bool = True,
                 feature_dtype: torch.dtype | None = None, adm_taps: dict | None = None,
                 fused_ops: bool = True) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        from .adm import translate_adm_taps

        #: A converted guided-diffusion teacher's ``adm_taps.json`` (ADM block names -> modules), else None.
        self.adm_taps = adm_taps
        if taps is not None:
            taps = translate_adm_taps(list(taps), adm_taps, "taps")

        self.unet = unet
        self.vae = vae
        self.scheduler = DDPMScheduler.from_config(scheduler.config) if scheduler is not None else DDPMScheduler()
        # A plain attribute, not a buffer: ``teacher.to(torch.bfloat16)`` must not round the noise schedule.
        self._alphas_cumprod = {torch.device("cpu"): self.scheduler.alphas_cumprod.detach().to("cpu", torch.float32)}
        self.num_train_timesteps = int(self.scheduler.alphas_cumprod.numel())
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")

        if conditioning not in CONDITIONINGS:
            raise UserError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
        cross_dim = _cross_attention_dim(unet)
        self.conditional = cross_dim is not None
        #: Where the unconditional text embedding came from (None for unconditional UNets).
        self.conditioning_source: str | None = None
        if self.conditional:
            if conditioning == "zeros":
                if text_embedding is not None:
                    raise UserError("conditioning: 'zeros' and a text_embedding exclude each other; drop one")
                emb, source = torch.zeros(1, 1, cross_dim), ZEROS_SOURCE
            elif text_embedding is None:
                raise UserError(_missing_conditioning(cross_dim, None))
            else:
                given = "a tensor given by the caller" if isinstance(text_embedding, torch.Tensor) \
                    else f"file {text_embedding}"
                emb = _check_embedding(_load_embedding(text_embedding), cross_dim, given)
                source = conditioning_source or given
            self.conditioning_source = source
            self.register_buffer("uncond_embedding", emb.to(next(unet.parameters()).dtype))
        elif text_embedding is not None:
            raise UserError("text_embedding: the UNet takes no encoder_hidden_states (not a conditional UNet)")

        if mode not in MODES:
            raise UserError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.t = self._check_t(t)
        if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
            raise UserError(f"n_noise: expected an integer >= 1, got {n_noise!r}")
        self.n_noise = n_noise
        if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or ddim_steps < 1:
            raise UserError(f"ddim_steps: expected an integer >= 1, got {ddim_steps!r}")
        self.ddim_steps = ddim_steps
        self.feature_dtype = feature_dtype
        # The teacher casts after averaging draws, so the taps keep the model's dtype.
        self.taps = FeatureTaps(unet, taps, strides=strides, early_exit=early_exit)
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self._feature_info: list[dict] | None = None
        self.requires_grad_(False)
        self.eval()
        if not isinstance(fused_ops, bool):
            raise UserError(f"fused_ops: expected true or false, got {fused_ops!r}")
        from .fused import fuse_teacher_ops, unfuse_teacher_ops

        #: Whether the UNet's GroupNorm + SiLU pairs run through dtkernels.group_norm_act.
        self.fused_ops = fused_ops
        #: How many places run through it (:func:`~dreamteacher.teachers.fused.fusion_report`); 0 when not fused.
        self.fused_places = fuse_teacher_ops(unet) if fused_ops else 0
        if not fused_ops:
            unfuse_teacher_ops(unet)  # the UNet may be shared with a teacher built with fused_ops=True

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
    def from_pretrained(cls, path: str | os.PathLike, *, text_embedding: torch.Tensor | str | os.PathLike | None = None,
                        conditioning: str = "auto", embedding_cache_dir: str | os.PathLike | None = None,
                        **kwargs) -> DiffusionTeacher:
        """Load from a local directory (never the hub).

        Layouts: a pipeline directory (``unet/``, ``scheduler/``, optional ``vae/``, ``text_encoder/`` + ``tokenizer/``
        and ``uncond_embedding.safetensors``, as written by :meth:`save_pretrained` or a diffusers pipeline), or a
        bare UNet directory (``config.json`` + weights, optional ``scheduler_config.json`` beside it).

        A conditional UNet's unconditional text embedding, with ``conditioning="auto"``, is the first of:
        ``text_embedding``; the empty prompt's embedding by the directory's ``text_encoder/`` and ``tokenizer/``
        (:func:`encode_empty_prompt`, computed once and cached as ``uncond_embedding.safetensors`` in ``path``, or
        in ``embedding_cache_dir`` where ``path`` is not writable); ``path/uncond_embedding.safetensors``. With none
        of them it refuses. ``conditioning="zeros"`` is the explicit opt-in to zeros. One INFO line names the
        source. A directory written by ``dreamteacher convert-adm`` (its ``adm_taps.json``) also takes ADM block names
        (``output_blocks.5``) as ``taps``. ``kwargs`` go to the constructor (e.g. ``fused_ops=False`` for the stock
        diffusers GroupNorm + SiLU; the fusion is applied after the weights are loaded).
        """
        import diffusers

        from .adm import read_adm_taps

        root = check_teacher_dir(path)
        kwargs.setdefault("adm_taps", read_adm_taps(root))
        unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
        class_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
        unet_cls = getattr(diffusers, class_name, None)
        if unet_cls is None:
            raise UserError(f"path: {unet_dir / 'config.json'} names an unknown diffusers class {class_name!r}")
        # diffusers defaults to low_cpu_mem_usage=True and, without `accelerate` installed, warns at every load
        # before falling back; ask for what will happen.
        load = {"local_files_only": True, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
        unet = _diffusers_load(unet_cls, unet_dir, **load)
        scheduler = None
        for cand in (root / "scheduler", root):
            if (cand / "scheduler_config.json").is_file():
                scheduler = diffusers.DDPMScheduler.from_pretrained(str(cand), local_files_only=True)
                break
        if scheduler is None:
            logger.warning("no scheduler_config.json in %s: using DDPMScheduler() defaults (1000 linear steps)", root)
        vae = None
        if (root / "vae" / "config.json").is_file():
            vae = _diffusers_load(diffusers.AutoencoderKL, root / "vae", **load)
        source = None
        cross_dim = _cross_attention_dim(unet)
        if cross_dim is not None and conditioning == "auto" and text_embedding is None:
            has_encoder, has_tokenizer = (root / "text_encoder").is_dir(), (root / "tokenizer").is_dir()
            if has_encoder and has_tokenizer:
                fallback = Path(embedding_cache_dir) if embedding_cache_dir is not None else None
                text_embedding, source = _empty_prompt_embedding(root, fallback)
                _check_embedding(text_embedding, cross_dim, f"the text encoder output of {root / 'text_encoder'}")
            else:
                if has_encoder != has_tokenizer:
                    logger.warning("%s has %s/ but no %s/: its text encoder is not used", root,
                                   *(("text_encoder", "tokenizer") if has_encoder else ("tokenizer", "text_encoder")))
                if (root / UNCOND_EMBEDDING_FILE).is_file():
                    text_embedding = root / UNCOND_EMBEDDING_FILE
                    source = f"file {text_embedding}" + _saved_source(text_embedding)
                else:
                    raise UserError(_missing_conditioning(cross_dim, root))
        teacher = cls(unet, scheduler, vae=vae, text_embedding=text_embedding, conditioning=conditioning,
                      conditioning_source=source, **kwargs)
        if teacher.conditional:
            logger.info("teacher conditioning: %s", teacher.conditioning_source)
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
                      str(root / UNCOND_EMBEDDING_FILE), metadata={"source": str(self.conditioning_source)})

    # ------------------------------------------------------------------------------------------------ frozen module
    def train(self, mode: bool = True) -> DiffusionTeacher:
        """The teacher is frozen: it always stays in eval mode."""
        return super().train(False)

    def _check_t(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_train_timesteps:
            raise UserError(f"t: expected an integer in [0, {self.num_train_timesteps}), got {t!r}")
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
        ``native_reduction`` (the stride before resizing) and, for a converted ADM teacher, ``block`` (the ADM block
        name). Found by a dry run on a tiny input (cached)."""
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
        info = []
        blocks = {m: b for b, m in self.adm_taps["taps"].items()} if self.adm_taps else {}
        # features come in call order, which need not be the order the taps were named in
        for name, feat in zip(self.taps.last_order, native):
            stride = self.taps._stride_of.get(name)
            native_r = image // feat.shape[-1]
            info.append({"num_chs": int(feat.shape[1]), "reduction": int(stride or native_r), "module": name,
                         "native_reduction": int(native_r)})
            if name in blocks:  # the ADM block name a converted guided-diffusion teacher's tap reads
                info[-1]["block"] = blocks[name]
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
            raise UserError(f"mode: expected one of {MODES}, got {mode!r}")
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
                feats = [f.div_(n_noise) for f in feats]  # float32, as the taps give them
        if self.feature_dtype is not None:
            feats = [f.to(self.feature_dtype) for f in feats]
        return feats

    def _features(self, x_t: torch.Tensor, t: torch.Tensor, image_size: Sequence[int]) -> list[torch.Tensor]:
        return self.taps.run(lambda: self._unet_call(x_t, t), image_size=image_size)[1]

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, t={self.t}, n_noise={self.n_noise}, taps={self.taps.names}, "
                f"strides={self.taps.strides}, early_exit={self.taps.early_exit}, latent={self.vae is not None}, "
                f"fused_ops={self.fused_ops}")


def _forward_params(module: nn.Module) -> set[str]:

    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()




def candidate_taps(path: str | os.PathLike) -> list[str]:
    """The UNet modules the automatic tap choice picks from: a converted ADM teacher's middle and decoder blocks (as
    DDPM-segmentation reads them), else diffusers' ``mid_block`` and every ``up_blocks.i``."""
    from .adm import read_adm_taps

    root = Path(path)
    adm = read_adm_taps(root)
    if adm is not None:
        return [n for n in adm["taps"] if n == "middle_block" or n.startswith("output_blocks.")]
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    n_up = len(json.loads((unet_dir / "config.json").read_text())["up_block_types"])
    return ["mid_block"] + [f"up_blocks.{i}" for i in range(n_up)]
