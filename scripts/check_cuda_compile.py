"""Compile-check the CUDA kernels: every ``deformops/csrc/cuda/*.cu`` with nvcc, no GPU, no torch.

Each file is compiled to a cubin for every architecture (default sm_80 and sm_90) with
``-Xptxas -v``; the (file, architecture) pairs run in parallel. The script prints one row
per kernel (registers, spill stores / loads, stack frame) and exits non-zero when a file
does not compile, or when a kernel that is not a float64 instantiation spills registers.

float64 instantiations are recognised by their mangled name: the first template argument
of the kernel is ``double``, written ``d`` right after the ``I`` that opens the template
argument list (``..._kernelIdLi1ELb0EEEv...``). The float64 kernels serve gradcheck and
may spill.

Usage: ``python3 scripts/check_cuda_compile.py [--arch 80 90] [--nvcc PATH] [-j JOBS]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "deformops" / "csrc"
DEFAULT_ARCHS = ("80", "90")
_ERROR_LINES = 20  # compiler error lines shown per failed file

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
_REGISTERS = re.compile(r"Used (?P<registers>\d+) registers")
# <length><identifier> followed by the opening of its template argument list.
_TEMPLATE_START = re.compile(r"(\d+)")


@dataclasses.dataclass
class Kernel:
    """The ptxas resource report of one kernel for one architecture."""

    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


@dataclasses.dataclass
class Result:
    """The outcome of compiling one file for one architecture."""

    source: Path
    arch: str
    ok: bool
    output: str
    kernels: list[Kernel]


def parse_ptxas(output: str) -> list[Kernel]:
    """Kernels and their resources from ``-Xptxas -v`` output.

    Parameters
    ----------
    output : str
        nvcc's combined stdout and stderr.

    Returns
    -------
    list of Kernel
        One per ``Compiling entry function`` line, in order.
    """
    kernels: list[Kernel] = []
    for line in output.splitlines():
        entry = _ENTRY.search(line)
        if entry is not None:
            kernels.append(Kernel(entry["name"], entry["arch"]))
            continue
        if not kernels:
            continue
        frame = _FRAME.search(line)
        if frame is not None:
            kernels[-1].stack = int(frame["stack"])
            kernels[-1].spill_stores = int(frame["stores"])
            kernels[-1].spill_loads = int(frame["loads"])
        registers = _REGISTERS.search(line)
        if registers is not None:
            kernels[-1].registers = int(registers["registers"])
    return kernels


def first_template_argument(mangled: str) -> str | None:
    """The first character of the first template argument list of a mangled name.

    Walks the ``<length><identifier>`` components of the (possibly nested) name and
    returns the character after the ``I`` that follows the last component, e.g. ``"d"``
    for ``_ZN8deformops3gpu11msda_detail19msda_forward_kernelIdLi1ELb0EEEvNS1_4ArgsIT_EEPS4_``.

    Parameters
    ----------
    mangled : str
        An Itanium-mangled function name.

    Returns
    -------
    str or None
        None when the name is not a template instantiation.
    """
    if not mangled.startswith("_Z"):
        return None
    i = 3 if mangled.startswith("_ZN") else 2
    while i < len(mangled) and mangled[i].isdigit():
        match = _TEMPLATE_START.match(mangled, i)
        assert match is not None
        i = match.end() + int(match.group(1))
        if i < len(mangled) and mangled[i] == "I":
            return mangled[i + 1] if i + 1 < len(mangled) else None
    return None


def is_float64(mangled: str) -> bool:
    """Whether a kernel is a float64 instantiation (its first template argument is double)."""
    return first_template_argument(mangled) == "d"


def demangle(names: list[str]) -> dict[str, str]:
    """Readable names via c++filt when available (identity otherwise)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    result = subprocess.run(
        [tool], input="\n".join(names), capture_output=True, text=True, check=False
    )
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != len(names):
        return {name: name for name in names}
    return dict(zip(names, lines, strict=True))


def short_name(readable: str) -> str:
    """A demangled kernel name without namespaces and parameter list."""
    head = readable.replace("(anonymous namespace)::", "").split("(", 1)[0]
    head = re.sub(r"^(void )?(\w+::)+", "", head)
    return re.sub(r"\s+", " ", head)


def compile_one(nvcc: str, source: Path, arch: str, workdir: Path) -> Result:
    """Compile one file for one architecture and parse its resource report."""
    output_file = workdir / f"{source.stem}.sm_{arch}.cubin"
    command = [
        nvcc,
        "-cubin",
        f"-arch=sm_{arch}",
        "-std=c++17",
        "-O3",
        "-Xptxas",
        "-v",
        "-I",
        str(CSRC),
        "-o",
        str(output_file),
        str(source),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    return Result(source, arch, completed.returncode == 0, output, parse_ptxas(output))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="e.g. 80 90")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        print(f"check_cuda_compile: nvcc not found ({args.nvcc!r})", file=sys.stderr)
        return 2
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    if not sources:
        print("check_cuda_compile: no .cu file under deformops/csrc/cuda", file=sys.stderr)
        return 2

    with (
        tempfile.TemporaryDirectory(prefix="deformops-cu-") as tmp,
        concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool,
    ):
        futures = [
            pool.submit(compile_one, nvcc, source, arch, Path(tmp))
            for source in sources
            for arch in args.arch
        ]
        results = [future.result() for future in futures]

    failed = [r for r in results if not r.ok]
    for result in failed:
        errors = [line for line in result.output.splitlines() if "error" in line]
        print(f"FAILED: {result.source.relative_to(ROOT)} for sm_{result.arch}")
        print("\n".join(errors[:_ERROR_LINES] or result.output.splitlines()[-_ERROR_LINES:]))

    kernels = [k for r in results for k in r.kernels]
    readable = demangle(sorted({k.name for k in kernels}))
    rows = [
        (
            short_name(readable[k.name]),
            k.arch,
            str(k.registers),
            f"{k.spill_stores}/{k.spill_loads}",
            str(k.stack),
            "float64" if is_float64(k.name) else "",
        )
        for k in kernels
    ]
    header = ("kernel", "arch", "registers", "spill st/ld", "stack", "note")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *sorted(rows)]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))

    spilling = [k for k in kernels if k.spills > 0 and not is_float64(k.name)]
    for kernel in spilling:
        print(
            f"SPILL: {short_name(readable[kernel.name])} ({kernel.arch}) spills "
            f"{kernel.spill_stores} bytes stored / {kernel.spill_loads} loaded"
        )
    print(
        f"{len(sources)} files x {len(args.arch)} archs, {len(kernels)} kernels: "
        f"{len(failed)} failed compiles, {len(spilling)} spilling kernels"
    )
    return 1 if failed or spilling else 0


if __name__ == "__main__":
    sys.exit(main())
