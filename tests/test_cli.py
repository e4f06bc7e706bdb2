"""The command line (``python -m deformops``) and backend selection."""

from __future__ import annotations

from pathlib import Path

import pytest

import deformops
from deformops import __main__ as cli
from deformops import ops


def test_info_reports_versions_and_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"deformops {deformops.__version__}" in out
    assert "device    cpu" in out
    assert "cache     " in out


def test_check_passes_and_prints_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for module in ("DeformConv2d", "DeformAttn2d", "DeformRoIPoolPack2d"):
        for backend in ("reference", "native"):
            assert any(line.split()[:3] == [module, "cpu", backend] for line in out.splitlines()), (
                module,
                backend,
            )
    assert "all ok" in out


def test_check_fails_on_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "CHECK_TOLERANCE", 0.0)  # float32 never equals float64 exactly
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert "FAILED" in out


def test_build_prints_the_library_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", "--device", "cpu"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.is_file()
    assert path.suffix == ".so"


def test_unknown_command_exits_with_usage() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_set_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="name"):
        deformops.set_backend("fast")  # type: ignore[arg-type]


def test_environment_selects_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFORMOPS_BACKEND", "reference")
    ops.set_backend(None)
    assert deformops.backend("cpu") == "reference"
    monkeypatch.setenv("DEFORMOPS_BACKEND", "fastest")
    ops.set_backend(None)
    with pytest.raises(ValueError, match="DEFORMOPS_BACKEND"):
        deformops.backend("cpu")


def test_backend_rejects_unknown_ops() -> None:
    with pytest.raises(ValueError, match="op"):
        deformops.backend("cpu", "roi_pool")  # type: ignore[arg-type]


def test_devices_without_native_kernels_use_the_reference() -> None:
    assert deformops.backend("meta") == "reference"
