"""``run.keep_checkpoints``: the newest N step checkpoints kept besides last.pt, older ones pruned, and
``--resume auto`` still continuing from the newest loadable one.

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 4, a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_teacher, tiny_overrides

from dreamteacher import cli
from dreamteacher.runtime import keep_step_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return save_tiny_teacher(out)


def args(teacher_dir: Path, out: Path, **extra) -> list[str]:
    values = {"run.steps": 5, "run.ckpt_every": 1, "run.keep_checkpoints": 2}
    return ["pretrain", "--resume", "auto", *tiny_overrides(teacher_dir, out, {**values, **extra})]


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["step"]


def test_the_newest_checkpoints_are_kept_and_resume_auto_continues(teacher_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(args(teacher_dir, out)) == 0
    assert names(out) == ["last.pt", "step00000004.pt", "step00000005.pt"]
    assert [step_of(out / "checkpoints" / n) for n in names(out)] == [5, 4, 5]
    # last.pt is lost (damaged): resume auto continues from the newest step checkpoint, and keeps pruning
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    (out / "checkpoints" / "step00000005.pt").unlink()
    assert cli.main(args(teacher_dir, out, **{"run.steps": 7})) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # resumed at 4: the log's records after step 4 were dropped and redone
    assert names(out) == ["last.pt", "step00000006.pt", "step00000007.pt"]
    assert step_of(out / "checkpoints" / "last.pt") == 7


def write(last: Path, text: str) -> None:
    """As save_checkpoint writes: a temporary file renamed over last.pt (a new file, the step links keep theirs)."""
    import os

    tmp = last.with_name(".tmp")
    tmp.write_text(text)
    os.replace(tmp, last)


def test_pruning_keeps_n_and_drops_an_abandoned_future(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = folder / "last.pt"
    (folder / "notes.txt").write_text("not ours")
    for step in (1, 2, 3, 4):
        write(last, f"state {step}")
        keep_step_checkpoint(last, step, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "notes.txt", "step00000002.pt",
                                                        "step00000003.pt", "step00000004.pt"]
    assert (folder / "step00000003.pt").read_text() == "state 3"  # each step file holds its own state
    # a run resumed from step 2 writes step 3 again: the old run's step 4 is removed, not kept as "newest"
    write(last, "state 3 again")
    removed = keep_step_checkpoint(last, 3, keep=3)
    assert sorted(p.name for p in removed) == ["step00000004.pt"]
    assert (folder / "step00000003.pt").read_text() == "state 3 again"
    assert (folder / "notes.txt").is_file()
