"""A warm interpreter for tests that need a fresh process: ``python -m dreamteacher ARGS`` or ``python -c CODE``
run as a fork of one process that has already imported the third-party libraries (torch, triton, diffusers, timm,
...), and nothing of this project.

Each run is a new process: it imports ``dreamteacher`` / ``dtkernels`` afresh, has its own stdout, stderr, exit
code, working directory and environment, and nothing it does reaches the next run. What it skips is the 3-10 s of
importing torch and diffusers that every CLI subprocess of the suite paid (most of those tests' time). The third-party
imports are the only difference from ``subprocess.run([sys.executable, ...])``: a module of ours that used torch
without importing it still fails (its own namespace has no ``torch``), and an import cycle among our modules still
shows, since none of them is loaded before the fork.

The warm process computes nothing before it forks (no OpenMP region has run), so the children's thread pools start
clean. Environment variables read at interpreter start-up (``PYTHONWARNINGS``, ``OMP_NUM_THREADS``) are the warm
process's: start it with the environment the tests want (:func:`start`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The server: import the libraries, then fork one child per request line. The child runs the request as `python -m
# dreamteacher` (argv) or `python -c` (code) would, flushes and exits with the code the interpreter would return.
_SERVER = r'''
import json, os, runpy, sys, traceback
import numpy, PIL.Image, yaml, safetensors.torch, tqdm
import torch, torchvision, triton, timm
import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

def child(req):
    devnull = os.open(os.devnull, os.O_RDONLY)  # the requests come on the server's stdin: never the child's
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.path[:0] = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("dreamteacher", "dtkernels"))
    if ours:  # the promise of a fresh process: nothing of this project is imported before the request runs
        print(f"warm interpreter: {ours} were imported before the fork", file=sys.stderr, flush=True)
        os._exit(70)
    code = 0
    try:
        if req.get("script") is not None:  # python SCRIPT ARGS
            sys.argv = [req["script"], *req["argv"]]
            runpy.run_path(req["script"], run_name="__main__")
        elif req.get("argv") is not None:
            sys.argv = ["dreamteacher", *req["argv"]]
            runpy.run_module("dreamteacher", run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c"]
            exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    op = req.get("op", "run")
    if op in ("run", "spawn"):
        pid = os.fork()
        if pid == 0:
            child(req)
        if op == "spawn":  # the caller polls, signals and waits for it by pid
            print(json.dumps({"pid": pid}), flush=True)
            continue
    else:
        pid = req["pid"]
    done, status = os.waitpid(pid, os.WNOHANG if op == "poll" else 0)
    code = os.waitstatus_to_exitcode(status) if done else None
    print(json.dumps({"returncode": code}), flush=True)
'''


class WarmInterpreter:
    """One warm server process; :meth:`run` is ``subprocess.run`` of ``python -m dreamteacher`` or ``python -c``."""

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 300) -> None:
        self.env = dict(os.environ if env is None else env)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=self.env, cwd=ROOT)
        self._dir = tempfile.TemporaryDirectory(prefix="warm-interpreter-")
        self._n = 0
        line = self._readline(start_timeout)
        if line.strip() != "ready":
            raise RuntimeError(f"the warm interpreter did not start (exit {self.proc.poll()})")

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise subprocess.TimeoutExpired("warm interpreter", timeout)
        return self.proc.stdout.readline()

    def run(self, *, argv: list[str] | None = None, code: str | None = None, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """``argv``: ``python -m dreamteacher *argv``; ``code``: ``python -c code``. ``env`` replaces the environment
        the code sees (variables read at start-up keep the server's values)."""
        if (argv is None) == (code is None):
            raise ValueError("give exactly one of argv and code")
        self._n += 1
        out, err = (Path(self._dir.name) / f"{self._n}.{s}" for s in ("out", "err"))
        req = {"argv": [str(a) for a in argv] if argv is not None else None, "code": code,
               "cwd": str(cwd or ROOT), "env": dict(self.env if env is None else env),
               "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if not line:
            raise RuntimeError(f"the warm interpreter died (exit {self.proc.poll()})")
        returncode = json.loads(line)["returncode"]
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        return subprocess.CompletedProcess(argv or ["-c", code], returncode, stdout, stderr)

    def _ask(self, req: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout)
        if not line:
            raise RuntimeError(f"the warm interpreter died (exit {self.proc.poll()})")
        return json.loads(line)

    def spawn(self, script: str | os.PathLike, argv: list, *, stderr: str | os.PathLike,
              env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> WarmProcess:
        """``python SCRIPT ARGV`` started in the background (stdout discarded, stderr to the file ``stderr``): a
        :class:`WarmProcess` to poll, signal and wait for, like ``subprocess.Popen``."""
        req = {"op": "spawn", "script": str(script), "argv": [str(a) for a in argv], "code": None,
               "cwd": str(cwd or ROOT), "env": dict(self.env if env is None else env), "stdout": os.devnull,
               "stderr": str(stderr)}
        return WarmProcess(self, self._ask(req, 60)["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()


class WarmProcess:
    """A :meth:`WarmInterpreter.spawn`-ed child: ``poll``, ``send_signal``, ``wait`` and ``returncode`` as
    ``subprocess.Popen`` has them (the server is its parent and reaps it)."""

    def __init__(self, server: WarmInterpreter, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._ask({"op": "poll", "pid": self.pid}, 60)["returncode"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        if self.returncode is None:
            self.returncode = self.server._ask({"op": "wait", "pid": self.pid}, timeout)["returncode"]
        return self.returncode
