"""A long run on a shared cluster: preemption signals, full disks and divergence, each through the real CLI.

* Preemption: SIGUSR1 while a checkpoint is being written, then SIGTERM to the whole process group (as SLURM
  signals every process of a job step, DataLoader workers included) in the middle of the steps: each stop writes a
  checkpoint and exits with ``EXIT_PREEMPTED``; ``--resume auto`` twice ends bit for bit where an uninterrupted run
  ends. The same signals for ``train-teacher`` and ``cache-features`` (which resumes to the same bytes), and for a
  2-process torchrun run (the ranks agree on the step; one checkpoint).
* Full disks: a real tmpfs too small for the second checkpoint (mounting needs root; where it is refused, that test
  says so and the ``RLIMIT_FSIZE`` tests still cover the write errors), and ``RLIMIT_FSIZE`` for the export and a
  cache shard: one ``error:`` line naming the file, the cause and what is intact, exit ``EXIT_WRITE_FAILED``, no
  temporary left.
* Divergence: a learning rate that diverges stops the run with ``EXIT_DIVERGED`` naming the step and the part;
  ``last.pt`` keeps the last finite state; no export; the log stays strict JSON.

Tiny everything, as in test_fault_injection.py: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, logged_steps, save_tiny_teacher

from dreamteacher import cli
from dreamteacher.faults import (
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_WRITE_FAILED,
    Diverged,
    WriteFailed,
    check_finite_state,
    check_free_space,
    first_nonfinite,
    guarded_write,
    json_line,
)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parent.parent

# The CLI, with hooks that make a run slow enough to be signalled at a chosen point (they change no number).
WRAPPER = r'''
import os, sys, time
from pathlib import Path

kind, _, arg = os.environ.get("DT_FAULT", "").partition(":")


def reached():
    Path(os.environ["DT_FAULT_SIGNAL"]).touch()


def slowed(module, name):
    real = getattr(module, name)

    def slow(*args, **kwargs):
        time.sleep(float(arg))
        return real(*args, **kwargs)

    setattr(module, name, slow)


if kind == "slow-steps":  # each logged pretraining step takes ARG s more (log_every=1)
    import dreamteacher.train
    slowed(dreamteacher.train, "json_line")
elif kind == "slow-teacher-steps":
    import dreamteacher.teacher_training
    slowed(dreamteacher.teacher_training, "json_line")
elif kind == "slow-cache":  # each cached batch takes ARG s more
    import dreamteacher.feature_cache
    slowed(dreamteacher.feature_cache, "to_unit_range")
elif kind == "hold-ckpt":  # the step-ARG checkpoint is written, then held 3 s before its rename (once)
    import torch

    real_save, held = torch.save, []

    def save(obj, f, *args, **kwargs):
        out = real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and "optimizer" in obj and obj.get("step") == int(arg) and not held:
            held.append(1)
            reached()
            time.sleep(3)
        return out

    torch.save = save

from dreamteacher.cli import main

sys.exit(main(sys.argv[1:]))
'''


class Child:
    """The CLI in a subprocess of its own process group (so that a signal can go to the group, as SLURM sends it)."""

    def __init__(self, workdir: Path, argv: list, *, fault: str = "", fsize: int | None = None,
                 torchrun: int = 0) -> None:
        self.flag = workdir / f"reached_{time.monotonic_ns()}"
        self.err = open(workdir / f"stderr_{time.monotonic_ns()}", "w+")  # noqa: SIM115 -- closed in wait()
        cmd = [sys.executable, str(workdir / "wrapper.py"), *map(str, argv)]
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
                   *cmd[1:]]

        def limit():
            if fsize is not None:  # writes past fsize bytes fail with EFBIG (SIGXFSZ ignored, as a shell's ulimit)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

        self.proc = subprocess.Popen(cmd, stdout=self.err, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=limit, env=cli_env(DT_FAULT=fault, DT_FAULT_SIGNAL=str(self.flag)))

    def wait_until(self, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended early ({self.proc.returncode}): {self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"condition not reached: {self.output()[-3000:]}"
            time.sleep(0.05)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def output(self) -> str:
        self.err.flush()
        self.err.seek(0)
        return self.err.read()

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        out = self.output()
        self.err.close()
        return rc, out


def records(out: Path) -> list[dict]:
    return [json.loads(line, parse_constant=_refuse) for line in (out / "log.jsonl").read_text().splitlines()]


def _refuse(token: str):
    raise ValueError(f"not strict JSON: {token}")


def last_checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def one_error(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    (root / "wrapper.py").write_text(WRAPPER)
    return root


@pytest.fixture(scope="module")
def teacher_dir(workdir) -> Path:
    return save_tiny_teacher(workdir / "teacher")


def pretrain_args(teacher_dir: Path, out: Path, **extra) -> list[str]:
    # one loader worker: a group signal reaches it too, and it must not take the run down
    values = {"teacher.path": teacher_dir, "data.image_size": 32, "data.length": 12, "data.num_workers": 1,
              "model.student": "test_resnet", "model.width": 16, "run.batch_size": 4, "run.steps": 6,
              "run.log_every": 1, "run.out_dir": out, "run.progress": False, "schedule.warmup_steps": 1,
              "optim.lr": 1e-3, "run.ckpt_every": 2, **extra}
    return ["pretrain", "--resume", "auto", *[f"--{k}={v}" for k, v in values.items()]]


@pytest.fixture(scope="module")
def reference(workdir, teacher_dir) -> Path:
    """An uninterrupted run of :func:`pretrain_args`."""
    out = workdir / "reference"
    rc, output = Child(workdir, pretrain_args(teacher_dir, out)).wait()
    assert rc == 0, output[-3000:]
    return out


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = records(out), records(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for a, b in zip(got, want):
        assert (a["loss"], a["mse"], a["at"], a["lr"]) == (b["loss"], b["mse"], b["at"], b["lr"]), (a, b)
    final, final_ref = last_checkpoint(out), last_checkpoint(ref)
    assert final["step"] == final_ref["step"] == 6
    assert all(torch.equal(final["model"][k], final_ref["model"][k]) for k in final_ref["model"])
    assert not list((out / "checkpoints").glob(".*.tmp*"))


# ------------------------------------------------------------------------------------------------ preemption
def test_preempted_twice_resumes_bit_for_bit(workdir, teacher_dir, reference):
    out = workdir / "preempted"
    args = pretrain_args(teacher_dir, out)
    # 1. SIGUSR1 (SLURM's time-limit warning) while the step-2 checkpoint is being written: the write completes,
    # the run stops at the next step boundary and exits with the requeue code
    child = Child(workdir, args, fault="hold-ckpt:2")
    child.wait_until(child.flag.exists)
    child.proc.send_signal(signal.SIGUSR1)
    rc, output = child.wait()
    assert rc == EXIT_PREEMPTED, output[-3000:]
    assert "SIGUSR1: stopping after this step" in output and "pretrain interrupted at step 2" in output, output
    assert "Traceback" not in output and last_checkpoint(out)["step"] == 2
    assert not list((out / "checkpoints").glob(".*.tmp*"))
    assert json.loads((out / "status.json").read_text())["state"] == "preempted"
    # 2. resumed, then SIGTERM to the whole process group (the loader worker included) in the middle of the steps
    child = Child(workdir, args, fault="slow-steps:0.4")
    child.wait_until(lambda: logged_steps(out) >= 4)
    child.signal_group(signal.SIGTERM)
    rc, output = child.wait()
    assert rc == EXIT_PREEMPTED, output[-3000:]
    assert "at step 2" in output and "Traceback" not in output, output[-3000:]
    stopped = last_checkpoint(out)["step"]
    assert 4 <= stopped < 6 and records(out)[-1]["step"] == stopped
    # 3. resumed to the end: the same losses and weights as the run that was never stopped
    rc, output = Child(workdir, args).wait()
    assert rc == 0 and f"at step {stopped}" in output, output[-3000:]
    assert_same_run(out, reference)
    assert json.loads((out / "status.json").read_text()) == {
        "state": "finished", "step": 6, "exit_code": 0, "signal": None,
        "checkpoint": str(out / "checkpoints" / "last.pt")}


def test_two_process_torchrun_agrees_on_the_stop_and_resumes_bit_for_bit(workdir, teacher_dir):
    def args(out: Path) -> list:
        return pretrain_args(teacher_dir, out, **{"run.steps": 8, "data.num_workers": 0, "run.ckpt_every": 100})

    ref, out = workdir / "ddp_ref", workdir / "ddp"
    reference = Child(workdir, args(ref), torchrun=2)
    child = Child(workdir, args(out), fault="slow-steps:0.5", torchrun=2)
    child.wait_until(lambda: logged_steps(out) >= 2, timeout=300)
    child.signal_group(signal.SIGTERM)  # torchrun and both workers; torchrun forwards it once more
    rc, output = child.wait()
    # torchrun exits 1 with its own traceback when it is signalled, whatever its workers returned: the workers'
    # exit code reaches a job script through status.json
    assert rc != 0 and output.count("SIGTERM: stopping after this step") == 2, output[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status == {"state": "preempted", "step": status["step"], "exit_code": EXIT_PREEMPTED,
                      "signal": "SIGTERM", "checkpoint": str(out / "checkpoints" / "last.pt")}, status
    assert last_checkpoint(out)["step"] == records(out)[-1]["step"] == status["step"] < 8, output[-3000:]
    sums = [(out / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert sums[0] == sums[1], "the ranks stopped at different steps"
    assert len(list((out / "checkpoints").iterdir())) == 1
    rc, output = Child(workdir, args(out), torchrun=2).wait()
    assert rc == 0, output[-3000:]
    assert reference.wait()[0] == 0
    assert [r["loss"] for r in records(out)] == [r["loss"] for r in records(ref)]
    assert (out / "params_rank0.sha256").read_text() == (ref / "params_rank0.sha256").read_text()


def test_train_teacher_stops_on_sigterm_and_resumes_bit_for_bit(workdir):
    def args(out: Path) -> list:
        return ["train-teacher", "--out", out, "--image-size", "16", "--channels", "8", "16", "--steps", "8",
                "--batch-size", "2", "--log-every", "1", "--num-workers", "1", "--ema-decay", "0.9", "--resume",
                "auto", "--no-progress"]

    ref, out = workdir / "teacher_ref", workdir / "teacher_sigterm"
    reference = Child(workdir, args(ref))
    child = Child(workdir, args(out), fault="slow-teacher-steps:0.4")
    child.wait_until(lambda: logged_steps(out) >= 3)
    child.signal_group(signal.SIGTERM)
    rc, output = child.wait()
    assert rc == EXIT_PREEMPTED, output[-3000:]
    assert "stopped by SIGTERM" in output and "--resume auto" in output and "Traceback" not in output
    meta = json.loads((out / "teacher.json").read_text())
    stopped = meta["steps"]
    assert meta["interrupted"] and 3 <= stopped < 8 and (out / "unet").is_dir()
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped
    assert not list(workdir.glob(".teacher_sigterm.tmp*"))
    rc, output = Child(workdir, args(out)).wait()
    assert rc == 0 and f"at step {stopped}" in output, output[-3000:]
    assert reference.wait()[0] == 0
    exact = ("step", "loss", "lr")  # images_per_s and time are the clock's
    assert [[r[k] for k in exact] for r in records(out)] == [[r[k] for k in exact] for r in records(ref)]
    assert [r["step"] for r in records(out)] == list(range(1, 9))
    from safetensors.torch import load_file

    weights = [load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (out, ref)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert json.loads((out / "teacher.json").read_text())["fixed_batch_loss"] == json.loads(
        (ref / "teacher.json").read_text())["fixed_batch_loss"]


def test_cache_features_stops_on_sigterm_and_resumes_to_the_same_bytes(workdir, teacher_dir):
    from PIL import Image

    from dreamteacher.feature_cache import _read_manifest, check_shards

    images = workdir / "cache_images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (20, 16 + i), (30 * i, 200 - 20 * i, 90)).save(images / f"{i}.png")

    def args(out: Path) -> list:
        return ["cache-features", "--teacher", teacher_dir, "--data", images, "--out", out, "--resolution", "16",
                "--shard-size", "2", "--batch-size", "1", "--strides", "4", "8", "16", "--no-progress",
                "--num-workers", "1"]

    ref, out = workdir / "cache_ref", workdir / "cache_stopped"
    reference = Child(workdir, args(ref))
    child = Child(workdir, args(out), fault="slow-cache:0.5")
    child.wait_until(lambda: (out / "manifest.json").is_file() and len(_read_manifest(out)["shards"]) >= 1)
    child.signal_group(signal.SIGTERM)
    rc, output = child.wait()
    assert rc == EXIT_PREEMPTED, output[-3000:]
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output[-3000:]
    manifest = _read_manifest(out)
    assert 1 <= len(manifest["shards"]) < 4 and not manifest["complete"] and not list(out.glob("*.tmp"))
    rc, output = Child(workdir, args(out)).wait()
    assert rc == 0 and "resuming" in output, output[-3000:]
    assert reference.wait()[0] == 0

    def hashes(root: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("shard_*"))}

    assert hashes(out) == hashes(ref) and len(hashes(out)) == 4
    assert check_shards(out, verify_hash=True) == []


# ------------------------------------------------------------------------------------------------ full disks
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def test_a_full_disk_keeps_the_previous_checkpoint_and_resume_continues(workdir, teacher_dir, reference):
    size = (reference / "checkpoints" / "last.pt").stat().st_size
    mount = workdir / "small_disk"
    # room for one checkpoint and half of the next one's temporary file: step 2 fits, step 4 does not
    if not _mount_tmpfs(mount, int(size * 1.5) + 64 * 1024):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the RLIMIT_FSIZE tests below cover write errors")
    try:
        out = mount / "run"
        args = pretrain_args(teacher_dir, out)
        rc, output = Child(workdir, args).wait()
        assert rc == EXIT_WRITE_FAILED, output[-3000:]
        assert "free in" in output and "run.out_dir checkpoints" in output  # the warning before training
        error = one_error(output)
        assert f"could not write the checkpoint {out / 'checkpoints' / 'last.pt'}" in error, error
        assert "no space left on the device" in error and "needed" in error, error
        assert "(step 2) is intact" in error and "--resume auto" in error, error
        assert last_checkpoint(out)["step"] == 2 and not list((out / "checkpoints").glob(".*.tmp*"))
        assert records(out)[-1]["step"] == 4
        # space freed: the same command continues and ends where the uninterrupted run ends
        subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(mount)], check=True)
        rc, output = Child(workdir, args).wait()
        assert rc == 0 and "at step 2" in output, output[-3000:]
        assert_same_run(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_export_past_the_file_size_limit_is_one_clear_error(workdir, reference):
    target = workdir / "export" / "backbone.pth"
    rc, output = Child(workdir, ["export", reference / "checkpoints" / "last.pt", "--out", target],
                       fsize=16 * 1024).wait()
    assert rc == EXIT_WRITE_FAILED, output[-3000:]
    error = one_error(output)
    assert f"could not write the backbone export {target}" in error and "file too large" in error, error
    assert "untouched" in error and not target.exists() and not list(target.parent.glob(".*.tmp*"))


def test_cache_shard_past_the_file_size_limit_is_one_clear_error(workdir, teacher_dir):
    from PIL import Image

    images = workdir / "fsize_images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 90, 200 - 40 * i)).save(images / f"{i}.png")
    out = workdir / "fsize_cache"
    rc, output = Child(workdir, ["cache-features", "--teacher", teacher_dir, "--data", images, "--out", out,
                                 "--resolution", "32", "--shard-size", "4", "--batch-size", "4", "--strides", "4",
                                 "8", "16", "--no-progress"], fsize=10 * 1024).wait()
    assert rc == EXIT_WRITE_FAILED, output[-3000:]
    error = one_error(output)
    assert f"could not write the cache file {out / 'shard_00000.safetensors'}" in error, error
    assert "file too large" in error and "rerun the same command" in error, error
    assert not list(out.glob("*.tmp")) and not (out / "shard_00000.safetensors").exists()


# ------------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("where", ["loss", "weights"])
def test_divergence_stops_before_anything_is_written_from_it(teacher_dir, tmp_path, capsys, where):
    out = tmp_path / "run"
    # "loss": no update at step 1 (warm-up starts at 0), a finite step-1 checkpoint, then a NaN loss at step 2.
    # "weights": the step-1 update already makes the weights infinite; the check before the first checkpoint
    # refuses them (the logged loss is still finite).
    extra = ({"schedule.warmup_steps": 1000, "optim.lr": 1e30, "run.ckpt_every": 1} if where == "loss"
             else {"optim.lr": 1e8, "run.ckpt_every": 2})
    args = pretrain_args(teacher_dir, out, **{"data.num_workers": 0, "run.clip_grad": 0, **extra})
    rc = cli.main(args)
    error = one_error(capsys.readouterr().err)
    assert rc == EXIT_DIVERGED, error
    if where == "loss":
        assert "pretrain diverged at step 2: the mse (level 0) is not finite" in error, error
        assert "(step 1) is intact" in error and last_checkpoint(out)["step"] == 1
        state = last_checkpoint(out)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        last = records(out)[-1]  # strict JSON (records() refuses NaN): the non-finite numbers are null, and named
        assert last["step"] == 2 and last["loss"] is None and "loss" in last["nonfinite"] and "mse[0]" in last[
            "nonfinite"]
    else:
        assert "the weights at step 2" in error and "NaN or Inf" in error, error
        assert "No checkpoint had been written yet" in error and not (out / "checkpoints").exists()
    assert "Lower optim.lr (now 1e+" in error and "run.clip_grad" in error, error
    assert not (out / "backbone.pth").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "diverged"


# ------------------------------------------------------------------------------------------------ the pieces
INF = float("inf")


def test_json_line_is_strict_and_names_what_was_not_finite():
    line = json_line({"step": 3, "loss": float("nan"), "mse": [1.0, float("inf")], "lr": 0.1, "d": {"x": -INF}})
    record = json.loads(line, parse_constant=_refuse)
    assert record == {"step": 3, "loss": None, "mse": [1.0, None], "lr": 0.1, "d": {"x": None},
                      "nonfinite": ["loss", "mse[1]", "d.x"]}
    assert "nonfinite" not in json.loads(json_line({"loss": 1.5}))



def test_first_nonfinite_names_the_part_and_level():
    assert first_nonfinite({"mse": [1.0, 2.0], "at": [0.1, float("nan")], "ld": float("inf")}) == "at (level 1)"
    assert first_nonfinite({"mse": [1.0], "at": [0.5], "ld": float("inf")}) == "ld"
    assert first_nonfinite({"mse": [1.0], "at": [0.5], "ld": None}) is None


def test_check_finite_state_names_the_first_bad_tensor():
    good = torch.randn(3, 4) + 2
    bad = good.clone()
    bad[1, 2] = float("nan")
    check_finite_state([("a", good), ("steps", torch.tensor(3))], what="w", hint="h")
    with pytest.raises(Diverged, match=r"^w: b holds NaN or Inf values; nothing was written from it\. h$"):
        check_finite_state([("a", good), ("b", bad), ("c", bad * float("inf"))], what="w", hint="h")


def test_guarded_write_names_the_file_cause_and_what_is_intact(tmp_path):
    import errno

    path, tmp = tmp_path / "f.pt", tmp_path / ".f.pt.tmp1"
    tmp.write_bytes(b"partial")
    with pytest.raises(WriteFailed, match=r"could not write the checkpoint .*f\.pt: disk quota exceeded\. All is "
                                          r"well; do this") as info:
        with guarded_write(path, what="checkpoint", intact="All is well", then="do this", cleanup=[tmp]):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert info.value.path == path and not tmp.exists()
    # torch.save reports the failed write as a RuntimeError; the OSError it hid is recorded on it
    hidden = RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    hidden.os_error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteFailed, match="no space left on the device .* free, about 2.0 kB needed"):
        with guarded_write(path, what="checkpoint", intact="x", then="y", needed=2000):
            raise hidden
    with pytest.raises(RuntimeError, match="not a write error"):  # anything else passes through unchanged
        with guarded_write(path, what="checkpoint", intact="x", then="y"):
            raise RuntimeError("not a write error")


def test_free_space_check_warns_with_the_figures(tmp_path, caplog):
    assert check_free_space(tmp_path, each=1, files=2, what="ckpt")
    with caplog.at_level("WARNING", logger="dreamteacher"):
        assert not check_free_space(tmp_path, each=10**13, files=3, what="run.out_dir checkpoints")
    assert "but run.out_dir checkpoints holds about 30.0 TB (3 file(s) of 10.0 TB)" in caplog.text


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and " 75  stopped by SIGTERM/SIGUSR1" in text and "  5  diverged" in text
