"""The development scripts that need no GPU: scripts/ab_prepare.sh (variants of the
package for an A/B call on a GPU host), run in a throwaway clone of this repository."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs git and this repository's history",
)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of this repository's HEAD with a branch `main` at it."""
    repo = tmp_path / "repo"
    _git(tmp_path, "clone", "-q", "--no-hardlinks", str(ROOT), str(repo))
    _git(repo, "checkout", "-q", "-B", "main")
    _git(repo, "config", "user.email", "tests@example.com")
    _git(repo, "config", "user.name", "tests")
    return repo


def _prepare(repo: Path, *specs: str) -> subprocess.CompletedProcess[str]:
    """This checkout's scripts/ab_prepare.sh, run in ``repo``."""
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "ab_prepare.sh"), *specs],
        cwd=repo,
        capture_output=True,
        text=True,
    )


def test_ab_prepare_takes_revisions_and_patches(clone: Path):
    marker = "# ab_prepare test marker\n"
    version = clone / "deformops" / "_version.py"
    original = version.read_text()
    version.write_text(original + marker)
    patch = clone / "change.patch"
    patch.write_text(_git(clone, "diff"))
    _git(clone, "checkout", "-q", "--", "deformops/_version.py")
    _git(clone, "checkout", "-q", "-b", "other")
    (clone / "tests" / "only_on_other.txt").write_text("other\n")
    _git(clone, "add", "tests/only_on_other.txt")
    _git(clone, "commit", "-q", "-m", "other")
    _git(clone, "checkout", "-q", "main")

    done = _prepare(clone, "base=main", "patched=change.patch", "branch=other")
    assert done.returncode == 0, done.stderr
    variants = clone / ".peer" / "v"
    for name in ("base", "patched", "branch"):
        for part in ("deformops", "scripts", "tests"):
            assert (variants / name / part).is_dir(), (name, part)
        assert (variants / name / "pyproject.toml").is_file(), name
    assert (variants / "base" / "deformops" / "_version.py").read_text() == original
    assert (variants / "patched" / "deformops" / "_version.py").read_text() == original + marker
    assert (variants / "branch" / "tests" / "only_on_other.txt").exists()
    assert not (variants / "base" / "tests" / "only_on_other.txt").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("novalue", "bad variant"),
        ("tree=main", "bad variant"),
        ("a b=main", "bad variant"),
        ("x=no-such-revision", "no revision"),
        ("x=missing.patch", "no patch file"),
    ],
)
def test_ab_prepare_rejects_bad_variants(clone: Path, spec: str, message: str):
    done = _prepare(clone, spec)
    assert done.returncode != 0
    assert message in done.stderr


def test_ab_prepare_needs_a_variant(clone: Path):
    done = _prepare(clone)
    assert done.returncode == 2
    assert "usage" in done.stderr
