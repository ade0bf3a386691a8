"""``dreamteacher compare``: DreamTeacher beside the self-supervised baselines, on the same data with the same compute.

Every row pretrains the same resnet18 student on the same images (the demo's procedural training set, or a folder)
with the same optimizer steps and batch size; only the objective differs. Phases, each a function below sharing a
:class:`_CompareRun` (the demo's :class:`~dreamteacher.demo._DemoRun` plus what the comparison adds):

1. teacher and interpreter: the demo's phases (:mod:`dreamteacher.demo`);
2. timing: seconds per step of DreamTeacher and of every baseline, from short runs made the way the long runs are
   (as many at once, one thread share each): the expected time said up front, and the equal-wall-clock budget;
3. DreamTeacher: the demo's pretraining phase (feature and mixed distillation at once), the demo's settings, never
   tuned here;
4. the baselines' grid: each method's ``optim.lr`` and, where it reads them, ``ssl.temperature`` / ``ssl.momentum``,
   one axis at a time (the learning rates at the method's defaults, then each other axis at the best point so far).
   Every point is a full pretraining run at the rows' steps and batch; each is scored by a cheap evaluation read on
   the validation split only (:func:`score_on_validation`) and the best point's exported backbone is the row;
5. evaluation: the demo's :func:`~dreamteacher.demo.evaluate_protocols` of scratch, the DreamTeacher rows and the
   chosen baselines (budgets, seeds, protocols, learning rates chosen on the validation split);
6. equal wall-clock (``CompareSettings.wallclock``, on by default): each baseline, at its chosen point, for the steps
   that fit the DreamTeacher row's pretraining time, evaluated the same way.

Writes ``OUT/results.json`` and ``OUT/results.md``. Library code: it logs, and returns what the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo import (
    BASELINE_NAMES,
    DemoSettings,
    _DemoRun,
    _interpreter_phase,
    _log_rate,
    _minutes,
    _pretraining_phase,
    _teacher_phase,
    _timed_pretrain,
    baseline_overrides,
    evaluate_protocols,
    pretrain_config,
    protocol_lr,
)

logger = logging.getLogger("dreamteacher")

__all__ = ["CompareSettings", "run_compare", "grid_axes", "score_on_validation", "choose", "reading",
           "compare_tables", "TUNED", "DEFAULT_GRID"]

#: The hyper-parameters besides ``optim.lr`` each method's grid tunes: the ones the methods' papers vary (NT-Xent's
#: temperature; the momentum of the key / target encoder).
TUNED: dict[str, tuple[str, ...]] = {"simclr": ("ssl.temperature",), "densecl": ("ssl.temperature",),
                                     "moco": ("ssl.temperature", "ssl.momentum"), "byol": ("ssl.momentum",)}
#: Each axis's values when the caller gives none: the method's own default first (the lr stage runs at it), then
#: the one alternative short runs on small images usually prefer (a lower temperature sharpens the contrast; a lower
#: momentum lets a key encoder of a few thousand steps keep up).
DEFAULT_GRID: dict[str, dict[str, list[float]]] = {
    "ssl.temperature": {"simclr": [0.5, 0.2], "moco": [0.2, 0.1], "densecl": [0.2, 0.1]},
    "ssl.momentum": {"moco": [0.999, 0.99], "byol": [0.996, 0.99]},
}
#: The DreamTeacher rows, in the demo's names, and what they are.
DREAMTEACHER_ROWS = {"DreamTeacher (feature)": "dreamteacher (feature distillation)",
                     "DreamTeacher (mixed)": "dreamteacher (feature + label distillation)"}


@dataclass
class CompareSettings:
    """What the comparison adds to the demo's sizes (:class:`~dreamteacher.demo.DemoSettings`)."""

    #: baselines (``ssl.method`` values), each one row; default one global and one dense method
    methods: list[str] = field(default_factory=lambda: ["simclr", "densecl"])
    #: the baselines' learning rates: around the demo's 2e-3 (DreamTeacher's, not tuned)
    grid_lr: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])
    #: ``ssl.temperature`` values for the methods that read it; None: :data:`DEFAULT_GRID`'s per method. The first
    #: value is the one the learning-rate stage runs at.
    grid_temperature: list[float] | None = None
    #: ``ssl.momentum`` values, the same way
    grid_momentum: list[float] | None = None
    #: also pretrain and evaluate every baseline at equal wall-clock (the DreamTeacher row's pretraining time): about
    #: a sixth more time at the default sizes (two runs at once of the DreamTeacher row's time, two more backbones)
    wallclock: bool = True
    #: steps of each timing run (seconds per step are read after the first logged step)
    timing_steps: int = 30
    #: a folder of pretraining images instead of the built-in procedural set (``data.source``)
    data: str | None = None
    #: the command line, written under the tables
    command: str = "dreamteacher compare"


# ------------------------------------------------------------------------------------------------ the grid
def grid_axes(method: str, c: CompareSettings) -> list[tuple[str, list[float]]]:
    """``[(key, values), ...]`` the method's grid searches, ``optim.lr`` first; an axis of one value is fixed."""
    axes = [("optim.lr", [float(v) for v in c.grid_lr])]
    for key in TUNED[method]:
        given = c.grid_temperature if key == "ssl.temperature" else c.grid_momentum
        axes.append((key, [float(v) for v in (given if given is not None else DEFAULT_GRID[key][method])]))
    return axes


def _stage_points(axes: Sequence[tuple[str, list[float]]], stage: int,
                  best: Mapping[str, float] | None) -> list[dict[str, float]]:
    """The points of ``stage``: stage 0 every learning rate at the other axes' first values; stage k the best point
    so far with axis k's other values (its first value is the best point itself, already scored)."""
    start = {key: values[0] for key, values in axes}
    if stage == 0:
        return [{**start, "optim.lr": v} for v in axes[0][1]]
    key, values = axes[stage]
    return [{**best, key: v} for v in values if v != best[key]]


def choose(points: Sequence[Mapping[str, Any]]) -> int:
    """The index of the point with the best validation score (ties: the first scored; a diverged point, score None
    or NaN, ranks below every score)."""
    def score(i: int) -> float:
        v = points[i].get("val_miou")
        return -math.inf if v is None or math.isnan(v) else v

    return max(range(len(points)), key=lambda i: (score(i), -i))


def score_on_validation(backbones: Mapping[str, str], s: DemoSettings) -> dict[str, float | None]:
    """The cheap evaluation the grid is chosen by: the probe (frozen backbone, head only) at the largest label budget
    and the first seed, its learning rate chosen from the probe grid, scored on the labelled pool's validation
    split. The validation split is also what the runs are "tested" on: the test split is never read here.

    Returns:
        backbone name -> the best validation mIoU over the probe's learning rates (None: every run diverged).
    """
    from .data import SHAPE_CLASSES
    from .evaluate import builtin_splits, builtin_validation_split, evaluate_backbones

    train_set = builtin_splits(s.image_size, s.n_test)[0]  # the labelled pool less the validation split
    val_set = builtin_validation_split(s.image_size)
    res = evaluate_backbones(dict(backbones), train_set, val_set, budgets=[max(s.budgets)], seeds=s.seeds[:1],
                             class_names=list(SHAPE_CLASSES), steps=s.probe_steps, batch_size=s.eval_batch,
                             lr=protocol_lr(s, "probe"), protocols=["probe"], val_set=val_set, progress=False,
                             workers=s.workers)
    scores: dict[str, list[float]] = {name: [] for name in backbones}
    for sel in res["selection"]:  # with a probe grid: every value's validation mIoU
        scores[sel["backbone"]] += [v for v in sel["val_miou"].values() if v is not None]
    for run in res["runs"]:  # without one: the one run's
        if run.get("val_miou") is not None:
            scores[run["backbone"]].append(run["val_miou"])
    return {name: max((v for v in vals if not math.isnan(v)), default=None) for name, vals in scores.items()}


def _grid_job(cfg) -> dict[str, Any]:
    """One grid point's pretraining (a worker job): its wall seconds and exported backbone, or that it diverged
    (a too-large learning rate is a result of the grid, not an error)."""
    from .export import export_backbone
    from .faults import Diverged
    from .train import pretrain

    began = time.perf_counter()
    try:
        summary = pretrain(cfg)
    except Diverged as e:
        return {"diverged": str(e), "seconds": time.perf_counter() - began, "steps": 0}
    out = Path(summary["out_dir"])
    backbone = export_backbone(summary["checkpoint"], out / "backbone.safetensors")
    return {"seconds": time.perf_counter() - began, "steps": summary["step"], "loss": summary["loss"],
            "interrupted": summary["interrupted"], "backbone": str(backbone), "out_dir": str(out),
            "checkpoint": summary["checkpoint"]}


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _CompareRun:
    """What the comparison's phases share: the demo's run (teacher, interpreter, DreamTeacher rows, times) and what
    the comparison adds to it."""

    demo: _DemoRun
    c: CompareSettings
    #: every run's overrides: the user's, and ``data.source`` for ``--data``
    overrides: list[str]
    seconds_per_step: dict[str, float] = field(default_factory=dict)
    #: method -> its grid's points in the order they were scored
    grid: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: row name -> method, steps, images, hyper-parameters (and for a baseline its grid and what the choice cost)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    wallclock: dict[str, Any] = field(default_factory=dict)

    def config(self, run_dir: Path, *extra: str):
        """A pretraining config at the demo's settings; ``extra`` (a grid point's keys) wins over the user's
        overrides, so a point is what its record says."""
        return pretrain_config(self.demo.s, self.demo.teacher_dir, run_dir, [*self.overrides, *extra])

    def run_args(self) -> list[str]:
        """A long run's progress bar only in this process (in a worker it would interleave with the other's)."""
        return ["--run.progress=false"] if self.demo.processes > 1 else []


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _timing_phase(run: _CompareRun) -> None:
    """2: seconds per step of every row kind from short runs, each made by as many copies at once as the long runs
    run at once (the same share of the machine each); DreamTeacher's without the demo's target sharing, so its
    time is that of a DreamTeacher run alone (the larger: the equal-wall-clock budget favours the baselines)."""
    from .evaluate import parallel_map

    d, s, c = run.demo, run.demo.s, run.c
    t0 = time.perf_counter()
    k = c.timing_steps
    short = [f"--run.steps={k}", f"--run.log_every={max(k // 6, 1)}", "--run.max_minutes=0",
             "--run.ckpt_every=1000000", "--run.progress=false"]
    kinds = {"DreamTeacher (feature)": [], "DreamTeacher (mixed)": [f"--label.interpreter={d.interp['path']}"]}
    for m in c.methods:
        kinds[BASELINE_NAMES[m]] = baseline_overrides(m, _stage_points(grid_axes(m, c), 0, None)[0])
    names = [name for name in kinds for _ in range(d.processes)]
    jobs = [(run.config(d.out / "timing" / f"{_slug(name)}_{i % d.processes}", *kinds[name], *short),)
            for i, name in enumerate(names)]
    d.say(f"[timing] {k} steps of each of {len(kinds)} objectives ({d.processes} at once), to say the expected "
          "time and set the equal-wall-clock budget")
    per: dict[str, list[float]] = {}
    for name, summary in zip(names, parallel_map(_timed_pretrain, jobs, s.workers)):
        per.setdefault(name, []).append(_log_rate(Path(summary["out_dir"]) / "log.jsonl", summary["wall"])[0])
    run.seconds_per_step = {name: sum(v) / len(v) for name, v in per.items()}
    shutil.rmtree(d.out / "timing", ignore_errors=True)
    d.say("      seconds per step: " + ", ".join(f"{n} {v:.3f}" for n, v in run.seconds_per_step.items()))
    n_points = {m: len(grid_axes(m, c)[0][1]) + sum(len(v) - 1 for _, v in grid_axes(m, c)[1:]) for m in c.methods}
    expected = {"DreamTeacher pretraining": s.pretrain_steps * max(run.seconds_per_step[n] for n in DREAMTEACHER_ROWS),
                "baselines' grid": sum(n_points[m] * s.pretrain_steps * run.seconds_per_step[BASELINE_NAMES[m]]
                                       for m in c.methods) / d.processes}
    if c.wallclock:
        expected["equal wall-clock runs"] = len(c.methods) * expected["DreamTeacher pretraining"] / d.processes
    d.say("      expected (pretraining only; the evaluations come on top): " + ", ".join(
        f"{k} about {_minutes(v)}" for k, v in expected.items())
        + f"; the grid is {sum(n_points.values())} runs of {s.pretrain_steps} steps")
    d.phase("timing", t0)


def _pretrain_points(run: _CompareRun, points: Sequence[tuple[str, dict[str, float], str]]) -> None:
    """Pretrain one stage's points, ``(method, hyper-parameters, the axis the stage searches)``, as many at once as
    there are workers, then score them on the validation split (:func:`score_on_validation`) and add them to their
    method's grid."""
    from .evaluate import parallel_map

    d, s = run.demo, run.demo.s
    records, jobs = [], []
    for m, hp, stage in points:
        index = len(run.grid[m]) + sum(r["method"] == m for r in records)
        run_dir = d.out / "baselines" / m / f"point{index}"
        records.append({"method": m, "point": index, "stage": stage, "hyperparameters": hp, "out_dir": str(run_dir)})
        jobs.append((run.config(run_dir, *baseline_overrides(m, hp), *run.run_args()),))
    d.say(f"[grid] {len(jobs)} run(s) of {s.pretrain_steps} steps of {s.pretrain_batch} images: "
          + "; ".join(f"{r['method']} ({r['stage']}) {_hp_text(r['hyperparameters'])}" for r in records))

    def done_one(i: int, result: dict) -> None:
        what = "diverged" if "diverged" in result else f"{result['steps']} steps"
        d.say(f"      {records[i]['method']} point {records[i]['point']}: {what} in {result['seconds']:.0f} s")

    for rec, result in zip(records, parallel_map(_grid_job, jobs, s.workers, on_done=done_one)):
        rec.update(result)
        rec["steps"] = result["steps"] if "diverged" not in result else s.pretrain_steps  # at most: cost bound
        rec["images"] = rec["steps"] * s.pretrain_batch
    named = {f"{r['method']} #{r['point']}": r for r in records if "backbone" in r}
    t0 = time.perf_counter()
    scores = score_on_validation({n: r["backbone"] for n, r in named.items()}, s) if named else {}
    share = (time.perf_counter() - t0) / max(len(named), 1)  # the same evaluation for every point
    for rec in records:
        name = f"{rec['method']} #{rec['point']}"
        rec["val_miou"], rec["selection_seconds"] = scores.get(name), share if name in named else 0.0
        run.grid[rec["method"]].append(rec)
        d.say(f"      {name} ({_hp_text(rec['hyperparameters'])}): validation "
              "mIoU " + ("–" if rec["val_miou"] is None else f"{100 * rec['val_miou']:.1f}"))


def _grid_phase(run: _CompareRun) -> None:
    """4: every method's grid, one axis at a time and every method's points of a stage at once; each method's row is
    its best point on the validation split. Only the chosen point's checkpoints are kept (the others keep their
    log, config and exported backbone)."""
    d, s, c = run.demo, run.demo.s, run.c
    t0 = time.perf_counter()
    axes = {m: grid_axes(m, c) for m in c.methods}
    run.grid = {m: [] for m in c.methods}
    for stage in range(max(len(a) for a in axes.values())):
        best = {m: run.grid[m][choose(run.grid[m])]["hyperparameters"] if run.grid[m] else None for m in c.methods}
        points = [(m, p, axes[m][stage][0]) for m in c.methods if stage < len(axes[m])
                  for p in _stage_points(axes[m], stage, best[m])]
        if points:
            _pretrain_points(run, points)
    for m in c.methods:
        chosen = run.grid[m][choose(run.grid[m])]
        for rec in run.grid[m]:
            rec["chosen"] = rec is chosen
            if rec is not chosen and rec.get("out_dir"):
                shutil.rmtree(Path(rec["out_dir"]) / "checkpoints", ignore_errors=True)
        cost = {"runs": len(run.grid[m]), "steps": sum(r["steps"] for r in run.grid[m]),
                "images": sum(r["images"] for r in run.grid[m]),
                "pretrain_seconds": sum(r["seconds"] for r in run.grid[m]),
                "selection_seconds": sum(r["selection_seconds"] for r in run.grid[m])}
        cost["seconds"] = cost["pretrain_seconds"] + cost["selection_seconds"]
        name = BASELINE_NAMES[m]
        run.rows[name] = {"method": m, "steps": chosen["steps"], "batch_size": s.pretrain_batch,
                          "images": chosen["images"], "hyperparameters": chosen["hyperparameters"],
                          "chosen_on": "validation", "backbone": chosen.get("backbone"),
                          "grid": [{k: r.get(k) for k in ("point", "stage", "hyperparameters", "steps", "images",
                                                          "seconds", "selection_seconds", "val_miou", "diverged",
                                                          "chosen")} for r in run.grid[m]],
                          "choice_cost": cost}
        d.steps_done[f"pretrain {m}"] = {"done": chosen["steps"], "planned": s.pretrain_steps}
        if chosen.get("interrupted"):
            d.cut[name] = f"{chosen['steps']} of {s.pretrain_steps} pretraining steps (time cap)"
        d.say(f"      {name}: chose {_hp_text(chosen['hyperparameters'])}"
              + ("" if chosen.get("backbone") else " (every point diverged: no row)")
              + f" on the validation split; the choice cost {cost['runs']} runs, {cost['steps']} steps, "
              f"{cost['seconds']:.0f} s")
    d.phase("baselines grid", t0)


def _dreamteacher_rows(run: _CompareRun) -> None:
    """What the DreamTeacher rows were trained with (their config files, as written), for the results."""
    from .config import load_config

    s = run.demo.s
    for name, kind in zip(DREAMTEACHER_ROWS, ("feature", "mixed")):
        summary = run.demo.runs.get(kind)
        if summary is None:
            continue
        cfg = load_config(Path(summary["out_dir"]) / "config.yaml", [])
        run.rows[name] = {"method": DREAMTEACHER_ROWS[name], "steps": summary["step"], "batch_size": s.pretrain_batch,
                          "images": summary["step"] * s.pretrain_batch,
                          "hyperparameters": {"optim.lr": cfg.optim.lr, "teacher.t": cfg.teacher.t,
                                              "loss.at_weight": cfg.loss.at_weight, "loss.whiten": cfg.loss.whiten},
                          "chosen_on": "not tuned (the demo's settings)", "backbone": run.demo.backbones.get(name)}


def _evaluation_phase(run: _CompareRun) -> dict[str, Any]:
    """5: scratch, the DreamTeacher rows and every chosen baseline, the demo's evaluation call (same budgets, seeds,
    protocols, learning rates chosen on the validation split)."""
    d, s = run.demo, run.demo.s
    t0 = time.perf_counter()
    backbones = dict(d.backbones)  # scratch and the DreamTeacher rows, as the demo's phase left them
    backbones.update({name: row["backbone"] for name, row in run.rows.items()
                      if name not in backbones and row.get("backbone")})
    d.say(f"[evaluate] {len(backbones)} backbones x label budgets {s.budgets} x seeds {s.seeds} x "
          f"{'/'.join(s.protocols)}, mIoU on {s.n_test} held-out images")
    evaluated = evaluate_protocols(backbones, s)
    d.phase("evaluate", t0)
    return evaluated


def _wallclock_phase(run: _CompareRun) -> None:
    """6: each baseline at its chosen point for the steps that fit the DreamTeacher row's pretraining time
    (:attr:`_CompareRun.seconds_per_step`: DreamTeacher's steps times its seconds per step, the mixed row's, the
    larger), then the demo's evaluation of those rows. A row whose steps equal the grid's reuses its backbone."""
    from .evaluate import parallel_map

    d, s = run.demo, run.demo.s
    t0 = time.perf_counter()
    reference = "DreamTeacher (mixed)"
    budget = s.pretrain_steps * run.seconds_per_step[reference]
    rows, jobs = {}, []
    for name, row in run.rows.items():
        if row["method"] not in BASELINE_NAMES or not row.get("backbone"):
            continue
        steps = max(int(budget / run.seconds_per_step[name]), 1)
        rows[f"{name} (equal time)"] = {"method": row["method"], "steps": steps, "batch_size": s.pretrain_batch,
                                        "images": steps * s.pretrain_batch, "hyperparameters": row["hyperparameters"],
                                        "seconds_per_step": run.seconds_per_step[name],
                                        "expected_seconds": steps * run.seconds_per_step[name]}
        if steps == row["steps"]:
            rows[f"{name} (equal time)"]["backbone"] = row["backbone"]
            continue
        extra = [*baseline_overrides(row["method"], row["hyperparameters"]), f"--run.steps={steps}",
                 f"--run.ckpt_every={max(steps // 2, 1)}", *run.run_args()]
        jobs.append((f"{name} (equal time)", run.config(d.out / "wallclock" / row["method"], *extra)))
    d.say(f"[equal wall-clock] {reference}: {s.pretrain_steps} steps x {run.seconds_per_step[reference]:.3f} s = "
          f"{budget:.0f} s of pretraining; " + ", ".join(f"{n}: {r['steps']} steps" for n, r in rows.items()))
    for (name, _), result in zip(jobs, parallel_map(_grid_job, [(cfg,) for _, cfg in jobs], s.workers)):
        rows[name].update({k: result.get(k) for k in ("backbone", "seconds", "diverged")})
        rows[name]["steps"] = result["steps"] or rows[name]["steps"]
    backbones = {n: r["backbone"] for n, r in rows.items() if r.get("backbone")}
    evaluated = evaluate_protocols(backbones, s) if backbones else {"runs": [], "selection": []}
    from .evaluate import summarize

    run.wallclock = {"reference": reference, "budget_seconds": budget, "rows": rows, "runs": evaluated["runs"],
                     "selection": evaluated["selection"], "summary": summarize(evaluated["runs"])}
    d.phase("equal wall-clock", t0)


# ------------------------------------------------------------------------------------------------ reading
def reading(summary: Sequence[Mapping[str, Any]], dreamteacher_rows: Sequence[str],
            baseline_rows: Sequence[str]) -> list[dict[str, Any]]:
    """Per (protocol, label budget) and DreamTeacher row: the difference of its mean mIoU from the best baseline's
    (the best by the test mean: the comparison is the hardest for DreamTeacher), and the verdict against the larger
    of the two rows' std over seeds: ``ties`` within it, else ``wins`` or ``loses``."""
    cell = {(x["protocol"], x["backbone"], x["labels"]): x for x in summary}
    out = []
    for protocol, n in dict.fromkeys((x["protocol"], x["labels"]) for x in summary):
        base = [cell[protocol, b, n] for b in baseline_rows
                if (protocol, b, n) in cell and not math.isnan(cell[protocol, b, n]["miou_mean"])]
        if not base:
            continue
        best = max(base, key=lambda x: x["miou_mean"])
        for name in dreamteacher_rows:
            dt = cell.get((protocol, name, n))
            if dt is None or math.isnan(dt["miou_mean"]):
                continue
            diff, std = dt["miou_mean"] - best["miou_mean"], max(dt["miou_std"], best["miou_std"])
            verdict = "ties" if abs(diff) <= std else "wins" if diff > 0 else "loses"
            out.append({"protocol": protocol, "labels": n, "dreamteacher": name, "baseline": best["backbone"],
                        "dreamteacher_miou": dt["miou_mean"], "baseline_miou": best["miou_mean"], "difference": diff,
                        "larger_std": std, "seeds": min(dt["n_seeds"], best["n_seeds"]), "verdict": verdict})
    return out


def _reading_lines(items: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for r in items:
        times = (f", {abs(r['difference']) / r['larger_std']:.1f}x" if r["larger_std"] > 0 else "")
        lines.append(f"* {r['protocol']}, {r['labels']} labels: {r['dreamteacher']} **{r['verdict']}** against "
                     f"{r['baseline']}: {100 * r['dreamteacher_miou']:.1f} vs {100 * r['baseline_miou']:.1f} mIoU "
                     f"({100 * r['difference']:+.1f}; the larger std over {r['seeds']} seed(s) is "
                     f"{100 * r['larger_std']:.1f}{times})")
    return lines


def _hp_text(hp: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def _rows_table(results: Mapping[str, Any]) -> list[str]:
    """Each row's method, budget in steps and images, hyper-parameters and how they were chosen, what the choice
    cost; then every grid point's validation score."""
    rows = results["rows"]
    lines = ["", "Rows: the same student, images, steps and batch size; only the objective differs.", "",
             "| row | method | pretraining steps | images | hyper-parameters | chosen | what the choice cost |",
             "|---|---|---:|---:|---|---|---|"]
    for name, r in rows.items():
        cost = r.get("choice_cost")
        cost_text = (f"{cost['runs']} runs, {cost['steps']} steps ({cost['images']} images), {cost['seconds']:.0f} s"
                     if cost else "–")
        lines.append(f"| {name} | {r['method']} | {r['steps']} | {r['images']} | {_hp_text(r['hyperparameters'])} "
                     f"| {r['chosen_on']} | {cost_text} |")
    grid = [(name, g) for name, r in rows.items() for g in r.get("grid", [])]
    if grid:
        probe = results["config"]["selection_probe"]
        lines += ["", f"The baselines' grid, one axis at a time (learning rates first, then each other axis at the "
                      f"best point so far): validation mIoU of the probe at {probe['labels']} labels, seed "
                      f"{probe['seed']}, {probe['steps']} steps (its lr the best of {probe['lr']}), on "
                      f"{results['config']['n_val']} validation images; the test split plays no part.", "",
                  "| row | point | axis | hyper-parameters | validation mIoU | pretraining s | chosen |",
                  "|---|---:|---|---|---:|---:|---|"]
        for name, g in grid:
            score = ("diverged" if g.get("diverged") else "–" if g["val_miou"] is None
                     else f"{100 * g['val_miou']:.1f}")
            lines.append(f"| {name} | {g['point']} | {g['stage']} | {_hp_text(g['hyperparameters'])} | {score} | "
                         f"{g['seconds']:.0f} | {'yes' if g['chosen'] else ''} |")
    return lines


def _wallclock_lines(results: Mapping[str, Any]) -> list[str]:
    """The equal-wall-clock table: the DreamTeacher rows at their steps beside each baseline at the steps that fit
    the reference row's time, mIoU mean ± std per protocol and budget."""
    from .evaluate import _pm

    wc, sps = results["wallclock"], results["seconds_per_step"]
    summary = [x for x in results["summary"] if x["backbone"] in DREAMTEACHER_ROWS] + wc["summary"]
    budgets = list(dict.fromkeys(x["labels"] for x in summary))
    cell = {(x["protocol"], x["backbone"], x["labels"]): x for x in summary}
    rows = {**{n: results["rows"][n] for n in DREAMTEACHER_ROWS if n in results["rows"]}, **wc["rows"]}
    lines = ["", f"Equal wall-clock: every row gets the pretraining time of {wc['reference']} "
                 f"({wc['budget_seconds']:.0f} s: its steps x its seconds per step on this machine, timed without "
                 "the demo's target sharing); "
                 "each baseline at its chosen point for the steps that fit.", "",
             "| protocol | row | pretraining steps | images | s/step | " + " | ".join(f"{n} labels" for n in budgets)
             + " |", "|---|---|---:|---:|---:|" + "---:|" * len(budgets)]
    for protocol in dict.fromkeys(x["protocol"] for x in summary):
        for name, r in rows.items():
            per_step = r.get("seconds_per_step", sps.get(name))
            vals = [_pm(cell[protocol, name, n]["miou_mean"], cell[protocol, name, n]["miou_std"])
                    if (protocol, name, n) in cell else "" for n in budgets]
            lines.append(f"| {protocol} | {name} | {r['steps']} | {r['images']} | {per_step:.3f} | "
                         + " | ".join(vals) + " |")
    return lines + ["", "Reading at equal wall-clock:", ""] + _reading_lines(wc["reading"])


def compare_tables(results: Mapping[str, Any]) -> str:
    """The demo's tables of the evaluation, then the rows and the grid, the reading, the equal-wall-clock table and
    the command, date and CPU."""
    from .evaluate import markdown_table

    lines = [markdown_table(results).rstrip("\n")] + _rows_table(results)
    lines += ["", "Reading (mIoU; the best baseline is the one with the best test mean per protocol and budget, the "
                  "hardest comparison for DreamTeacher; a tie is a difference within the larger std over seeds):",
              ""] + _reading_lines(results["reading"])
    if results.get("wallclock"):
        lines += _wallclock_lines(results)
    m = results["machine"]
    lines += ["", f"Command: `{results['config']['command']}`; {results['config']['date']}; CPU {m['cpu']} "
                  f"({' '.join(m.get('isa', [])) or 'no AVX2'}), {m.get('workers', 1)} run(s) at once with "
                  f"{m.get('threads_per_run', m.get('threads'))} thread(s) each, torch {m.get('torch')}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ entry point
def _check(c: CompareSettings) -> None:
    """Refuse settings that would fail only after the DreamTeacher runs were spent."""
    bad = [m for m in c.methods if m not in BASELINE_NAMES]
    if bad or not c.methods or len(set(c.methods)) != len(c.methods):
        raise ValueError(f"methods: expected distinct baselines among {', '.join(BASELINE_NAMES)}, got {c.methods}")
    for key, values in (("grid_lr", c.grid_lr), ("grid_temperature", c.grid_temperature),
                        ("grid_momentum", c.grid_momentum)):
        if values is not None and (not values or len(set(values)) != len(values)):
            raise ValueError(f"{key}: expected distinct values, got {values}")
    if c.grid_momentum is not None and any(not 0 <= v < 1 for v in c.grid_momentum):
        raise ValueError(f"grid_momentum: expected momenta in [0, 1), got {c.grid_momentum}")
    if c.timing_steps < 2:
        raise ValueError(f"timing_steps: expected at least 2 (seconds per step are read after the first logged "
                         f"step), got {c.timing_steps}")
    if c.data is not None and not Path(c.data).is_dir():
        raise FileNotFoundError(f"data: {c.data}: no such folder")
    from .baselines import import_lightly

    import_lightly()  # a missing lightly is said now, not after the DreamTeacher runs


def _results(run: _CompareRun, evaluated: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's results with everything the tables need to be traced: every row's method, budget and
    hyper-parameters, the grids' validation scores, seconds per step, the machine, the command and the date."""
    from datetime import datetime, timezone

    from .evaluate import summarize

    d, s, c = run.demo, run.demo.s, run.c
    config = dict(evaluated["config"])
    config.update({"protocols": list(s.protocols), "n_val": evaluated["n_val"], "settings": dataclasses.asdict(s),
                   "compare": dataclasses.asdict(c), "overrides": list(run.overrides),
                   "phase_seconds": dict(d.times), "command": c.command,
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "selection_probe": {"protocol": "probe", "labels": max(s.budgets), "seed": s.seeds[0],
                                       "steps": s.probe_steps, "lr": s.probe_lrs, "split": "validation"},
                   "teacher": {"path": str(d.teacher_dir), **{k: d.teacher_meta.get(k) for k in (
                       "steps", "command", "seed", "fixed_batch_loss", "sha256")}},
                   "ran": {"machine": d.machine, "steps": d.steps_done, "cut": d.cut}})
    rows = {"scratch": {"method": "scratch (random initialisation)", "steps": 0, "batch_size": 0, "images": 0,
                        "hyperparameters": {}, "chosen_on": "–"}}
    rows.update(run.rows)
    runs = list(evaluated["runs"])
    summary = summarize(runs)
    baselines = [n for n, r in rows.items() if r["method"] in BASELINE_NAMES]
    results = {"config": config, "machine": d.machine, "rows": rows, "seconds_per_step": run.seconds_per_step,
               "runs": runs, "selection": evaluated["selection"], "summary": summary,
               "reading": reading(summary, list(DREAMTEACHER_ROWS), baselines)}
    if run.wallclock:
        wc = dict(run.wallclock)
        both = [x for x in summary if x["backbone"] in DREAMTEACHER_ROWS] + wc["summary"]
        wc["reading"] = reading(both, list(DREAMTEACHER_ROWS), list(wc["rows"]))
        results["wallclock"] = wc
    return results


def run_compare(out: str | Path, settings: DemoSettings, compare: CompareSettings | None = None,
                overrides: Sequence[str] = (), say: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Run every phase (module docstring); ``say`` reports progress (the CLI prints). Writes ``OUT/results.json``
    and ``OUT/results.md``; returns their paths, the results, the tables and the seconds each phase took."""
    from .evaluate import worker_pool, worker_split
    from .runtime import machine_info

    c = compare if compare is not None else CompareSettings()
    _check(c)
    out = Path(out)
    start = time.perf_counter()
    overrides = [*([f"--data.source={c.data}"] if c.data is not None else []), *overrides]
    processes, threads = worker_split(settings.workers)
    machine = {**machine_info(), "workers": processes, "threads_per_run": threads}
    d = _DemoRun(out=out, s=settings, overrides=overrides, say=say, start=start, processes=processes,
                 threads=threads, machine=machine)
    run = _CompareRun(demo=d, c=c, overrides=overrides)
    with worker_pool(settings.workers):  # one pool of worker processes for every phase
        t0 = time.perf_counter()
        d.teacher_dir, d.teacher_meta = _teacher_phase(out, settings, say)
        d.phase("teacher", t0)
        _interpreter_phase(d)
        _timing_phase(run)
        _pretraining_phase(d)
        _dreamteacher_rows(run)
        _grid_phase(run)
        evaluated = _evaluation_phase(run)
        if c.wallclock:
            _wallclock_phase(run)
    results = _results(run, evaluated)
    from .evaluate import _json_safe

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    table = compare_tables(results)
    (out / "results.md").write_text(table)
    return {"results": results, "table": table, "json": str(out / "results.json"),
            "markdown": str(out / "results.md"), "seconds": time.perf_counter() - start, "phase_seconds": d.times,
            "cut": d.cut, "backbones": {n: r.get("backbone") for n, r in results["rows"].items()}}
