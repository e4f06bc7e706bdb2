"""The JIT build system: cache keys, the file lock, damaged entries, failure reporting.

Builds use tiny stand-in sources written to a temporary directory, so that each compiles
in seconds; the real sources are built by the native kernel tests. Whatever loads a
library runs in a child process: ``deformops_native`` can be defined once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from deformops import _build

STANDIN_CPU = {
    "standin.h": "#pragma once\nconstexpr double kStandinScale = 2.0;\n",
    "bindings.cpp": """
#include <torch/library.h>
at::Tensor standin_msda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights);
TORCH_LIBRARY(deformops_native, m) {
  m.def("msda_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.impl("msda_forward", c10::DispatchKey::CPU, TORCH_FN(standin_msda));
}
""",
    "autograd.cpp": "// the stand-in operators have no autograd kernel\n",
    "cpu/standin.cpp": """
#include <torch/library.h>
#include "standin.h"
at::Tensor standin_msda(const at::Tensor& value, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&) {
  return value.mul(kStandinScale);
}
""",
}

STANDIN_CUDA = {
    "cuda/standin.cu": """
#include <cuda_runtime.h>
#include <cstdint>
#include "standin.h"
__global__ void standin_kernel(const float* x, float* y, int64_t n) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = x[i] * float(kStandinScale);
}
void standin_scale(const float* x, float* y, int64_t n, cudaStream_t stream) {
  standin_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(x, y, n);
}
""",
    "bindings_cuda.cpp": """
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>
void standin_scale(const float* x, float* y, int64_t n, cudaStream_t stream);
at::Tensor standin_msda_cuda(const at::Tensor& value, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&) {
  at::Tensor x = value.contiguous();
  at::Tensor y = at::empty_like(x);
  standin_scale(x.data_ptr<float>(), y.data_ptr<float>(), x.numel(),
                at::cuda::getCurrentCUDAStream());
  return y;
}
TORCH_LIBRARY_IMPL(deformops_native, CUDA, m) {
  m.impl("msda_forward", TORCH_FN(standin_msda_cuda));
}
""",
}

# The stand-in's msda_forward doubles `value`.
EXPECTED = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]

# Child process: waits until `count` children are ready, loads, runs the stand-in op.
CHILD = """
import json, os, pathlib, sys, time
import torch
from deformops import _build

device, ready, count = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
(ready / str(os.getpid())).touch()
deadline = time.monotonic() + 120
while len(list(ready.iterdir())) < count and time.monotonic() < deadline:
    time.sleep(0.005)
start = time.perf_counter()
loaded = _build.load(device)
seconds = time.perf_counter() - start
value = torch.arange(6.0, device=device).reshape(1, 3, 1, 2)
out = torch.ops.deformops_native.msda_forward(value, value, value, value, value)
print(json.dumps({"loaded": loaded, "seconds": seconds, "out": out.flatten().tolist()}))
"""

COMPILING = "deformops: compiling the native"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def child_env(cache: Path, csrc: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEFORMOPS_BACKEND", "CXX")}
    env.update(DEFORMOPS_CACHE_DIR=str(cache), DEFORMOPS_CSRC_DIR=str(csrc), **extra)
    return env


def run_children(env: dict[str, str], count: int, device: str = "cpu") -> list[tuple[dict, str]]:
    """Start ``count`` children together; returns each one's result and stderr."""
    ready = Path(env["DEFORMOPS_CACHE_DIR"]).parent / f"ready-{os.urandom(4).hex()}"
    ready.mkdir()
    command = [sys.executable, "-c", CHILD, device, str(ready), str(count)]
    children = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr
        results.append((json.loads(stdout.strip().splitlines()[-1]), stderr))
    return results


def write_csrc(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "csrc", STANDIN_CPU)


def libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/deformops_native_*.so"))


@pytest.fixture
def csrc(tmp_path: Path) -> Path:
    return write_csrc(tmp_path)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, csrc: Path) -> Path:
    """This process builds stand-ins into an empty cache, with a fresh load() state."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEFORMOPS_CACHE_DIR", str(cache))
    monkeypatch.setenv("DEFORMOPS_CSRC_DIR", str(csrc))
    for name in ("DEFORMOPS_BACKEND", "TORCH_CUDA_ARCH_LIST", "CXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_build, "_outcomes", {})
    return cache


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, csrc: Path) -> Path:
    """A torch that claims CUDA, a stand-in nvcc, one visible GPU of capability 9.0."""
    write_tree(csrc, STANDIN_CUDA)
    nvcc = write_tree(tmp_path / "toolkit", {"bin/nvcc": "#!/bin/sh\necho fake nvcc 13.0\n"})
    (nvcc / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(nvcc))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    return csrc


@pytest.fixture(scope="module")
def concurrent_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Four processes started together on an empty cache, all loading the CPU library."""
    root = tmp_path_factory.mktemp("concurrent")
    env = child_env(root / "cache", write_csrc(root))
    return root / "cache", run_children(env, 4)


@pytest.fixture
def built_cache(concurrent_run: tuple[Path, list], tmp_path: Path) -> Path:
    """A copy of the cache that the concurrent run filled."""
    return Path(shutil.copytree(concurrent_run[0], tmp_path / "cache"))


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEFORMOPS_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _build.cache_dir() == tmp_path / ".cache" / "deformops"
    monkeypatch.setenv("DEFORMOPS_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _build.cache_dir() == tmp_path / "elsewhere"


def test_key_follows_every_built_file(isolated: Path, csrc: Path) -> None:
    key = _build._recipe("cpu", None).key
    assert key.startswith("cpu-")
    assert _build._recipe("cpu", None).key == key

    kernel = csrc / "cpu" / "standin.cpp"
    original = kernel.read_text()
    kernel.write_text(original + "// edited\n")
    assert _build._recipe("cpu", None).key != key
    kernel.write_text(original)
    assert _build._recipe("cpu", None).key == key

    (csrc / "notes.txt").write_text("not a source")
    write_tree(csrc, {"cuda/kernel.cu": "// CUDA only", "bindings_cuda.cpp": "// CUDA only"})
    assert _build._recipe("cpu", None).key == key

    write_tree(csrc, {"cpu/detail/extra.h": "#pragma once\n"})
    with_header = _build._recipe("cpu", None).key
    assert with_header != key

    write_tree(csrc, {"cpu/extra.cpp": "// a new kernel file\n"})
    recipe = _build._recipe("cpu", None)
    assert recipe.key not in (key, with_header)
    assert csrc / "cpu" / "extra.cpp" in recipe.sources


def test_key_follows_torch_abi_and_compiler(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = _build._recipe("cpu", None).key
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0-other")
        assert _build._recipe("cpu", None).key != key
    with monkeypatch.context() as m:
        m.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)
        assert _build._recipe("cpu", None).key != key
    wrapper = tmp_path / "bin" / "c++"
    write_tree(tmp_path, {"bin/c++": '#!/bin/sh\nexec c++ "$@"\n'})
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    assert _build._recipe("cpu", None).key != key


def test_cuda_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build._cuda_archs(["9.0", "sm_80", "90", "9.0a", "8.6+PTX"]) == (
        ("9.0", "8.0", "9.0a", "8.6+PTX"),
        False,
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    capabilities = [(9, 0), (8, 6), (9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert _build._cuda_archs(None) == (("8.6", "9.0"), True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _build._cuda_archs(None) == (("8.0", "9.0+PTX"), False)
    assert _build._cuda_archs(["7.5"]) == (("7.5",), False)
    with pytest.raises(_build.BuildError, match="unknown CUDA architecture 'Hopper'"):
        _build._cuda_archs(["Hopper"])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(_build.BuildError, match="no CUDA device is visible"):
        _build._cuda_archs(None)


def test_gencode_flags_and_coverage() -> None:
    assert _build._gencode_flags(["8.0", "9.0a", "9.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert _build._covers(["8.0", "9.0"], ["9.0"])
    assert _build._covers(["8.0", "9.0"], ["8.6", "9.0"])  # sm_80 code runs on 8.6
    assert not _build._covers(["8.0"], ["9.0"])
    assert _build._covers(["8.0+PTX"], ["9.0"])  # PTX is compiled for newer GPUs
    assert not _build._covers(["9.0a"], ["10.0"])
    assert not _build._covers(["9.0"], ["8.9"])


def test_cuda_recipe(isolated: Path, fake_cuda: Path) -> None:
    write_tree(fake_cuda, {"cuda/host.cpp": "// host code beside the kernels"})
    recipe = _build._recipe("cuda", None)
    assert recipe.archs == ("9.0",)
    assert recipe.detected
    assert recipe.sources == (
        fake_cuda / "bindings_cuda.cpp",
        fake_cuda / "cuda" / "host.cpp",
        fake_cuda / "cuda" / "standin.cu",
    )
    assert "--use_fast_math" not in recipe.cuda_cflags
    assert "-lineinfo" in recipe.cuda_cflags
    assert [f for f in recipe.cuda_cflags if "arch" in f] == ["-gencode=arch=compute_90,code=sm_90"]
    assert recipe.label == "CUDA (sm_90)"
    both = _build._recipe("cuda", ["8.0", "9.0"])
    assert both.base == recipe.base
    assert both.key != recipe.key
    assert not both.detected
    assert _build._recipe("cpu", None).base != recipe.base


def test_prebuilt_cuda_library_covering_the_gpu_is_used(
    isolated: Path, fake_cuda: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `python -m deformops build --device cuda --arch 8.0 9.0` leaves it, ahead of time.
    prebuilt = _build._recipe("cuda", ["8.0", "9.0"])
    entry = isolated / prebuilt.key
    write_tree(entry, {"deformops_native_cuda.so": "stand-in"})
    _build._write_metadata(prebuilt, entry, entry / "deformops_native_cuda.so", 1.0)
    compiled: list[tuple[str, ...]] = []
    monkeypatch.setattr(_build, "_compile", lambda recipe, *_: compiled.append(recipe.archs))
    assert _build.build("cuda") == entry / "deformops_native_cuda.so"  # detected: sm_90
    assert compiled == []
    _build.build("cuda", ["9.0"])  # requested explicitly: built as asked
    assert compiled == [("9.0",)]


def test_error_summary_starts_at_the_first_error() -> None:
    output = "\n".join(
        [
            "Error building extension 'deformops_native_cuda': [1/3] c++ -c a.cpp -o a.o",
            "[2/3] c++ -c b.cpp -o b.o",
            "FAILED: b.o ",
            "c++ -isystem /torch/include -c b.cpp -o b.o",
            "In file included from b.cpp:3:",
            "b.h: In function 'void f()':",
            "b.h:7:3: error: 'g' was not declared in this scope",
            *[f"b.h:{i}:1: note: candidate {i}" for i in range(40)],
            "ninja: build stopped: subcommand failed.",
        ]
    )
    summary = _build._error_summary(output).splitlines()
    assert summary[:3] == [
        "In file included from b.cpp:3:",
        "b.h: In function 'void f()':",
        "b.h:7:3: error: 'g' was not declared in this scope",
    ]
    assert len(summary) == _build._ERROR_LINES
    assert not any("-o b.o" in line or "a.cpp" in line for line in summary)
    no_error = "[1/1] c++ -c a.cpp\nld: cannot find -lfoo\ncollect2: ld returned 1 exit status"
    assert _build._error_summary(no_error).splitlines() == [
        "ld: cannot find -lfoo",
        "collect2: ld returned 1 exit status",
    ]


def test_missing_compiler_warns_once_and_falls_back(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_build.BuildError, match="'/nonexistent/c\\+\\+' was not found"):
        _build.build("cpu")
    with pytest.warns(RuntimeWarning, match="(?s)reference implementation.*/nonexistent/c"):
        assert _build.load("cpu") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.load("cpu") is False
        assert _build.load("cuda") is False  # needs the CPU library; its failure was reported
    assert "/nonexistent/c++" in _build.load_error("cpu")
    assert "/nonexistent/c++" in _build.load_error("cuda")
    assert _build.cache_info()["loaded"]["cpu"].startswith("failed: ")
    assert COMPILING not in capfd.readouterr().err
    assert libraries(isolated) == []


def test_missing_compiler_raises_when_native_is_forced(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("DEFORMOPS_BACKEND", "native")
    with pytest.raises(RuntimeError, match=r"DEFORMOPS_BACKEND=native.*/nonexistent/c"):
        _build.load("cpu")


def test_missing_ninja(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "_find_ninja", lambda: None)
    with pytest.raises(_build.BuildError, match="ninja is not installed: pip install ninja"):
        _build.build("cpu")
    assert libraries(isolated) == []


def test_compile_error_is_reported_with_the_compilers_message(
    isolated: Path, csrc: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # A single source whose error comes before any include: the compiler fails at once.
    (csrc / "cpu" / "standin.cpp").unlink()
    (csrc / "bindings.cpp").write_text("#error stand-in: deliberate error\n")
    with pytest.warns(RuntimeWarning) as record:
        assert _build.load("cpu") is False
    assert len(record) == 1
    message = str(record[0].message)
    assert "bindings.cpp:1:2: error: #error stand-in: deliberate error" in message
    assert "-isystem" not in message  # ninja's command lines are left out
    assert COMPILING in capfd.readouterr().err

    monkeypatch.setattr(_build, "_outcomes", {})
    monkeypatch.setenv("DEFORMOPS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="deliberate error"):
        _build.load("cpu")
    assert libraries(isolated) == []
    assert not list(isolated.glob("*/build-*"))  # temporary build directories are removed


def test_concurrent_processes_build_once(concurrent_run: tuple[Path, list]) -> None:
    cache, results = concurrent_run
    assert sum(stderr.count(COMPILING) for _, stderr in results) == 1
    for result, _ in results:
        assert result["loaded"] is True
        assert result["out"] == EXPECTED
    assert len(libraries(cache)) == 1
    assert not list(cache.glob("*/build-*"))


def test_cache_hit_is_silent_and_fast(built_cache: Path, tmp_path: Path) -> None:
    ((result, stderr),) = run_children(child_env(built_cache, write_csrc(tmp_path)), 1)
    assert result["loaded"] is True
    assert result["out"] == EXPECTED
    assert "deformops:" not in stderr
    assert result["seconds"] < 1.0, result  # no ninja, no compiler: hashing and dlopen


def test_cached_library_serves_without_a_compiler(built_cache: Path, tmp_path: Path) -> None:
    env = child_env(built_cache, write_csrc(tmp_path), CXX="/nonexistent/c++")
    ((result, stderr),) = run_children(env, 1)
    assert result == {**result, "loaded": True, "out": EXPECTED}
    assert "deformops:" not in stderr


def test_build_prints_nothing_on_a_cache_hit(
    built_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    monkeypatch.setenv("DEFORMOPS_CACHE_DIR", str(built_cache))
    monkeypatch.setenv("DEFORMOPS_CSRC_DIR", str(write_csrc(tmp_path)))
    monkeypatch.delenv("CXX", raising=False)
    assert _build.build("cpu") == libraries(built_cache)[0]
    assert capfd.readouterr() == ("", "")
    info = _build.cache_info()
    assert info["current"]["cpu"] == {"key": libraries(built_cache)[0].parent.name, "built": True}
    assert [(e["device_type"], e["path"]) for e in info["entries"]] == [
        ("cpu", str(libraries(built_cache)[0]))
    ]


def test_damaged_cache_entry_is_rebuilt(built_cache: Path, tmp_path: Path) -> None:
    (library,) = libraries(built_cache)
    size = library.stat().st_size
    library.write_bytes(library.read_bytes()[:4096])  # a truncated copy
    ((result, stderr),) = run_children(child_env(built_cache, write_csrc(tmp_path)), 1)
    assert "is damaged; rebuilding it" in stderr
    assert stderr.count(COMPILING) == 1
    assert result["loaded"] is True
    assert result["out"] == EXPECTED
    assert libraries(built_cache) == [library]
    assert library.stat().st_size == size


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_library_builds_for_the_visible_gpu(tmp_path: Path) -> None:
    csrc = write_tree(tmp_path / "csrc", {**STANDIN_CPU, **STANDIN_CUDA})
    env = child_env(tmp_path / "cache", csrc)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    ((result, stderr),) = run_children(env, 1, device="cuda")
    assert result["loaded"] is True
    assert result["out"] == EXPECTED
    major, minor = torch.cuda.get_device_capability(0)
    assert f"compiling the native CUDA (sm_{major}{minor}) library" in stderr
    assert stderr.count(COMPILING) == 2  # the CPU library first
