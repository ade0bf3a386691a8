"""Configs of the pretraining run: dataclasses, loaded from YAML with ``--key=value`` overrides, type-checked.

A config has sections (``model``, ``teacher``, ``loss``, ``label``, ``optim``, ``schedule``, ``data``, ``run``,
``ssl``), each a dataclass whose fields carry their help text. Values come, in order, from the defaults, a YAML file and
command-line overrides ``--section.key=value`` (or ``--key=value`` when ``key`` names a field of one section only).
Every value is checked against its field's type and choices; unknown keys and bad values raise :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = ["UserError", "UserPathError", "ConfigError", "options_named", "PretrainConfig", "load_config",
           "apply_overrides", "config_to_dict", "config_from_dict", "describe_config"]


class UserError(ValueError):
    """A mistake in what the user asked for: an option's value, or a file or folder it names that is missing or not
    what the option expects. The message starts with the option or config key (``teacher.path: ...``) and says what
    to do; the command line prints it as one ``error:`` line and exits with status 2, without a traceback (anything
    else that escapes a command is a bug and keeps its traceback)."""


class UserPathError(UserError, FileNotFoundError):
    """A file or folder named by an option is missing, or is not the kind of file or folder the option expects."""


class ConfigError(UserError):
    """A config key is unknown or its value has the wrong type or is out of range."""


@contextlib.contextmanager
def options_named(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, a :class:`UserError` whose message starts with a library argument's name (``path: ...``, the
    convention of every message here) is re-raised naming the option or config key the value came from instead
    (``{"path": "teacher.path"}`` -> ``teacher.path: ...``), so the user reads the name they typed."""
    try:
        yield
    except UserError as e:
        head, sep, rest = str(e).partition(": ")
        if sep and head in names and len(e.args) == 1:
            e.args = (f"{names[head]}: {rest}",)
        raise


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None,
        exclusive: bool = False) -> Any:
    """A dataclass field with help text and optional checks (``choices``; ``minimum``, ``> minimum`` if exclusive)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
            "exclusive": exclusive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    student: str = opt("resnet18", "timm model name of the student backbone (features_only, strides 4-32)")
    pretrained: bool = opt(False, "start the student from timm's pretrained weights (needs the hub; off in the paper)")
    reductions: list[int] = opt([4, 8, 16, 32], "student feature strides distilled, fine to coarse")
    width: int = opt(256, "FPN channels of the feature regressor (256 in the paper)", minimum=1)
    pool_sizes: list[int] = opt([1, 2, 3, 6], "PPM pooling grid sizes on the deepest level")


@dataclass
class TeacherConfig:
    kind: str = opt("diffusion", "diffusion: a diffusers UNet encodes the training images (teacher.path); "
                                 "generator: a frozen GAN-style generator synthesizes the images from latents and "
                                 "its own features are the targets (teacher.generator; data.source is not read)",
                    choices=("diffusion", "generator"))
    path: str = opt("", "local diffusers directory of the frozen teacher (as written by train-teacher); required for "
                        "teacher.kind=diffusion")
    generator: str = opt("", "teacher.kind=generator: MODULE:FACTORY (an importable Python function returning the "
                             "generator nn.Module; importing runs that module's code, as any import does) or a "
                             "TorchScript file (.pt; read by torch.jit.load, which runs TorchScript only, never "
                             "Python). See dreamteacher.teachers.generator.load_generator for what the module must "
                             "provide")
    latent_dim: int = opt(0, "teacher.kind=generator: size of the latent z; 0 reads the generator's latent_dim "
                             "attribute", minimum=0)
    taps: list[str] | None = opt(None, "UNet module per student level, fine to coarse; null picks, for each student "
                                       "stride s, the decoder block whose native stride is closest to s/2 (the "
                                       "paper). teacher.kind=generator: the generator's module names (TorchScript: "
                                       "the keys of its feature dict); null: its tap_names attribute")
    t: int = opt(150, "noise level of the one-step encoding", minimum=0)
    mode: str = opt("stochastic", "encoding: one-step noising (stochastic) or DDIM inversion (deterministic)",
                    choices=("stochastic", "deterministic"))
    n_noise: int = opt(1, "stochastic mode: noise draws whose features are averaged", minimum=1)
    ddim_steps: int = opt(10, "deterministic mode: inversion steps", minimum=1)
    dtype: str = opt("auto", "teacher weights and compute dtype (auto: bfloat16 on GPU and on CPUs that multiply "
                               "bfloat16 natively, avx512_bf16 / amx_bf16; float32 elsewhere). Normalisation "
                               "statistics, the taps' resize and the whitening stay float32",
                     choices=("auto", "float32", "bfloat16", "float16"))
    early_exit: bool = opt(True, "stop the teacher forward after the last tapped block")
    fused_ops: bool = opt(True, "run the teacher's GroupNorm+SiLU through dtkernels.group_norm_act; false: stock "
                                "diffusers")
    channels_last: bool | None = opt(None, "channels_last memory format for the teacher; null (auto): with "
                                           "run.channels_last on GPU, never on CPU. true on CPU: the ADM-256 teacher's "
                                           "forward measured 1.28x faster on a 2-core AVX2 CPU "
                                           "(benchmarks/teacher_layout.py), not yet measured at other sizes or CPUs")
    text_embedding: str = opt("", "conditional (latent, Stable Diffusion style) teachers: .safetensors or .pt file "
                                  "with the unconditional text embedding [L, D] or [1, L, D], D the UNet's "
                                  "cross_attention_dim; empty: see teacher.conditioning")
    conditioning: str = opt("auto", "conditional teachers' text embedding. auto: teacher.text_embedding if given, "
                                    "else the empty prompt's embedding by the teacher's text_encoder/ + tokenizer/ "
                                    "(computed once, cached as uncond_embedding.safetensors in teacher.path, or in "
                                    "run.out_dir where that is read-only), else "
                                    "teacher.path/uncond_embedding.safetensors, else an error. zeros: a zero "
                                    "embedding, the explicit opt-in",
                            choices=("auto", "zeros"))


@dataclass
class LossConfig:
    mse_weight: float = opt(1.0, "weight of the whitened MSE term", minimum=0.0)
    at_weight: float = opt(10.0, "weight of the attention-transfer term (10 in the paper)", minimum=0.0)
    at_p: float = opt(2.0, "exponent of the attention maps", minimum=1.0)
    at_mode: str = opt("paper", "AT loss: paper (mean_b ||q_s - q_t||_2) or mean_sq", choices=("paper", "mean_sq"))
    whiten: str | None = opt("channel", "teacher whitening: LayerNorm over channels, over the sample, or none (null)",
                             choices=("channel", "sample", None))
    eps: float = opt(1e-5, "whitening LayerNorm epsilon", minimum=0.0, exclusive=True)
    level_weights: list[float] | None = opt(None, "one non-negative weight per level (null: all equal)")


@dataclass
class OptimConfig:
    name: str = opt("adamw", "optimizer: adamw (fused on GPU) or lamb (the paper's ImageNet recipe)",
                    choices=("adamw", "lamb"))
    lr: float = opt(1e-3, "peak learning rate (per optimizer step, after warm-up)", minimum=0.0, exclusive=True)
    betas: list[float] = opt([0.9, 0.999], "Adam betas")
    weight_decay: float = opt(0.05, "decoupled weight decay (not applied to norms and biases)", minimum=0.0)
    eps: float = opt(1e-8, "Adam epsilon", minimum=0.0, exclusive=True)


@dataclass
class ScheduleConfig:
    warmup_steps: int = opt(100, "linear warm-up steps from 0 to the peak learning rate", minimum=0)
    min_lr_ratio: float = opt(0.0, "cosine decay ends at lr * min_lr_ratio on the last step", minimum=0.0)


@dataclass
class DataConfig:
    source: str = opt("procedural", "'procedural' (built-in shapes dataset, generated on the fly) or a folder of "
                                    "images searched recursively")
    image_size: int = opt(64, "side of the square training images", minimum=8)
    length: int = opt(10000, "procedural dataset: images per epoch", minimum=1)
    seed: int = opt(0, "procedural dataset: generator seed (image i is a function of seed and i)")
    num_workers: int = opt(2, "DataLoader worker processes (0: load in the main process)", minimum=0)
    prefetch_factor: int = opt(2, "batches each worker prepares ahead", minimum=1)
    cache: str = opt("", "feature cache directory from `dreamteacher cache-features`: the student's images and the "
                         "teacher's targets come from its shards and no teacher is built. teacher.*, model.reductions "
                         "and data.image_size must agree with what the cache was made with (checked; every "
                         "difference is named); teacher.path and teacher.taps may stay empty/null (the cache's); an "
                         "epoch is every stored view of every image. Empty: the online teacher over data.source")
    cache_verify: bool = opt(True, "data.cache: check every shard's sha256 before training (reads the whole cache "
                                   "once); false checks sizes only, so a flipped byte would go unnoticed")
    cache_on_corrupt: str = opt("skip", "data.cache: a damaged shard (missing, truncated, sha256 mismatch) is left "
                                        "out with a warning naming it (skip) or refuses the run (error); it is never "
                                        "trained on", choices=("skip", "error"))
    augment: bool = opt(False, "pretraining: random resized crop + horizontal flip of each image "
                               "(dreamteacher.data.RandomResizedCropFlip), drawn from the step's key (resumes "
                               "replay it); the same augmented image feeds the student and the teacher. With "
                               "data.cache the views were fixed when the cache was written (`cache-features "
                               "--augment`): true then requires a cache augmented with the same data.crop_scale / "
                               "crop_ratio / flip_prob, false takes its views as they are; nothing is drawn in "
                               "pretraining")
    crop_scale: list[float] = opt([0.2, 1.0], "data.augment: range of the crop's area, as a fraction of the image")
    crop_ratio: list[float] = opt([0.75, 1.3333333333333333], "data.augment: range of the crop's aspect ratio "
                                                             "(width / height, drawn log-uniformly)")
    flip_prob: float = opt(0.5, "data.augment: probability of a horizontal flip", minimum=0.0)
    share_targets: str = opt("", "a directory where runs that differ only on the student's side (losses, label "
                                 "distillation, optimizer) and run at the same time split the teacher's work: run "
                                 "data.share_index of data.share_count computes the targets (images and teacher "
                                 "features) of every share_count-th micro-batch and writes them there; the others "
                                 "read them. Exact: a run shares only with runs of the same teacher, data, seed, "
                                 "batch, student strides and thread count, so it trains on the targets it would "
                                 "compute itself (dreamteacher.model.SharedTargets). Empty: every run computes its own")
    share_index: int = opt(0, "data.share_targets: this run's index among the sharing runs", minimum=0)
    share_count: int = opt(1, "data.share_targets: how many runs share (1: none)", minimum=1)
    share_wait: float = opt(120.0, "data.share_targets: seconds to wait for another run's targets before computing "
                                   "them here and every later one too (a partner that died or never started)",
                            minimum=0.0, exclusive=True)


@dataclass
class RunConfig:
    steps: int = opt(1000, "optimizer steps", minimum=1)
    batch_size: int = opt(32, "images per micro-batch per process", minimum=1)
    accumulation: int = opt(1, "micro-batches per optimizer step (gradients synced on the last one only)",
                            minimum=1)
    clip_grad: float = opt(1.0, "max global gradient norm (0 disables clipping)", minimum=0.0)
    compile: bool = opt(False, "torch.compile the trainable module (student + regressor)")
    amp: str = opt("auto", "autocast of the trainable module's forward: bf16, fp16 (with a gradient scaler, saved in "
                           "checkpoints) or off (float32); auto: bf16 on GPU and on CPUs that multiply bfloat16 "
                           "natively (avx512_bf16 / amx_bf16, where it measured faster), else off "
                           "(dreamteacher.runtime.CPU_AUTO_AMP)",
                   choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool | None = opt(None, "channels_last memory format for the models and images; null (auto): on "
                                           "GPU only (on a small CPU NCHW steps were faster at the demo's size; "
                                           "benchmarks/README.md)")
    single_pixel_linear: bool | None = opt(None, "run the trainable module's convolutions that see 1x1 maps as the "
                                                 "equivalent matrix product (dreamteacher.perf.SinglePixelConv2d; "
                                                 "exact); null (auto): on CPU, where oneDNN's weight gradient for "
                                                 "them is slow (benchmarks/README.md)")
    keep_freed_memory: bool = opt(True, "CPU: make glibc malloc keep freed memory for reuse instead of returning it "
                                        "to the kernel, which otherwise page-faults it back in every step "
                                        "(dreamteacher.perf)")
    ema_decay: float = opt(0.0, "decay of an exponential moving average of the student's weights, updated after "
                                "every optimizer step (warm-up: min(decay, (1 + t) / (10 + t))), saved in checkpoints "
                                "and written as backbone_ema.pth (`dreamteacher export --ema`); 0: off", minimum=0.0)
    tensorboard: bool = opt(False, "also write the logged scalars (loss, per-level mse and at, ld, lr, images/s) "
                                   "as TensorBoard events in run.out_dir/tensorboard (rank 0; needs the tensorboard "
                                   "package: pip install 'dtkernels[tensorboard]'); log.jsonl is written either way")
    log_every: int = opt(10, "steps between logged losses (the only steps that sync with .item())", minimum=1)
    ckpt_every: int = opt(500, "steps between checkpoints (one is always written at the end)", minimum=1)
    keep_checkpoints: int = opt(0, "besides checkpoints/last.pt, keep the newest N checkpoints as "
                                   "checkpoints/stepNNNNNNNN.pt (hard links of last.pt when written; older ones are "
                                   "deleted); 0: last.pt only", minimum=0)
    out_dir: str = opt("runs/pretrain", "output directory: config, logs, checkpoints, exported backbone")
    seed: int = opt(0, "seed of the model init, the data order and the teacher noise")
    device: str = opt("auto", "torch device (auto: cuda when available, else cpu; under torchrun: cuda:LOCAL_RANK)")
    progress: bool = opt(True, "show a progress bar (rank 0)")
    max_minutes: float = opt(0.0, "stop (with a checkpoint) after this many minutes of training; 0: no limit",
                             minimum=0.0)
    naive: bool = opt(False, "the naive loop, for speed comparisons: the losses in eager PyTorch as a user writes "
                             "them (dreamteacher.losses, same values), torch.optim.AdamW's default implementation, "
                             "the full teacher forward (no early exit), no malloc tuning, no 1x1-convolution rewrite")


@dataclass
class LabelConfig:
    interpreter: str = opt("", "label distillation: interpreter file from `dreamteacher train-interpreter` (its soft "
                               "labels train a logit head on the finest regressor level); empty: feature distillation "
                               "only")
    weight: float = opt(1.0, "lambda_ld: weight of the soft-label term (L_mix = L_feat + weight * L_ld)", minimum=0.0)
    tau: float = opt(4.0, "softmax temperature of the soft-label cross-entropy (4 in the paper)", minimum=0.0,
                     exclusive=True)


#: ``ssl.method`` values that pretrain a self-supervised baseline instead of distilling a teacher
#: (:mod:`dreamteacher.baselines`).
BASELINE_METHODS = ("simclr", "moco", "byol", "densecl")


@dataclass
class SSLConfig:
    method: str = opt("dreamteacher", "pretraining objective. dreamteacher: distil the teacher (teacher.*, loss.*). "
                                      "simclr, moco (MoCo-v2), byol, densecl: a self-supervised baseline from the "
                                      "lightly package trained by the same loop on the same student, data, "
                                      "optimizer, schedule, steps and batch; no teacher is built, each image gives "
                                      "the method's two augmented views (docs/baselines.md; needs the baselines "
                                      "extra)", choices=("dreamteacher", *BASELINE_METHODS))
    temperature: float | None = opt(None, "simclr, moco, densecl: temperature of the contrastive (NT-Xent) loss; "
                                          "null: the method's (simclr 0.5, moco and densecl 0.2)",
                                    minimum=0.0, exclusive=True)
    momentum: float | None = opt(None, "moco, byol, densecl: momentum of the key (target) encoder, a moving "
                                       "average of the trained one updated before every step; byol raises it to 1 "
                                       "along a cosine over run.steps. null: the method's (moco and densecl 0.999, "
                                       "byol 0.996)", minimum=0.0)
    memory_bank: int = opt(4096, "moco, densecl: negatives kept from past steps' keys (a queue, saved in "
                                 "checkpoints; the papers keep 65536 on ImageNet); 0: the batch's other images only",
                           minimum=0)
    dense_weight: float = opt(0.5, "densecl: weight of the dense term, loss = (1 - w) * global + w * dense (0.5 in "
                                   "the paper)", minimum=0.0)
    dense_stride: int = opt(0, "densecl: the student stride (one of model.reductions) whose map the dense head "
                               "reads; 0: the coarsest whose map at data.image_size is at least 7x7, the papers' "
                               "224 / 32 (stride 32 at 224, stride 4 at 32x32)", minimum=0)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(PretrainConfig))


# ------------------------------------------------------------------------------------------------ type checks
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, *, from_text: bool) -> Any:
    """Check ``value`` against ``tp``; strings from the command line are converted. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if from_text and isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, from_text=from_text)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip().strip("[]")
            value = [v.strip() for v in text.split(",")] if text else []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", from_text=from_text) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool (true or false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str) and (from_text or _looks_like_float(value)):
            # YAML 1.1 reads '1e-3' as a string; accept it as the number it obviously is.
            try:
                value = float(value)
            except ValueError as e:
                raise ConfigError(f"{key}: expected a float, got {value!r}") from e
        else:
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a str, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _set(section: Any, section_name: str, name: str, value: Any, *, from_text: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    key = f"{section_name}.{name}"
    if name not in fields:
        raise ConfigError(f"{key}: unknown key; {section_name} has {', '.join(sorted(fields))}")
    f = fields[name]
    tp = typing.get_type_hints(type(section))[name]
    value = _coerce(value, tp, key, from_text=from_text)
    choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join('null' if c is None else str(c) for c in choices)}, "
                          f"got {value!r}")
    if minimum is not None and value is not None:
        bad = value <= minimum if f.metadata.get("exclusive") else value < minimum
        if bad:
            raise ConfigError(f"{key}: expected a value {'>' if f.metadata.get('exclusive') else '>='} {minimum}, "
                              f"got {value!r}")
    setattr(section, name, value)


def _validate(cfg: PretrainConfig) -> PretrainConfig:
    """Cross-field checks."""
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.loss.level_weights is not None and len(cfg.loss.level_weights) != len(cfg.model.reductions):
        raise ConfigError(f"loss.level_weights: expected {len(cfg.model.reductions)} weights (one per level in "
                          f"model.reductions), got {len(cfg.loss.level_weights)}")
    if cfg.teacher.taps is not None and len(cfg.teacher.taps) != len(cfg.model.reductions):
        raise ConfigError(f"teacher.taps: expected {len(cfg.model.reductions)} module names (one per level in "
                          f"model.reductions), got {len(cfg.teacher.taps)}")
    if not cfg.model.reductions:
        raise ConfigError("model.reductions: expected at least one stride")
    for key, values in (("model.reductions", cfg.model.reductions), ("model.pool_sizes", cfg.model.pool_sizes)):
        if any(v < 1 for v in values):
            raise ConfigError(f"{key}: expected positive integers, got {values}")
    if cfg.loss.level_weights is not None and any(w < 0 for w in cfg.loss.level_weights):
        raise ConfigError(f"loss.level_weights: expected non-negative weights, got {cfg.loss.level_weights}")
    lo, hi = (cfg.data.crop_scale + [0.0, 0.0])[:2]
    if len(cfg.data.crop_scale) != 2 or not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"data.crop_scale: expected two area fractions 0 < min <= max <= 1, got "
                          f"{cfg.data.crop_scale}")
    lo, hi = (cfg.data.crop_ratio + [0.0, 0.0])[:2]
    if len(cfg.data.crop_ratio) != 2 or not 0.0 < lo <= hi:
        raise ConfigError(f"data.crop_ratio: expected two aspect ratios 0 < min <= max, got {cfg.data.crop_ratio}")
    if cfg.run.ema_decay >= 1.0:
        raise ConfigError(f"run.ema_decay: expected a decay in [0, 1) (0: off), got {cfg.run.ema_decay}")
    if cfg.data.flip_prob > 1.0:
        raise ConfigError(f"data.flip_prob: expected a probability in [0, 1], got {cfg.data.flip_prob}")
    if cfg.data.share_index >= cfg.data.share_count:
        raise ConfigError(f"data.share_index: expected an index below data.share_count={cfg.data.share_count}, got "
                          f"{cfg.data.share_index}")
    if cfg.data.share_targets and cfg.data.cache:
        raise ConfigError(f"data.share_targets: the targets of data.cache ({cfg.data.cache!r}) are read from disk, "
                          "there is no teacher work to share; drop one of them")
    if cfg.teacher.kind == "generator":
        if cfg.data.augment:
            raise ConfigError("data.augment: teacher.kind=generator distils the generator's features of the very "
                              "images it made (a crop would no longer match them); drop data.augment")
        if not cfg.teacher.generator:
            raise ConfigError("teacher.generator: teacher.kind=generator needs the generator: "
                              "--teacher.generator=MODULE:FACTORY or a TorchScript file")
        if cfg.teacher.path:
            raise ConfigError(f"teacher.path: teacher.kind=generator reads teacher.generator, not a diffusers "
                              f"directory ({cfg.teacher.path!r}); drop teacher.path or use teacher.kind=diffusion")
        if cfg.data.source != "procedural":
            raise ConfigError(f"data.source: teacher.kind=generator trains on the images the generator synthesizes, "
                              f"not on data.source ({cfg.data.source!r}); drop data.source")
        if cfg.label.interpreter:
            raise ConfigError("label.interpreter: label distillation reads a diffusion teacher's features; it needs "
                              "teacher.kind=diffusion")
        if cfg.data.cache:
            raise ConfigError(f"data.cache: teacher.kind=generator synthesizes every batch afresh; a feature cache "
                              f"({cfg.data.cache!r}) holds a diffusion teacher's features of stored images; drop "
                              "data.cache or use teacher.kind=diffusion")
    elif cfg.teacher.generator:
        raise ConfigError(f"teacher.generator: set with teacher.kind=diffusion ({cfg.teacher.generator!r}); add "
                          "--teacher.kind=generator or drop teacher.generator")
    if cfg.ssl.method != "dreamteacher":
        _validate_baseline(cfg)
    if cfg.teacher.conditioning == "zeros" and cfg.teacher.text_embedding:
        raise ConfigError("teacher.conditioning: zeros excludes teacher.text_embedding "
                          f"({cfg.teacher.text_embedding!r}); set one of them")
    return cfg


def _validate_baseline(cfg: PretrainConfig) -> None:
    """A self-supervised baseline (ssl.method) builds no teacher and makes its own views: refuse what needs either."""
    method, ssl = cfg.ssl.method, cfg.ssl
    no_teacher = [("label.interpreter", cfg.label.interpreter, "label distillation reads the teacher's features"),
                  ("data.cache", cfg.data.cache, "a feature cache holds a teacher's features"),
                  ("data.share_targets", cfg.data.share_targets, "there are no teacher targets to share"),
                  ("teacher.kind", cfg.teacher.kind == "generator", "a generator teacher makes the images"),
                  ("data.augment", cfg.data.augment, "the method's own views already crop and flip")]
    for key, given, why in no_teacher:
        if given:
            raise ConfigError(f"{key}: ssl.method={method} pretrains without a teacher ({why}); drop {key} or use "
                              "ssl.method=dreamteacher")
    if ssl.momentum is not None and ssl.momentum >= 1.0:
        raise ConfigError(f"ssl.momentum: expected a momentum in [0, 1), got {ssl.momentum}")
    if ssl.dense_weight > 1.0:
        raise ConfigError(f"ssl.dense_weight: expected a weight in [0, 1], got {ssl.dense_weight}")
    if ssl.dense_stride and ssl.dense_stride not in cfg.model.reductions:
        raise ConfigError(f"ssl.dense_stride: expected 0 or one of model.reductions "
                          f"({', '.join(map(str, cfg.model.reductions))}), got {ssl.dense_stride}")


# ------------------------------------------------------------------------------------------------ load / override
def config_from_dict(data: Mapping[str, Any], base: PretrainConfig | None = None) -> PretrainConfig:
    """A config from nested ``{section: {key: value}}`` data (e.g. parsed YAML), checked key by key."""
    cfg = _copy(base) if base is not None else PretrainConfig()
    return _validate(config_from_dict_inplace(cfg, data))


def _copy(cfg: PretrainConfig) -> PretrainConfig:
    return PretrainConfig(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})


def config_from_dict_inplace(cfg: PretrainConfig, data: Mapping[str, Any]) -> PretrainConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section_name, values in data.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"{section_name}: unknown section; expected one of {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section_name}: expected a mapping of keys, got {values!r}")
        for name, value in values.items():
            _set(getattr(cfg, section_name), section_name, str(name), value, from_text=False)
    return cfg


def _resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"{key}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        return section, name.replace("-", "_")
    name = key.replace("-", "_")
    owners = [s for s in SECTIONS if name in {f.name for f in dataclasses.fields(getattr(PretrainConfig(), s))}]
    if not owners:
        raise ConfigError(f"{key}: unknown key (see --help for every section.key)")
    if len(owners) > 1:
        raise ConfigError(f"{key}: ambiguous key, write one of {', '.join(f'{s}.{name}' for s in owners)}")
    return owners[0], name


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """Apply ``--section.key=value`` / ``--key=value`` (also ``--key value``) strings to a copy of ``cfg``."""
    cfg = _copy(cfg)
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"{item}: expected an override --section.key=value")
        body = item[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = body, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"{item}: expected a value (--{body}=VALUE)")
        section, name = _resolve_key(key)
        _set(getattr(cfg, section), section, name, value, from_text=True)
        i += 1
    return _validate(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: PretrainConfig | None = None) -> PretrainConfig:
    """Defaults (or ``base``), then the YAML file at ``path``, then the overrides."""
    cfg = _copy(base) if base is not None else PretrainConfig()
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ConfigError(f"--config: {path}: no such file (expected a YAML config file)")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config: {path}: cannot be read ({e})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path}: not valid YAML ({e})") from e
        cfg = config_from_dict(data, cfg)
    return apply_overrides(cfg, overrides)


def config_to_dict(cfg: PretrainConfig) -> dict[str, dict[str, Any]]:
    """Plain nested data (YAML/JSON-able)."""
    return dataclasses.asdict(cfg)


def describe_config(cfg: PretrainConfig | None = None) -> str:
    """Every ``section.key`` with its type, default and help, for ``--help``."""
    cfg = cfg or PretrainConfig()
    lines = []
    for s in SECTIONS:
        section = getattr(cfg, s)
        lines.append(f"{s}:")
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            lines.append(f"  --{s}.{f.name}={'null' if value is None else value}  ({_type_name(hints[f.name])}) "
                         f"{f.metadata.get('help', '')}")
    return "\n".join(lines)
