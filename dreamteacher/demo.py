"""The embedded end-to-end demo: does DreamTeacher pretraining help on the built-in dataset? (``dreamteacher demo``)

Phases:

1. teacher: the DDPM UNet shipped with the package for this image size (trained once by ``dreamteacher
   train-teacher``; its command, seed and log ship with it), or one trained here with ``retrain_teacher``;
2. interpreter: a feature interpreter on the teacher's features of the smallest label budget's images (seed 0), and
   its held-out mIoU, the teacher's own quality;
3. pretraining by feature distillation (OUT/pretrain_feature) and 4. by mixed distillation (OUT/pretrain_mixed),
   same steps, same data, same seed; with two workers both at once, splitting the teacher's work
   (``data.share_targets``: the targets are the same in both, so each computes every other step's);
5. evaluation: scratch vs both pretrained backbones, each label budget, several seeds, by full fine-tuning and by a
   frozen-backbone probe; learning rates chosen per row on the labelled pool's validation split;
6. pictures: PCA of teacher vs student features with masks, and loss curves.

Presets (:data:`PRESETS`): ``quick`` is ``make demo`` (a fresh clone, install included, within 15 minutes on a 2-core
CPU); ``long`` is the evidence (8 to 128 labels, longer pretraining and evaluation, the equal-wall-clock
comparison; 50 minutes there).

Library code: it logs, and returns what the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("dreamteacher")

__all__ = ["DemoSettings", "PRESETS", "run_demo"]


@dataclass
class DemoSettings:
    """The demo's sizes. Defaults are the ``quick`` preset (see :data:`PRESETS`)."""

    image_size: int = 32
    #: a shipped teacher's name (:func:`dreamteacher.teacher_training.shipped_teacher`), or None to train one
    teacher: str | None = "shapes32"
    retrain_teacher: bool = False
    teacher_steps: int = 1500
    teacher_batch: int = 16
    #: wall-clock cap of a retrained teacher (0: none). Work is fixed in steps; a cap is only a safety net, and a
    #: phase it cuts is marked as cut in the table and the final message.
    teacher_minutes: float = 0.0
    teacher_lr: float = 5e-4
    interpreter_steps: int = 300
    pretrain_steps: int = 2000
    pretrain_batch: int = 16
    #: wall-clock cap of each pretraining run (0: none, the default: the table must not depend on the machine's
    #: speed). A run it cuts is marked as cut in the table and the final message.
    pretrain_minutes: float = 0.0
    width: int = 128
    budgets: list[int] = field(default_factory=lambda: [32, 128])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: fine-tuning steps (every row the same: an equal budget, not tuned)
    eval_steps: int = 300
    #: probe steps: the head alone on cached features costs a few ms a step, so it trains far longer
    probe_steps: int = 2000
    #: the learning-rate grids, chosen per (protocol, backbone, budget) on the validation split; one value is used
    #: as is for every row. Quick: 1e-2, what the long preset's validation split chose for scratch at 8 and 32
    #: labels (pretrained rows lose up to 2.6 points at it there): the fixed value favours the baseline.
    eval_lrs: list[float] = field(default_factory=lambda: [1e-2])
    probe_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2])
    #: quick: the probe only. Its 300-step fine-tune showed nothing the probe does not (too short for any row:
    #: scratch did not improve from 32 to 128 labels) at half the evaluation time; the long preset fine-tunes.
    protocols: list[str] = field(default_factory=lambda: ["probe"])
    eval_batch: int = 8
    n_test: int = 256
    #: DataLoader worker processes of the pretraining runs. 0: the main process loads, and with the teacher's targets
    #: shared it loads only the batches whose targets it computes (two runs at once on 2 cores: a loader process per
    #: run only competed for them; measured in benchmarks/README.md, "The same work with less")
    num_workers: int = 0
    #: independent runs at once (the two pretraining runs; the evaluation's (protocol, backbone, budget) groups),
    #: each in its own process with an equal share of the threads: on a 2-core CPU two one-thread runs finish
    #: sooner than the same runs one after the other on two threads (small convolutions do not fill two cores)
    workers: int = 2
    #: measure this machine's speed first (a few steps of each phase) and say the expected time of every phase
    calibrate: bool = True
    #: > 0: also pretrain the lean loop and the naive loop (``run.naive``) for this many minutes each (steps set from
    #: a short throughput calibration of each, so both finish their schedules in the budget) and evaluate both
    speed_minutes: float = 0.0
    #: self-supervised baselines (``ssl.method`` values) pretrained as more rows, at the demo's lr and the method's
    #: defaults, not tuned (``dreamteacher compare`` tunes them on the validation split); the same steps and batch
    baselines: list[str] = field(default_factory=list)
    progress: bool = True


#: Named presets: ``quick`` (``make demo``) and ``long`` (``make demo-long``, the evidence). The long preset's
#: fine-tuning grid reaches 1e-2 because scratch chose the top of a [1e-3, 3e-3] grid at every budget in a pilot.
PRESETS: dict[str, DemoSettings] = {
    "quick": DemoSettings(),
    "long": DemoSettings(pretrain_steps=4000, budgets=[8, 32, 128], seeds=[0, 1, 2], eval_steps=600,
                         probe_steps=1500, eval_lrs=[1e-3, 3e-3, 1e-2], interpreter_steps=600, speed_minutes=5.0,
                         protocols=["finetune", "probe"]),
}


def _teacher_phase(out: Path, s: DemoSettings, say: Callable[[str], None]) -> tuple[Path, dict]:
    """The teacher folder to distil: a shipped one (checked against its checksum), a cached one, or a new one."""
    from .teacher_training import DEMO_UNET, shipped_teacher, train_teacher

    if s.teacher is not None and not s.retrain_teacher:
        root = shipped_teacher(s.teacher)
        meta = json.loads((root / "teacher.json").read_text())
        if meta["image_size"] != s.image_size:
            raise ValueError(f"image_size: the shipped teacher {s.teacher!r} was trained at {meta['image_size']}x"
                             f"{meta['image_size']}, not {s.image_size}; pass --retrain-teacher")
        say(f"[1/6] teacher: the shipped {s.teacher!r} ({meta['steps']} steps of `{meta.get('command', '?')}`, "
            f"EMA weights, fixed-batch epsilon MSE {meta['fixed_batch_loss']:.4f}; sha256 checked)")
        return root, meta
    teacher_dir = out / "teacher"
    if (teacher_dir / "unet" / "config.json").is_file() and (teacher_dir / "teacher.json").is_file():
        meta = json.loads((teacher_dir / "teacher.json").read_text())
        if not meta.get("snapshot"):
            say(f"[1/6] teacher: using the one trained earlier in {teacher_dir} (delete it to retrain)")
            return teacher_dir, meta
    say(f"[1/6] teacher: training a DDPM UNet2DModel {list(DEMO_UNET['block_out_channels'])} on procedural shapes "
        f"at {s.image_size}x{s.image_size} (at most {s.teacher_steps} steps or {s.teacher_minutes:g} min)")
    meta = train_teacher(teacher_dir, image_size=s.image_size, steps=s.teacher_steps, batch_size=s.teacher_batch,
                         lr=s.teacher_lr, num_workers=s.num_workers, log_every=10, max_minutes=s.teacher_minutes,
                         progress=s.progress)
    if meta["first_loss"] is not None:
        say(f"      {meta['steps']} steps, epsilon MSE {meta['first_loss']:.4f} -> {meta['last_loss']:.4f}")
    return teacher_dir, meta


def pretrain_config(s: DemoSettings, teacher_dir: Path, run_dir: Path, overrides: Sequence[str]):
    """The pretraining config of the demo's (and the ablation's) runs at settings ``s``; ``overrides`` come last and
    win (``--section.key=value``)."""
    from .config import load_config

    return load_config(None, [
        f"--teacher.path={teacher_dir}", "--model.student=resnet18", f"--model.width={s.width}",
        f"--data.image_size={s.image_size}", f"--run.steps={s.pretrain_steps}",
        f"--run.batch_size={s.pretrain_batch}", f"--data.num_workers={s.num_workers}",
        f"--run.out_dir={run_dir}", "--run.log_every=10", f"--run.ckpt_every={max(s.pretrain_steps // 2, 1)}",
        "--schedule.warmup_steps=40", "--optim.lr=2e-3", f"--run.max_minutes={s.pretrain_minutes}",
        f"--run.progress={s.progress}",
        # Pinned, not auto: the published tables were made with a float32 teacher, and whether a bfloat16 one (what
        # auto picks on CPUs with native bfloat16) keeps them within seed noise has not been measured yet
        # (docs/teachers.md, teacher precision). --teacher.dtype=auto in the overrides opts in.
        "--teacher.dtype=float32", *overrides])


#: The baselines' names in the tables (``ssl.method`` -> row).
BASELINE_NAMES = {"simclr": "SimCLR", "moco": "MoCo-v2", "byol": "BYOL", "densecl": "DenseCL"}


def baseline_overrides(method: str, hyperparameters: Mapping[str, float] | None = None) -> list[str]:
    """Overrides that make a demo pretraining config a self-supervised baseline's (``ssl.method``), with these
    ``section.key`` values; ``data.augment`` off, since the method makes its own views (and refuses it)."""
    return [f"--ssl.method={method}", "--data.augment=false",
            *(f"--{k}={v!r}" for k, v in (hyperparameters or {}).items())]


def evaluate_protocols(backbones: dict[str, str | None], s: DemoSettings, **kwargs: Any) -> dict[str, Any]:
    """Every backbone on the built-in splits at settings ``s``, once per protocol, each with its own learning-rate
    grid chosen on the validation split. ``kwargs`` go to :func:`~dreamteacher.evaluate.evaluate_backbones`.

    Returns:
        ``{"config": <the first protocol's config>, "runs", "selection", "n_val"}``.
    """
    from .data import SHAPE_CLASSES
    from .evaluate import builtin_splits, builtin_validation_split, evaluate_backbones

    train_set, test_set = builtin_splits(s.image_size, s.n_test)
    val_set = builtin_validation_split(s.image_size)
    parts = []
    for protocol in s.protocols:
        parts.append(evaluate_backbones(
            backbones, train_set, test_set, budgets=s.budgets, seeds=s.seeds, class_names=list(SHAPE_CLASSES),
            steps=protocol_steps(s, protocol), batch_size=s.eval_batch, lr=protocol_lr(s, protocol),
            protocols=[protocol], val_set=val_set, progress=s.progress, workers=s.workers, **kwargs))
    config = dict(parts[0]["config"])
    config["steps"] = {p: protocol_steps(s, p) for p in s.protocols}
    config["lr"] = {p: protocol_lr(s, p) for p in s.protocols}
    return {"config": config, "runs": [r for p in parts for r in p["runs"]],
            "selection": [x for p in parts for x in p["selection"]], "n_val": len(val_set)}


def protocol_steps(s: DemoSettings, protocol: str) -> int:
    """Training steps of one evaluation run under ``protocol``."""
    return s.eval_steps if protocol == "finetune" else s.probe_steps


def protocol_lr(s: DemoSettings, protocol: str) -> float | list[float]:
    """The learning rate of ``protocol``'s runs: a grid (chosen on the validation split), or its one value."""
    grid = s.eval_lrs if protocol == "finetune" else s.probe_lrs
    return list(grid) if len(grid) > 1 else grid[0]


def _lr_words(s: DemoSettings, protocol: str) -> str:
    lr = protocol_lr(s, protocol)
    return f"the lr of {lr} best on the validation split" if isinstance(lr, list) else f"lr {lr:g}"


def _log_rate(log: Path, wall: float) -> tuple[float, float]:
    """(seconds per step after the first logged step, seconds outside the step loop) of a short timed run whose
    ``log.jsonl`` records ``step`` and ``time`` (seconds since its loop began) and which took ``wall`` seconds."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first, last = records[0], records[-1]
    per_step = (last["time"] - first["time"]) / max(last["step"] - first["step"], 1)
    return per_step, max(wall - last["time"], 0.0) + first["time"] - per_step * first["step"]


#: Seconds a pretraining run at once waits for its partner's targets before computing them itself (the partner is
#: normally a step behind at most; a run that stopped early, e.g. at a time cap, must not hold the other long).
SHARE_WAIT_S = 30.0


def share_args(root: Path, index: int, count: int) -> list[str]:
    """Overrides that make the demo's pretraining runs at once split the teacher's work (``data.share_targets``): the
    feature and the mixed run compute the same targets at every step, so each computes every other micro-batch's and
    reads the rest from the other (exact: :class:`~dreamteacher.model.SharedTargets`)."""
    return [f"--data.share_targets={root}", f"--data.share_index={index}", f"--data.share_count={count}",
            f"--data.share_wait={SHARE_WAIT_S:g}"]


def _timed_pretrain(cfg) -> dict[str, Any]:
    """:func:`~dreamteacher.train.pretrain` and its wall-clock seconds (a worker job of the calibration)."""
    from .train import pretrain

    began = time.perf_counter()
    summary = pretrain(cfg)
    return {**summary, "wall": time.perf_counter() - began}


def _timed_evaluation(s: DemoSettings, protocol: str, steps: int) -> float:
    """Seconds of one evaluation run of ``protocol`` (scratch, the largest budget, the first seed, the grid's first
    value) at ``steps`` steps."""
    from .data import SHAPE_CLASSES
    from .evaluate import builtin_splits, builtin_validation_split, evaluate_backbones

    train_set, test_set = builtin_splits(s.image_size, s.n_test)
    val_set = builtin_validation_split(s.image_size)
    lr = protocol_lr(s, protocol)
    began = time.perf_counter()
    evaluate_backbones({"scratch": None}, train_set, test_set, budgets=[max(s.budgets)], seeds=s.seeds[:1],
                       class_names=list(SHAPE_CLASSES), steps=steps, batch_size=s.eval_batch,
                       lr=lr[0] if isinstance(lr, list) else lr, protocols=[protocol], val_set=val_set,
                       progress=False)
    return time.perf_counter() - began


def _timed_evaluation_pair(s: DemoSettings, protocol: str, few: int, more: int) -> tuple[float, float]:
    return _timed_evaluation(s, protocol, few), _timed_evaluation(s, protocol, more)


def evaluation_runs(s: DemoSettings, protocol: str, n_backbones: int) -> tuple[int, int]:
    """(groups, runs per group) of one protocol's evaluation: a group is one (backbone, budget); it runs every seed,
    plus the grid's other values on the first seed."""
    grid = s.eval_lrs if protocol == "finetune" else s.probe_lrs
    return n_backbones * len(s.budgets), len(s.seeds) + len(grid) - 1


def estimate_phases(s: DemoSettings, teacher_dir: Path, out: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """This machine's speed, measured on a few steps of every phase run the way the demo runs them (the
    pretraining runs and evaluation groups :attr:`DemoSettings.workers` at a time), turned into the expected
    seconds of each phase at settings ``s``. Writes only under ``out/calibration`` (removed afterwards).

    Returns:
        ``{"seconds": {phase: expected s}, "total": s, "measured": {what: s per step / setup}, "took": s}``.
    """

    from .evaluate import parallel_map, worker_split
    from .interpreter import train_interpreter

    began = time.perf_counter()
    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)

    def config(run_dir: Path, *extra: str):
        return pretrain_config(s, teacher_dir, run_dir, [*overrides, *extra])

    processes = worker_split(s.workers)[0]
    measured: dict[str, float] = {}
    # interpreter: 20 steps, logged every 10
    k = 20
    t0 = time.perf_counter()
    interp = train_interpreter(config(cal / "interpreter"), labels=min(s.budgets), label_seed=0, steps=k,
                               out=cal / "interpreter", progress=False)
    measured["interpreter s/step"], measured["interpreter setup s"] = _log_rate(
        cal / "interpreter" / "log.jsonl", time.perf_counter() - t0)
    seconds = {"interpreter": measured["interpreter setup s"] + s.interpreter_steps * measured["interpreter s/step"]}

    # pretraining: both runs, as many at once as the demo runs them
    short = ["--run.steps=16", "--run.log_every=4", "--run.max_minutes=0", "--run.ckpt_every=100000",
             "--run.progress=false"]
    share = (lambda i: share_args(cal / "shared_targets", i, 2)) if processes > 1 else (lambda i: [])
    jobs = [(config(cal / "pretrain_feature", *short, *share(0)),),
            (config(cal / "pretrain_mixed", *short, f"--label.interpreter={interp['path']}", *share(1)),)]
    done = parallel_map(_timed_pretrain, jobs, s.workers)
    per_run = []
    for name, summary in zip(("feature", "mixed"), done):
        per_step, setup = _log_rate(Path(summary["out_dir"]) / "log.jsonl", summary["wall"])
        measured[f"pretrain {name} s/step"], measured[f"pretrain {name} setup s"] = per_step, setup
        per_run.append(setup + s.pretrain_steps * per_step)
    if processes > 1:
        seconds[PRETRAIN_AT_ONCE] = max(per_run)
    else:
        seconds["pretrain feature"], seconds["pretrain mixed"] = per_run
    if s.speed_minutes > 0:  # two loops of a fixed wall-clock budget each, plus their calibrations
        seconds["speed"] = 2 * (60 * s.speed_minutes + measured["pretrain feature setup s"] + 30 *
                                measured["pretrain feature s/step"])
    for m in s.baselines:  # one after the other, in this process on every thread, as the phase runs them
        summary = _timed_pretrain(config(cal / f"pretrain_{m}", *short, *baseline_overrides(m)))
        per_step, setup = _log_rate(Path(summary["out_dir"]) / "log.jsonl", summary["wall"])
        measured[f"pretrain {m} s/step"], measured[f"pretrain {m} setup s"] = per_step, setup
        seconds[f"pretrain {m}"] = setup + s.pretrain_steps * per_step

    # evaluation: per protocol, one run at two step counts (both at once when the groups run at once)
    n_backbones = 3 + (2 if s.speed_minutes > 0 else 0) + len(s.baselines)
    total_eval = 0.0
    for protocol in s.protocols:
        # one run at two step counts, in every process at once: each process does the same work at the same time,
        # as the groups will (two jobs of different lengths would measure the longer one partly alone)
        few, more = (5, 25) if protocol == "finetune" else (20, 150)
        pairs = parallel_map(_timed_evaluation_pair, [(s, protocol, few, more)] * processes, s.workers)
        w_few, w_more = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        per_step = max((w_more - w_few) / (more - few), 0.0)
        setup = max(w_few - few * per_step, 0.0)
        measured[f"{protocol} s/step"], measured[f"{protocol} setup s"] = per_step, setup
        groups, per_group = evaluation_runs(s, protocol, n_backbones)
        waves = -(-groups // processes)  # groups are spread evenly over the processes
        total_eval += waves * per_group * (setup + protocol_steps(s, protocol) * per_step)
    seconds["evaluate"] = total_eval
    seconds["pictures"] = 3.0
    shutil.rmtree(cal, ignore_errors=True)
    took = time.perf_counter() - began
    return {"seconds": seconds, "total": sum(seconds.values()), "measured": measured, "took": took}


#: The phase name (in the expected times and the measured ones) of the two pretraining runs run at once.
PRETRAIN_AT_ONCE = "pretrain (feature + mixed, at once)"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


#: Above this expected time the demo names a faster option (it still carries on): the quick preset is made to fit
#: 15 minutes with the install on the slowest CPU of this project's machine kind.
SLOW_MINUTES = 15.0


def faster_option(s: DemoSettings, estimate: Mapping[str, Any]) -> str:
    """A faster way to run the demo than settings ``s``, with its expected time from the same measurement."""
    if s.budgets != PRESETS["quick"].budgets or s.pretrain_steps > PRESETS["quick"].pretrain_steps:
        return "--preset quick (the smaller preset)"
    secs = dict(estimate["seconds"])
    options = []
    if len(s.seeds) > 2:
        fewer = {**secs, "evaluate": secs["evaluate"] * 2 / len(s.seeds)}  # the grid's extra runs stay: an upper bound
        options.append(f"--seeds {s.seeds[0]} {s.seeds[1]} (about {_minutes(sum(fewer.values()))}; the stds rest on "
                       "two runs)")
    half = {k: v / 2 if k.startswith(("pretrain", "evaluate")) else v for k, v in secs.items()}  # steps halved
    options.append(f"--steps {max(s.pretrain_steps // 2, 1)} --probe-steps {max(s.probe_steps // 2, 1)}"
                   + (f" --eval-steps {max(s.eval_steps // 2, 1)}" if "finetune" in s.protocols else "")
                   + f" (about {_minutes(sum(half.values()))}; a weaker table, not comparable with the README's)")
    return " or ".join(options)


def run_demo(out: str | Path, settings: DemoSettings, overrides: Sequence[str] = (),
             say: Callable[[str], None] = logger.info, estimate_only: bool = False) -> dict[str, Any]:
    """Run every phase; ``say`` reports progress (the CLI prints). Returns the paths of every output, the
    evaluation results and the seconds each phase took.

    Work is fixed in steps: the table depends on the settings (and the thread count and CPU features recorded
    with it), never on the machine's speed. A wall-clock cap (``pretrain_minutes``, ``teacher_minutes``; off by
    default) is a safety net: what it cuts is marked in the table. With ``calibrate``, the first seconds measure this
    machine's speed and the expected time of every phase is said before the work starts; ``estimate_only`` stops
    there and returns ``{"estimate": ...}``.
    """
    from .evaluate import worker_pool

    with worker_pool(settings.workers):  # one pool of worker processes for every phase
        return _run_demo(Path(out), settings, overrides, say, estimate_only)


@dataclass
class _DemoRun:
    """What the demo's phases share: where and how it runs, the seconds each phase took and was expected to take,
    and what each phase leaves for the later ones and for the results."""

    out: Path
    s: DemoSettings
    overrides: Sequence[str]
    say: Callable[[str], None]
    start: float
    processes: int
    threads: int
    machine: dict[str, Any]
    times: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    teacher_dir: Path = Path()
    teacher_meta: dict[str, Any] = field(default_factory=dict)
    interp: dict[str, Any] = field(default_factory=dict)
    steps_done: dict[str, dict[str, int]] = field(default_factory=dict)
    cut: dict[str, str] = field(default_factory=dict)
    backbones: dict[str, str | None] = field(default_factory=lambda: {"scratch": None})
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def left(self) -> float:
        """The expected seconds of the phases not done yet."""
        return sum(v for k, v in self.expected.items() if k not in self.times)

    def phase(self, name: str, began: float) -> None:
        """Record a finished phase's seconds and say them, against its expected time and what is left."""
        self.times[name] = time.perf_counter() - began
        what = f" (expected {_minutes(self.expected[name])})" if name in self.expected else ""
        rest = f", about {_minutes(self.left())} left" if self.expected else ""
        self.say(f"      {name}: {self.times[name]:.0f} s{what}; {time.perf_counter() - self.start:.0f} s so far{rest}")

    def config(self, run_dir: Path, *extra: str):
        """A pretraining config of this demo; the user's overrides come after ``extra`` and win."""
        return pretrain_config(self.s, self.teacher_dir, run_dir, [*extra, *self.overrides])


def _calibration_phase(run: _DemoRun) -> dict[str, Any]:
    """1b: measure this machine's speed and say the expected time of every phase before the work starts."""
    s, machine = run.s, run.machine
    t0 = time.perf_counter()
    run.say(f"      measuring this machine's speed (a few steps of every phase; {run.processes} run(s) at once, "
            f"{run.threads} thread(s) each; {machine['cpu']}, {' '.join(machine['isa']) or 'no AVX2'})")
    estimate = estimate_phases(s, run.teacher_dir, run.out, run.overrides)
    run.expected.update(estimate["seconds"])
    run.say("      expected: " + ", ".join(f"{k} {_minutes(v)}" for k, v in run.expected.items())
            + f"; in all about {_minutes(estimate['total'])} from now")
    if estimate["total"] > 60 * SLOW_MINUTES:
        run.say(f"      note: over {SLOW_MINUTES:g} minutes on this machine. Faster: {faster_option(s, estimate)}. "
                "Carrying on (Ctrl-C stops).")
    run.phase("calibration", t0)
    return estimate


def _interpreter_phase(run: _DemoRun) -> None:
    """2: the interpreter on the smallest budget's images of label seed 0, whose held-out mIoU is the teacher's own
    quality; also notes a teacher that a time cap cut."""
    from .interpreter import train_interpreter

    s, out = run.s, run.out
    t0 = time.perf_counter()
    n_interp = min(s.budgets)
    run.say(f"[2/6] interpreter: {n_interp} labelled images (label seed 0), {s.interpreter_steps} steps")
    interp = run.interp = train_interpreter(run.config(out / "interpreter"), labels=n_interp, label_seed=0,
                                            steps=s.interpreter_steps, out=out / "interpreter", progress=s.progress)
    run.say(f"      loss {interp['first_loss']:.3f} -> {interp['last_loss']:.3f}; the teacher's own features: "
            f"held-out mIoU {100 * interp['test_miou']:.1f}%, foreground {100 * interp['test_fg_miou']:.1f}%")
    run.phase("interpreter", t0)
    run.steps_done["interpreter"] = {"done": s.interpreter_steps, "planned": s.interpreter_steps}
    meta = run.teacher_meta
    if s.retrain_teacher and meta.get("steps") is not None and meta["steps"] < s.teacher_steps:
        run.cut["teacher"] = f"the teacher trained {meta['steps']} of {s.teacher_steps} steps (time cap)"


def _pretrain_at_once(run: _DemoRun, kinds: Sequence[tuple[str, tuple[str, ...]]], cap: str) -> list[dict]:
    """3-4 with workers: both runs in worker processes at once, splitting the teacher's work through shared targets
    (removed afterwards); one progress bar follows both runs' logs."""
    from .evaluate import parallel_map
    from .train import pretrain

    s, out = run.s, run.out
    run.say(f"[3-4/6] pretrain, feature and mixed distillation at once ({run.threads} thread(s) each): resnet18 + "
            f"FPN/PPM regressor ({s.width} channels), {s.pretrain_steps} steps of {s.pretrain_batch} images each"
            f"{cap}; the teacher's targets are the same in both, so each run computes every other step's and reads "
            "the rest from the other (data.share_targets)")
    cfgs = [run.config(out / f"pretrain_{name}", *extra, "--run.progress=false",
                       *share_args(out / "shared_targets", i, len(kinds))) for i, (name, extra) in enumerate(kinds)]
    bar = None
    if s.progress:
        from .runtime import progress_bar

        bar = progress_bar(len(cfgs) * s.pretrain_steps, "pretrain (feature + mixed)", "step")
    seen = [0] * len(cfgs)

    def poll() -> None:
        for i, c in enumerate(cfgs):
            log = Path(c.run.out_dir) / "log.jsonl"
            try:
                lines = log.read_text().splitlines()
            except OSError:
                continue
            step = json.loads(lines[-1])["step"] if lines and lines[-1].strip() else 0
            if bar is not None and step > seen[i]:
                bar.update(step - seen[i])
            seen[i] = max(seen[i], step)

    try:
        summaries = parallel_map(pretrain, [(c,) for c in cfgs], s.workers, poll=poll)
        poll()
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(out / "shared_targets", ignore_errors=True)
    return summaries


def _pretrain_in_turn(run: _DemoRun, kinds: Sequence[tuple[str, tuple[str, ...]]],
                      cap: str) -> tuple[list[dict], float]:
    """3 then 4 in this process; returns the summaries and when the last run began (its phase is timed from it)."""
    from .train import pretrain

    s = run.s
    summaries = []
    for k, (name, extra) in enumerate(kinds, 3):
        run.say(f"[{k}/6] pretrain ({name} distillation): resnet18 + FPN/PPM regressor ({s.width} channels), "
                f"{s.pretrain_steps} steps of {s.pretrain_batch} images{cap}")
        t0 = time.perf_counter()
        summaries.append(pretrain(run.config(run.out / f"pretrain_{name}", *extra)))
        if name == "feature":
            run.phase("pretrain feature", t0)
    return summaries, t0


def _keep_pretrained(run: _DemoRun, kinds: Sequence[tuple[str, tuple[str, ...]]], summaries: list[dict]) -> None:
    """Export each pretrained backbone for the evaluation, record its steps and any time-cap cut, and say them."""
    from .export import export_backbone

    s = run.s
    for (name, _), summary in zip(kinds, summaries):
        run.runs[name] = summary
        backbone = f"DreamTeacher ({name})"
        run.backbones[backbone] = str(export_backbone(summary["checkpoint"], run.out / f"resnet18_{name}.safetensors"))
        run.steps_done[f"pretrain {name}"] = {"done": summary["step"], "planned": s.pretrain_steps}
        if summary["interrupted"]:
            run.cut[backbone] = f"{summary['step']} of {s.pretrain_steps} pretraining steps (time cap)"
        loss = f", last logged loss {summary['loss']:.4f}" if summary["loss"] is not None else ""
        run.say(f"      {name}: {summary['step']} of {s.pretrain_steps} steps"
                f"{' (CUT by the time cap)' if summary['interrupted'] else ''}{loss}")


def _pretraining_phase(run: _DemoRun) -> None:
    """3./4.: pretraining by feature and by mixed distillation, independent runs, at once when there are workers."""
    s = run.s
    kinds = (("feature", ()), ("mixed", (f"--label.interpreter={run.interp['path']}",)))
    cap = f", cap {s.pretrain_minutes:g} min" if s.pretrain_minutes > 0 else ""
    t0 = time.perf_counter()
    if run.processes > 1:
        summaries = _pretrain_at_once(run, kinds, cap)
        phase_name = PRETRAIN_AT_ONCE
    else:
        summaries, t0 = _pretrain_in_turn(run, kinds, cap)
        phase_name = "pretrain mixed"  # t0: when the mixed run began
    _keep_pretrained(run, kinds, summaries)
    run.phase(phase_name, t0)


def _baselines_phase(run: _DemoRun) -> None:
    """4c: each self-supervised baseline of :attr:`DemoSettings.baselines`, the same steps and batch as the
    DreamTeacher runs, at the demo's lr and the method's defaults (not tuned), in this process on every thread
    (alone, after the DreamTeacher runs: a third run beside them would slow all three)."""
    from .export import export_backbone
    from .train import pretrain

    s = run.s
    for m in s.baselines:
        name = BASELINE_NAMES[m]
        run.say(f"[4c] pretrain the {name} baseline (ssl.method={m}, lightly; not tuned): {s.pretrain_steps} steps "
                f"of {s.pretrain_batch} images")
        t0 = time.perf_counter()
        summary = pretrain(run.config(run.out / f"pretrain_{m}", *baseline_overrides(m)))
        run.backbones[name] = str(export_backbone(summary["checkpoint"], run.out / f"resnet18_{m}.safetensors"))
        run.steps_done[f"pretrain {m}"] = {"done": summary["step"], "planned": s.pretrain_steps}
        if summary["interrupted"]:
            run.cut[name] = f"{summary['step']} of {s.pretrain_steps} pretraining steps (time cap)"
        run.phase(f"pretrain {m}", t0)


#: Steps of each loop's throughput calibration before the equal-wall-clock runs (the last logged window, after the
#: first ten steps' warm-up, gives the images/s); the tests shrink it.
SPEED_CALIBRATION_STEPS = 30


def _speed_run(run: _DemoRun, name: str, naive: bool, budget_s: float) -> dict[str, Any]:
    """One loop (lean or naive) pretrained for ``budget_s``: steps set from a 30-step throughput calibration so its
    schedule finishes in the budget, then exported."""
    from .export import export_backbone
    from .train import pretrain

    s, out = run.s, run.out
    calib_dir = out / f"speed_{name}_calibration"
    steps, every = SPEED_CALIBRATION_STEPS, min(10, SPEED_CALIBRATION_STEPS)
    cal = pretrain(run.config(calib_dir, f"--run.steps={steps}", "--run.max_minutes=0", f"--run.log_every={every}",
                              f"--run.naive={naive}", "--run.progress=false"))
    records = [json.loads(line) for line in (Path(cal["out_dir"]) / "log.jsonl").read_text().splitlines()]
    ips = records[-1]["images_per_s"]  # the last window, after warm-up
    steps = max(int(budget_s * ips / s.pretrain_batch), 10)
    run.say(f"[speed] {name} loop: {ips:.1f} images/s in calibration -> {steps} steps in {s.speed_minutes:g} min")
    began = time.perf_counter()
    summary = pretrain(run.config(out / f"speed_{name}", f"--run.steps={steps}",
                                  f"--run.max_minutes={s.speed_minutes * 1.15:.3f}", f"--run.naive={naive}"))
    seconds = time.perf_counter() - began  # the whole run as a user waits for it, setup included
    return {"steps": summary["step"], "planned_steps": steps, "seconds": seconds,
            "images_per_s": summary["step"] * s.pretrain_batch / seconds, "interrupted": summary["interrupted"],
            "backbone": str(export_backbone(summary["checkpoint"], out / f"resnet18_speed_{name}.safetensors"))}


def _speed_phase(run: _DemoRun) -> None:
    """4b: speed turned into accuracy, lean vs naive loop on the same wall-clock budget (a time budget by design:
    the rows say how many steps each loop did in it)."""
    s = run.s
    t0 = time.perf_counter()
    budget_s = 60.0 * s.speed_minutes
    for name, naive in (("lean", False), ("naive", True)):
        run.speed[name] = _speed_run(run, name, naive, budget_s)
        run.backbones[f"{name} loop, {s.speed_minutes:g} min"] = run.speed[name]["backbone"]
    run.phase("speed", t0)


def _demo_results(run: _DemoRun, evaluated: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's results with what the table needs to be traced: settings, interpreter, speed runs, teacher,
    machine, steps done, cuts and the phase times so far."""
    from .data import labelled_indices
    from .evaluate import summarize

    s, n_interp = run.s, min(run.s.budgets)
    results = {"config": evaluated["config"], "runs": evaluated["runs"], "selection": evaluated["selection"]}
    results["summary"] = summarize(results["runs"])
    results["config"]["protocols"] = list(s.protocols)
    results["config"]["n_val"] = evaluated["n_val"]
    results["config"]["phase_seconds"] = dict(run.times)
    results["config"]["settings"] = dataclasses.asdict(s)
    results["config"]["interpreter"] = {"labels": n_interp, "label_seed": 0, "images": labelled_indices(n_interp, 0),
                                        "test_miou": run.interp["test_miou"],
                                        "test_fg_miou": run.interp["test_fg_miou"]}
    results["config"]["speed"] = run.speed
    results["config"]["teacher"] = {"path": str(run.teacher_dir), **{k: run.teacher_meta.get(k) for k in (
        "steps", "command", "seed", "fixed_batch_loss", "sha256")}}
    results["config"]["ran"] = {"machine": run.machine, "steps": run.steps_done, "cut": run.cut,
                                "expected_seconds": dict(run.expected)}
    return results


def _evaluation_phase(run: _DemoRun) -> tuple[dict[str, Any], Path, Path]:
    """5: every backbone, one call per protocol, each with its own learning-rate grid chosen on the validation
    split; writes the results (JSON and Markdown) and returns them with their paths."""
    from .evaluate import write_results

    s = run.s
    t0 = time.perf_counter()
    run.say(f"[5/6] evaluate: {len(run.backbones)} backbones x label budgets {s.budgets} x seeds {s.seeds} x "
            f"{'/'.join(s.protocols)}, " + ", ".join(f"{p} {protocol_steps(s, p)} steps at {_lr_words(s, p)}"
                                                     for p in s.protocols) +
            f", mIoU on {s.n_test} held-out images" + (f"; {run.processes} groups at once" if run.processes > 1
                                                       else ""))
    evaluated = evaluate_protocols(run.backbones, s, save_models=run.out / "evaluate" / "models",
                                   save_seeds=[s.seeds[0]])
    for p in s.protocols:
        run.steps_done[f"evaluate {p}"] = {"done": protocol_steps(s, p), "planned": protocol_steps(s, p)}
    results = _demo_results(run, evaluated)
    json_path, md_path = write_results(results, run.out / "evaluate")
    run.phase("evaluate", t0)
    return results, json_path, md_path


def _pictures_phase(run: _DemoRun, results: Mapping[str, Any]) -> list[str]:
    """6: PCA of teacher vs student features with masks and a fine-tuned model's prediction, and the loss curves."""
    import torch

    from .data import SHAPE_CLASSES, TEST_SEED, ProceduralShapes
    from .evaluate import load_segmentation_model
    from .viz import feature_figure, loss_curves, student_teacher_features

    s, out, runs = run.s, run.out, run.runs
    t0 = time.perf_counter()
    run.say("[6/6] pictures")
    ds = ProceduralShapes(4, s.image_size, seed=TEST_SEED)
    images = torch.stack([ds[i][0] for i in range(4)])
    masks = torch.stack([ds[i][1] for i in range(4)])
    teacher_f, student_f = student_teacher_features(runs["mixed"]["checkpoint"], images)
    seg_run = next(r for r in results["runs"] if r["backbone"] == "DreamTeacher (mixed)" and r["labels"] ==
                   max(s.budgets) and "model" in r and r["protocol"] == s.protocols[0])
    with torch.inference_mode():
        pred = load_segmentation_model(seg_run["model"])(images).argmax(1)
    features_png = feature_figure(images, teacher_f, student_f, masks, pred, out / "features.png",
                                  class_names=list(SHAPE_CLASSES))
    curves_png = loss_curves({"feature": Path(runs["feature"]["out_dir"]) / "log.jsonl",
                              "mixed": Path(runs["mixed"]["out_dir"]) / "log.jsonl"}, out / "curves.png")
    teacher_png = loss_curves({"teacher (epsilon MSE)": run.teacher_dir / "log.jsonl",
                               "interpreter (CE + 3 Dice)": out / "interpreter" / "log.jsonl"},
                              out / "curves_teacher_interpreter.png")
    run.phase("pictures", t0)
    return [str(features_png), str(curves_png), str(teacher_png)]


def _run_demo(out: Path, s: DemoSettings, overrides: Sequence[str], say: Callable[[str], None],
              estimate_only: bool) -> dict[str, Any]:
    """The phases in the order the log says them: teacher, calibration, interpreter, pretraining, speed, evaluation,
    pictures."""
    from .evaluate import markdown_table, worker_split
    from .runtime import machine_info

    start = time.perf_counter()
    processes, threads = worker_split(s.workers)
    machine = {**machine_info(), "workers": processes, "threads_per_run": threads}
    run = _DemoRun(out=out, s=s, overrides=overrides, say=say, start=start, processes=processes, threads=threads,
                   machine=machine)
    t0 = time.perf_counter()
    run.teacher_dir, run.teacher_meta = _teacher_phase(out, s, say)
    run.phase("teacher", t0)
    estimate = None
    if s.calibrate or estimate_only:
        estimate = _calibration_phase(run)
        if estimate_only:
            return {"estimate": estimate, "machine": machine, "seconds": time.perf_counter() - start}
    _interpreter_phase(run)
    _pretraining_phase(run)
    if s.baselines:
        _baselines_phase(run)
    if s.speed_minutes > 0:
        _speed_phase(run)
    results, json_path, md_path = _evaluation_phase(run)
    pictures = _pictures_phase(run, results)
    table = markdown_table(results)
    return {"results": results, "table": table, "json": str(json_path), "markdown": str(md_path),
            "teacher": str(run.teacher_dir), "interpreter": run.interp["path"],
            "runs": {k: v["out_dir"] for k, v in run.runs.items()}, "backbones": run.backbones, "pictures": pictures,
            "seconds": time.perf_counter() - start, "phase_seconds": run.times, "cut": run.cut, "machine": machine,
            "estimate": estimate}
