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

from .faults import Diverged, check_finite_state, guarded_write, json_line
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


#: What a teacher-training checkpoint must agree on with the run that resumes it (anything else would continue a
#: different run under the old one's name).
_RESUME_KEYS = ("image_size", "unet", "steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "clip_grad",
                "ema_decay", "num_train_timesteps", "seed", "num_samples")
TEACHER_CHECKPOINT_KIND = "dreamteacher.teacher_training"


def _resume_state(resume: str | os.PathLike | None, out: Path, record: dict) -> dict | None:
    """The training state to continue from (``resume``: a checkpoint, or ``"auto"``: ``out/checkpoints/last.pt`` when
    it exists), checked against this run's ``record``; None for a fresh start."""
    from .config import UserError
    from .serialization import load_file

    if resume is None:
        return None
    path = out / "checkpoints" / "last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.is_file():
        logger.info("--resume auto: no checkpoint in %s, starting fresh", path.parent)
        return None
    state = load_file(path, what="--resume")
    if not isinstance(state, dict) or state.get("kind") != TEACHER_CHECKPOINT_KIND:
        raise UserError(f"--resume: {path} is not a train-teacher checkpoint (OUT/checkpoints/last.pt)")
    changed = [f"{k}: checkpoint {state['record'].get(k)!r}, now {record[k]!r}" for k in _RESUME_KEYS
               if state["record"].get(k) != record[k]]
    if changed:
        raise UserError(f"--resume: {path} was trained with other settings ({'; '.join(changed)}); resume with the "
                        "checkpoint's settings or start a fresh run in another --out")
    logger.info("resumed from %s at step %d", path, state["step"])
    return state


class _TeacherRun:
    """The trained objects of one teacher-training run and its position, which :meth:`state` saves and
    :meth:`restore` loads exactly (weights, EMA, optimizer, schedule, data position, RNG, logging window)."""

    def __init__(self, model, ema, optimizer, sched, monitor, record: dict, window: torch.Tensor) -> None:
        self.model, self.ema, self.optimizer, self.sched, self.monitor = model, ema, optimizer, sched, monitor
        self.record, self.window = record, window
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.history: list[float] = []
        self.pending_rng: dict | None = None  # restored once the resumed epoch's loader iterator exists

    def state(self) -> dict:
        from .runtime import _rng_states

        check_finite_state([*self.model.state_dict().items(), *(self.ema.model.state_dict().items() if self.ema
                                                                 else ())], what=f"the teacher at step {self.step}",
                           hint="Lower the learning rate (--lr); the previous checkpoint is intact.")
        return {"kind": TEACHER_CHECKPOINT_KIND, "record": self.record, "model": self.model.state_dict(),
                "ema": self.ema.model.state_dict() if self.ema else None,
                "ema_updates": self.ema.updates if self.ema else 0, "optimizer": self.optimizer.state_dict(),
                "sched": self.sched.state_dict(), "step": self.step, "epoch": self.epoch, "consumed": self.consumed,
                "history": list(self.history), "window": self.window.clone().cpu(), "rng": _rng_states(),
                "monitor": [self.monitor.best, self.monitor.best_step, self.monitor.bad]}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.history = list(state["history"])
        self.window.copy_(state["window"])
        self.monitor.best, self.monitor.best_step, self.monitor.bad = state["monitor"]
        self.pending_rng = state["rng"]

    def save(self, out: Path) -> None:
        from .runtime import save_checkpoint

        path = out / "checkpoints" / "last.pt"
        with guarded_write(path, what="teacher-training checkpoint", intact="The previous checkpoint is intact",
                           then="free space, then rerun with --resume auto"):
            save_checkpoint(path, self.state())


def train_teacher(out_dir: str | os.PathLike, *, dataset=None, image_size: int = 64, unet: dict | None = None,
                  steps: int = 1000, batch_size: int = 16, lr: float = 1e-3, warmup_steps: int = 100,
                  min_lr_ratio: float = 0.1, clip_grad: float = 1.0, ema_decay: float = 0.999,
                  num_train_timesteps: int = 1000, seed: int = 0, num_workers: int = 2, log_every: int = 25,
                  max_minutes: float = 0.0, save_every: int = 0, device: str = "auto", progress: bool = True,
                  divergence: DivergenceMonitor | None = None, ckpt_every: int = 0,
                  resume: str | os.PathLike | None = None) -> dict:
    """Train a small DDPM ``UNet2DModel`` with the epsilon-prediction MSE and save its EMA where
    :meth:`DiffusionTeacher.from_pretrained` finds it (``unet/`` + ``scheduler/``, plus ``teacher.json``).

    ``loss = mean((unet(x_t, t) - eps)**2)`` with ``t`` uniform in ``[0, T)`` and ``x_t`` from ``dtkernels.q_sample``.
    AdamW with ``warmup_steps`` of linear warm-up then cosine to ``min_lr_ratio * lr`` over ``steps``; gradients
    clipped to norm ``clip_grad``; EMA of the weights with ``ema_decay`` (0 saves the raw weights). ``max_minutes``
    stops early (the model is saved either way); ``save_every`` > 0 also saves the EMA every that many steps
    (after the divergence check of that step's window), so a long run has a usable teacher before it ends. The loss
    of each logging window goes to ``out_dir/log.jsonl`` and through ``divergence`` (default
    :class:`DivergenceMonitor`): a diverged run raises :class:`TeacherDiverged` and saves nothing.

    The training state goes to ``out_dir/checkpoints/last.pt`` every ``ckpt_every`` steps (0: never) and whenever
    the run stops early (Ctrl-C, SIGTERM, SIGUSR1, ``max_minutes``); ``resume`` (a checkpoint, or ``"auto"``: that
    file when it exists) continues exactly, bit for bit with a run that was never stopped.

    Returns:
        ``{"path", "steps", "first_loss", "last_loss", "best_loss", "fixed_batch_loss", "interrupted", "signal"}``
        (window means; ``fixed_batch_loss``: :func:`fixed_batch_loss` of the saved model; ``signal``: the stop
        signal's name, or None).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .data import ProceduralShapes, build_loader
    from .runtime import _truncate_log

    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if isinstance(ckpt_every, bool) or not isinstance(ckpt_every, int) or ckpt_every < 0:
        raise ValueError(f"ckpt_every: expected a non-negative integer, got {ckpt_every!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset if dataset is not None else ProceduralShapes(max(steps * batch_size, 1000), image_size,
                                                                   seed=seed + 1)
    config = dict(DEMO_UNET if unet is None else unet)
    record = {"image_size": image_size, "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
              "steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
              "min_lr_ratio": min_lr_ratio, "clip_grad": clip_grad, "ema_decay": ema_decay,
              "num_train_timesteps": num_train_timesteps, "seed": seed, "num_samples": len(dataset)}
    state = _resume_state(resume, out, record)
    model = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **config).to(dev)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    run = _TeacherRun(model, EMA(model, ema_decay) if ema_decay > 0 else None, optimizer,
                      torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
                          s, warmup=warmup_steps, total=steps, min_ratio=min_lr_ratio)),
                      divergence if divergence is not None else DivergenceMonitor(), record,
                      torch.zeros((), device=dev))
    if state is not None:
        run.restore(state)
        _truncate_log(out / "log.jsonl", run.step)
    loader = build_loader(dataset, batch_size, seed=seed, num_workers=num_workers, rank=0, world_size=1)
    pbar = None
    if progress:
        from .runtime import progress_bar

        pbar = progress_bar(steps, "train-teacher", "step", initial=run.step)
    alphas = scheduler.alphas_cumprod.to(dev, torch.float32)
    model.train()
    try:
        with open(out / "log.jsonl", "a" if state is not None else "w") as log, StopFlag() as stop:
            stopped_early = _train_teacher_steps(run, loader, alphas, log, stop, pbar, out=out, steps=steps,
                                                 batch_size=batch_size, clip_grad=clip_grad, log_every=log_every,
                                                 save_every=save_every, ckpt_every=ckpt_every,
                                                 max_minutes=max_minutes, scheduler=scheduler,
                                                 image_size=image_size, num_train_timesteps=num_train_timesteps)
            if stopped_early:  # what a rerun with --resume auto continues from
                run.save(out)
    finally:
        if pbar is not None:
            pbar.close()
    saved = (run.ema.model if run.ema is not None else model).cpu().eval()
    check = fixed_batch_loss(saved, image_size=image_size, num_train_timesteps=num_train_timesteps)
    if not math.isfinite(check):
        raise TeacherDiverged(f"teacher training: the model to save has a non-finite loss ({check}) on a fixed "
                              f"batch; nothing was written")
    history = run.history
    meta = {"steps": run.step, "image_size": image_size, "unet": record["unet"],
            "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
            "clip_grad": clip_grad, "ema_decay": ema_decay, "seed": seed, "num_train_timesteps": num_train_timesteps,
            "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
            "best_loss": run.monitor.best if history else None, "fixed_batch_loss": check,
            "saved": "ema" if run.ema is not None else "raw", "interrupted": stop.requested}
    _save_teacher_atomically(saved, scheduler, out, meta)
    return {"path": str(out), **meta, "signal": stop.signal}


def _train_teacher_steps(run: _TeacherRun, loader, alphas: torch.Tensor, log, stop, pbar, *, out: Path, steps: int,
                         batch_size: int, clip_grad: float, log_every: int, save_every: int, ckpt_every: int,
                         max_minutes: float, scheduler, image_size: int, num_train_timesteps: int) -> bool:
    """The step loop of :func:`train_teacher`, from ``run``'s position; returns whether it stopped early."""
    from .runtime import _set_rng_states

    model, dev = run.model, alphas.device
    start = last = time.perf_counter()
    while run.step < steps and not stop.requested:
        loader.sampler.set_epoch(run.epoch)
        loader.sampler.set_start(run.consumed * batch_size)
        batches = iter(loader)  # draws the loader's base seed from the global RNG, as an uninterrupted run did
        if run.pending_rng is not None:
            _set_rng_states(run.pending_rng)
            run.pending_rng = None
        for batch in batches:
            run.consumed += 1
            x0 = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(dev, non_blocking=True)
            t = torch.randint(0, num_train_timesteps, (x0.shape[0],), device=dev)
            x_t, eps = dtkernels.q_sample(x0, t, alphas, seed=int(torch.randint(0, 2**62, ()).item()),
                                          return_noise=True)
            loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
            loss.backward()
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            run.optimizer.step()
            run.sched.step()
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.update(model)
            run.window += loss.detach()
            run.step += 1
            step = run.step
            if step % log_every == 0 or step == steps:
                now = time.perf_counter()
                n = (step - 1) % log_every + 1
                run.history.append(run.window.item() / n)
                run.window.zero_()
                log.write(json_line({"step": step, "loss": run.history[-1], "lr": run.sched.get_last_lr()[0],
                                     "images_per_s": n * batch_size / (now - last), "time": now - start}))
                log.flush()
                run.monitor.update(step, run.history[-1])
                if pbar is not None:
                    pbar.set_postfix(loss=f"{run.history[-1]:.4f}", img_s=f"{n * batch_size / (now - last):.1f}")
                last = now
            if save_every > 0 and step % save_every == 0 and step < steps:
                snapshot = copy.deepcopy(run.ema.model if run.ema is not None else model).cpu().eval()
                _save_teacher_atomically(snapshot, scheduler, out, {
                    "steps": step, "image_size": image_size, "snapshot": True,
                    "last_loss": run.history[-1] if run.history else None})
            if ckpt_every > 0 and step % ckpt_every == 0 and step < steps:
                run.save(out)
            if pbar is not None:
                pbar.update(1)
            if (step >= steps or stop.requested
                    or (max_minutes > 0 and time.perf_counter() - start > 60 * max_minutes)):
                return step < steps
        run.epoch, run.consumed = run.epoch + 1, 0
    return run.step < steps


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
