"""Fault injection: SIGKILL `pretrain` and `cache-features` at several points, including in the middle of a checkpoint
or shard write, rerun the same command each time, and check that the run always finds something loadable and ends
bitwise where an uninterrupted run ends.

The commands run as the real CLI in subprocesses, through a small wrapper that can hold a write at a chosen point
(half the bytes written to the temporary file, or all of them but not yet renamed) and tell the test, which then
kills the process: exactly what a kill at that instant leaves on disk. Without DT_FAULT the wrapper is plain
``dreamteacher.cli.main``.

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32 (small checkpoints), 6 steps with a
checkpoint every 2; a 16x16 feature cache of 8 images in 4 shards.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, logged_steps, save_tiny_teacher

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")
REPO = Path(__file__).resolve().parent.parent

WRAPPER = r'''
import os, sys, time
from pathlib import Path

FAULT = os.environ.get("DT_FAULT", "")
kind, _, arg = FAULT.partition(":")


def hold():
    """Tell the test where we are, then wait for its SIGKILL."""
    Path(os.environ["DT_FAULT_SIGNAL"]).touch()
    while True:
        time.sleep(1)


if kind.startswith("ckpt"):
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("step") == int(arg):
            real_save(obj, f, *args, **kwargs)
            f.flush()
            if kind == "ckpt-mid-write":  # half the checkpoint is in the temporary file
                f.truncate(f.tell() // 2)
                f.flush()
            hold()  # ckpt-before-rename: all of it is there, not renamed yet
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif kind.startswith("shard"):
    import dreamteacher.feature_cache as fc

    real_write = fc._atomic_write_bytes

    def write(path, data):
        if path.name == fc.shard_name(int(arg)):
            if kind == "shard-mid-write":  # the writer's temporary file, half written
                path.with_name(path.name + ".tmp").write_bytes(data[: len(data) // 2])
                hold()
            real_write(path, data)  # shard-before-manifest: renamed, the manifest does not list it yet
            hold()
        return real_write(path, data)

    fc._atomic_write_bytes = write

from dreamteacher.cli import main

sys.exit(main(sys.argv[1:]))
'''


_WARM: list = []


@pytest.fixture(scope="module", autouse=True)
def warm():
    from warm_interpreter import WarmInterpreter

    server = WarmInterpreter(cli_env())
    _WARM.append(server)
    yield server
    _WARM.clear()
    server.close()


def run(wrapper: Path, argv: list, *, fault: str = "", kill_when=None, workdir: Path, timeout: float = 300):
    """Run the CLI; SIGKILL it as soon as ``kill_when()`` is true (or the fault point is reached).

    Returns ``(returncode, stderr)``; returncode is ``-SIGKILL`` for a killed run."""
    flag = workdir / f"reached_{time.monotonic_ns()}"
    log = open(workdir / f"stderr_{time.monotonic_ns()}", "w+")  # noqa: SIM115 -- closed below
    # A fresh process forked from the warm interpreter (tests/warm_interpreter.py): the wrapper and the CLI import
    # as in a new interpreter, without paying torch's and diffusers' imports at each of the six runs.
    proc = _WARM[0].spawn(wrapper, list(argv), stderr=log.name, env=cli_env(DT_FAULT=fault,
                                                                             DT_FAULT_SIGNAL=str(flag)))
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if (fault and flag.exists()) or (kill_when is not None and kill_when()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            assert time.monotonic() < deadline, "the run neither finished nor reached its kill point"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
    return proc.returncode, stderr


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    (root / "wrapper.py").write_text(WRAPPER)
    return root


@pytest.fixture(scope="module")
def teacher_dir(workdir) -> Path:
    return save_tiny_teacher(workdir / "teacher")


def pretrain_args(teacher_dir: Path, out: Path) -> list[str]:
    values = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 12, "data.num_workers": 0,
              "model.student": "test_resnet", "model.width": 16, "run.batch_size": 4, "run.steps": 6,
              "run.log_every": 1, "run.out_dir": out, "run.progress": False, "schedule.warmup_steps": 1,
              "optim.lr": 1e-3, "run.ckpt_every": 2}
    return ["pretrain", "--resume", "auto", *[f"--{k}={v}" for k, v in values.items()]]


def test_killed_pretraining_always_resumes_to_the_same_losses(workdir, teacher_dir):
    wrapper = workdir / "wrapper.py"
    ref, out = workdir / "reference", workdir / "killed"
    ckpts = out / "checkpoints"
    reference = subprocess.Popen([sys.executable, str(wrapper), *pretrain_args(teacher_dir, ref)], env=cli_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    args = pretrain_args(teacher_dir, out)

    # 1. killed during step 2, before any checkpoint exists: the rerun starts fresh
    rc, _ = run(wrapper, args, kill_when=lambda: logged_steps(out) >= 1, workdir=workdir)
    assert rc == -signal.SIGKILL and not ckpts.exists()
    # 2. killed with half of the step-2 checkpoint written: only the temporary file is there
    rc, err = run(wrapper, args, fault="ckpt-mid-write:2", workdir=workdir)
    assert rc == -signal.SIGKILL and "starting fresh" in err, err[-3000:]
    partial = list(ckpts.glob(".last.pt.tmp*"))
    assert len(partial) == 1 and not (ckpts / "last.pt").exists()
    # 3. killed with the whole step-4 checkpoint written but not renamed: last.pt is step 2's
    rc, err = run(wrapper, args, fault="ckpt-before-rename:4", workdir=workdir)
    assert rc == -signal.SIGKILL and "starting fresh" in err, err[-3000:]
    assert not partial[0].exists()  # the dead run's partial file was cleaned up
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 2
    # a damaged copy next to it is skipped, not fatal
    (ckpts / "copy.pt").write_bytes((ckpts / "last.pt").read_bytes()[:1000])
    # 4. killed during step 5, between checkpoints (last.pt is step 4's)
    rc, err = run(wrapper, args, kill_when=lambda: logged_steps(out) >= 5, workdir=workdir)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "at step 2" in err and "skipping" in err and "copy.pt" in err, err[-3000:]
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 4
    # 5. runs to the end
    rc, err = run(wrapper, args, workdir=workdir)
    assert rc == 0, err[-3000:]
    assert "at step 4" in err and "Traceback" not in err, err[-3000:]

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    got, want = records(out), records(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for a, b in zip(got, want):
        assert (a["loss"], a["mse"], a["at"], a["lr"]) == (b["loss"], b["mse"], b["at"], b["lr"]), (a, b)
    final, final_ref = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (out, ref))
    assert final["step"] == final_ref["step"] == 6
    assert all(torch.equal(final["model"][k], final_ref["model"][k]) for k in final_ref["model"])
    assert not list(ckpts.glob(".*.tmp*"))


def shard_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("shard_*"))}


def test_killed_feature_caching_resumes_to_a_cache_that_verifies(workdir, teacher_dir):
    from PIL import Image

    from dreamteacher.feature_cache import FeatureCacheDataset, _read_manifest, check_shards

    images = workdir / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (20, 16 + i), (30 * i, 200 - 20 * i, 90)).save(images / f"{i}.png")
    wrapper = workdir / "wrapper.py"

    def args(out: Path) -> list:
        return ["cache-features", "--teacher", teacher_dir, "--data", images, "--out", out, "--resolution", "16",
                "--shard-size", "2", "--batch-size", "2", "--strides", "4", "8", "16", "--no-progress"]

    ref, out = workdir / "cache_ref", workdir / "cache_killed"
    reference = subprocess.Popen([sys.executable, str(wrapper), *args(ref)], env=cli_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    # 1. killed with shard 1 half written: shard 0 is finished and listed
    rc, _ = run(wrapper, args(out), fault="shard-mid-write:1", workdir=workdir)
    assert rc == -signal.SIGKILL
    assert (out / "shard_00001.safetensors.tmp").is_file()
    assert [s["index"] for s in _read_manifest(out)["shards"]] == [0]
    # 2. killed after shard 2 was renamed but before the manifest listed it
    rc, err = run(wrapper, args(out), fault="shard-before-manifest:2", workdir=workdir)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert "resuming, 1 of 4 shards" in err, err[-3000:]
    assert (out / "shard_00002.safetensors").is_file() and not (out / "shard_00001.safetensors.tmp").exists()
    assert [s["index"] for s in _read_manifest(out)["shards"]] == [0, 1]
    # 3. finishes
    rc, err = run(wrapper, args(out), workdir=workdir)
    assert rc == 0 and "resuming, 2 of 4 shards" in err, err[-3000:]

    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    manifest = _read_manifest(out)
    assert manifest["complete"] and check_shards(out, verify_hash=True) == []
    assert shard_hashes(out) == shard_hashes(ref) and len(shard_hashes(out)) == 4
    assert not list(out.glob("*.tmp"))
    cache, cache_ref = FeatureCacheDataset(out, verify_hash=True), FeatureCacheDataset(ref)
    assert len(cache) == 8
    for i in (0, 5, 7):
        (x, fa), (y, fb) = cache[i], cache_ref[i]
        assert torch.equal(x, y) and all(torch.equal(a, b) for a, b in zip(fa, fb))
