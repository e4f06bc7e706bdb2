"""``deformops.integrations.torchvision`` without torchvision, as in CI (where torchvision
cannot be imported): a clear ImportError, nothing patched, and no integration imports its
library before ``patch()``. The patch itself is tested against torchvision on the GPU host
(``tests/gpu/test_cuda_torchvision.py``). Also: the docstring examples of every
integration module run."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from deformops.integrations import torchvision as tv_integration


def test_missing_torchvision_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"needs torchvision, which could not be imported"):
        tv_integration.patch()
    assert not tv_integration.is_patched()
    tv_integration.unpatch()  # harmless when not patched


def test_broken_torchvision_is_a_clear_import_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A torchvision built for another torch fails to import with a RuntimeError."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n', encoding="utf-8"
    )
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"RuntimeError: operator torchvision::nms") as info:
        tv_integration.patch()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not tv_integration.is_patched()


def test_importing_deformops_imports_no_integrated_library() -> None:
    code = (
        "import sys, deformops, deformops.integrations.mmcv, "
        "deformops.integrations.torchvision, deformops.integrations.transformers\n"
        "print(sorted(m for m in ('mmcv', 'torchvision', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["__init__", "_patching", "mmcv", "torchvision", "transformers"])
def test_docstring_examples_run(module: str) -> None:
    name = "deformops.integrations" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
