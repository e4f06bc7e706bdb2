"""The worked examples of ``examples/`` run to the end with their short settings (``--quick``).

The digits example needs scikit-learn and matplotlib (the ``examples`` extra): without
them the test skips, except in CI (env ``CI`` set), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = f"the example needs {', '.join(missing)} (pip install -e '.[examples]')"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; env CI is set: the examples must run")
    pytest.skip(message)


def _run(script: str, *args: str) -> str:
    """Run ``examples/script`` in a fresh interpreter from the repository root; its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_digits_quick(tmp_path: Path) -> None:
    _require("sklearn", "matplotlib")
    figure = tmp_path / "digits.png"
    out = _run("digits_deformable.py", "--quick", "--figure", str(figure))
    accuracies = dict(re.findall(r"(plain|deformable): test accuracy ([0-9.]+)", out))
    assert accuracies.keys() == {"plain", "deformable"}, out
    for name, value in accuracies.items():  # 10 classes: chance is 0.1
        assert 0.15 < float(value) <= 1.0, f"{name}: {out}"
    assert figure.read_bytes()[:8] == PNG_SIGNATURE
    assert figure.stat().st_size > 10_000


def test_detr_encoder_quick() -> None:
    out = _run("detr_encoder.py", "--quick")
    losses = [float(v) for v in re.findall(r"step +\d+ +loss ([0-9.]+)", out)]
    assert len(losses) >= 3, out
    assert losses[-1] < 0.8 * losses[0], out
