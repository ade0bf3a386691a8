"""Frozen teachers, one module per family, as diffusers keeps one file per model family.

* :mod:`.taps` -- what every family shares: :class:`FeatureTaps` (forward hooks, resizing to the student's strides
  in the hook, early exit), the automatic tap choice (:func:`select_taps`) and teacher fingerprints.
* :mod:`.diffusion` -- diffusers denoisers, pixel space (``UNet2DModel``) and latent space (``UNet2DConditionModel``
  + ``AutoencoderKL``, with the unconditional text embedding): :class:`DiffusionTeacher`.
* :mod:`.adm` -- guided-diffusion (ADM) checkpoints converted into exact diffusers teachers, and ADM block names
  (``output_blocks.5``) as taps: :func:`convert_adm`.
* :mod:`.generator` -- GAN-style generators (``MODULE:FACTORY`` or TorchScript): :class:`GeneratorTeacher`.
* :mod:`.build` -- :func:`build_teacher`, the one place a teacher is built from ``cfg.teacher`` (tap choice, call
  order, dtype), for every command.
"""

from .adm import ADMConversionError, convert_adm, parse_adm_flags
from .build import build_teacher, resolve_dtype
from .diffusion import (
    CONDITIONINGS,
    DEFAULT_T,
    MODES,
    UNCOND_EMBEDDING_FILE,
    ZEROS_SOURCE,
    DiffusionTeacher,
    check_image_size,
    check_teacher_dir,
    encode_empty_prompt,
)
from .generator import GeneratorTeacher, ScriptedGenerator, load_generator
from .taps import FeatureTaps, default_tap_names, describe_tap, resize_to_stride, select_taps, state_fingerprint

__all__ = ["FeatureTaps", "resize_to_stride", "default_tap_names", "describe_tap", "select_taps",
           "state_fingerprint", "DiffusionTeacher", "check_image_size", "check_teacher_dir", "encode_empty_prompt",
           "MODES", "DEFAULT_T", "CONDITIONINGS", "ZEROS_SOURCE", "UNCOND_EMBEDDING_FILE", "GeneratorTeacher",
           "ScriptedGenerator", "load_generator", "convert_adm", "parse_adm_flags", "ADMConversionError",
           "build_teacher", "resolve_dtype"]
