"""The embedded end-to-end demo: does DreamTeacher pretraining help on the built-in dataset? (``dreamteacher demo``)

Phases (teacher and pretraining have wall-clock caps; ``make demo`` on a fresh clone, install included, must fit in
15 minutes on a 2-core CPU and took 11m54s there):

1. teacher: a small DDPM UNet trained on procedural shapes (cached in OUT/teacher);
2. interpreter: a feature interpreter on the teacher's features of the smallest label budget's images (seed 0);
3. pretraining by feature distillation (OUT/pretrain_feature) and 4. by mixed distillation (OUT/pretrain_mixed),
   same steps, same data, same seed;
5. evaluation: scratch vs both pretrained backbones, fine-tuned with each label budget, several seeds;
6. pictures: PCA of teacher vs student features with masks, and loss curves.

Library code: it logs, and returns what the CLI prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("dreamteacher")

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """The demo's sizes (defaults chosen to fit `make demo` on a fresh clone in 15 minutes on a quiet 2-core CPU, see
    the README)."""

    image_size: int = 32
    teacher_steps: int = 1500
    teacher_batch: int = 16
    teacher_minutes: float = 4.0
    interpreter_steps: int = 150
    pretrain_steps: int = 800
    pretrain_batch: int = 16
    pretrain_minutes: float = 2.5
    width: int = 128
    budgets: list[int] = field(default_factory=lambda: [8, 32])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_steps: int = 150
    eval_lr: float = 3e-3
    eval_batch: int = 8
    n_test: int = 256
    num_workers: int = 1
    progress: bool = True


def run_demo(out: str | Path, settings: DemoSettings, overrides: Sequence[str] = (),
             say: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Run every phase; ``say`` reports progress (the CLI prints). Returns the paths of every output, the
    evaluation results and the seconds each phase took."""
    from .config import load_config
    from .data import labelled_indices
    from .evaluate import builtin_splits, evaluate_backbones, markdown_table, write_results
    from .interpreter import train_interpreter
    from .train import DEMO_UNET, export_backbone, pretrain, train_teacher
    from .viz import feature_figure, loss_curves, student_teacher_features

    s = settings
    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()

    def phase(name: str, began: float) -> None:
        times[name] = time.perf_counter() - began
        say(f"      {name}: {times[name]:.0f} s ({time.perf_counter() - start:.0f} s so far)")

    # 1. teacher
    t0 = time.perf_counter()
    teacher_dir = out / "teacher"
    if (teacher_dir / "unet" / "config.json").is_file():
        say(f"[1/6] teacher: using the cached {teacher_dir} (delete it to retrain)")
    else:
        say(f"[1/6] teacher: training a DDPM UNet2DModel {list(DEMO_UNET['block_out_channels'])} on procedural shapes "
            f"at {s.image_size}x{s.image_size} (at most {s.teacher_steps} steps or {s.teacher_minutes:g} min)")
        result = train_teacher(teacher_dir, image_size=s.image_size, steps=s.teacher_steps,
                               batch_size=s.teacher_batch, num_workers=s.num_workers, log_every=10,
                               max_minutes=s.teacher_minutes, progress=s.progress)
        if result["first_loss"] is not None:
            say(f"      {result['steps']} steps, epsilon MSE {result['first_loss']:.4f} -> {result['last_loss']:.4f}")
    phase("teacher", t0)

    def config(run_dir: Path, *extra: str):
        return load_config(None, [
            f"--teacher.path={teacher_dir}", "--model.student=resnet18", f"--model.width={s.width}",
            f"--data.image_size={s.image_size}", f"--run.steps={s.pretrain_steps}",
            f"--run.batch_size={s.pretrain_batch}", f"--data.num_workers={s.num_workers}",
            f"--run.out_dir={run_dir}", "--run.log_every=10", f"--run.ckpt_every={max(s.pretrain_steps // 2, 1)}",
            "--schedule.warmup_steps=40", "--optim.lr=2e-3", f"--run.max_minutes={s.pretrain_minutes}",
            f"--run.progress={s.progress}", *extra, *overrides])

    # 2. interpreter (labels: the smallest budget's images of seed 0)
    t0 = time.perf_counter()
    n_interp = min(s.budgets)
    say(f"[2/6] interpreter: {n_interp} labelled images (label seed 0), {s.interpreter_steps} steps")
    interp = train_interpreter(config(out / "interpreter"), labels=n_interp, label_seed=0,
                               steps=s.interpreter_steps, out=out / "interpreter", progress=s.progress)
    say(f"      loss {interp['first_loss']:.3f} -> {interp['last_loss']:.3f}, held-out mIoU of the interpreter "
        f"itself {100 * interp['test_miou']:.1f}%")
    phase("interpreter", t0)

    # 3./4. pretraining, feature and mixed distillation
    backbones: dict[str, str | None] = {"scratch": None}
    runs = {}
    for k, (name, extra) in enumerate((("feature", ()), ("mixed", (f"--label.interpreter={interp['path']}",))), 3):
        t0 = time.perf_counter()
        say(f"[{k}/6] pretrain ({name} distillation): resnet18 + FPN/PPM regressor ({s.width} channels), "
            f"{s.pretrain_steps} steps of {s.pretrain_batch} images (cap {s.pretrain_minutes:g} min)")
        summary = pretrain(config(out / f"pretrain_{name}", *extra))
        runs[name] = summary
        backbones[f"DreamTeacher ({name})"] = str(export_backbone(summary["checkpoint"],
                                                                  out / f"resnet18_{name}.pth"))
        say(f"      {summary['step']} steps{' (stopped by the time cap)' if summary['interrupted'] else ''}, "
            f"last logged loss {summary['loss']:.4f}")
        phase(f"pretrain {name}", t0)

    # 5. evaluation
    t0 = time.perf_counter()
    say(f"[5/6] evaluate: {len(backbones)} backbones x label budgets {s.budgets} x seeds {s.seeds}, "
        f"{s.eval_steps} fine-tuning steps each, mIoU on {s.n_test} held-out images")
    train_set, test_set = builtin_splits(s.image_size, s.n_test)
    results = evaluate_backbones(backbones, train_set, test_set, budgets=s.budgets, seeds=s.seeds,
                                 class_names=None, steps=s.eval_steps, batch_size=s.eval_batch, lr=s.eval_lr,
                                 progress=s.progress,
                                 save_models=out / "evaluate" / "models", save_seeds=[s.seeds[0]])
    from .data import SHAPE_CLASSES

    results["config"]["class_names"] = list(SHAPE_CLASSES)
    results["config"]["phase_seconds"] = dict(times)
    results["config"]["interpreter"] = {"labels": n_interp, "label_seed": 0,
                                        "images": labelled_indices(n_interp, 0)}
    json_path, md_path = write_results(results, out / "evaluate")
    phase("evaluate", t0)

    # 6. pictures
    t0 = time.perf_counter()
    say("[6/6] pictures")
    import torch

    from .data import TEST_SEED, ProceduralShapes

    ds = ProceduralShapes(4, s.image_size, seed=TEST_SEED)
    images = torch.stack([ds[i][0] for i in range(4)])
    masks = torch.stack([ds[i][1] for i in range(4)])
    teacher_f, student_f = student_teacher_features(runs["mixed"]["checkpoint"], images)
    seg_run = next(r for r in results["runs"] if r["backbone"] == "DreamTeacher (mixed)" and r["labels"] ==
                   max(s.budgets) and "model" in r)
    from .evaluate import load_segmentation_model

    with torch.inference_mode():
        pred = load_segmentation_model(seg_run["model"])(images).argmax(1)
    features_png = feature_figure(images, teacher_f, student_f, masks, pred, out / "features.png",
                                  class_names=list(SHAPE_CLASSES))
    curves_png = loss_curves({"feature": Path(runs["feature"]["out_dir"]) / "log.jsonl",
                              "mixed": Path(runs["mixed"]["out_dir"]) / "log.jsonl"}, out / "curves.png")
    teacher_png = loss_curves({"teacher (epsilon MSE)": teacher_dir / "log.jsonl",
                               "interpreter (CE + 3 Dice)": out / "interpreter" / "log.jsonl"},
                              out / "curves_teacher_interpreter.png")
    phase("pictures", t0)
    table = markdown_table(results)
    return {"results": results, "table": table, "json": str(json_path), "markdown": str(md_path),
            "teacher": str(teacher_dir), "interpreter": interp["path"], "runs": {k: v["out_dir"] for k, v in
                                                                                 runs.items()},
            "backbones": backbones, "pictures": [str(features_png), str(curves_png), str(teacher_png)],
            "seconds": time.perf_counter() - start, "phase_seconds": times}
