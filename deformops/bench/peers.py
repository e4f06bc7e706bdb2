"""The parent side of the peer worker (:mod:`.peers_worker`).

The published deformops 3.0.1 has this package's top-level name, so it is measured in a
subprocess started with ``python -I peers_worker.py --peer-path DIR``: one worker per
benchmark run, kept alive across jobs, restarted after a crash. A job that gets no
answer within the timeout (a hung build, the Triton convolution's minutes of
autotuning) kills the worker and disables that implementation for the rest of the run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

#: The worker script, run by file path.
WORKER = Path(__file__).with_name("peers_worker.py")

PEER_VERSION = "3.0.1"
PEER_CUDA = f"peer-deformops-{PEER_VERSION}-cuda"
PEER_TRITON = f"peer-deformops-{PEER_VERSION}-triton"

#: Peer implementations of each operator.
PEER_IMPLS: dict[str, tuple[str, ...]] = {
    "msda": (PEER_CUDA, PEER_TRITON),
    "conv": (PEER_TRITON,),
}

#: Peer implementations run only when named with ``--impl`` (the Triton convolution
#: autotunes for about six minutes per kernel on its first call).
OPT_IN: frozenset[tuple[str, str]] = frozenset({("conv", PEER_TRITON)})


def peer_path_problem(peer_path: str | None) -> str | None:
    """Why ``peer_path`` cannot hold the peer (None when it looks right)."""
    if not peer_path:
        return "no peer folder: pass --peer-path DIR or set DEFORMOPS_PEER_PATH"
    if not (Path(peer_path) / "deformops" / "__init__.py").is_file():
        return f"the peer is not installed in {peer_path} (no deformops/__init__.py)"
    return None


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class PeerWorker:
    """A lazily started worker process answering one job at a time.

    Parameters
    ----------
    peer_path : str
        Folder holding the peer package.
    device : str
        Device of the jobs.
    timeout : float
        Seconds to wait for one job's answer.
    """

    def __init__(self, peer_path: str, device: str, timeout: float) -> None:
        self.peer_path = os.path.abspath(peer_path)
        self.device = device
        self.timeout = timeout
        self.disabled: dict[tuple[str, str], str] = {}
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        command = [sys.executable, "-I", str(WORKER), "--peer-path", self.peer_path]
        process = subprocess.Popen(
            [*command, "--device", self.device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=_pump, args=(process.stdout, self._lines), daemon=True).start()
        return process

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send one job (see :mod:`.peers_worker` for its fields) and return the reply.

        Raises
        ------
        RuntimeError
            If the implementation is disabled, the worker dies, or no reply comes in time.
        """
        key = (job["op"], job["impl"])
        if key in self.disabled:
            raise RuntimeError(self.disabled[key])
        if self._process is None or self._process.poll() is not None:
            self._process = self._start()
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(job) + "\n")
        self._process.stdin.flush()
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close(kill=True)
            reason = f"no answer within {self.timeout:g} s: worker killed, {key[1]} disabled"
            self.disabled[key] = f"skipped: an earlier job got {reason}"
            raise RuntimeError(reason) from None
        if line is None:
            code = self._process.wait()
            self._process = None
            raise RuntimeError(f"the peer worker exited with code {code} (its stderr is above)")
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        """Stop the worker: close its stdin and let it exit, or kill it (also when it
        does not exit within 10 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        assert process.stdin is not None
        try:
            if not kill:
                process.stdin.close()
                process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            kill = True
        if kill:
            process.kill()
            process.wait()
