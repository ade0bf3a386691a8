"""``dreamteacher ablate``: which parts of DreamTeacher matter, on the built-in data.

Every variant is one pretraining run that differs from the reference recipe (MSE + AT with lambda_AT = 10, channel
whitening, stochastic encoding at the configured t, feature distillation) in one choice; all runs share the teacher,
the pretraining steps, data and seed, and every backbone (plus scratch) is then evaluated with the same budgets,
seeds, protocols and learning-rate selection on the validation split as the demo. Variants:

* ``MSE only`` (lambda_AT = 0) vs the reference (the paper's ablation);
* whitening ``sample`` and ``none`` vs ``channel``;
* the teacher timestep t (the reference's and two others) and deterministic (DDIM-inversion) encoding;
* mixed distillation (the interpreter's soft labels added).

Writes ``OUT/ablation.json`` and ``OUT/ablation.md``. Library code: it logs, and returns what the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .demo import DemoSettings, _teacher_phase, evaluate_protocols, pretrain_config

logger = logging.getLogger("dreamteacher")

__all__ = ["default_variants", "run_ablation", "ablation_table"]


def default_variants(t: int = 150) -> dict[str, list[str]]:
    """Variant name -> config overrides relative to the reference recipe (``--section.key=value``)."""
    others = [v for v in (50, 400) if v != t] if t not in (50, 400) else [v for v in (50, 150, 400) if v != t]
    variants = {f"reference (MSE + AT, channel, stochastic t={t})": [],
                "MSE only (lambda_AT = 0)": ["--loss.at_weight=0"],
                "whitening: sample": ["--loss.whiten=sample"],
                "whitening: none": ["--loss.whiten=null"]}
    for v in others:
        variants[f"t = {v}"] = [f"--teacher.t={v}"]
    variants["deterministic (DDIM) encoding"] = ["--teacher.mode=deterministic"]
    variants["mixed distillation"] = ["<mixed>"]
    return variants


def run_ablation(out: str | Path, settings: DemoSettings, overrides: Sequence[str] = (),
                 variants: dict[str, list[str]] | None = None,
                 say: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Pretrain one backbone per variant, evaluate them all beside scratch, write the table."""
    from .config import load_config
    from .evaluate import summarize
    from .export import export_backbone
    from .interpreter import train_interpreter
    from .train import pretrain

    s = settings
    out = Path(out)
    start = time.perf_counter()
    teacher_dir, teacher_meta = _teacher_phase(out, s, say)
    base_t = load_config(None, list(overrides)).teacher.t
    variants = variants if variants is not None else default_variants(base_t)

    def config(run_dir: Path, *extra: str):  # the variant's own settings win over the user's overrides
        return pretrain_config(s, teacher_dir, run_dir, [*overrides, *extra])

    interp = None
    if any("<mixed>" in v for v in variants.values()):
        n_interp = min(s.budgets)
        say(f"interpreter for mixed distillation: {n_interp} labels, {s.interpreter_steps} steps")
        interp = train_interpreter(config(out / "interpreter"), labels=n_interp, label_seed=0,
                                   steps=s.interpreter_steps, out=out / "interpreter", progress=s.progress)
    backbones: dict[str, str | None] = {"scratch": None}
    pretrain_runs = {}
    for k, (name, extra) in enumerate(variants.items(), 1):
        extra = [f"--label.interpreter={interp['path']}" if e == "<mixed>" else e for e in extra]
        run_dir = out / f"variant_{k}"
        say(f"[{k}/{len(variants)}] pretrain: {name} {' '.join(extra)}")
        summary = pretrain(config(run_dir, *extra))
        backbones[name] = str(export_backbone(summary["checkpoint"], run_dir / "backbone.safetensors"))
        pretrain_runs[name] = {"overrides": extra, "steps": summary["step"], "loss": summary["loss"],
                               "interrupted": summary["interrupted"], "out_dir": summary["out_dir"]}
    say(f"evaluate: {len(backbones)} backbones x budgets {s.budgets} x seeds {s.seeds} x {'/'.join(s.protocols)}")
    evaluated = evaluate_protocols(backbones, s)
    runs, selection = evaluated["runs"], evaluated["selection"]
    results = {"config": {"settings": dataclasses.asdict(s), "overrides": list(overrides),
                          "teacher": {"path": str(teacher_dir), **{k: teacher_meta.get(k) for k in (
                              "steps", "command", "fixed_batch_loss", "sha256")}},
                          "variants": pretrain_runs, "n_test": s.n_test, "n_val": evaluated["n_val"],
                          "seconds": time.perf_counter() - start},
               "runs": runs, "selection": selection, "summary": summarize(runs)}
    out.mkdir(parents=True, exist_ok=True)
    from .evaluate import _json_safe

    (out / "ablation.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False))
    table = ablation_table(results)
    (out / "ablation.md").write_text(table)
    return {"results": results, "table": table, "json": str(out / "ablation.json"), "markdown": str(out /
                                                                                                     "ablation.md"),
            "seconds": time.perf_counter() - start}


def ablation_table(results: dict[str, Any]) -> str:
    """One row per (protocol, variant): mIoU and foreground mIoU per budget, mean ± sample std over seeds."""
    summary = results["summary"]
    budgets = list(dict.fromkeys(x["labels"] for x in summary))
    rows = list(dict.fromkeys((x["protocol"], x["backbone"]) for x in summary))
    cell = {(x["protocol"], x["backbone"], x["labels"]): x for x in summary}
    variants = results["config"].get("variants", {})
    n_seeds = max(x["n_seeds"] for x in summary)

    def pm(m: float, sd: float) -> str:
        return "–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * sd:.1f}"

    lines = [f"mIoU / foreground mIoU (%) on {results['config']['n_test']} held-out images, mean ± sample std over "
             f"{n_seeds} seeds; every variant differs from the reference in the one setting named.", "",
             "| protocol | variant | overrides | pretraining steps | "
             + " | ".join(f"{n} labels | {n} labels fg" for n in budgets) + " |",
             "|---|---|---|---:|" + "---:|" * (2 * len(budgets))]
    for protocol, name in rows:
        vals = []
        for n in budgets:
            c = cell.get((protocol, name, n))
            vals += [pm(c["miou_mean"], c["miou_std"]), pm(c["fg_miou_mean"], c["fg_miou_std"])] if c else ["", ""]
        extra = " ".join(variants.get(name, {}).get("overrides", [])) or "–"
        extra = extra.replace("|", "\\|")
        if "label.interpreter" in extra:
            extra = "label.interpreter (soft labels)"
        steps = variants.get(name, {}).get("steps", "–")
        if variants.get(name, {}).get("interrupted"):
            steps = f"{steps} (time cap)"
        lines.append(f"| {protocol} | {name} | `{extra}` | {steps} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
