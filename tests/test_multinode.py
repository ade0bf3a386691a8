"""Two "nodes" on this machine: two ``torchrun --nnodes=2 --nproc-per-node=1`` launchers meeting at a c10d rendezvous
on localhost (gloo), each starting one pretraining process; the replicas' parameter checksums must agree after a few
steps, as with one launcher and two processes (tests/test_train.py). Both launchers run the same command, as on two
machines (the c10d rendezvous assigns the node ranks).

Tiny everything: an untrained 3-level DDPM teacher, timm's test_resnet at 32x32, batches of 2, 3 steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_teacher

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Cannot initialize model")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_keep_replicas_identical(tmp_path):
    teacher = tmp_path / "teacher"
    save_tiny_teacher(teacher)
    out = tmp_path / "run"
    values = {"teacher.path": teacher, "data.image_size": 32, "data.length": 16, "data.num_workers": 0,
              "model.student": "test_resnet", "model.width": 16, "run.batch_size": 2, "run.steps": 3,
              "run.log_every": 1, "run.out_dir": out, "run.progress": False, "schedule.warmup_steps": 1,
              "run.ckpt_every": 100, "run.device": "cpu"}
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    procs = []
    for node in (0, 1):  # the same command on both "nodes"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=two-nodes-test",
               "--max-restarts=0", "-m", "dreamteacher", "pretrain",
               *[f"--{k}={v}" for k, v in values.items()]]
        log = open(tmp_path / f"node{node}.log", "w+")  # noqa: SIM115 -- closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    outputs = []
    try:
        for proc, _ in procs:
            proc.wait(timeout=180)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            outputs.append(log.read())
            log.close()
    for (proc, _), text in zip(procs, outputs):
        assert proc.returncode == 0, text[-3000:]
    sums = [(out / f"params_rank{r}.sha256").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
