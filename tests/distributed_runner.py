"""Runs ``scripts/distributed_check.py`` under torchrun for the data-parallel tests
(``test_distributed.py`` on the CPU, ``gpu/test_multi_gpu.py`` on two GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "distributed_check.py"


def run_distributed_check(
    tmp_path: Path, *options: str, timeout: float = 300, env: dict | None = None
) -> tuple[dict, str]:
    """Run the script under torchrun with 2 processes; rank 0's report and the output."""
    out = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(SCRIPT),
        *options,
        "--out",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return json.loads(out.read_text()), output
