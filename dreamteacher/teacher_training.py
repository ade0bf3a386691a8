"""Training a small diffusion teacher on the built-in data, where no pretrained diffusion model can be downloaded.

A DDPM ``UNet2DModel`` learns the epsilon-prediction MSE. Long runs must not die silently, so the recipe is the one
DDPM practice uses at any length: warm-up then cosine learning rate, gradient clipping, and an exponential moving
average (EMA) of the weights, which is the model saved as the teacher. A :class:`DivergenceMonitor` stops a run whose
loss turns non-finite or jumps and stays up (a UNet that collapsed to a constant output has an epsilon MSE near 1);
such a run raises :class:`TeacherDiverged` and writes no teacher.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import dtkernels
from dtkernels import _compat

from .faults import Diverged, guarded_write, json_line
from .optim import warmup_cosine
from .runtime import StopFlag

logger = logging.getLogger("dreamteacher")

__all__ = ["TINY_UNET", "DEMO_UNET", "TeacherDiverged", "DivergenceMonitor", "EMA", "train_teacher",
           "fixed_batch_loss", "SHIPPED_TEACHERS", "shipped_teacher", "ship_teacher"]

#: A tiny pixel UNet for tests (3 levels: mid_block and 3 up blocks, enough taps for 4 student levels).
TINY_UNET = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
#: The demo's teacher: five levels (native strides 1-16) so that the taps one octave finer than the student's
#: strides 4-32 exist (mid_block and up_blocks.0-2, early exit before the full-resolution blocks).
DEMO_UNET = dict(block_out_channels=(16, 32, 64, 64, 128), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D",) * 5, up_block_types=("UpBlock2D",) * 5)


class TeacherDiverged(Diverged):
    """Teacher training diverged; no teacher was written."""


class DivergenceMonitor:
    """Watches the windowed training loss and raises :class:`TeacherDiverged` when the run has diverged.

    Diverged means: a non-finite window mean, or ``patience`` consecutive windows above both ``factor`` times the
    best window so far and the best plus ``min_gap``. One bad window is noise (a hard batch); several in a row is a
    run that will not come back (the model collapsed and the optimizer state is poisoned).

    Args:
        factor: relative jump over the best window that counts as bad.
        min_gap: absolute jump that must also be exceeded (so a loss near 0 does not trip on tiny wiggles).
        patience: consecutive bad windows before giving up.
    """

    def __init__(self, factor: float = 2.0, min_gap: float = 0.05, patience: int = 5) -> None:
        if factor <= 1.0:
            raise ValueError(f"factor: expected > 1, got {factor}")
        if patience < 1:
            raise ValueError(f"patience: expected >= 1, got {patience}")
        self.factor, self.min_gap, self.patience = float(factor), float(min_gap), int(patience)
        self.best = math.inf
        self.best_step = 0
        self.bad = 0

    def update(self, step: int, loss: float) -> None:
        """Record the mean loss of the window ending at ``step``; raise :class:`TeacherDiverged` if diverged."""
        if not math.isfinite(loss):
            best = (f"best so far {self.best:.4f} at step {self.best_step}" if math.isfinite(self.best)
                    else "in the first logging window")
            raise TeacherDiverged(f"teacher training diverged at step {step}: the loss is {loss} ({best}); lower "
                                  f"the learning rate (--lr)")
        if loss < self.best:
            self.best, self.best_step, self.bad = loss, step, 0
            return
        if loss > self.best * self.factor and loss > self.best + self.min_gap:
            self.bad += 1
            if self.bad >= self.patience:
                raise TeacherDiverged(
                    f"teacher training diverged at step {step}: the loss rose from {self.best:.4f} (step "
                    f"{self.best_step}) to {loss:.4f} and stayed up for {self.bad} logging windows; lower the "
                    f"learning rate (--lr) or lengthen the warm-up (--warmup-steps)")
        else:
            self.bad = 0


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), with the usual warm-up of the decay
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so early averages are not dominated by the random init.

    The average lives in :attr:`model`, a frozen copy in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema = [p for p in self.model.parameters()]
        cur = [p.detach() for p in model.parameters()]
        _compat.foreach_lerp_(ema, cur, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


@torch.no_grad()
def fixed_batch_loss(unet: nn.Module, *, image_size: int, num_train_timesteps: int = 1000, n: int = 32,
                     seed: int = 2) -> float:
    """The epsilon MSE of ``unet`` on a fixed batch: ``n`` built-in images of ``seed`` (the test split's seed by
    default), timesteps evenly spread over ``[0, T)``, noise from a seeded generator. Deterministic on CPU in float32,
    so a shipped teacher can be checked against the number recorded when it was trained."""
    from diffusers import DDPMScheduler

    from .data import ProceduralShapes

    ds = ProceduralShapes(n, image_size, seed=seed)
    x0 = torch.stack([ds[i][0] for i in range(n)])
    t = torch.linspace(0, num_train_timesteps - 1, n).round().long()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    abar = DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    was_training = unet.training
    unet.eval()
    p = next(unet.parameters())
    pred = unet(x_t.to(p.device, p.dtype), t.to(p.device)).sample.float().cpu()
    unet.train(was_training)
    return float(torch.nn.functional.mse_loss(pred, eps))


def _save_teacher_atomically(unet: nn.Module, scheduler, out: Path, meta: dict) -> None:
    """Write ``unet/`` + ``scheduler/`` + ``teacher.json`` into a temporary folder next to ``out``, then move them in:
    an interrupted save never leaves a half-written teacher that loads."""
    from .teachers.diffusion import DiffusionTeacher

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with guarded_write(tmp, what="teacher", intact=f"The teacher already in {out} (if any) is intact",
                           then="free space and run the command again"):
            DiffusionTeacher(unet, scheduler).save_pretrained(tmp)
            (tmp / "teacher.json").write_text(json.dumps(meta, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in ("unet", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
    for child in tmp.iterdir():
        os.replace(child, out / child.name)
    tmp.rmdir()


def train_teacher(out_dir: str | os.PathLike, *, dataset=None, image_size: int = 64, unet: dict | None = None,
                  steps: int = 1000, batch_size: int = 16, lr: float = 1e-3, warmup_steps: int = 100,
                  min_lr_ratio: float = 0.1, clip_grad: float = 1.0, ema_decay: float = 0.999,
                  num_train_timesteps: int = 1000, seed: int = 0, num_workers: int = 2, log_every: int = 25,
                  max_minutes: float = 0.0, save_every: int = 0, device: str = "auto", progress: bool = True,
                  divergence: DivergenceMonitor | None = None) -> dict:
    """Train a small DDPM ``UNet2DModel`` with the epsilon-prediction MSE and save its EMA where
    :meth:`DiffusionTeacher.from_pretrained` finds it (``unet/`` + ``scheduler/``, plus ``teacher.json``).

    ``loss = mean((unet(x_t, t) - eps)**2)`` with ``t`` uniform in ``[0, T)`` and ``x_t`` from ``dtkernels.q_sample``.
    AdamW with ``warmup_steps`` of linear warm-up then cosine to ``min_lr_ratio * lr`` over ``steps``; gradients
    clipped to norm ``clip_grad``; EMA of the weights with ``ema_decay`` (0 saves the raw weights). ``max_minutes``
    stops early (the model is saved either way); ``save_every`` > 0 also saves the EMA every that many steps
    (after the divergence check of that step's window), so a long run has a usable teacher before it ends. The loss
    of each logging window goes to ``out_dir/log.jsonl`` and through ``divergence`` (default
    :class:`DivergenceMonitor`): a diverged run raises :class:`TeacherDiverged` and saves nothing.

    Returns:
        ``{"path", "steps", "first_loss", "last_loss", "best_loss", "fixed_batch_loss", "interrupted"}`` (window
        means; ``fixed_batch_loss``: :func:`fixed_batch_loss` of the saved model).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .data import ProceduralShapes, build_loader

    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset if dataset is not None else ProceduralShapes(max(steps * batch_size, 1000), image_size,
                                                                   seed=seed + 1)
    config = dict(DEMO_UNET if unet is None else unet)
    model = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **config).to(dev)
    ema = EMA(model, ema_decay) if ema_decay > 0 else None
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    alphas = scheduler.alphas_cumprod.to(dev, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup=warmup_steps, total=steps, min_ratio=min_lr_ratio))
    loader = build_loader(dataset, batch_size, seed=seed, num_workers=num_workers, rank=0, world_size=1)
    monitor = divergence if divergence is not None else DivergenceMonitor()
    pbar = None
    if progress:
        from .runtime import progress_bar

        pbar = progress_bar(steps, "train-teacher", "step")
    history: list[float] = []
    window = torch.zeros((), device=dev)
    start = last = time.perf_counter()
    step, epoch = 0, 0
    model.train()
    try:
        with open(out / "log.jsonl", "w") as log, StopFlag() as stop:
            while step < steps and not stop.requested:
                loader.sampler.set_epoch(epoch)
                for batch in loader:
                    x0 = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(dev, non_blocking=True)
                    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), device=dev)
                    x_t, eps = dtkernels.q_sample(x0, t, alphas, seed=int(torch.randint(0, 2**62, ()).item()),
                                                  return_noise=True)
                    loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
                    loss.backward()
                    if clip_grad > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                    optimizer.step()
                    sched.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                    window += loss.detach()
                    step += 1
                    if step % log_every == 0 or step == steps:
                        now = time.perf_counter()
                        n = (step - 1) % log_every + 1
                        history.append(window.item() / n)
                        window.zero_()
                        log.write(json_line({"step": step, "loss": history[-1], "lr": sched.get_last_lr()[0],
                                             "images_per_s": n * batch_size / (now - last), "time": now - start}))
                        log.flush()
                        monitor.update(step, history[-1])
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{history[-1]:.4f}", img_s=f"{n * batch_size / (now - last):.1f}")
                        last = now
                    if save_every > 0 and step % save_every == 0 and step < steps:
                        snapshot = copy.deepcopy(ema.model if ema is not None else model).cpu().eval()
                        _save_teacher_atomically(snapshot, scheduler, out, {
                            "steps": step, "image_size": image_size, "snapshot": True,
                            "last_loss": history[-1] if history else None})
                    if pbar is not None:
                        pbar.update(1)
                    if (step >= steps or stop.requested
                            or (max_minutes > 0 and time.perf_counter() - start > 60 * max_minutes)):
                        break
                else:
                    epoch += 1
                    continue
                break
    finally:
        if pbar is not None:
            pbar.close()
    saved = (ema.model if ema is not None else model).cpu().eval()
    check = fixed_batch_loss(saved, image_size=image_size, num_train_timesteps=num_train_timesteps)
    if not math.isfinite(check):
        raise TeacherDiverged(f"teacher training: the model to save has a non-finite loss ({check}) on a fixed "
                              f"batch; nothing was written")
    meta = {"steps": step, "image_size": image_size, "unet": {k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in config.items()},
            "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
            "clip_grad": clip_grad, "ema_decay": ema_decay, "seed": seed, "num_train_timesteps": num_train_timesteps,
            "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
            "best_loss": monitor.best if history else None, "fixed_batch_loss": check,
            "saved": "ema" if ema is not None else "raw", "interrupted": stop.requested}
    _save_teacher_atomically(saved, scheduler, out, meta)
    return {"path": str(out), **meta, "signal": stop.signal}


# ------------------------------------------------------------------------------------------------ shipped teachers
#: Teachers that ship inside the package, trained once by ``dreamteacher train-teacher`` (the exact command, seed and
#: training log are in each one's ``teacher.json`` and ``log.jsonl``), stored in float16 to stay small.
SHIPPED_TEACHERS = Path(__file__).resolve().parent / "assets" / "teachers"
_UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_teacher(name: str = "shapes32") -> Path:
    """The folder of a shipped teacher, after checking its weights' sha256 against the one recorded at shipping
    time (a mismatch is an error: the file was damaged or replaced)."""
    root = SHIPPED_TEACHERS / name
    meta_file = root / "teacher.json"
    if not meta_file.is_file():
        available = sorted(p.name for p in SHIPPED_TEACHERS.glob("*") if (p / "teacher.json").is_file())
        raise FileNotFoundError(f"name: no shipped teacher {name!r} (available: {available})")
    meta = json.loads(meta_file.read_text())
    digest = _sha256(root / _UNET_FILE)
    if digest != meta.get("sha256"):
        raise ValueError(f"shipped teacher {name!r}: {root / _UNET_FILE} has sha256 {digest}, expected "
                         f"{meta.get('sha256')}; reinstall the package or rebuild it with --retrain-teacher")
    return root


def ship_teacher(src: str | os.PathLike, dst: str | os.PathLike, *, command: str) -> dict:
    """Store the teacher trained in ``src`` as a shipped teacher in ``dst``: float16 UNet weights, the scheduler,
    ``log.jsonl`` and ``teacher.json`` (``src``'s record plus ``command``, the weights' sha256 and
    :func:`fixed_batch_loss` of the float16 weights loaded back in float32, which a test reproduces)."""
    from diffusers import DDPMScheduler, UNet2DModel

    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "teacher.json").read_text())
    unet = UNet2DModel.from_pretrained(src / "unet").half()
    scheduler = DDPMScheduler.from_pretrained(src / "scheduler")
    dst.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(dst / "unet")
    # diffusers records where the UNet was loaded from (src, a local training folder): ship the teacher's name
    unet_config = dst / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    if "_name_or_path" in config:
        config["_name_or_path"] = dst.name
        unet_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    scheduler.save_pretrained(dst / "scheduler")
    back = UNet2DModel.from_pretrained(dst / "unet", torch_dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded number is reproduced on one thread (reduction order)
    try:
        check = fixed_batch_loss(back, image_size=meta["image_size"], num_train_timesteps=meta["num_train_timesteps"])
    finally:
        torch.set_num_threads(threads)
    meta.update({"command": command, "stored_dtype": "float16", "sha256": _sha256(dst / _UNET_FILE),
                 "fixed_batch_loss_before_float16": meta.get("fixed_batch_loss"), "fixed_batch_loss": check})
    shutil.copyfile(src / "log.jsonl", dst / "log.jsonl")
    (dst / "teacher.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
