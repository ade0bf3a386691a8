"""`dreamteacher demo` end to end at a tiny size: every phase runs and every output it names exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamteacher import cli

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")


@pytest.fixture
def small_splits(monkeypatch):
    """The demo's held-out test and validation splits cut to 32 images each (the demo's own are 256): every
    evaluation run of these tests tests on both, and at 256 that was most of their time."""
    from torch.utils.data import Subset

    import dreamteacher.evaluate as ev

    splits, validation = ev.builtin_splits, ev.builtin_validation_split
    monkeypatch.setattr(ev, "builtin_splits", lambda size, n_test=256: splits(size, min(n_test, 32)))
    monkeypatch.setattr(ev, "builtin_validation_split", lambda size: Subset(validation(size), range(32)))


def test_demo_runs_every_phase_and_prints_where_the_outputs_are(tmp_path, capsys, monkeypatch, small_splits):
    import dreamteacher.demo as demo
    import dreamteacher.teacher_training as tt

    monkeypatch.setattr(tt, "DEMO_UNET", tt.TINY_UNET)  # the demo's teacher, shrunk for a test
    monkeypatch.setattr(demo, "SPEED_CALIBRATION_STEPS", 4)  # the speed rows' calibration, shrunk likewise
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["demo", "--out", str(tmp_path), "--retrain-teacher", "--image-size", "32",
                         "--teacher-steps", "2", "--interpreter-steps", "2", "--steps", "2", "--batch-size", "4",
                         "--labels", "2", "4",
                         "--seeds", "0", "1", "--eval-steps", "1", "--probe-steps", "2", "--eval-lr", "1e-3", "3e-3",
                         "--num-workers", "0", "--protocol", "finetune", "probe",
                         "--speed-minutes", "0.02", "--no-progress", "--model.width=16"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    printed = capsys.readouterr().out
    for needle in ("| finetune | scratch |", "| finetune | DreamTeacher (feature) |",
                   "| probe | DreamTeacher (mixed) |", "2 labels fg", "4 labels", "The teacher's own features"):
        assert needle in printed, needle
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    # 2 protocols x 5 backbones (scratch, feature, mixed, lean and naive loop) x 2 budgets x 2 seeds; the grids'
    # other values on seed 0 are not kept.
    assert len(results["runs"]) == 2 * 5 * 2 * 2
    assert len(results["selection"]) == 2 * 5 * 2
    # each protocol trains for its own number of steps, and the table says so
    assert results["config"]["steps"] == {"finetune": 1, "probe": 2}
    assert "trained for finetune 1; probe 2 steps" in printed
    speed = results["config"]["speed"]
    assert set(speed) == {"lean", "naive"} and all(v["steps"] >= 1 for v in speed.values())
    assert "Same wall-clock budget" in printed and "| naive |" in printed
    for sel in results["selection"]:
        best = max(sel["val_miou"].values())
        assert sel["val_miou"][str(sel["lr"])] == best  # chosen on the validation split
    assert set(results["config"]["phase_seconds"]) >= {"teacher", "calibration", "interpreter", "pretrain feature",
                                                       "pretrain mixed"}
    # the time said up front: every phase's expected seconds, measured on this machine before the work
    assert "measuring this machine's speed" in printed and "expected: interpreter" in printed
    ran = results["config"]["ran"]
    assert set(ran["expected_seconds"]) >= {"interpreter", "pretrain feature", "pretrain mixed", "evaluate"}
    assert all(v >= 0 for v in ran["expected_seconds"].values())
    # what ran: steps per phase, the machine, no cut
    assert ran["steps"]["pretrain feature"] == {"done": 2, "planned": 2} and ran["cut"] == {}
    assert ran["machine"]["threads_per_run"] == 1 and ran["machine"]["torch"] == torch.__version__
    assert "Ran on " in printed and "pretrain mixed 2/2" in printed and "CUT" not in printed
    for line in printed.split("Outputs:", 1)[1].splitlines():
        if line.strip().startswith(("picture:", "evaluation:", "interpreter:", "exported backbone:")):
            path = line.split(":", 1)[1].split("(")[0].strip()
            assert Path(path).exists(), line
    assert (tmp_path / "features.png").is_file() and (tmp_path / "curves.png").is_file()


def test_ablate_runs_every_variant_at_tiny_size(tmp_path, capsys, monkeypatch, small_splits):
    import dreamteacher.teacher_training as tt

    monkeypatch.setattr(tt, "DEMO_UNET", tt.TINY_UNET)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["ablate", "--out", str(tmp_path), "--retrain-teacher", "--teacher-steps", "2",
                         "--interpreter-steps", "2", "--steps", "1", "--labels", "2",
                         "--seeds", "0", "--eval-steps", "1", "--probe-steps", "1", "--protocol", "probe",
                         "--no-progress",
                         "--model.width=16", "--data.num_workers=0", "--teacher.ddim_steps=2"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    printed = capsys.readouterr().out
    for needle in ("MSE only (lambda_AT = 0)", "whitening: sample", "whitening: none", "t = 50", "t = 400",
                   "deterministic (DDIM) encoding", "mixed distillation", "| probe | scratch |", "2 labels fg"):
        assert needle in printed, needle
    results = json.loads((tmp_path / "ablation.json").read_text())
    variants = results["config"]["variants"]
    assert len(variants) == 8 and all(v["steps"] == 1 for v in variants.values())
    # one run per (variant + scratch) at one budget and one seed; each variant's run dir holds its config
    assert len(results["runs"]) == 9
    cfg = (Path(variants["MSE only (lambda_AT = 0)"]["out_dir"]) / "config.yaml").read_text()
    assert "at_weight: 0.0" in cfg


def test_demo_runs_at_once_and_marks_what_a_time_cap_cut(tmp_path, capsys, monkeypatch, small_splits):
    """Two workers (a two-core share, one thread each): both pretraining runs and the evaluation groups run in
    spawned processes. A time cap that stops the pretraining runs early is marked in the table, in the results and
    in the final message, never passed off as the full settings' table."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    code = cli.main(["demo", "--out", str(tmp_path), "--steps", "40", "--batch-size", "4", "--labels", "2", "4",
                     "--seeds", "0", "--interpreter-steps", "2", "--probe-steps", "2", "--protocol", "probe",
                     "--num-workers", "0", "--workers", "2", "--no-calibrate", "--no-progress",
                     "--pretrain-minutes", "0.0002", "--model.width=16", "--run.log_every=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "feature and mixed distillation at once (1 thread(s) each)" in printed
    assert "each run computes every other step's and reads the rest from the other" in printed
    assert not (tmp_path / "shared_targets").exists()  # the exchanged targets are removed after the phase
    for name in ("feature", "mixed"):  # the sharing settings each run ran with
        cfg = (tmp_path / f"pretrain_{name}" / "config.yaml").read_text()
        assert "share_count: 2" in cfg and f"share_index: {int(name == 'mixed')}" in cfg
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    ran = results["config"]["ran"]
    assert ran["machine"]["workers"] == 2 and ran["machine"]["threads_per_run"] == 1
    for name in ("feature", "mixed"):
        done = ran["steps"][f"pretrain {name}"]
        assert done["planned"] == 40 and 1 <= done["done"] < 40, done
        assert ran["cut"][f"DreamTeacher ({name})"] == f"{done['done']} of 40 pretraining steps (time cap)"
        assert f"| probe | DreamTeacher ({name}) (CUT: {done['done']} of 40 pretraining steps" in printed
    assert "**Cut by a time cap, so not comparable" in printed
    assert "WARNING: a time cap cut" in printed and "not comparable" in printed.split("WARNING", 1)[1]
    assert len(results["runs"]) == 3 * 2  # 3 backbones x 2 budgets x 1 seed, probe only


def test_demo_estimate_only_says_the_time_of_every_phase_and_stops(tmp_path, capsys, small_splits):
    code = cli.main(["demo", "--out", str(tmp_path), "--steps", "50", "--batch-size", "4", "--labels", "2", "4",
                     "--seeds", "0", "1", "--interpreter-steps", "40", "--probe-steps", "100", "--eval-steps", "10",
                     "--protocol", "finetune", "probe", "--num-workers", "0", "--estimate-only", "--no-progress",
                     "--model.width=16"])
    assert code == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.strip().startswith("expected:"))
    for phase in ("interpreter", "pretrain", "evaluate", "pictures"):
        assert f"{phase} " in line, (phase, line)
    assert "in all about" in line and "estimate only: measured in" in printed
    assert not (tmp_path / "evaluate").exists() and not (tmp_path / "calibration").exists()
