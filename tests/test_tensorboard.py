"""``run.tensorboard``: the logged scalars also go to TensorBoard, the JSON-lines log stays, and a missing
``tensorboard`` package is a clear error naming the key.

The real ``torch.utils.tensorboard.SummaryWriter`` writes the events (``tensorboard`` is in the dev extra); they are
read back with tensorboard's own readers (``EventAccumulator``, ``EventFileLoader``), across resumes. The
missing-package error is forced by making the import fail, whether or not the package is installed.

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 4, a few steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_teacher, tiny_overrides

pytest.importorskip("tensorboard", reason="needs the tensorboard package (the dev extra installs it)")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.compat.proto.event_pb2 import SessionLog  # noqa: E402

from dreamteacher import cli  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def args(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 3, "run.ckpt_every": 100, "run.tensorboard": True}
    return ["pretrain", *tiny_overrides(teacher_dir, out, {**values, **extra})]


def read_scalars(log_dir: Path, *, purge_orphaned_data: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files as TensorBoard shows it: ``{tag: [(step, value)]}``."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0},  # 0: keep every event
                                   purge_orphaned_data=purge_orphaned_data)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard must show: the records of log.jsonl (float32, as events store them)."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        values = {name: r[name] for name in ("loss", "lr", "images_per_s")}
        values.update({f"{name}/level{i}": v for name in ("mse", "at") for i, v in enumerate(r[name])})
        for tag, value in values.items():
            series.setdefault(tag, []).append((r["step"], float(torch.tensor(value, dtype=torch.float32))))
    return series


def event_files(log_dir: Path) -> list[Path]:
    """The run's event files, oldest first (one per writer, i.e. per run)."""
    return sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def test_the_logged_scalars_are_read_back_by_tensorboard_across_a_resume(teacher_dir, tmp_path):
    out, log_dir = tmp_path / "run", tmp_path / "run" / "tensorboard"
    assert cli.main(args(teacher_dir, out, **{"run.steps": 2})) == 0
    assert (out / "log.jsonl").exists()  # the JSON-lines log stays
    first = read_scalars(log_dir)
    assert first == expected_scalars(out)
    assert [s for s, _ in first["loss"]] == [1, 2] and {"lr", "images_per_s", "mse/level0", "at/level0"} <= set(first)
    step2 = (out / "checkpoints" / "last.pt").read_bytes()

    # continue to step 4, then play a run killed after logging steps 3-4 but before its step-4 checkpoint: the
    # step-2 checkpoint is the newest again, and the rerun logs steps 3 and 4 a second time
    assert cli.main([*args(teacher_dir, out, **{"run.steps": 4}), "--resume", "auto"]) == 0
    (out / "checkpoints" / "last.pt").write_bytes(step2)
    assert cli.main([*args(teacher_dir, out, **{"run.steps": 4}), "--resume", "auto"]) == 0

    # every resumed writer was opened with purge_step = the first step it logs (tensorboard's own file reader)
    files = event_files(log_dir)
    assert len(files) == 3
    for path, purge_step in zip(files[1:], (3, 3)):
        starts = [e.step for e in EventFileLoader(str(path)).Load()
                  if e.HasField("session_log") and e.session_log.status == SessionLog.START]
        assert starts == [purge_step], path.name
    # the stale steps 3-4 of the "killed" run are on disk, and TensorBoard hides them: each step shows once, with
    # the values of the final log.jsonl (truncated to the checkpoint on resume, then appended)
    raw = read_scalars(log_dir, purge_orphaned_data=False)
    assert [s for s, _ in raw["loss"]] == [1, 2, 3, 4, 3, 4]
    shown = read_scalars(log_dir)
    assert [s for s, _ in shown["loss"]] == [1, 2, 3, 4]
    assert shown == expected_scalars(out)


def test_a_missing_tensorboard_package_is_a_clear_error(teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    out = tmp_path / "run"
    assert cli.main(args(teacher_dir, out)) == 2
    err = capsys.readouterr().err
    assert "error: run.tensorboard: TensorBoard logging needs the tensorboard package" in err
    assert "dtkernels[tensorboard]" in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists()  # refused before anything ran
