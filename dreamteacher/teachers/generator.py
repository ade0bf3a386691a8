"""GAN-style generators as teachers (the paper's synthesized-data setting): an importable factory or a
TorchScript file, its images and its own features read through feature taps."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import UserError, UserPathError
from .taps import FeatureTaps, _first_tensor, state_fingerprint

logger = logging.getLogger("dreamteacher")

__all__ = ["GeneratorTeacher", "ScriptedGenerator", "load_generator"]


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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the generated images (from a dry run)."""
        if self._image_size is None:
            self._dry_run()
        return self._image_size

    def identity(self) -> dict:
        """What makes two generator teachers give the same features: the module's class and a hash of its weights."""
        name = getattr(self.generator, "original_name", None) or type(self.generator).__name__
        return {"class": type(self).__name__, "generator_class": name, "latent_dim": self.latent_dim,
                "fingerprint": state_fingerprint(self.generator, {"class": name, "latent_dim": self.latent_dim})}

    @torch.inference_mode()
    def _dry_run(self) -> None:
        z = torch.zeros(1, self.latent_dim, device=self.device, dtype=self.dtype)
        images, native = self.taps.run(lambda: _first_tensor(self.generator(z)), image_size=None)
        self._image_size = (int(images.shape[-2]), int(images.shape[-1]))
        self._feature_info = []
        for name, feat in zip(self.taps.last_order, native):  # call order, as the features come
            stride = self.taps._stride_of.get(name)
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
                            device=generator.device if generator is not None else "cpu")
        elif z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z: expected [B, {self.latent_dim}], got {tuple(z.shape)}")
        z = z.to(device=self.device, dtype=self.dtype)
        images, feats = self.taps.run(lambda: _first_tensor(self.generator(z)), image_size=self._image_size)
        return images, feats


class ScriptedGenerator(nn.Module):
    """A TorchScript generator as a module :class:`FeatureTaps` can tap.

    Forward hooks cannot be registered inside a loaded ``ScriptModule`` (its compiled forward calls its submodules
    directly), so a TorchScript generator hands its features out itself: its ``forward(z)`` returns
    ``(images, features)`` with ``features`` a ``Dict[str, Tensor]``. Each key becomes an identity submodule of this
    wrapper, called on its feature, so the tap names are the dict's keys.
    """

    def __init__(self, scripted: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.scripted = scripted
        self.names = list(names)
        for name in self.names:
            if not name.isidentifier() or name in ("scripted", "names") or hasattr(nn.Module, name):
                raise UserError(f"taps: {name!r} cannot name a TorchScript generator's feature (expected a Python "
                                "identifier other than scripted, names or an nn.Module attribute)")
            self.add_module(name, nn.Identity())
        self.latent_dim = getattr(scripted, "latent_dim", None)
        self.tap_names = getattr(scripted, "tap_names", None)
        self.original_name = getattr(scripted, "original_name", type(scripted).__name__)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.scripted(z)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise UserError("generator: a TorchScript generator's forward(z) must return (images, "
                            f"Dict[str, Tensor] of features), got {type(out).__name__}")
        images, feats = out
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise UserError(f"taps: the TorchScript generator's features have no {missing} (it returns "
                            f"{sorted(feats)})")
        for name in self.names:
            self.get_submodule(name)(feats[name])
        return images


def _is_file_spec(spec: str) -> bool:
    return Path(spec).suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript") or os.sep in spec or Path(spec).exists()


def load_generator(spec: str, option: str = "generator", *, taps: Sequence[str] | None = None
                   ) -> tuple[nn.Module, list[str] | None, int | None]:
    """The generator of ``teacher.kind=generator``: ``(module, default tap names or None, latent_dim or None)``.

    ``spec`` is one of:

    * ``MODULE:FACTORY`` -- ``importlib.import_module(MODULE).FACTORY()`` must return an ``nn.Module`` whose
      ``forward(z [B, latent_dim])`` returns images ``[B, 3, H, W]`` in ``[-1, 1]`` (or a tuple starting with them).
      Its features are read by forward hooks on submodules named by their dotted names (``model.get_submodule``).
      Optional attributes: ``latent_dim`` (int; else ``teacher.latent_dim``) and ``tap_names`` (one module name
      per student level, fine to coarse; else ``teacher.taps``). Importing runs the module's code: name only code
      you trust, as with any import.
    * a TorchScript file (``torch.jit.save``), read by ``torch.jit.load``: its pickled constants go through the C++
      unpickler, which builds tensors and plain values only (an unknown global is refused, no Python object is made
      and nothing is imported); loading runs the archive's TorchScript ``__setstate__`` methods if it has any, and
      the teacher runs its TorchScript ``forward``, which can call torch operators but never Python.
      ``forward(z)`` must return ``(images, Dict[str, Tensor])``; the tap names are the dict's keys
      (:class:`ScriptedGenerator`); ``latent_dim`` and ``tap_names`` attributes are read as above.

    Every refusal is a :class:`UserError` naming ``option``.
    """
    if not isinstance(spec, str) or not spec:
        raise UserError(f"{option}: expected MODULE:FACTORY or a TorchScript file, got {spec!r}")
    if _is_file_spec(spec):
        path = Path(spec)
        if not path.is_file():
            raise UserPathError(f"{option}: {spec!r} is not a file (expected a TorchScript file written by "
                                "torch.jit.save, or MODULE:FACTORY)")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            try:
                scripted = torch.jit.load(str(path), map_location="cpu")
            except (RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise UserError(f"{option}: {spec} is not a loadable TorchScript archive ({first}); write it with "
                                "torch.jit.save(torch.jit.script(generator), PATH)") from e
        names = list(taps) if taps is not None else getattr(scripted, "tap_names", None)
        if names is None:
            raise UserError(f"teacher.taps: the TorchScript generator {spec} has no tap_names attribute; name its "
                            "feature keys with --teacher.taps=KEY,...")
        module = ScriptedGenerator(scripted, names)
    else:
        mod_name, sep, attr = spec.partition(":")
        if not sep or not mod_name or not attr or not all(p.isidentifier() for p in mod_name.split(".")) \
                or not all(p.isidentifier() for p in attr.split(".")):
            raise UserError(f"{option}: {spec!r} is neither MODULE:FACTORY (e.g. mypackage.gan:build) nor an "
                            "existing TorchScript file")
        import importlib

        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"{option}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?") from e
        factory: Any = mod
        try:
            for part in attr.split("."):
                factory = getattr(factory, part)
        except AttributeError as e:
            raise UserError(f"{option}: module {mod_name!r} has no {attr!r}") from e
        if not callable(factory):
            raise UserError(f"{option}: {spec} is a {type(factory).__name__}, expected a function returning an "
                            "nn.Module")
        import inspect

        try:
            inspect.signature(factory).bind()
        except TypeError as e:
            raise UserError(f"{option}: {spec} cannot be called without arguments ({e}); point at a factory that "
                            "takes none (wrap yours: def build(): return make_generator(...))") from e
        except ValueError:  # no signature to inspect (a builtin): let the call tell
            pass
        module = factory()  # the user's own code: its errors keep their traceback
        if not isinstance(module, nn.Module):
            raise UserError(f"{option}: {spec}() returned a {type(module).__name__}, expected an nn.Module")
        if isinstance(module, torch.jit.ScriptModule):
            names = list(taps) if taps is not None else getattr(module, "tap_names", None)
            if names is None:
                raise UserError(f"teacher.taps: the TorchScript generator from {spec} has no tap_names attribute; "
                                "name its feature keys with --teacher.taps=KEY,...")
            module = ScriptedGenerator(module, names)
    tap_names = getattr(module, "tap_names", None)
    if tap_names is not None:
        if isinstance(tap_names, str) or not all(isinstance(n, str) for n in tap_names):
            raise UserError(f"{option}: the generator's tap_names must be a list of module names, got {tap_names!r}")
        tap_names = list(tap_names)
    latent_dim = getattr(module, "latent_dim", None)
    if latent_dim is not None and (isinstance(latent_dim, bool) or not isinstance(latent_dim, int)
                                   or latent_dim < 1):
        raise UserError(f"{option}: the generator's latent_dim must be a positive int, got {latent_dim!r}")
    return module, tap_names, latent_dim
