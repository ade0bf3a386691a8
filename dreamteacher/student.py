"""Student backbones: timm ``features_only`` models at strides 4, 8, 16, 32, and their export in timm's own names.

timm's ``features_only`` wrappers rename weights (``FeatureListNet`` flattens ``stem.0`` into ``stem_0``, a getter
wrapper prefixes ``model.``), so the student's ``state_dict`` does not load into ``timm.create_model(name)``.
:meth:`StudentBackbone.timm_key_map` maps every student key to the name the same tensor has in the full timm model,
found by identity (see its docstring), never by per-family rules. The export (:meth:`StudentBackbone.export_state_dict`)
uses the model's own names; it loads strictly into the model :func:`exported_model` builds (the full model with
``num_classes=0``, pruned after the last level the student uses by timm's ``prune_intermediate_layers``) and, with
``strict=False``, into the model with its default head.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("dreamteacher")

#: The strides DreamTeacher distills at (C2-C5 of a ResNet).
DEFAULT_REDUCTIONS = (4, 8, 16, 32)
#: ``format`` in an exported file's metadata.
EXPORT_FORMAT = "dreamteacher.backbone"
#: (name, out_indices, create kwargs) -> (features_only key -> timm key, the full model's keys).
_KEY_MAPS: dict[tuple, tuple[dict[str, str], frozenset[str]]] = {}


def _recording(wrapper: type) -> type:
    """A subclass of a timm feature wrapper class that keeps the state_dict (tensors, not copies) of the full model
    it wraps."""

    class Recording(wrapper):
        def __init__(self, model: nn.Module, **kwargs) -> None:
            # taken before wrapping: some wrappers prune the model or reset its classifier
            state = model.state_dict(keep_vars=True)
            super().__init__(model, **kwargs)
            object.__setattr__(self, "wrapped_state", state)  # not a submodule: its keys stay the wrapper's

    return Recording


def _shorten(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    return f"{keys[:n]}{'...' if len(keys) > n else ''}"


def exported_model(name: str, out_indices: Sequence[int], **kwargs) -> nn.Module:
    """The timm model an export loads into strictly: ``timm.create_model(name, pretrained=False, num_classes=0)``
    with the layers after the last used level (final norm, head convolutions, classifier; never trained by
    distillation) removed by ``prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)``.

    Its ``forward_intermediates(x, indices=list(out_indices), intermediates_only=True)`` returns the student's maps.

    Args:
        name: timm model name.
        out_indices: the student's feature levels (``StudentBackbone.out_indices``).
        **kwargs: passed to ``timm.create_model``.
    """
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if not hasattr(model, "prune_intermediate_layers"):
        raise ValueError(f"student: timm {name!r} has no prune_intermediate_layers, so no timm model with exactly the "
                         "student's layers exists to export to")
    model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
    return model


def loading_recipe(name: str, out_indices: Sequence[int], path: str = "backbone.safetensors",
                   kwargs: Mapping[str, Any] | None = None) -> str:
    """Python that loads an export strictly into plain timm and computes the student's feature maps."""
    extra = "".join(f", {k}={v!r}" for k, v in (kwargs or {}).items())
    idx = list(out_indices)
    read = (f"load_file({path!r})" if str(path).endswith(".safetensors")
            else f"torch.load({path!r}, weights_only=True)")
    head = "from safetensors.torch import load_file\n" if str(path).endswith(".safetensors") else "import torch\n"
    return (f"import timm\n{head}"
            f"model = timm.create_model({name!r}, pretrained=False, num_classes=0{extra})\n"
            f"model.prune_intermediate_layers({idx}, prune_norm=True, prune_head=True)\n"
            f"model.load_state_dict({read})  # strict\n"
            f"feats = model.forward_intermediates(x, indices={idx}, intermediates_only=True)")


class StudentBackbone(nn.Module):
    """A timm backbone that returns its feature maps at the requested reductions.

    Args:
        name: any timm model name with ``features_only`` support (``resnet18``, ``resnet50``, ``convnext_tiny``...)
            and feature levels at several strides (CNNs, hierarchical models); plain ViTs, whose levels all have one
            stride, are refused.
        pretrained: load timm's pretrained weights (needs the model hub; off by default, DreamTeacher starts from
            scratch).
        reductions: output strides to keep, each must be one of the model's feature levels.
        **kwargs: passed to ``timm.create_model``.

    Attributes:
        feature_info: list of ``{"num_chs", "reduction", "module"}`` per returned level, the contract with the
            regressor.
        out_indices: timm ``features_only`` indices of the returned levels.
    """

    def __init__(self, name: str = "resnet50", *, pretrained: bool = False,
                 reductions: tuple[int, ...] = DEFAULT_REDUCTIONS, **kwargs) -> None:
        super().__init__()
        import timm

        probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        available = list(probe.feature_info.reduction())
        fmt = str(getattr(getattr(probe, "output_fmt", "NCHW"), "value", "NCHW"))
        del probe
        if len(set(available)) == 1:
            raise ValueError(f"student: {name!r} is a plain ViT-style model, its features_only levels are all at "
                             f"stride {available[0]}; plain ViTs (one stride) are not supported, DreamTeacher "
                             f"distills a feature pyramid (strides {list(reductions)}): use a CNN or another "
                             "hierarchical backbone (resnet50, convnext_tiny, ...)")
        if fmt != "NCHW":
            raise ValueError(f"student: {name!r} returns {fmt} feature maps; only backbones with NCHW feature maps "
                             "(CNNs such as resnet50, convnext_tiny) are supported")
        missing = [r for r in reductions if r not in available]
        if missing:
            raise ValueError(f"reductions: {name} has feature levels at strides {available}, not {missing}")
        indices = tuple(available.index(r) for r in reductions)
        self.name = name
        self.out_indices = indices
        self.reductions = tuple(reductions)
        self.create_kwargs = dict(kwargs)
        self.body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=indices, **kwargs)
        self.feature_info = [
            {"num_chs": c, "reduction": r, "module": m}
            for c, r, m in zip(self.body.feature_info.channels(), self.body.feature_info.reduction(),
                               self.body.feature_info.module_name())
        ]
        self._key_map: dict[str, str] | None = None
        self._model_keys: frozenset[str] | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> one ``[B, C_l, H / r_l, W / r_l]`` map per level."""
        return list(self.body(x))

    # -------------------------------------------------------------------------------------------- timm names
    def timm_key_map(self) -> dict[str, str]:
        """``self.body.state_dict()`` key -> the key of the same tensor in ``timm.create_model(name)``.

        timm builds most ``features_only`` models by wrapping the full model (``FeatureListNet`` & co.), whose
        modules become the wrapper's: the same builder is run once more with a subclass of the student's wrapper
        class that keeps the wrapped model, and keys are matched by tensor identity, exact by construction. Families
        with their own features class (``EfficientNetFeatures``, ``MobileNetV3Features``...) are built to load the
        full model's checkpoints by name, so their keys already are the model's; checked against the model's keys
        and shapes either way.

        Raises:
            ValueError: when some student weight has no counterpart in the full model.
        """
        if self._key_map is None:
            cache_key = (self.name, self.out_indices, json.dumps(self.create_kwargs, sort_keys=True, default=repr))
            if cache_key not in _KEY_MAPS:  # the same for every instance of an architecture
                _KEY_MAPS[cache_key] = self._build_key_map()
            self._key_map, self._model_keys = _KEY_MAPS[cache_key]
        return dict(self._key_map)

    def _build_key_map(self) -> tuple[dict[str, str], frozenset[str]]:
        # the models built here must not consume the caller's random numbers (evaluation seeds its runs)
        with torch.random.fork_rng(devices=[]):
            return self._build_key_map_unseeded()

    def _build_key_map_unseeded(self) -> tuple[dict[str, str], frozenset[str]]:
        import timm
        from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet

        own = self.body.state_dict(keep_vars=True)
        if isinstance(self.body, (FeatureDictNet, FeatureHookNet, FeatureGetterNet)):
            twin = timm.create_model(self.name, pretrained=False, features_only=True, out_indices=self.out_indices,
                                     feature_cls=_recording(type(self.body)), **self.create_kwargs)
            full_sd = twin.wrapped_state
            names: dict[int, str] = {}
            for k, t in full_sd.items():
                names.setdefault(id(t), k)
            twin_sd = twin.state_dict(keep_vars=True)
            if list(twin_sd) != list(own):
                raise ValueError(f"student: rebuilding timm {self.name!r} gave other features_only keys "
                                 f"({_shorten(sorted(set(twin_sd) ^ set(own)))}); cannot map them to its own names")
            key_map = {k: names.get(id(twin_sd[k]), "") for k in own}
        else:
            full_sd = timm.create_model(self.name, pretrained=False, **self.create_kwargs).state_dict()
            key_map = {k: k for k in own}
        bad = [k for k, v in key_map.items() if v not in full_sd or full_sd[v].shape != own[k].shape]
        if bad or len(set(key_map.values())) != len(key_map):
            raise ValueError(f"student: timm {self.name!r} features_only weights {_shorten(bad)} have no counterpart "
                             "in timm.create_model's own names; this model cannot be exported")
        return key_map, frozenset(full_sd)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights (CPU, detached) keyed by ``timm.create_model(name)``'s own names: the levels up to
        the last one in ``reductions``, nothing after it (see :func:`exported_model`)."""
        key_map = self.timm_key_map()
        return {key_map[k]: v.detach().cpu().contiguous() for k, v in self.body.state_dict().items()}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Same as :meth:`export_state_dict` (timm's own names)."""
        return self.export_state_dict()

    def export_metadata(self) -> dict[str, str]:
        """String metadata of an exported file: format, timm model name, levels, timm version."""
        import timm

        return {"format": EXPORT_FORMAT, "timm_model": self.name, "out_indices": json.dumps(list(self.out_indices)),
                "reductions": json.dumps(list(self.reductions)), "timm_version": timm.__version__,
                "create_kwargs": json.dumps(self.create_kwargs)}

    def load_exported_state_dict(self, state: Mapping[str, torch.Tensor], *, source: str = "state_dict") -> None:
        """Load weights keyed by timm's own names (an export) into :attr:`body`, strictly.

        Every backbone tensor must be present with its shape. Keys of the full timm model's layers after the
        student's last level (classifier, head norm, ...: a head-ful timm checkpoint) are ignored; any other key is
        an error.

        Args:
            state: ``{timm name: tensor}``.
            source: how errors name where ``state`` came from (a path).

        Raises:
            ValueError: listing missing, unexpected and mis-shaped keys.
        """
        key_map = self.timm_key_map()
        assert self._model_keys is not None
        inverse = {v: k for k, v in key_map.items()}
        own = self.body.state_dict()
        missing = [v for v in inverse if v not in state]
        extra = [k for k in state if k not in inverse]
        unexpected = [k for k in extra if k not in self._model_keys]
        if missing or unexpected:
            hint = ""
            if missing and set(own) <= set(state) and set(own) != set(inverse):
                hint = " (the keys are timm's features_only names: export it again with `dreamteacher export`)"
            raise ValueError(f"{source} does not match timm {self.name!r}: {len(missing)} missing keys "
                             f"{_shorten(sorted(missing))}, {len(unexpected)} unexpected keys "
                             f"{_shorten(sorted(unexpected))} (levels at out_indices {list(self.out_indices)}){hint}")
        wrong = [k for k, b in inverse.items() if tuple(state[k].shape) != tuple(own[b].shape)]
        if wrong:
            raise ValueError(f"{source}: shape mismatch for {_shorten(wrong)} (e.g. {wrong[0]}: "
                             f"{tuple(state[wrong[0]].shape)}, model {tuple(own[inverse[wrong[0]]].shape)})")
        if extra:
            logger.info("%s: ignored %d tensors of layers after the last feature level (%s)", source, len(extra),
                        _shorten(extra, 3))
        self.body.load_state_dict({b: state[k] for k, b in inverse.items()}, strict=True)

    def check_export(self, state: Mapping[str, torch.Tensor], *, check_features: bool = True) -> dict[str, Any]:
        """Load ``state`` into plain timm models as the recipes do and refuse anything short of a full load.

        1. with ``strict=False`` into ``timm.create_model(name, pretrained=False)`` (default head): every tensor of
           ``state`` must be loaded (weights under other names would load nothing, silently);
        2. strictly into :func:`exported_model` (``num_classes=0``, pruned after the last level) and, with
           ``check_features``, its ``forward_intermediates`` against this student's maps, bitwise in eval mode on
           the student's device (one random 64x64 image, or one at the model's default input size if it needs it).

        The models are built without consuming the global random number generator.

        Returns:
            ``{"tensors", "headful_loaded", "headful_total", "headful_missing"}``: the head-ful model's count of
            loaded tensors, of its own tensors, and the keys it keeps at timm's initialisation (head, layers after
            the last level).

        Raises:
            ValueError: when either load falls short (the export must then not be written).
        """
        import timm

        with torch.random.fork_rng(devices=[]):  # leave the caller's random numbers alone
            headful = timm.create_model(self.name, pretrained=False, **self.create_kwargs)
            strict_model = exported_model(self.name, self.out_indices, **self.create_kwargs)
        try:
            missing, unexpected = headful.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            raise ValueError(f"export: timm {self.name!r} rejects the export: {str(e)[:600]}") from e
        loaded = len(state) - len(unexpected)
        if unexpected or not state:
            raise ValueError(f"export: timm.create_model({self.name!r}).load_state_dict(sd, strict=False) would load "
                             f"only {loaded} of the {len(state)} backbone tensors (not in the model: "
                             f"{_shorten(unexpected)}); not exported")
        missing_strict, unexpected_strict = strict_model.load_state_dict(state, strict=False)
        if missing_strict or unexpected_strict:
            raise ValueError(f"export: timm {self.name!r} (num_classes=0, pruned after out_indices "
                             f"{list(self.out_indices)}) does not load the export strictly: {len(missing_strict)} "
                             f"missing keys {_shorten(missing_strict)}, {len(unexpected_strict)} unexpected keys "
                             f"{_shorten(unexpected_strict)}; not exported")
        if check_features:
            was_training = self.training
            self.eval()
            strict_model.to(next(self.parameters()).device).eval()  # same device, same kernels: bitwise
            try:
                ours, theirs = self._both_features(strict_model, (3, 64, 64))
            except (RuntimeError, AssertionError, ValueError):  # a model that needs its own input size
                size = tuple(getattr(strict_model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
                ours, theirs = self._both_features(strict_model, size)
            finally:
                self.train(was_training)
            same = len(ours) == len(theirs) and all(a.shape == b.shape and torch.equal(a, b)
                                                    for a, b in zip(ours, theirs))
            if not same:
                raise ValueError(f"export: timm {self.name!r} loaded with the export computes other features than the "
                                 f"student at out_indices {list(self.out_indices)}; not exported")
        return {"tensors": len(state), "headful_loaded": loaded, "headful_total": len(headful.state_dict()),
                "headful_missing": list(missing)}

    @torch.no_grad()
    def _both_features(self, model: nn.Module, size: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The student's maps and ``model.forward_intermediates``' at the same levels for one random image."""
        x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(next(self.parameters()).device)
        return self(x), model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
