"""Self-supervised baselines pretrained by :func:`dreamteacher.train.pretrain`'s own loop (``ssl.method``).

SimCLR, MoCo-v2, BYOL and DenseCL take their losses, heads, momentum update and augmentations from the ``lightly``
package; what is here is the wiring into the loop, so that a baseline row and a DreamTeacher row differ only in the
objective: the same student (:func:`~dreamteacher.model.build_student`), dataset and loader, optimizer, schedule,
autocast, steps and images per step, checkpoints, exact resume and export.

A baseline is two things the loop already knows how to hold:

* the **trainable module** (:class:`SSLModel`): ``student`` (the same :class:`~dreamteacher.student.StudentBackbone`,
  so export and the EMA read ``student.*`` as for DreamTeacher) + the method's heads; for MoCo, BYOL and DenseCL a
  frozen momentum copy of both (moved in :meth:`SSLModel.momentum_update` before every optimizer step) and for MoCo
  and DenseCL the loss's memory bank. Everything is in ``state_dict()``, so a checkpoint holds it and a resume
  continues bitwise.
* the **source** of the micro-batches (:class:`SSLViews`, in place of the teacher's targets): the method's lightly
  transform applied to every image, its random draws keyed by the step like ``data.augment``'s.

``lightly`` is imported here only, lazily (:func:`import_lightly`); ``import dreamteacher`` never needs it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import PretrainConfig, UserError

logger = logging.getLogger("dreamteacher")

__all__ = ["LIGHTLY_VERSION", "INSTALL_HINT", "import_lightly", "SSLViews", "SSLModel", "build_baseline",
           "dense_stride"]

#: The lightly release the baselines are written and tested against (its transforms' defaults are the recipes).
LIGHTLY_VERSION = "1.6.0"
#: lightly 1.6.0 declares pytorch_lightning and hydra-core as dependencies, but the modules used here import
#: neither, so the extra lists what they do import and lightly itself comes without its declared dependencies.
INSTALL_HINT = f"pip install 'dtkernels[baselines]' && pip install --no-deps lightly=={LIGHTLY_VERSION}"


def import_lightly() -> Any:
    """The ``lightly`` modules the baselines use (loss, heads, model utilities, transforms), or a :class:`UserError`
    naming the extra that installs them."""
    try:
        import lightly.loss
        import lightly.models.modules
        import lightly.models.utils
        import lightly.transforms
    except ImportError as e:
        raise UserError(f"ssl.method: the self-supervised baselines need the lightly package ({e}); install the "
                        f"baselines extra: {INSTALL_HINT} (docs/baselines.md)") from e
    return lightly


# ------------------------------------------------------------------------------------------------ views
@contextlib.contextmanager
def _draws_keyed_by(seed: int) -> Iterator[None]:
    """lightly's transforms draw from the global RNGs (torch's CPU generator in torchvision, numpy's in its blur and
    solarization): seed them with the step's key for the block and put them back after, so the views are a function
    of the key alone (a resumed run replays them) and the loop's own draws are untouched."""
    import numpy as np

    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays as it was
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class SSLViews:
    """The baselines' micro-batches: ``views(batch, seed=key) -> (views, None)``, the same call as the teacher's
    targets (:class:`~dreamteacher.model.OnlineTargets`), so the loop reads either.

    Each image of the batch (``[3, R, R]`` in ``[-1, 1]``) goes through ``transform`` (a lightly multi-view
    transform) as an 8-bit PIL image, the input lightly's transforms are written for: its solarization works on PIL
    images only, its blur converts to PIL anyway, and torchvision's PIL kernels were 4x faster than its tensor ones
    on 32 px images (2 ms per image for two views on one core). One image at a time: a batched torchvision
    transform would draw one crop for the whole batch. The views (float in ``[0, 1]``) come back in ``[-1, 1]``, the
    range DreamTeacher's student and ``dreamteacher evaluate`` feed the backbone, one ``[B, 3, R, R]`` tensor per
    view on the device. Made on the CPU, where the loader delivers the batch."""

    def __init__(self, transform: Any, device: torch.device, memory_format: torch.memory_format) -> None:
        self.transform, self.device, self.memory_format = transform, device, memory_format

    def __call__(self, batch: Any, *, seed: int) -> tuple[list[torch.Tensor], None]:
        from torchvision.transforms.v2.functional import to_pil_image

        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        pixels = ((images.detach().cpu().float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
        with _draws_keyed_by(seed):
            per_image = [self.transform(to_pil_image(image)) for image in pixels]
        views = [torch.stack([image_views[v] for image_views in per_image]) for v in range(len(per_image[0]))]
        return [(v * 2 - 1).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                for v in views], None


def view_transform(method: str, image_size: int, lightly: Any) -> Any:
    """The method's lightly transform (its defaults, the papers' ImageNet recipes) at ``image_size``. Below 64 px
    (CIFAR scale) two settings follow lightly's own advice for CIFAR-10 instead: no Gaussian blur (sigma up to 2 px
    wipes out a 32 px image; lightly's CIFAR-10 examples pass ``gaussian_blur=0.0``, SimCLR's CIFAR-10 setup drops
    it too) and, for SimCLR, colour jitter strength 0.5 (``SimCLRTransform``'s docstring: "for datasets with small
    images, such as CIFAR, it is recommended to set cj_strength to 0.5"). No normalization: the views stay in the
    loop's range."""
    t = lightly.transforms
    small = image_size < 64
    kw = dict(input_size=image_size, normalize=None, **({"gaussian_blur": 0.0} if small else {}))
    if method == "simclr":
        return t.SimCLRTransform(**kw, **({"cj_strength": 0.5} if small else {}))
    if method == "moco":
        return t.MoCoV2Transform(**kw)
    if method == "densecl":
        return t.DenseCLTransform(**kw)
    if method == "byol":
        return t.BYOLTransform(view_1_transform=t.BYOLView1Transform(**kw),
                               view_2_transform=t.BYOLView2Transform(**kw))
    raise ValueError(f"method: expected one of simclr, moco, byol, densecl, got {method!r}")


# ------------------------------------------------------------------------------------------------ models
def _persist_memory_bank(bank: nn.Module) -> None:
    """lightly registers a memory bank's queue and pointer as non-persistent buffers (left out of ``state_dict``):
    a resumed run would restart from a fresh random queue. Registered again as persistent, they are checkpointed
    and loaded like any weight."""
    for name in ("bank", "bank_ptr"):
        tensor = getattr(bank, name)
        delattr(bank, name)
        bank.register_buffer(name, tensor, persistent=True)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """The momentum encoder's half: a copy with no gradients, moved only by :meth:`SSLModel.momentum_update`."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _pool(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.mean(dim=(2, 3))


class SSLModel(nn.Module):
    """The trainable module of a baseline: ``student`` + the method's heads (+ momentum copies, memory banks).

    ``forward(views)`` (under the loop's autocast) returns what the loss needs; :meth:`loss` computes it in float32
    and returns ``(loss, parts)``, parts being the named terms the log records. ``momentum`` is ``(start, cosine)``:
    the key encoder's momentum and whether it rises to 1 along a cosine over the run (BYOL), or None (SimCLR)."""

    momentum: tuple[float, bool] | None = None

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self._pairs: list[tuple[nn.Module, nn.Module]] = []  # (trained module, its momentum copy)

    def _momentum_copy(self, module: nn.Module) -> nn.Module:
        twin = _frozen_copy(module)
        self._pairs.append((module, twin))
        return twin

    @torch.no_grad()
    def momentum_update(self, step: int, total: int) -> None:
        """Move the momentum copies towards the trained weights (lightly's ``update_momentum``) before optimizer
        step ``step`` (0-based) of ``total``: a function of the step, so a resumed run continues it exactly."""
        if self.momentum is None:
            return
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        start, cosine = self.momentum
        m = cosine_schedule(step, total, start, 1.0) if cosine else start
        for module, twin in self._pairs:
            update_momentum(module, twin, m)

    def loss(self, outputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class SimCLR(SSLModel):
    """SimCLR: a 2-layer MLP projection (lightly ``SimCLRProjectionHead``, hidden = the backbone's width, 128 out)
    on the pooled last level; NT-Xent (``NTXentLoss``) over the batch's two views, the other images' views as
    negatives."""

    def __init__(self, student: nn.Module, lightly: Any, settings: dict) -> None:
        super().__init__(student)
        width = student.feature_info[-1]["num_chs"]
        self.head = lightly.models.modules.SimCLRProjectionHead(width, width, 128)
        self.criterion = lightly.loss.NTXentLoss(temperature=settings["temperature"],
                                                 gather_distributed=settings["distributed"])

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.head(_pool(self.student(v)[-1])) for v in views]

    def loss(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z0, z1 = (z.float() for z in outputs)
        return self.criterion(z0, z1), {}


class MoCo(SSLModel):
    """MoCo-v2: queries from the trained encoder + MLP head (``MoCoProjectionHead``, 128 out), keys of the other view
    from its momentum copy; InfoNCE (``NTXentLoss`` with a memory bank: the queue of past keys are the negatives)."""

    def __init__(self, student: nn.Module, lightly: Any, settings: dict) -> None:
        super().__init__(student)
        width = student.feature_info[-1]["num_chs"]
        self.head = lightly.models.modules.MoCoProjectionHead(width, width, 128)
        self.momentum_student, self.momentum_head = self._momentum_copy(student), self._momentum_copy(self.head)
        self.momentum = (settings["momentum"], False)
        self.criterion = _contrastive(lightly, settings, 128)

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        query = self.head(_pool(self.student(views[0])[-1]))
        with torch.no_grad():
            key = self.momentum_head(_pool(self.momentum_student(views[1])[-1]))
        return [query, key]

    def loss(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, key = (z.float() for z in outputs)
        return self.criterion(query, key), {}


class BYOL(SSLModel):
    """BYOL: online encoder + projection (``BYOLProjectionHead``, 4096 hidden, 256 out) + prediction
    (``BYOLPredictionHead``); target = momentum copy of encoder + projection, its momentum rising from 0.996 to 1
    along a cosine; symmetric negative cosine similarity (``NegativeCosineSimilarity``) between each view's
    prediction and the other view's target projection."""

    def __init__(self, student: nn.Module, lightly: Any, settings: dict) -> None:
        super().__init__(student)
        width, heads = student.feature_info[-1]["num_chs"], lightly.models.modules
        self.projection = heads.BYOLProjectionHead(width, 4096, 256)
        self.prediction = heads.BYOLPredictionHead(256, 4096, 256)
        self.momentum_student = self._momentum_copy(student)
        self.momentum_projection = self._momentum_copy(self.projection)
        self.momentum = (settings["momentum"], True)
        self.criterion = lightly.loss.NegativeCosineSimilarity()

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        predictions = [self.prediction(self.projection(_pool(self.student(v)[-1]))) for v in views]
        with torch.no_grad():
            targets = [self.momentum_projection(_pool(self.momentum_student(v)[-1])) for v in views]
        return {"predictions": predictions, "targets": targets}

    def loss(self, outputs: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (p0, p1), (z0, z1) = ([t.float() for t in outputs[k]] for k in ("predictions", "targets"))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0)), {}


class DenseCL(SSLModel):
    """DenseCL: MoCo-v2's global branch plus a dense one. The dense head (``DenseCLProjectionHead``, a 1x1 MLP) maps
    every location of the student's map at ``dense_stride`` to a 128-d vector; each query location is matched to
    the key location whose backbone feature is most similar (``select_most_similar``), and the pairs enter NT-Xent
    with a memory bank of past dense keys. Loss ``(1 - w) * global + w * dense``."""

    def __init__(self, student: nn.Module, lightly: Any, settings: dict) -> None:
        super().__init__(student)
        heads, info = lightly.models.modules, student.feature_info
        self.level = [i["reduction"] for i in info].index(settings["dense_stride"])
        width, dense_width = info[-1]["num_chs"], info[self.level]["num_chs"]
        self.head_global = heads.DenseCLProjectionHead(width, width, 128)
        self.head_dense = heads.DenseCLProjectionHead(dense_width, dense_width, 128)
        self.momentum_student = self._momentum_copy(student)
        self.momentum_head_global = self._momentum_copy(self.head_global)
        self.momentum_head_dense = self._momentum_copy(self.head_dense)
        self.momentum = (settings["momentum"], False)
        self.dense_weight = settings["dense_weight"]
        self.criterion_global = _contrastive(lightly, settings, 128)
        self.criterion_dense = _contrastive(lightly, settings, 128)

    def _branches(self, feats: list[torch.Tensor], head_global: nn.Module, head_dense: nn.Module) -> list:
        dense = feats[self.level].flatten(2).transpose(1, 2)  # [B, H*W, C]: one row per location
        return [head_global(_pool(feats[-1])), dense, head_dense(dense)]

    def forward(self, views: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        query = self._branches(self.student(views[0]), self.head_global, self.head_dense)
        with torch.no_grad():
            key = self._branches(self.momentum_student(views[1]), self.momentum_head_global,
                                 self.momentum_head_dense)
        return {"query": query, "key": key}

    def loss(self, outputs: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from lightly.models.utils import select_most_similar

        (q_global, q_feats, q_dense), (k_global, k_feats, k_dense) = (
            [t.float() for t in outputs[k]] for k in ("query", "key"))
        k_dense = select_most_similar(q_feats, k_feats, k_dense)  # the key location matched to each query location
        global_term = self.criterion_global(q_global, k_global)
        dense_term = self.criterion_dense(q_dense.flatten(0, 1), k_dense.flatten(0, 1))
        w = self.dense_weight
        return (1 - w) * global_term + w * dense_term, {"global": global_term.detach(), "dense": dense_term.detach()}


def _contrastive(lightly: Any, settings: dict, dim: int) -> nn.Module:
    """NT-Xent with the memory bank of ``ssl.memory_bank`` keys (persistent: checkpointed)."""
    size = settings["memory_bank"]
    criterion = lightly.loss.NTXentLoss(temperature=settings["temperature"],
                                        memory_bank_size=(size, dim) if size else 0,
                                        gather_distributed=settings["distributed"])
    _persist_memory_bank(criterion.memory_bank)
    return criterion


_MODELS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "densecl": DenseCL}
#: The papers' values of what ``ssl.temperature`` / ``ssl.momentum`` leave null.
_TEMPERATURE = {"simclr": 0.5, "moco": 0.2, "densecl": 0.2}
_MOMENTUM = {"moco": 0.999, "densecl": 0.999, "byol": 0.996}
#: The settings each method reads (what the run's log line names).
_READS = {"simclr": ("temperature",), "moco": ("temperature", "momentum", "memory_bank"), "byol": ("momentum",),
          "densecl": ("temperature", "momentum", "memory_bank", "dense_weight", "dense_stride")}


def dense_stride(cfg: PretrainConfig) -> int:
    """``ssl.dense_stride``, where 0 means the coarsest student stride whose map at ``data.image_size`` is at least
    7x7 (224 / 32, the map the papers' dense heads read), else the finest."""
    if cfg.ssl.dense_stride:
        return cfg.ssl.dense_stride
    fits = [r for r in cfg.model.reductions if cfg.data.image_size // r >= 7]
    return max(fits) if fits else min(cfg.model.reductions)


def method_settings(cfg: PretrainConfig, world_size: int = 1) -> dict:
    """What the method's model reads: the config's ``ssl.*`` with the papers' values where it leaves them null."""
    method = cfg.ssl.method
    return {"temperature": cfg.ssl.temperature if cfg.ssl.temperature is not None else _TEMPERATURE.get(method),
            "momentum": cfg.ssl.momentum if cfg.ssl.momentum is not None else _MOMENTUM.get(method),
            "memory_bank": cfg.ssl.memory_bank, "dense_weight": cfg.ssl.dense_weight,
            "dense_stride": dense_stride(cfg), "distributed": world_size > 1}


def build_baseline(cfg: PretrainConfig, student: nn.Module, device: torch.device,
                   memory_format: torch.memory_format, world_size: int = 1) -> tuple[SSLModel, Any]:
    """The method's trainable module around ``student`` (on ``device``) and its source of views over the config's
    dataset (a :class:`~dreamteacher.model.DistillationSource` with no teacher), for :func:`pretrain`."""
    from .model import DistillationSource, build_dataset

    lightly = import_lightly()
    settings = method_settings(cfg, world_size)
    model = _MODELS[cfg.ssl.method](student, lightly, settings).to(device).to(memory_format=memory_format)
    transform = view_transform(cfg.ssl.method, cfg.data.image_size, lightly)
    logger.info("ssl.method=%s (lightly %s): %s; no teacher", cfg.ssl.method, lightly.__version__,
                ", ".join(f"{k}={settings[k]}" for k in _READS[cfg.ssl.method]))
    source = DistillationSource(build_dataset(cfg), SSLViews(transform, device, memory_format), None, [])
    return model, source
