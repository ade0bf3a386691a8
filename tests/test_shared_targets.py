"""data.share_targets: runs at the same time split the teacher's work and train on exactly the targets they would
compute alone (dreamteacher.model.SharedTargets)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import keep_every_checkpoint, save_tiny_teacher

from dreamteacher.config import ConfigError, load_config
from dreamteacher.demo import _timed_pretrain
from dreamteacher.evaluate import parallel_map, worker_split
from dreamteacher.train import pretrain

STEPS = 6


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def config(teacher_dir: Path, out: Path, *extra: str):
    return load_config(None, [
        f"--teacher.path={teacher_dir}", "--data.image_size=32", "--data.length=64", "--data.num_workers=0",
        "--model.width=16", "--run.batch_size=4", f"--run.steps={STEPS}", "--run.log_every=1",
        f"--run.out_dir={out}", "--run.progress=false", "--schedule.warmup_steps=1", "--run.ckpt_every=100",
        "--data.augment=true", *extra])


def weights(summary: dict) -> dict[str, torch.Tensor]:
    return torch.load(summary["backbone"], weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Two student sides: the second differs in the loss only (the teacher, data and seed are the same).
SIDES = ([], ["--loss.at_weight=3.0", "--optim.lr=3e-3"])


def test_two_runs_at_once_share_the_teacher_and_train_as_alone(teacher_dir, tmp_path):
    """Two runs at once (one thread each, the demo's way) with data.share_targets end with the weights of the same
    two runs without sharing, bit for bit, and each computed only its half of the targets (the other half read) and
    loaded only that half's images (data.num_workers=0: the loader yields indices, the dataset is read on demand)."""
    if worker_split(2)[0] < 2:
        pytest.skip("needs two threads to run two runs at once")
    share = tmp_path / "share"
    alone = parallel_map(_timed_pretrain, [(config(teacher_dir, tmp_path / f"alone{i}", *side),)
                                           for i, side in enumerate(SIDES)], 2)
    shared = parallel_map(_timed_pretrain, [(config(
        teacher_dir, tmp_path / f"shared{i}", *side, f"--data.share_targets={share}", f"--data.share_index={i}",
        "--data.share_count=2"),) for i, side in enumerate(SIDES)], 2)
    for a, s in zip(alone, shared):
        assert "shared_targets" not in a
        stats = s["shared_targets"]
        assert (stats["computed"], stats["read"], stats["alone_from_key"]) == (STEPS // 2, STEPS // 2, None)
        assert stats["loaded"] == STEPS // 2  # loading in the main process: a batch read from the other is not loaded
        assert_same_weights(weights(a), weights(s))
    assert not torch.equal(*(weights(s)["conv1.weight"] for s in shared))  # the two sides did differ
    # the files left are the last ones each run wrote, readable by a partner still behind; no temporaries
    files = sorted(p.name for p in share.rglob("*") if p.is_file())
    assert len(files) == STEPS and not any(f.endswith(".tmp") for f in files)


def test_a_missing_partner_costs_time_not_correctness(teacher_dir, tmp_path, caplog):
    """Run 1 of 2 with no run 0 beside it waits data.share_wait once, warns, and computes every target itself; a run
    started later reads the files it left; a damaged file where a partner's targets would be is computed here, never
    trained on."""
    ref = pretrain(config(teacher_dir, tmp_path / "alone"))
    share = tmp_path / "share"
    with caplog.at_level(logging.WARNING, logger="dreamteacher"):
        got = pretrain(config(teacher_dir, tmp_path / "lonely", f"--data.share_targets={share}",
                              "--data.share_index=1", "--data.share_count=2", "--data.share_wait=0.3"))
    stats = got["shared_targets"]
    assert stats["read"] == 0 and stats["computed"] == STEPS and stats["alone_from_key"] is not None
    assert "computing every micro-batch here from now on" in caplog.text
    assert_same_weights(weights(ref), weights(got))

    # the same run again, now with a partner's files present but damaged: read fails, computed here
    run0 = pretrain(config(teacher_dir, tmp_path / "run0", f"--data.share_targets={share}", "--data.share_index=0",
                           "--data.share_count=2", "--data.share_wait=0.3", "--data.num_workers=1"))
    assert run0["shared_targets"]["loaded"] is None  # a loader worker process loads every batch, as without sharing
    # its partner (the lonely run) had finished, leaving its own micro-batches' files: read, not recomputed
    assert (run0["shared_targets"]["computed"], run0["shared_targets"]["read"]) == (STEPS // 2, STEPS // 2)
    assert_same_weights(weights(ref), weights(run0))
    damaged = [p for p in Path(run0["shared_targets"]["dir"]).iterdir() if p.suffix == ".safetensors"]
    assert damaged
    for p in damaged:
        p.write_bytes(p.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dreamteacher"):
        again = pretrain(config(teacher_dir, tmp_path / "again", f"--data.share_targets={share}",
                                "--data.share_index=1", "--data.share_count=2", "--data.share_wait=0.3"))
    assert again["shared_targets"]["read"] == 0
    assert "could not be read" in caplog.text
    assert_same_weights(weights(ref), weights(again))


def test_runs_of_another_teacher_setting_never_read_each_others_targets(teacher_dir, tmp_path):
    """The identity covers the teacher's settings: a run at another teacher.t finds none of the files of a run
    at the default t in the same directory (it waits, then computes alone)."""
    share = tmp_path / "share"
    a = pretrain(config(teacher_dir, tmp_path / "a", f"--data.share_targets={share}", "--data.share_index=0",
                        "--data.share_count=2", "--data.share_wait=0.2"))
    b = pretrain(config(teacher_dir, tmp_path / "b", f"--data.share_targets={share}", "--data.share_index=1",
                        "--data.share_count=2", "--data.share_wait=0.2", "--teacher.t=50"))
    assert a["shared_targets"]["dir"] != b["shared_targets"]["dir"]
    assert b["shared_targets"]["read"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--data.share_index=2", "--data.share_count=2"], "data.share_index: expected an index below"),
    (["--data.share_targets=x", "--data.cache=y"], "data.share_targets: the targets of data.cache"),
    (["--data.share_wait=0"], "data.share_wait"),
])
def test_share_settings_are_checked(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, extra)


def test_a_sharing_run_resumes_exactly_although_it_drew_a_batch_ahead(teacher_dir, tmp_path, monkeypatch):
    """A sharing run draws the next micro-batch before training on the current one (to compute its targets ahead);
    its checkpoints record the data position of the batch trained on, so a resume from step 2 (12 images, batch 4:
    the run crosses an epoch boundary at step 3) ends with the uninterrupted run's weights, bit for bit."""


    saved = keep_every_checkpoint(monkeypatch)
    share = ["--data.length=12", "--run.ckpt_every=2", f"--data.share_targets={tmp_path / 'share'}",
             "--data.share_index=0", "--data.share_count=2", "--data.share_wait=0.05"]
    full = pretrain(config(teacher_dir, tmp_path / "full", *share))
    assert [p.name for p in saved][:2] == ["step2.pt", "step4.pt"]
    state = torch.load(saved[0], weights_only=False)
    assert (state["epoch"], state["consumed"]) == (0, 2)  # the batches trained on, not the one drawn ahead
    resumed = pretrain(config(teacher_dir, tmp_path / "resumed", *share), resume=saved[0])
    assert resumed["step"] == full["step"] == STEPS
    assert_same_weights(weights(full), weights(resumed))
