"""The wheel is pure Python and ships every native source for the build on first use."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import deformops

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "deformops" / "csrc"


def test_wheel_is_pure_and_ships_native_sources(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("deformops-*.whl")
    assert wheel.name == f"deformops-{deformops.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"deformops-{deformops.__version__}.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: true" in metadata
    sources = {
        f"deformops/{path.relative_to(CSRC.parent).as_posix()}"
        for path in CSRC.rglob("*")
        if path.suffix in {".h", ".cpp", ".cu", ".cuh"}
    }
    assert sources, "no native sources found"
    assert sources <= names, sorted(sources - names)
    assert not any(name.endswith((".so", ".o")) for name in names)
