"""`dreamteacher compare` end to end at a tiny size: every row's budget and hyper-parameters are recorded, each
baseline's grid choice is the argmax of its validation scores, and the test split plays no part in it."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from dreamteacher import cli

pytest.importorskip("lightly")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")

TINY = ["--retrain-teacher", "--teacher-steps", "2", "--interpreter-steps", "2", "--steps", "2", "--batch-size", "4",
        "--labels", "4", "--seeds", "0", "--eval-steps", "1", "--probe-steps", "2", "--probe-lr", "1e-2",
        "--protocol", "probe", "--num-workers", "0", "--workers", "1", "--timing-steps", "2", "--no-progress",
        "--model.width=16", "--run.ckpt_every=1000"]


class _PoisonedTest(Dataset):
    """A test split that counts its reads and whose masks are all one shape class: scores read on it would differ
    from the validation split's, so scores that stay the same show the choice never read it."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        image, mask = self.base[i]
        return image, torch.full_like(mask, 1)


@pytest.fixture
def poisoned_splits(monkeypatch):
    """The held-out splits cut to 32 images (as tests/test_demo.py's small_splits), the test split poisoned."""
    from torch.utils.data import Subset

    import dreamteacher.evaluate as ev

    splits, validation = ev.builtin_splits, ev.builtin_validation_split
    poisoned = {}

    def poisoned_splits(size, n_test=256):
        train, test = splits(size, min(n_test, 32))
        return train, poisoned.setdefault("test", _PoisonedTest(test))

    monkeypatch.setattr(ev, "builtin_splits", poisoned_splits)
    monkeypatch.setattr(ev, "builtin_validation_split", lambda size: Subset(validation(size), range(32)))
    return poisoned


def test_compare_runs_end_to_end_and_chooses_on_validation_only(tmp_path, capsys, monkeypatch, poisoned_splits):
    import dreamteacher.compare as cmp
    import dreamteacher.teacher_training as tt

    monkeypatch.setattr(tt, "DEMO_UNET", tt.TINY_UNET)  # the demo's teacher, shrunk for a test
    scored, reads_while_choosing = [], []
    score = cmp.score_on_validation

    def spy(backbones, s):  # every grid scoring: what it scored, and the test split's reads during it
        before = poisoned_splits["test"].reads if "test" in poisoned_splits else 0
        out = score(backbones, s)
        scored.append((dict(backbones), out))
        reads_while_choosing.append((poisoned_splits["test"].reads if "test" in poisoned_splits else 0) - before)
        return out

    monkeypatch.setattr(cmp, "score_on_validation", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["compare", "--out", str(tmp_path), "--methods", "simclr", "densecl",
                         "--grid-lr", "1e-3", "3e-3", "--grid-temperature", "0.3", *TINY])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"scratch", "DreamTeacher (feature)", "DreamTeacher (mixed)", "SimCLR", "DenseCL"}
    for name, row in rows.items():  # every row names its method, budget and hyper-parameters
        assert {"method", "steps", "images", "hyperparameters"} <= set(row), name
        if name != "scratch":
            assert row["steps"] == 2 and row["images"] == 2 * 4, name  # the same budget for every row
    assert rows["SimCLR"]["method"] == "simclr" and rows["DenseCL"]["method"] == "densecl"
    for name in ("SimCLR", "DenseCL"):
        grid = rows[name]["grid"]
        # 2 learning rates at the one temperature given (the axes' order: tests below)
        assert [g["stage"] for g in grid] == ["optim.lr", "optim.lr"]
        assert [g["hyperparameters"] for g in grid] == [{"optim.lr": v, "ssl.temperature": 0.3} for v in (1e-3, 3e-3)]
        scores = [g["val_miou"] for g in grid]
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        assert grid[best]["chosen"] and sum(g["chosen"] for g in grid) == 1
        assert rows[name]["hyperparameters"] == grid[best]["hyperparameters"]  # the argmax of the recorded scores
        cost = rows[name]["choice_cost"]
        assert cost["runs"] == 2 and cost["steps"] == 2 * 2 and cost["images"] == 2 * 2 * 4 and cost["seconds"] > 0
    # the choice never read the test split; the evaluation did (poisoned: its numbers are not the ones chosen on)
    assert len(scored) == 1 and reads_while_choosing == [0]
    assert poisoned_splits["test"].reads > 0
    # the same scoring with the true test split gives the same scores, bit for bit: the test split is not an input
    monkeypatch.undo()
    from torch.utils.data import Subset

    import dreamteacher.evaluate as ev

    validation = ev.builtin_validation_split
    monkeypatch.setattr(ev, "builtin_validation_split", lambda size: Subset(validation(size), range(32)))
    settings = _settings(results)
    torch.set_num_threads(1)  # the runs' own thread count: the same rounding
    try:
        for backbones, out in scored:
            assert score(backbones, settings) == out
    finally:
        torch.set_num_threads(n)
    # the tables: the rows, the grid, the reading, the equal-wall-clock table, command and CPU under them
    for needle in ("| probe | SimCLR |", "| probe | DenseCL |", "| SimCLR | simclr | 2 | 8 |",
                   "ssl.temperature=0.3", "validation mIoU", "Reading", "against", "Equal wall-clock", "(equal time)",
                   "Command: `dreamteacher compare", "CPU "):
        assert needle in printed, needle
    assert {r["verdict"] for r in results["reading"]} <= {"wins", "ties", "loses"}
    assert len(results["reading"]) == 2  # 1 budget x 2 DreamTeacher rows, probe only
    wc = results["wallclock"]
    assert set(wc["rows"]) == {"SimCLR (equal time)", "DenseCL (equal time)"}
    assert all(r["steps"] >= 1 and r["images"] == r["steps"] * 4 for r in wc["rows"].values())
    assert results["machine"]["cpu"] and set(results["seconds_per_step"]) >= {"DreamTeacher (mixed)", "SimCLR"}
    assert (tmp_path / "results.md").read_text().startswith("mIoU (%)")


def _settings(results):
    from dreamteacher.demo import DemoSettings

    return DemoSettings(**results["config"]["settings"])


def test_compare_refuses_an_unknown_method_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--out", str(tmp_path), "--methods", "swav"])
    assert "--methods" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_grid_searches_one_axis_at_a_time_from_the_best_point_so_far():
    from dreamteacher.compare import CompareSettings, _stage_points, choose, grid_axes

    c = CompareSettings(grid_lr=[1e-3, 2e-3], grid_momentum=[0.99, 0.9])
    axes = grid_axes("moco", c)  # lr, then the method's default temperatures, then the momenta given
    assert axes == [("optim.lr", [1e-3, 2e-3]), ("ssl.temperature", [0.2, 0.1]), ("ssl.momentum", [0.99, 0.9])]
    assert grid_axes("simclr", CompareSettings())[1] == ("ssl.temperature", [0.5, 0.2])
    first = _stage_points(axes, 0, None)
    assert first == [{"optim.lr": v, "ssl.temperature": 0.2, "ssl.momentum": 0.99} for v in (1e-3, 2e-3)]
    best = first[1]
    assert _stage_points(axes, 1, best) == [{**best, "ssl.temperature": 0.1}]  # the best point's other values only
    assert _stage_points(axes, 2, {**best, "ssl.temperature": 0.1}) == [{**best, "ssl.temperature": 0.1,
                                                                          "ssl.momentum": 0.9}]
    # the choice: the best validation score, the first on ties, a diverged point (None / NaN) below every score
    assert choose([{"val_miou": 0.2}, {"val_miou": 0.3}, {"val_miou": 0.3}]) == 1
    assert choose([{"val_miou": None}, {"val_miou": float("nan")}, {"val_miou": 0.01}]) == 2


def test_reading_says_wins_ties_or_loses_against_the_best_baseline_by_the_larger_std():
    from dreamteacher.compare import reading

    def cell(name, mean, std):
        return {"protocol": "probe", "backbone": name, "labels": 8, "miou_mean": mean, "miou_std": std, "n_seeds": 3}

    summary = [cell("DT", 0.40, 0.02), cell("SimCLR", 0.30, 0.01), cell("DenseCL", 0.37, 0.05)]
    (r,) = reading(summary, ["DT"], ["SimCLR", "DenseCL"])
    assert r["baseline"] == "DenseCL" and r["verdict"] == "ties" and r["larger_std"] == 0.05  # 3 points < 5
    (r,) = reading([cell("DT", 0.45, 0.02), *summary[1:]], ["DT"], ["SimCLR", "DenseCL"])
    assert r["verdict"] == "wins" and abs(r["difference"] - 0.08) < 1e-12
    (r,) = reading([cell("DT", 0.20, 0.02), *summary[1:]], ["DT"], ["SimCLR", "DenseCL"])
    assert r["verdict"] == "loses"


def test_demo_baselines_adds_an_untuned_densecl_row(tmp_path, capsys, monkeypatch, poisoned_splits):
    import dreamteacher.teacher_training as tt

    monkeypatch.setattr(tt, "DEMO_UNET", tt.TINY_UNET)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["demo", "--out", str(tmp_path), "--baselines", "--retrain-teacher", "--teacher-steps", "2",
                         "--interpreter-steps", "2", "--steps", "2", "--batch-size", "4", "--labels", "4", "--seeds",
                         "0", "--probe-steps", "2", "--probe-lr", "1e-2", "--protocol", "probe", "--num-workers", "0",
                         "--workers", "1", "--no-progress", "--no-calibrate", "--model.width=16",
                         "--run.ckpt_every=1000"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    printed = capsys.readouterr().out
    assert "| probe | DenseCL |" in printed and "pretrain densecl" in printed
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert results["config"]["ran"]["steps"]["pretrain densecl"] == {"done": 2, "planned": 2}
    config = (tmp_path / "pretrain_densecl" / "config.yaml").read_text()
    assert "method: densecl" in config and "lr: 0.002" in config  # the demo's lr, not tuned
