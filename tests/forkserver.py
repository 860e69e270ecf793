"""Command-line runs for the tests, started from a process that has already imported what the
entry points import (torch, Lightning, diffusers, transformers, Hydra, distillery): each
command is a child forked from it, so it starts at once instead of paying about ten seconds of
imports.

The child is a process of its own, as ``python <script> <args>`` would be: its own pid, working
directory, environment (PYTHONPATH and OMP_NUM_THREADS applied), empty stdin, stdout, stderr and
exit status (negative: the signal that ended it). The server never runs a tensor operation, so
no OpenMP pool exists when it forks (each child starts its own); the only other threads are the
ones libraries start at import (OpenBLAS's pool, which stops and restarts around a fork). It
refuses to fork once a Python thread runs beside its main one.
DISTILLERY_TEST_FORK=0 runs every command as a plain subprocess instead.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- the server ---------------------------------------------------------------------------------
def _child(request: dict, reply_fd: int) -> None:
    """Runs in the forked process: become the command, run it, exit with its status."""
    code = 1
    try:
        os.close(reply_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request["argv"][0]
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [str(Path(script).resolve().parent), *extra, *[p for p in sys.path[1:] if p not in extra]]
        if os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # Only what the command itself registers runs at its exit: the server's exit functions
        # and finalizers (its temporary folders, say) belong to the server.
        import atexit
        import weakref

        atexit._clear()
        for info in list(weakref.finalize._registry.values()):
            info.atexit = False
        weakref.finalize._registered_with_atexit = False
        sys.argv = list(request["argv"])
        import runpy
        import traceback

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = int(stop.code or 0)
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what the interpreter does at exit (W&B, logging), then leave
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    # What the entry points import, so that no child imports it again.
    import diffusers  # noqa: F401
    import hydra  # noqa: F401
    import lightning  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import distillery.cli  # noqa: F401
    import distillery.eval.runner  # noqa: F401
    import distillery.export  # noqa: F401
    import distillery.training  # noqa: F401

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else of the server reaches the pipe

    def say(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    say({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if threading.active_count() != 1:
            say({"error": f"the fork server runs {threading.active_count()} Python threads: forking it is not safe"})
            continue
        pid = os.fork()
        if pid == 0:
            _child(request, reply.fileno())
        say({"pid": pid})
        _, status = os.waitpid(pid, 0)
        say({"status": os.waitstatus_to_exitcode(status)})


# ---- the client ---------------------------------------------------------------------------------
class ForkServer:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _read(self, timeout: float | None) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (status {self.proc.poll()})")
        return json.loads(line)

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env, bufsize=1)
        assert self._read(300).get("ready")

    def run(self, argv: list[str], cwd: str | Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env),
                                              "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            started = self._read(60)
            if "error" in started:
                raise RuntimeError(started["error"])
            try:
                status = self._read(timeout)["status"]
            except TimeoutError:
                os.kill(started["pid"], signal.SIGKILL)
                self._read(60)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout,
                                                out.read_text(errors="replace"), err.read_text(errors="replace"))
            return subprocess.CompletedProcess([sys.executable, *argv], status, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))


_SERVER = ForkServer()


def run_script(argv: list[str], cwd: str | Path, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <argv...>`` with captured text output, from the fork server (or as a plain
    subprocess with DISTILLERY_TEST_FORK=0, or where there is no fork)."""
    env = dict(os.environ if env is None else env)
    if os.environ.get("DISTILLERY_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=cwd)
    return _SERVER.run(list(argv), cwd, env, timeout)


if __name__ == "__main__":
    serve()
