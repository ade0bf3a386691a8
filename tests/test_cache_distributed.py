"""``cache-features`` on two processes writes the cache one process writes, byte for byte, and a run stopped or
killed on one rank resumes to it.

* ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) against one process with the same arguments: every
  shard and the manifest equal bit for bit; rank 0 alone prints.
* A SIGTERM to rank 1 alone after its first shard: both ranks agree to stop before the next batch, rank 0 lists
  every finished shard in the manifest, both exit with ``EXIT_PREEMPTED``.
* A SIGKILL of rank 1 after its next shard (once rank 0 has recorded its own): rank 0 dies on the broken process
  group (under torchrun it is also torn down), the manifest is not rewritten, only the ranks' progress files record
  the two shards. The same 2-process command again keeps every finished shard (same inode and mtime), computes the
  last one only and ends with the one-process cache; one process resumes the killed cache just as well, and a
  progress file of another cache is refused.
* A full disk on rank 1: both ranks stop, each with one ``error:`` line and ``EXIT_WRITE_FAILED``; rank 0's
  shard is listed in the manifest.

Only the first run goes through torchrun itself; the signalled runs and the resume fork their two ranks from this
process with torchrun's environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is
all that ``setup_distributed`` reads: a torchrun launch costs ~20 s of CPU in imports on this project's 2-core
machines, a fork none, and they run while the torchrun run does. Every run is the real CLI (``cli.main``).

Tiny everything: the untrained 3-level DDPM teacher of helpers.save_tiny_teacher, 9 images at 16x16 in shards of 2
(5 shards, the last one short, so rank 0 has one shard more than rank 1), one image per teacher call (two batches
a shard).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from helpers import cli_env, save_tiny_teacher
from PIL import Image

from dreamteacher import cli
from dreamteacher.faults import EXIT_CACHE_MISMATCH, EXIT_PREEMPTED, EXIT_WRITE_FAILED
from dreamteacher.feature_cache import FeatureCacheDataset, _read_manifest

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model",
                                         "ignore:dtkernels.q_sample:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parent.parent
SHARDS = 5


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def stats(root: Path, names) -> dict[str, tuple[int, int]]:
    return {n: ((root / n).stat().st_ino, (root / n).stat().st_mtime_ns) for n in names}


def torchrun(work: Path, argv: list) -> subprocess.Popen:
    """The CLI under ``torchrun --standalone --nproc_per_node 2``, its output in ``work/torchrun_N.log``."""
    log = work / f"torchrun_{len(list(work.glob('torchrun_*')))}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dreamteacher", *map(str, argv)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=cli_env())
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, proc.log.read_text()


def _rank(rank: int, port: int, argv: list, fault: str, log: Path) -> None:
    """One forked rank: torchrun's environment, its output to ``log``, the CLI. ``fault`` ``term`` or ``kill``: it
    signals itself right after recording its first shard of the run (``kill``: once rank 0 has recorded its own, so
    that both ranks' records are there); ``fsize``: it cannot write a shard (the disk is full)."""
    rc = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not pytest's capture
        logging.root.handlers = []  # the CLI's basicConfig logs to this stderr
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if fault == "fsize":  # writes past 3000 bytes fail (EFBIG): a full disk, as far as the writer can tell
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
        elif fault:
            import dreamteacher.feature_cache as fc

            real_write = fc._atomic_write_bytes

            def write(path, data):
                real_write(path, data)
                if path.name.startswith("progress.rank") and fault == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif path.name.startswith("progress.rank"):
                    deadline = time.monotonic() + 120
                    while not path.with_name("progress.rank0.json").exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    os.kill(os.getpid(), signal.SIGKILL)

            fc._atomic_write_bytes = write
        rc = cli.main([str(a) for a in argv])
    except BaseException:  # noqa: BLE001 -- a child must never return into pytest
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def forked_ranks(work: Path, argv: list, fault: str, name: str) -> tuple[list[int], list[str]]:
    """Run the CLI as two ranks forked from this process, rank 1 with ``fault``; their exit codes (-N: signal N)
    and outputs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [work / f"{name}_rank{r}.log" for r in (0, 1)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, argv, fault if r == 1 else "", logs[r])) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """While torchrun writes the 2-process cache: the one-process cache, the 2-process run stopped by a SIGTERM to
    rank 1, its rerun killed by a SIGKILL of rank 1 (a copy of what that leaves is kept), the rerun to the end, and
    a 2-process run whose rank 1 finds the disk full."""
    work = tmp_path_factory.mktemp("cache_distributed")
    teacher = save_tiny_teacher(work / "teacher")
    images = work / "images"
    images.mkdir()
    for i in range(9):
        Image.new("RGB", (20, 16 + i), (30 * i, 200 - 20 * i, 90)).save(images / f"{i}.png")

    def args(out: Path) -> list:
        return ["cache-features", "--teacher", teacher, "--data", images, "--out", out, "--resolution", "16",
                "--shard-size", "2", "--batch-size", "1", "--strides", "4", "8", "16", "--no-progress"]

    both, one, out = work / "two", work / "one", work / "signalled"
    clean = torchrun(work, args(both))
    assert cli.main([str(a) for a in args(one)]) == 0
    result = {"work": work, "args": args, "one": one, "out": out}
    result["term"] = forked_ranks(work, args(out), "term", "term")
    result["after_term"] = _read_manifest(out), stats(out, ["shard_00000.safetensors", "shard_00001.safetensors"])
    result["kill"] = forked_ranks(work, args(out), "kill", "kill")
    shutil.copytree(out, work / "killed", copy_function=shutil.copy)  # for the one-process resume
    result["after_kill"] = stats(out, ["shard_00002.safetensors", "shard_00003.safetensors"])
    result["resume"] = forked_ranks(work, args(out), "", "resume")
    result["full"] = forked_ranks(work, args(work / "full"), "fsize", "full")
    result["two"] = (both, *finish(clean))
    return result


def test_torchrun_two_processes_write_the_bytes_of_one(runs):
    one, (two, rc, output) = runs["one"], runs["two"]
    assert rc == 0, output[-3000:]
    reference = files(one)
    assert sorted(reference) == ["manifest.json", *[f"shard_{k:05d}.safetensors" for k in range(SHARDS)]]
    got = files(two)  # no progress file left, no temporary
    assert sorted(got) == sorted(reference)
    for name in reference:
        assert got[name] == reference[name], f"{name} differs between 1 and 2 processes"
    # rank 0 alone prints and logs the summary
    assert output.count(f"9 images in {SHARDS} shards") == 1 and "2 processes (torchrun)" in output, output[-3000:]
    assert output.count("wrote 9 samples") == 1, output[-3000:]
    assert len(FeatureCacheDataset(two, verify_hash=True)) == 9


def test_bytes_per_view_of_paper_scale_are_those_of_a_written_shard(runs):
    """benchmarks/paper_scale.py --cache-bytes (docs/scale.md's figures) counts what a shard holds: its rows, plus
    the safetensors header."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_scale", REPO / "benchmarks" / "paper_scale.py")
    paper_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_scale)
    manifest = _read_manifest(runs["one"])
    per_view = paper_scale.cache_bytes_per_view(16, [(lv["num_chs"], lv["reduction"]) for lv in manifest["levels"]])
    assert per_view["total"] == 768 + 2 * (16 * 4 * 4 + 16 * 2 * 2 + 8 * 1 * 1) + 16
    for shard in manifest["shards"]:
        data = (runs["one"] / shard["file"]).read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        assert len(data) == header + shard["count"] * per_view["total"], shard


def test_stopped_and_killed_ranks_resume_to_the_same_bytes(runs):
    one, out = runs["one"], runs["out"]
    # 1. SIGTERM to rank 1 only: both stop before the next batch (shards 0 and 1 finished, one each), both exit
    # with EXIT_PREEMPTED, and rank 0 (which got no signal) says so once
    (rcs, outputs), (manifest, kept) = runs["term"], runs["after_term"]
    assert rcs == [EXIT_PREEMPTED, EXIT_PREEMPTED], outputs
    assert f"cache-features stopped by SIGTERM: 2 of {SHARDS} shards written" in outputs[0], outputs
    assert "stopped by SIGTERM:" not in outputs[1] and "Traceback" not in "".join(outputs), outputs
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    # 2. the rerun (shards 2, 4 on rank 0, 3 on rank 1): rank 1 SIGKILLed after its first shard; rank 0 fails on
    # the broken process group. The manifest still lists 0 and 1; only the progress files record 2 and 3
    rcs, outputs = runs["kill"]
    assert rcs[1] == -signal.SIGKILL and rcs[0] not in (0, None), outputs
    assert "another cache-features rank stopped answering" in outputs[0], outputs
    assert f"resuming, 2 of {SHARDS} shards already written" in outputs[0], outputs
    killed = runs["work"] / "killed"
    assert [s["index"] for s in _read_manifest(killed)["shards"]] == [0, 1]
    assert sorted(p.name for p in killed.glob("progress.*")) == ["progress.rank0.json", "progress.rank1.json"]
    kept.update(runs["after_kill"])
    # 3. the same command again: every finished shard kept as it was, only shard 4 computed (on rank 0; rank 1 has
    # none left and only takes part in the agreements), the bytes of one process, no progress file left
    rcs, outputs = runs["resume"]
    assert rcs == [0, 0], outputs
    assert f"resuming, 4 of {SHARDS} shards already written" in outputs[0], outputs
    assert "wrote 1 samples (1 view(s) per image) in 1 shards" in outputs[0], outputs
    assert outputs[1].strip() == "" or "resuming" not in outputs[1], outputs  # rank 0 alone logs
    assert stats(out, kept) == kept
    assert files(out) == files(one)


def test_one_process_resumes_a_killed_two_process_cache_and_refuses_another_caches_records(runs, capsys, caplog):
    work, args, one = runs["work"], runs["args"], runs["one"]
    killed = work / "killed"
    # a progress file of another cache (the manifest deleted by hand, another t asked for) is refused
    other = work / "other"
    shutil.copytree(killed, other)
    (other / "manifest.json").unlink()
    assert cli.main([str(a) for a in args(other)] + ["--t", "90"]) == EXIT_CACHE_MISMATCH
    assert "progress.rank0.json: this progress record was made with a different" in capsys.readouterr().err
    # one process reads the ranks' progress files as well (another world size than the killed run's)
    with caplog.at_level(logging.INFO, logger="dreamteacher"):
        assert cli.main([str(a) for a in args(killed)]) == 0
    assert f"resuming, 4 of {SHARDS} shards already written" in caplog.text
    assert files(killed) == files(one)


def test_a_full_disk_on_one_rank_stops_both_with_one_clear_error_each(runs):
    (rcs, outputs), out = runs["full"], runs["work"] / "full"
    # rank 1 cannot write shard 1; rank 0 wrote shard 0 in the same step, then both stop, rank 0 lists it
    assert rcs == [EXIT_WRITE_FAILED, EXIT_WRITE_FAILED], outputs
    assert all("Traceback" not in o and o.count("error:") == 1 for o in outputs), outputs
    assert f"could not write the cache file {out / 'shard_00001.safetensors'}: file too large" in outputs[1], outputs
    assert "error: rank 1: could not write the cache file" in outputs[0], outputs
    assert "rerun the same command" in outputs[0], outputs
    assert [s["index"] for s in _read_manifest(out)["shards"]] == [0]
    assert not list(out.glob("*.tmp")) and not list(out.glob("progress.*"))
