"""Building a frozen teacher from ``cfg.teacher``: the one place every command gets its teacher from.

:func:`build_teacher` dispatches on ``teacher.kind``: a diffusers (or converted ADM) UNet with one tap per student
level, chosen automatically (:func:`~.taps.select_taps` over :func:`~.diffusion.candidate_taps`) or named, built in
call order (:func:`~.taps.call_order`); or a GAN-style generator. Each tap is resized to its level's stride in the
hook. The few settings outside ``cfg.teacher`` (image size, naive loop, embedding cache, channels_last) are
arguments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..config import ConfigError, TeacherConfig, UserError, options_named
from .diffusion import DiffusionTeacher, candidate_taps, check_image_size, check_teacher_dir
from .generator import GeneratorTeacher
from .taps import call_order, select_taps

logger = logging.getLogger("dreamteacher")

__all__ = ["build_teacher", "resolve_dtype", "describe_dtype", "DTYPES"]

#: ``teacher.dtype`` names -> torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: DiffusionTeacher's argument names -> the config keys they come from (for error messages).
_TEACHER_KEYS = {"path": "teacher.path", "t": "teacher.t", "mode": "teacher.mode", "n_noise": "teacher.n_noise",
                 "ddim_steps": "teacher.ddim_steps", "names": "teacher.taps", "taps": "teacher.taps",
                 "text_embedding": "teacher.text_embedding", "conditioning": "teacher.conditioning"}


def build_teacher(cfg: TeacherConfig, *, device: torch.device, student_strides: Sequence[int], image_size: int,
                  naive: bool = False, cache_dir: str | os.PathLike | None = None, channels_last: bool = False
                  ) -> tuple[DiffusionTeacher | GeneratorTeacher, list[int]]:
    """The frozen teacher with one tap per student level, each resized to that level's stride in the hook.

    Returns the teacher and ``order``: ``teacher(x)[order[lvl]]`` is the target of student level ``l`` (the teacher
    returns its features in call order). With ``teacher.kind=generator`` the teacher is a :class:`GeneratorTeacher`
    (:func:`build_generator_teacher`), called as ``images, features = teacher(batch_size, generator=g)``.
    """
    if cfg.kind == "generator":
        return _build_generator_teacher(cfg, device, student_strides, image_size)
    if not cfg.path:
        raise ConfigError("teacher.path: expected the directory of a diffusers teacher (--teacher.path=DIR; see "
                          "`dreamteacher train-teacher`)")
    # Before candidate_taps reads its config.json.
    check_teacher_dir(cfg.path, "teacher.path", "--teacher.path=DIR (teacher: path: DIR in a YAML config)")
    dtype = resolve_dtype(cfg.dtype, device)
    common = dict(t=cfg.t, mode=cfg.mode, n_noise=cfg.n_noise,
                  ddim_steps=cfg.ddim_steps, early_exit=cfg.early_exit and not naive,
                  fused_ops=cfg.fused_ops and not naive)  # run.naive: stock diffusers, the baseline
    names = cfg.taps
    with options_named(_TEACHER_KEYS):
        probe = DiffusionTeacher.from_pretrained(cfg.path, taps=None if names else candidate_taps(cfg.path),
                                                 text_embedding=cfg.text_embedding or None,
                                                 conditioning=cfg.conditioning,
                                                 embedding_cache_dir=cache_dir, **common)
    if names is None:  # automatic choice from the candidates' native strides (a dry run on a tiny input)
        info = probe.feature_info
        picked = select_taps([i["native_reduction"] for i in info], student_strides)
        names = [info[j]["module"] for j in picked]
    else:  # ADM block names (output_blocks.5) of a converted guided-diffusion teacher -> its modules
        from .adm import translate_adm_taps

        names = translate_adm_taps(list(names), probe.adm_taps, "teacher.taps")
    probe.taps.remove()
    # Build the real taps in call order; strides per tap are the student's strides of the levels they feed.
    call_rank = {n: i for i, n in enumerate(_unet_call_order(probe, names))}
    ordered = sorted(range(len(names)), key=lambda lvl: call_rank[names[lvl]])
    teacher = DiffusionTeacher(probe.unet, probe.scheduler, vae=probe.vae,
                               text_embedding=probe.uncond_embedding if probe.conditional else None,
                               conditioning_source=probe.conditioning_source,
                               taps=[names[lvl] for lvl in ordered], strides=[student_strides[lvl] for lvl in ordered],
                               adm_taps=probe.adm_taps, **common)
    check_image_size(teacher, image_size, "data.image_size")
    teacher = teacher.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    if channels_last:  # the first convolution's channels_last weight makes every later activation channels_last
        teacher = teacher.to(memory_format=torch.channels_last)
    order = [ordered.index(lvl) for lvl in range(len(names))]
    return teacher, order


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``teacher.dtype`` with auto resolved: bfloat16 on GPU and on CPUs that multiply bfloat16 natively
    (``avx512_bf16`` or ``amx_bf16``), float32 elsewhere.

    Without native bfloat16 (an AVX2-only CPU) oneDNN emulates the bfloat16 convolutions by conversions and the
    teacher's forward is slower than in float32 (benchmarks/teacher_precision.py measures both). The statistics of
    every normalisation, the taps' resize and the loss's whitening stay in float32 whatever this dtype.
    """
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16"
    from ..runtime import cpu_has_native_bf16

    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def describe_dtype(dtype: str, device: torch.device) -> str:
    """``teacher.dtype`` for a log line: the dtype, and why when ``auto`` chose it."""
    resolved = resolve_dtype(dtype, device)
    if dtype != "auto":
        return f"{resolved} (teacher.dtype={dtype})"
    if device.type == "cuda":
        why = "a GPU"
    elif resolved == "bfloat16":
        why = "this CPU multiplies bfloat16 natively"
    else:
        why = "this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), where float32 is faster"
    return f"{resolved} (teacher.dtype=auto: {why})"


def _unet_call_order(teacher: DiffusionTeacher, names: Sequence[str]) -> list[str]:
    """The order in which the named UNet modules run (a dry run on a tiny input)."""
    n_levels = len(teacher.unet.config.block_out_channels)
    size = max(2 ** (n_levels - 1) * 2, 8)
    x = torch.zeros(1, teacher.unet.config.in_channels, size, size, device=teacher.device, dtype=teacher.dtype)
    tt = torch.full((1,), teacher.t, dtype=torch.long, device=teacher.device)

    def dry_run() -> None:
        with torch.inference_mode():
            teacher._unet_call(x, tt)

    return call_order(teacher.unet, names, dry_run, option="teacher.taps")


def _build_generator_teacher(cfg: TeacherConfig, device: torch.device, student_strides: Sequence[int],
                             image_size: int) -> tuple[GeneratorTeacher, list[int]]:
    """``teacher.kind=generator``: the frozen generator of ``teacher.generator``
    (:func:`~dreamteacher.teachers.generator.load_generator`) with one tap per student level (``teacher.taps``, else the
    generator's ``tap_names``), each resized to its level's stride relative to the generated image, which must be
    ``data.image_size`` square. Returns the teacher and ``order`` as :func:`build_teacher` does."""
    from .generator import load_generator

    with options_named({"generator": "teacher.generator", "taps": "teacher.taps", "names": "teacher.taps",
                        "strides": "teacher.taps"}):
        module, default_taps, module_latent = load_generator(cfg.generator, "teacher.generator",
                                                             taps=cfg.taps)
        names = cfg.taps if cfg.taps is not None else default_taps
        if names is None:
            raise ConfigError(f"teacher.taps: the generator {cfg.generator} has no tap_names attribute; name "
                              f"one of its modules per student level (fine to coarse, {len(student_strides)} of "
                              "them) with --teacher.taps=A,B,...")
        if len(names) != len(student_strides):
            raise ConfigError(f"teacher.taps: expected {len(student_strides)} module names (one per student level, "
                              f"fine to coarse), got {len(names)}: {list(names)}")
        latent_dim = cfg.latent_dim or module_latent
        if latent_dim is None:
            raise ConfigError(f"teacher.latent_dim: the generator {cfg.generator} has no latent_dim "
                              "attribute; give the size of its z with --teacher.latent_dim=N")
        if module_latent is not None and cfg.latent_dim and cfg.latent_dim != module_latent:
            raise ConfigError(f"teacher.latent_dim: {cfg.latent_dim} asked for, but the generator's "
                              f"latent_dim is {module_latent}; drop teacher.latent_dim")
        dtype = resolve_dtype(cfg.dtype, device)
        module = module.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
        # The features come in call order; find it with a dry run (a generator runs coarse to fine).
        order_probe = GeneratorTeacher(module, list(names), latent_dim=latent_dim)
        seen: list[str] = []
        handles = [module.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.append(n))
                   for n in dict.fromkeys(names)]
        try:
            made = order_probe.image_size
        except UserError:
            raise
        except RuntimeError as e:
            if not str(e).startswith("FeatureTaps:"):
                raise ConfigError(f"teacher.generator: {cfg.generator} failed on a latent of size "
                                  f"{latent_dim} ({str(e).splitlines()[0][:200]}); check teacher.latent_dim") from e
            raise ConfigError(f"teacher.taps: each tapped module must run once in the generator's forward "
                              f"({str(e).partition(': ')[2][:300]})") from e
        except Exception as e:  # the generator's own code failed on z [1, latent_dim]
            raise ConfigError(f"teacher.generator: {cfg.generator} failed on a latent of size {latent_dim} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); check "
                              "teacher.latent_dim") from e
        finally:
            for h in handles:
                h.remove()
            order_probe.taps.remove()
        if made != (image_size, image_size):
            raise ConfigError(f"data.image_size: the generator makes {made[0]}x{made[1]} images; set "
                              f"--data.image_size={made[0]}" if made[0] == made[1] else
                              f"data.image_size: the generator makes {made[0]}x{made[1]} images; "
                              "pretraining needs square ones")
        call_rank = {n: i for i, n in enumerate(dict.fromkeys(seen))}
        ordered = sorted(range(len(names)), key=lambda lvl: call_rank[names[lvl]])
        teacher = GeneratorTeacher(module, [names[lvl] for lvl in ordered], latent_dim=latent_dim,
                                   strides=[student_strides[lvl] for lvl in ordered],
                                   feature_dtype=DTYPES[dtype])
        teacher.feature_info  # noqa: B018 -- the dry run, inside the options_named block
    order = [ordered.index(lvl) for lvl in range(len(names))]
    return teacher, order


