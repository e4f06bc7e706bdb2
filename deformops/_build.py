"""Just-in-time build and loading of the native library.

The native library is compiled with :mod:`torch.utils.cpp_extension` (ninja) on the first
use of a device type, never at import and never at install, and cached on disk for every
later process:

- CPU library: ``csrc/bindings.cpp`` and ``csrc/cpu/*.cpp``. It defines the operators of the
  ``deformops_native`` namespace and their CPU kernels.
- CUDA library: ``csrc/bindings_cuda.cpp``, ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``,
  built for the GPU architectures present. It registers CUDA kernels for the operators
  that the CPU library defines, so it is loaded after it.

Each library lives in ``cache_dir()/<key>/``. The key hashes everything the build depends
on: the contents of the sources and headers, the torch, Python and CUDA versions, the C++
ABI, the flags, the compilers (path and ``--version``) and the CUDA architectures, so a
changed source, compiler or torch never loads a stale library. A file lock makes
concurrent processes build once; the build runs in a child process in a temporary
directory and the finished library is moved into place atomically, so no process loads a
half-written file. A cache hit runs neither ninja nor the compiler (only ``--version``,
once per process).

Two cache entries serve beyond their exact key: a CUDA library built ahead of time for
several architectures (``python -m deformops build --device cuda --arch 8.0 9.0``) is used
on any GPU it covers, and where the compiler is missing (a runtime image), an entry built
from the same sources for the same torch is used.

Environment variables: ``DEFORMOPS_CACHE_DIR`` (cache location, default
``~/.cache/deformops``), ``DEFORMOPS_BACKEND=native`` (a failed build raises instead of
warning), ``DEFORMOPS_CSRC_DIR`` (build from another source tree, for development),
``CXX``, ``CC``, ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` (as for
:mod:`torch.utils.cpp_extension`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["BuildError", "build", "cache_dir", "cache_info", "load", "load_error", "source_dir"]

DEVICE_TYPES = ("cpu", "cuda")

#: Bump when the way a library is built changes in a way the key does not see.
_RECIPE_VERSION = "1"
_HEADER_SUFFIXES = frozenset({".h", ".hpp", ".cuh", ".inl"})
_CPU_CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
_CPU_LDFLAGS = ("-fopenmp",)
_CUDA_HOST_CFLAGS = ("-O3", "-std=c++17")
# The convolution's GEMMs call cuBLAS directly (the library torch itself loads).
_CUDA_LDFLAGS = ("-lcublas",)
# torch.utils.cpp_extension defines __CUDA_NO_HALF_OPERATORS__ and friends for nvcc; the
# kernels are torch-free, so they are compiled as plain nvcc compiles them (and as CI
# checks them). No --use_fast_math: it trades accuracy away.
_NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
)
_ARCH_PATTERN = re.compile(r"^(?:sm_)?(\d+)\.?(\d)([af]?)(\+PTX)?$", re.IGNORECASE)
# A failed build is summarised by the compiler's first error line, the lines before it
# (the "In file included from" chain) and those after it, up to _ERROR_LINES in all.
_ERROR_LINE = re.compile(r"(^|[\s:])error\b", re.IGNORECASE)
_ERROR_LINES = 30
_ERROR_CONTEXT = 4

# Builds one library in a child process, so that a failed build leaves this process
# untouched; loading the library there checks it before it is published to the cache.
_CHILD = """
import json, sys
from torch.utils.cpp_extension import load
try:
    load(**json.loads(sys.argv[1]))
except Exception as exc:
    sys.stderr.write(str(exc))
    sys.exit(1)
"""


class BuildError(RuntimeError):
    """The native library could not be built; the message names the cause."""


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """What one device type's library is built from, and the hashes that key it."""

    device_type: str
    root: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    #: CUDA architectures such as "9.0" or "9.0+PTX"; empty for the CPU.
    archs: tuple[str, ...]
    #: Whether the architectures were detected from the visible GPUs (not requested).
    detected: bool
    #: Hash of the sources, versions, ABI and flags (not the compilers, not the archs).
    base: str
    #: Hash of the compilers' identities; None when a compiler is missing.
    tools: str | None
    #: Why the compilers are unusable, when ``tools`` is None.
    tool_error: str | None

    @property
    def name(self) -> str:
        return f"deformops_native_{self.device_type}"

    @property
    def key(self) -> str:
        """Name of the cache entry that a build of this recipe creates."""
        if self.tools is None:
            raise BuildError(str(self.tool_error))
        return f"{self.device_type}-{_digest([self.base, self.tools, *self.archs])[:24]}"

    @property
    def label(self) -> str:
        if self.device_type == "cpu":
            return "CPU"
        return "CUDA (" + ", ".join(_sm_name(arch) for arch in self.archs) + ")"


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What :func:`load` did for one device type in this process."""

    path: Path | None
    error: str | None


_lock = threading.RLock()
_outcomes: dict[str, _Outcome] = {}


def cache_dir() -> Path:
    """Directory of the compiled libraries.

    Returns
    -------
    pathlib.Path
        ``$DEFORMOPS_CACHE_DIR`` if set, else ``~/.cache/deformops``.
    """
    configured = os.environ.get("DEFORMOPS_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "deformops"


def source_dir() -> Path:
    """Root of the C++/CUDA sources: ``$DEFORMOPS_CSRC_DIR`` if set, else the package's csrc."""
    configured = os.environ.get("DEFORMOPS_CSRC_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parent / "csrc"


def load(device_type: str) -> bool:
    """Make the native library of a device type available to ``torch.ops.deformops_native``.

    The first call in a process builds the library if the cache lacks it (messages on
    stderr say so and how long it took) and loads it; later calls return the first
    result. Loading ``"cuda"`` loads ``"cpu"`` first. A damaged cached library (its
    checksum differs from the one recorded at build time) is deleted and rebuilt.
    Thread-safe.

    Parameters
    ----------
    device_type : {"cpu", "cuda"}
        Device type whose kernels are needed.

    Returns
    -------
    bool
        True when the library is loaded. False when it cannot be built or loaded: one
        warning names the cause (also given by :func:`load_error`), and callers fall back
        to the reference implementation.

    Raises
    ------
    RuntimeError
        If the library is unavailable and the environment sets ``DEFORMOPS_BACKEND=native``;
        the message includes the compiler's own output.
    """
    _check_device_type(device_type)
    with _lock:
        outcome = _outcomes.get(device_type)
        if outcome is None:
            outcome, report = _attempt(device_type)
            _outcomes[device_type] = outcome
            if outcome.error is not None and report and not _native_forced():
                warnings.warn(
                    f"deformops: the native {device_type.upper()} library is unavailable, "
                    f"so the slower pure-PyTorch reference implementation runs instead. "
                    f"Cause: {outcome.error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if outcome.error is not None and _native_forced():
            raise RuntimeError(
                f"deformops: DEFORMOPS_BACKEND=native, but the native {device_type.upper()} "
                f"library is unavailable: {outcome.error}"
            )
        return outcome.path is not None


def load_error(device_type: str) -> str | None:
    """Why :func:`load` failed for a device type in this process (None if it did not fail)."""
    _check_device_type(device_type)
    with _lock:
        outcome = _outcomes.get(device_type)
    return None if outcome is None else outcome.error


def build(device_type: str, arch_list: Sequence[str] | None = None, verbose: bool = False) -> Path:
    """Build the native library of a device type, or find it in the cache.

    Prints nothing on a cache hit, otherwise one message on stderr when the build starts
    and one when it ends. Does not load the library.

    Parameters
    ----------
    device_type : {"cpu", "cuda"}
        Which library.
    arch_list : sequence of str, optional
        CUDA architectures such as ``["8.0", "9.0"]`` (``"9.0+PTX"`` also embeds PTX).
        Default: ``$TORCH_CUDA_ARCH_LIST`` if set, else those of the visible GPUs.
    verbose : bool
        Echo the compiler commands and output to stderr.

    Returns
    -------
    pathlib.Path
        The compiled shared library in the cache.

    Raises
    ------
    BuildError
        If a tool is missing or the compilation fails; the message includes the cause.
    """
    _check_device_type(device_type)
    return _ensure_built(_recipe(device_type, arch_list), verbose)


def cache_info() -> dict:
    """State of the cache and of this process, for ``python -m deformops info``.

    Returns
    -------
    dict
        ``cache_dir`` and ``source_dir`` (str); ``entries``: one dict per cached library
        with ``device_type``, ``key``, ``path``, ``size`` (bytes), the ``torch`` version
        and CUDA ``archs`` it was built for, and whether it is ``intact`` (checksum);
        ``current``: per device type, the key that the present sources and tools give
        and whether a library that serves them is cached, or the ``error`` that prevents
        a build; ``loaded``: per device type that :func:`load` handled in this process,
        where the library was loaded from or why it failed.
    """
    entries = []
    for library, meta in _cached_libraries():
        entries.append(
            {
                "device_type": meta["device_type"],
                "key": library.parent.name,
                "path": str(library),
                "size": library.stat().st_size,
                "torch": meta.get("torch"),
                "archs": meta.get("archs", []),
                "intact": _intact(library),
            }
        )
    current: dict[str, dict] = {}
    for device_type in DEVICE_TYPES:
        try:
            recipe = _recipe(device_type, None)
            current[device_type] = {"key": recipe.key, "built": _cached_library(recipe) is not None}
        except BuildError as exc:
            current[device_type] = {"error": str(exc)}
    with _lock:
        loaded = {
            device_type: f"loaded from {o.path}" if o.path else f"failed: {o.error}"
            for device_type, o in _outcomes.items()
        }
    return {
        "cache_dir": str(cache_dir()),
        "source_dir": str(source_dir()),
        "entries": entries,
        "current": current,
        "loaded": loaded,
    }


def _check_device_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {device_type!r}")


def _native_forced() -> bool:
    return os.environ.get("DEFORMOPS_BACKEND", "").strip().lower() == "native"


def _attempt(device_type: str) -> tuple[_Outcome, bool]:
    """Build and load one library; returns the outcome and whether a failure needs reporting."""
    if device_type == "cuda" and not load("cpu"):
        # The CPU failure was already reported; the CUDA library cannot load without it.
        return _Outcome(None, f"the native CPU library is unavailable: {load_error('cpu')}"), False
    try:
        return _Outcome(_build_and_load(_recipe(device_type, None)), None), True
    except (BuildError, OSError) as exc:  # OSError: e.g. an unwritable cache directory
        return _Outcome(None, str(exc)), True


def _build_and_load(recipe: _Recipe) -> Path:
    library = _ensure_built(recipe, verbose=False)
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:
        raise BuildError(f"{library} does not load: {_cause(exc)}") from exc
    return library


def _ensure_built(recipe: _Recipe, verbose: bool) -> Path:
    """An intact cached library for the recipe, compiled under the entry's lock if needed.

    A damaged one (its checksum differs from the one recorded when it was built: say a
    truncated file, which would crash dlopen) is deleted and built again.
    """
    found = _cached_library(recipe)
    if found is not None:
        if _intact(found):
            return found
        _message(f"the cached library {found} is damaged; rebuilding it")
        with _locked(found.parent, recipe.label):
            if not _intact(found):  # unless another process has rebuilt it meanwhile
                found.unlink(missing_ok=True)
    library = _library_path(recipe)  # raises the tool error when a compiler is missing
    with _locked(library.parent, recipe.label):
        if not _intact(library):
            _compile(recipe, library, verbose)
    return library


def _library_path(recipe: _Recipe) -> Path:
    return cache_dir() / recipe.key / f"{recipe.name}.so"


def _cached_library(recipe: _Recipe) -> Path | None:
    """The recipe's library if cached, else a cached one built differently that serves here.

    The latter comes from the same sources, torch and flags, and from the same compilers
    unless they are missing here; when the architectures were detected, it may have been
    built for others that cover every visible GPU.
    """
    if recipe.tools is not None and _library_path(recipe).is_file():
        return _library_path(recipe)
    for library, meta in _cached_libraries():
        if meta.get("base") != recipe.base or meta.get("device_type") != recipe.device_type:
            continue
        if recipe.tools is not None and meta.get("tools") != recipe.tools:
            continue
        archs = tuple(meta.get("archs", ()))
        if archs == recipe.archs or (recipe.detected and _covers(archs, recipe.archs)):
            return library
    return None


def _cached_libraries() -> Iterator[tuple[Path, dict]]:
    """Every cache entry with a library: the library and its metadata."""
    for entry in sorted(p for p in cache_dir().glob("*-*") if p.is_dir()):
        meta = _metadata(entry)
        library = entry / f"deformops_native_{meta.get('device_type')}.so"
        if library.is_file():
            yield library, meta


def _metadata(entry: Path) -> dict:
    try:
        return json.loads((entry / "build.json").read_text())
    except (OSError, ValueError):
        return {}


def _intact(library: Path) -> bool:
    """Whether a cached library has the size and checksum recorded when it was built."""
    meta = _metadata(library.parent)
    try:
        data = library.read_bytes()
    except OSError:
        return False
    return len(data) == meta.get("size") and hashlib.sha256(data).hexdigest() == meta.get("sha256")


@contextlib.contextmanager
def _locked(entry: Path, label: str) -> Iterator[None]:
    """Hold the exclusive file lock of a cache entry (the entry is created if missing)."""
    import fcntl  # POSIX only: imported here so that the package imports everywhere

    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / "lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _message(f"waiting for another process compiling the native {label} library ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(recipe: _Recipe, library: Path, verbose: bool) -> None:
    """Compile the recipe in a temporary directory beside ``library``, then move it there.

    Runs under the entry's lock.
    """
    ninja = _find_ninja()
    if ninja is None:
        raise BuildError("ninja is not installed: pip install ninja")
    entry = library.parent
    for stale in entry.glob("build-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    estimate = "about a minute" if recipe.device_type == "cpu" else "a few minutes"
    _message(f"compiling the native {recipe.label} library (first use, {estimate}) ...")
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="build-", dir=entry))
    try:
        spec = {
            "name": recipe.name,
            "sources": [str(s) for s in recipe.sources],
            "extra_cflags": list(recipe.cflags),
            "extra_cuda_cflags": list(recipe.cuda_cflags),
            "extra_ldflags": list(recipe.ldflags),
            "extra_include_paths": [str(recipe.root)],
            "build_directory": str(workdir),
            "verbose": verbose,
            "with_cuda": recipe.device_type == "cuda",
            "is_python_module": False,
        }
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(ninja).parent), env.get("PATH", "")])
        failure = _run_child([sys.executable, "-c", _CHILD, json.dumps(spec)], env, verbose)
        built = workdir / f"{recipe.name}.so"
        if failure is not None or not built.is_file():
            summary = _error_summary(failure or "")
            raise BuildError(f"compiling the native {recipe.label} library failed:\n{summary}")
        _write_metadata(recipe, entry, built, time.perf_counter() - start)
        os.replace(built, library)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - start
    _message(f"compiled the native {recipe.label} library in {seconds:.0f} s: {library}")


def _run_child(command: list[str], env: dict[str, str], verbose: bool) -> str | None:
    """Run the build child; returns None on success, else its output (stdout and stderr)."""
    lines = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if verbose:
                sys.stderr.write(line)
    return None if child.returncode == 0 else "".join(lines)


def _error_summary(output: str) -> str:
    """The compiler's messages from a failed build, from its first error on.

    Ninja's command lines are left out; without an error line, the end of the output.
    """
    kept = []
    skip_next = False
    for line in output.splitlines():
        if skip_next or re.match(r"^(Error building extension '[^']*': )?\[\d+/\d+\] ", line):
            skip_next = False
            continue
        skip_next = line.startswith("FAILED: ")  # the failed command follows on the next line
        if not skip_next:
            kept.append(line)
    first = next((i for i, line in enumerate(kept) if _ERROR_LINE.search(line)), None)
    if first is None:
        return "\n".join(kept[-_ERROR_LINES:]).strip()
    start = max(first - _ERROR_CONTEXT, 0)
    return "\n".join(kept[start : start + _ERROR_LINES]).strip()


def _write_metadata(recipe: _Recipe, entry: Path, library: Path, seconds: float) -> None:
    data = library.read_bytes()
    meta = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "device_type": recipe.device_type,
        "base": recipe.base,
        "tools": recipe.tools,
        "archs": list(recipe.archs),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if recipe.device_type == "cuda" else None,
        "sources": [str(s.relative_to(recipe.root)) for s in recipe.sources],
        "seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    partial = entry / "build.json.partial"
    partial.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(partial, entry / "build.json")


def _message(text: str) -> None:
    print(f"deformops: {text}", file=sys.stderr, flush=True)


def _cause(exc: BaseException) -> str:
    """An exception's message with that of its direct cause (e.g. dlopen's)."""
    if exc.__cause__ is not None:
        return f"{exc}: {exc.__cause__}"
    return str(exc)


def _digest(parts: Iterable[str | bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _find_ninja() -> str | None:
    """ninja on PATH, else the one ``pip install ninja`` put beside this Python."""
    return shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))


@functools.cache
def _tool_identity(tool: str, what: str, hint: str) -> str:
    """Resolved path and ``--version`` output of a compiler (cached per process)."""
    path = shutil.which(tool)
    if path is None:
        raise BuildError(f"the {what} {tool!r} was not found: {hint}")
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"the {what} {path!r} does not run ({hint}): {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise BuildError(f"the {what} {path!r} does not run ({hint}): {output}")
    return f"{os.path.realpath(path)}\n{result.stdout.strip()}"


def _tools(device_type: str) -> tuple[str | None, str | None]:
    """Hash of the compilers' identities, or None and why they are unusable."""
    try:
        cxx = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension runs
        identities = [_tool_identity(cxx, "C++ compiler", "install g++ or set CXX")]
        if device_type == "cuda":
            from torch.utils.cpp_extension import CUDA_HOME

            if CUDA_HOME is None:
                raise BuildError(
                    "the CUDA compiler nvcc was not found: install it or set CUDA_HOME"
                )
            nvcc = str(Path(CUDA_HOME, "bin", "nvcc"))
            identities.append(_tool_identity(nvcc, "CUDA compiler", "set CUDA_HOME"))
            identities.append(f"CC={os.environ.get('CC', '')}")  # nvcc's host compiler if set
    except BuildError as exc:
        return None, str(exc)
    return _digest(identities), None


def _sources(device_type: str, root: Path) -> tuple[Path, ...]:
    if device_type == "cpu":
        bindings = root / "bindings.cpp"
        others = [root / "autograd.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    else:
        bindings = root / "bindings_cuda.cpp"
        others = sorted([*(root / "cuda").glob("*.cu"), *(root / "cuda").glob("*.cpp")])
    if not bindings.is_file():
        raise BuildError(f"the native sources are missing: {bindings} does not exist")
    return (bindings, *others)


def _headers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in _HEADER_SUFFIXES and p.is_file())


def _parse_arch(arch: str) -> str:
    """Normalise ``"9.0"``, ``"90"``, ``"sm_90"``, ``"9.0a"``, ``"9.0+PTX"`` to ``"9.0[a][+PTX]"``."""
    match = _ARCH_PATTERN.match(arch.strip())
    if match is None:
        raise BuildError(
            f"unknown CUDA architecture {arch!r}: use compute capabilities such as 8.0 or 9.0+PTX"
        )
    major, minor, suffix, ptx = match.groups()
    return f"{int(major)}.{minor}{suffix.lower()}{'+PTX' if ptx else ''}"


def _cuda_archs(arch_list: Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """Target architectures, and whether they were detected.

    From the argument, else ``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs.
    """
    detected = False
    if arch_list is None:
        configured = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if configured and configured != "native":
            arch_list = configured.replace(";", " ").replace(",", " ").split()
    if arch_list is None:
        detected = True
        capabilities = {
            torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        }
        arch_list = [f"{major}.{minor}" for major, minor in sorted(capabilities)]
    archs = tuple(dict.fromkeys(_parse_arch(arch) for arch in arch_list))
    if not archs:
        raise BuildError(
            "no CUDA device is visible: name the architectures (python -m deformops build "
            "--device cuda --arch 9.0, or TORCH_CUDA_ARCH_LIST)"
        )
    return archs, detected


def _capability(arch: str) -> tuple[int, int]:
    major, minor = arch.split("+")[0].rstrip("af").split(".")
    return int(major), int(minor)


def _covers(built: Sequence[str], needed: Sequence[str]) -> bool:
    """Whether a library built for ``built`` runs on GPUs of the ``needed`` capabilities.

    Machine code for X.Y runs on X.Z with Z >= Y ("a"/"f" variants only on their own
    capability); PTX for X.Y runs on every capability >= X.Y.
    """

    def runs(arch: str, gpu: tuple[int, int]) -> bool:
        cap = _capability(arch)
        if arch.endswith("+PTX") and cap <= gpu:
            return True
        specific = arch.split("+")[0][-1] in "af"
        return cap == gpu or (not specific and cap[0] == gpu[0] and cap[1] <= gpu[1])

    return all(any(runs(arch, _capability(gpu)) for arch in built) for gpu in needed)


def _sm_name(arch: str) -> str:
    return "sm_" + arch.replace(".", "")


def _gencode_flags(archs: Sequence[str]) -> list[str]:
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _recipe(device_type: str, arch_list: Sequence[str] | None) -> _Recipe:
    """The sources, flags and hashes of a device type's library (runs no build)."""
    if sys.platform == "win32":
        raise BuildError("building the native library is supported on Linux and macOS only")
    root = source_dir()
    sources = _sources(device_type, root)
    archs: tuple[str, ...] = ()
    detected = False
    if device_type == "cpu":
        cflags, cuda_cflags, ldflags = _CPU_CFLAGS, (), _CPU_LDFLAGS
    else:
        if torch.version.cuda is None:
            raise BuildError(f"this torch build ({torch.__version__}) has no CUDA support")
        archs, detected = _cuda_archs(arch_list)
        cflags, cuda_cflags, ldflags = _CUDA_HOST_CFLAGS, _NVCC_FLAGS, _CUDA_LDFLAGS
        cuda_cflags = (*cuda_cflags, *_gencode_flags(archs))
    files = dict.fromkeys((*sources, *_headers(root)))
    base = _digest(
        [
            _RECIPE_VERSION,
            device_type,
            torch.__version__,
            str(torch.version.git_version),
            str(torch.version.cuda),
            str(torch._C._GLIBCXX_USE_CXX11_ABI),
            sys.implementation.cache_tag,
            platform.machine(),
            repr((cflags, [f for f in cuda_cflags if "-gencode" not in f], ldflags)),
            *(part for path in files for part in (str(path.relative_to(root)), path.read_bytes())),
        ]
    )
    tools, tool_error = _tools(device_type)
    return _Recipe(
        device_type=device_type,
        root=root,
        sources=sources,
        cflags=cflags,
        cuda_cflags=cuda_cflags,
        ldflags=ldflags,
        archs=archs,
        detected=detected,
        base=base,
        tools=tools,
        tool_error=tool_error,
    )
