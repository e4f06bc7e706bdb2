"""The benchmark harness (``python -m deformops bench``) on the CPU, with tiny workloads.

The peer path is exercised with a stand-in package named ``deformops`` (like the published
peer) that exposes the peer's call surface (``registry.msda``, ``registry.conv``,
``registry.Backend``; flat attention weights, channels-last convolution) on top of this
project's ``reference.py`` loaded by file path: the worker must pick it over this package,
and its layout conversions must give back the reference's results.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deformops.bench import cli, impls, peers, peers_worker, timing, workloads

BENCH = Path(cli.__file__).parent
REFERENCE = BENCH.parent / "reference.py"
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}

STUB_REGISTRY = f"""
import enum, importlib.util
spec = importlib.util.spec_from_file_location("_stub_reference", {str(REFERENCE)!r})
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

class Backend(enum.Enum):
    CUDA = "cuda"
    TRITON = "triton"

def msda(value, shapes, starts, loc, attn, *, backend, fp32acc=None):
    assert attn.dim() == 4, "the peer's flat layout [N, Q, M, L*P]"
    n, q, m, _ = attn.shape
    levels, points = loc.shape[3:5]
    return ref.multi_scale_deformable_attention(
        value, shapes, starts, loc, attn.view(n, q, m, levels, points))

def conv(value, offset, weight, *, bias, mask, stride, padding, dilation, offset_groups,
         backend):
    assert backend is Backend.TRITON
    n, h_out, w_out, g, k, _ = offset.shape
    out = ref.deform_conv2d(
        value.permute(0, 3, 1, 2),
        offset.permute(0, 3, 4, 5, 1, 2).reshape(n, 2 * g * k, h_out, w_out),
        weight, bias, stride, padding, dilation,
        mask.permute(0, 3, 4, 1, 2).reshape(n, g * k, h_out, w_out))
    return out.permute(0, 2, 3, 1)
"""


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny sizes: a single thread is faster (and the CI machine has two cores), here and
    in the peer worker; no native build."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DEFORMOPS_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stub_peer(tmp_path: Path) -> Path:
    """A folder holding the stand-in peer package ``deformops``."""
    package = tmp_path / "peer" / "deformops"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "3.0.1-stub"\n')
    (package / "registry.py").write_text(textwrap.dedent(STUB_REGISTRY))
    return package.parent


def _bench(tmp_path: Path, *argv: str) -> tuple[int, list[dict]]:
    out = tmp_path / "out"
    code = cli.main(
        [
            *("--device", "cpu", "--scale", "0.0625", "--runs", "2", "--warmup", "0"),
            *("--out", str(out), "--name", "records", *argv),
        ]
    )
    return code, json.loads((out / "records.json").read_text())


def test_cpu_run_records_errors_and_chart(tmp_path, capsys):
    code, records = _bench(
        tmp_path,
        *("--workload", "m2f_enc", "r50_dcn", "--dtype", "fp32", "bf16"),
        *("--impl", "deformops", "reference", "pytorch-grid-sample", "cudnn-dense"),
    )
    assert code == 0
    keys = {(r["op"], r["workload"], r["dtype"], r["impl"]) for r in records}
    assert keys == {
        (op, w, d, i)
        for op, w, impls in (
            ("msda", "m2f_enc", ("deformops", "reference", "pytorch-grid-sample")),
            ("conv", "r50_dcn", ("deformops", "reference", "cudnn-dense")),
        )
        for d in ("fp32", "bf16")
        for i in impls
    }
    required = "op workload dtype impl fwd_ms fwdbwd_ms peak_mib rel_err device torch cuda"
    for r in records:
        assert set((required + " version date").split()) <= r.keys()
        assert "error" not in r, r
        assert r["fwd_ms"] > 0
        assert r["fwdbwd_ms"] > 0
        assert r["peak_mib"] > 0  # CPU: from the profiler's allocation records
        assert r["extra_mib"] < r["peak_mib"]
        assert r["version"]
        assert r["torch"] == torch.__version__
        scaled = workloads.WORKLOADS[r["workload"]].scaled(0.0625)
        assert workloads.from_dict(r["shape"]) == scaled
        if r["impl"] != "pytorch-grid-sample":  # computes in the input dtype, bf16 included
            assert r["rel_err"] < TOLERANCE[r["dtype"]], r
        assert r["rel_err"] == max(r["rel_err_parts"].values())
        if r["impl"] == "deformops":
            assert r["backend"] == "reference"
        if r["op"] == "msda":
            assert r["fwd_gbps"] > 0
            assert r["fwdbwd_bytes"] > r["fwd_bytes"] > 0
    parts = next(r["rel_err_parts"] for r in records if r["impl"] == "cudnn-dense")
    assert set(parts) == {"output", "input", "weight", "bias"}
    for op in ("msda", "conv"):
        assert (tmp_path / "out" / f"{op}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| msda | m2f_enc | bf16 | pytorch-grid-sample |" in table
    again = tmp_path / "again"
    assert (
        cli.main(["--from-json", str(tmp_path / "out" / "records.json"), "--out", str(again)]) == 0
    )
    assert capsys.readouterr().out == table
    assert (again / "conv.png").is_file()


def test_peer_worker_runs_the_peer_in_its_own_process(tmp_path, stub_peer):
    code, records = _bench(
        tmp_path,
        *("--workload", "detr_dec", "r50_dcn", "--dtype", "fp32"),
        *("--impl", peers.PEER_CUDA, peers.PEER_TRITON, "--peer-path", str(stub_peer)),
    )
    assert code == 0, records
    assert {(r["op"], r["impl"]) for r in records} == {
        ("msda", peers.PEER_CUDA),
        ("msda", peers.PEER_TRITON),
        ("conv", peers.PEER_TRITON),
    }
    for r in records:
        assert r["version"] == "3.0.1-stub"  # the stand-in, not this package
        assert r["rel_err"] < 1e-5, r  # layouts converted back correctly
    triton = next(r for r in records if r["op"] == "msda" and r["impl"] == peers.PEER_TRITON)
    assert triton["options"] == {"fp32acc": False}


def test_peer_failure_is_recorded_and_the_run_goes_on(tmp_path):
    code, records = _bench(
        tmp_path,
        *("--workload", "detr_dec", "--dtype", "fp32"),
        *("--impl", peers.PEER_CUDA, "reference", "--peer-path", str(tmp_path / "absent")),
    )
    assert code == 0  # a peer that cannot run is recorded; the run still succeeds
    failed, measured = records
    assert failed["impl"] == peers.PEER_CUDA
    assert "not installed" in failed["error"]
    assert failed["fwd_ms"] is None
    assert failed["rel_err"] is None
    assert measured["impl"] == "reference"
    assert measured["rel_err"] < 1e-5


def test_our_failure_fails_the_run(tmp_path, monkeypatch):
    def broken(workload, inputs):
        raise RuntimeError("broken on purpose")

    ours = impls.IMPLS["msda"]["deformops"]
    monkeypatch.setitem(impls.IMPLS["msda"], "deformops", dataclasses.replace(ours, build=broken))
    code, records = _bench(
        tmp_path, *("--workload", "detr_dec", "--dtype", "fp32", "--impl", "deformops")
    )
    assert code == 1
    assert "broken on purpose" in records[0]["error"]


def test_silent_worker_times_out_and_disables_the_impl(tmp_path, monkeypatch):
    silent = tmp_path / "silent.py"
    silent.write_text("import sys, time\nsys.stdin.readline()\ntime.sleep(60)\n")
    monkeypatch.setattr(peers, "WORKER", silent)
    worker = peers.PeerWorker(str(tmp_path), "cpu", timeout=0.5)
    job = {"op": "msda", "impl": peers.PEER_CUDA}
    with pytest.raises(RuntimeError, match=r"no answer within 0\.5 s"):
        worker.run(job)
    with pytest.raises(RuntimeError, match="skipped"):
        worker.run(job)
    worker.close()


def test_peer_names_match_the_worker():
    assert set(peers_worker.ADAPTERS) == {
        (op, i) for op, names in peers.PEER_IMPLS.items() for i in names
    }
    assert (peers.PEER_CUDA, peers.PEER_TRITON) == (
        peers_worker.PEER_CUDA,
        peers_worker.PEER_TRITON,
    )


def test_allow_tf32_sets_the_matmul_flag(tmp_path):
    """--allow-tf32 turns TF32 matrix products on for the run (CUDA records carry the
    flag); without it, PyTorch's setting is left alone."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        code, _ = _bench(
            tmp_path, "--workload", "detr_dec", "--dtype", "fp32", "--impl", "reference"
        )
        assert code == 0
        assert not torch.backends.cuda.matmul.allow_tf32
        code, _ = _bench(
            tmp_path,
            *("--workload", "detr_dec", "--dtype", "fp32", "--impl", "reference"),
            "--allow-tf32",
        )
        assert code == 0
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_conv_warm_parts_share_out_the_configs():
    """Each part of the Triton convolution's warm-up keeps its share of every
    autotuner's configs; the parts together keep each config once."""
    sizes = {"_conv_forward_kernel": 24, "_conv_backward_kernel": 16}

    def kernels() -> SimpleNamespace:
        return SimpleNamespace(
            **{name: SimpleNamespace(configs=list(range(n))) for name, n in sizes.items()}
        )

    seen: dict[str, list[int]] = {name: [] for name in sizes}
    for part in range(5):
        module = kernels()
        kept = peers_worker.restrict_tuners(module, part, 5)
        for name in sizes:
            configs = getattr(module, name).configs
            assert kept[name] == len(configs)
            seen[name] += configs
    assert {name: sorted(c) for name, c in seen.items()} == {
        name: list(range(n)) for name, n in sizes.items()
    }
    with pytest.raises(ValueError, match="part"):
        peers_worker.restrict_tuners(kernels(), 5, 5)


@pytest.mark.parametrize("module", ["workloads.py", "timing.py", "peers_worker.py"])
def test_worker_side_modules_import_only_torch_and_stdlib(module):
    """The worker shares a process with the peer, whose package is also ``deformops``."""
    tree = ast.parse((BENCH / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {module}"
            imported.add(node.module.split(".")[0])
    assert imported <= {*sys.stdlib_module_names, "torch"}, imported


def test_workloads_are_those_of_the_design():
    w = workloads.WORKLOADS
    assert w["m2f_enc"].positions == w["m2f_enc"].num_queries == 21504
    assert w["detr_enc"].positions == w["detr_enc"].num_queries == 19947
    assert (w["detr_dec"].n, w["detr_dec"].num_queries, w["detr_dec"].positions) == (8, 900, 19947)
    for name in ("m2f_enc", "detr_enc", "detr_dec"):
        assert (w[name].heads, w[name].head_dim, w[name].points) == (8, 32, 4)
    assert (w["r50_dcn"].n, w["r50_dcn"].c_in, w["r50_dcn"].c_out, w["r50_dcn"].out_size) == (
        8,
        256,
        256,
        (64, 64),
    )
    assert (w["hires_dcn"].n, w["hires_dcn"].c_in, w["hires_dcn"].out_size) == (16, 64, (128, 128))
    small = w["detr_dec"].scaled(0.125)
    assert small.levels == ((12, 19), (6, 9), (3, 5), (2, 2))
    assert (small.n, small.num_queries) == (8, 14)
    assert w["m2f_enc"].scaled(0.125).num_queries == 16 * 16 + 8 * 8 + 4 * 4
    for workload in w.values():
        assert workloads.from_dict(json.loads(json.dumps(workloads.to_dict(workload)))) == workload


@pytest.mark.parametrize("name", ["detr_enc", "hires_dcn"])
def test_inputs_are_random_reproducible_and_well_formed(name):
    workload = workloads.WORKLOADS[name].scaled(0.1)
    first = workloads.make_inputs(workload, torch.bfloat16, "cpu", seed=3)
    again = workloads.make_inputs(workload, torch.bfloat16, "cpu", seed=3)
    other = workloads.make_inputs(workload, torch.bfloat16, "cpu", seed=4)
    for key, t in first.items():
        assert torch.equal(t, again[key])
        if t.is_floating_point():
            assert t.dtype == torch.bfloat16
            assert not torch.equal(t, other[key])
            assert t.abs().amax() > 0
    if name == "detr_enc":
        loc, attn = first["sampling_locations"], first["attention_weights"]
        assert loc.min() >= 0
        assert loc.max() <= 1
        torch.testing.assert_close(
            attn.float().sum((-2, -1)), torch.ones(attn.shape[:3]), atol=2e-2, rtol=0
        )
        sizes = [h * w for h, w in workload.levels]
        assert first["level_start_index"].tolist() == [sum(sizes[:i]) for i in range(4)]
        assert first["value"].shape[1] == sum(sizes)
    else:
        assert first["mask"].min() >= 0
        assert first["mask"].max() <= 1
        assert 1.5 < first["offset"].float().std() < 2.5


def test_cpu_peak_memory_counts_live_allocations():
    """1M + 1M floats live together, then 2M: the peak above the inputs is 3M floats
    (intermediates) plus the output and gradient buffers, i.e. at least 12 MB."""
    x = torch.randn(1000, 1000, requires_grad=True)

    def forward() -> torch.Tensor:
        a = x * 2
        b = a * 3
        del a
        c = torch.randn(2000, 1000)
        return (b.sum() + c.sum()) * x.sum()

    case = timing.Case(leaves=[x], forward=forward, grad_output=torch.ones(()))
    measured = timing.measure(case, runs=1, warmup=0)
    inputs_mib = (x.nbytes + 4) / 2**20
    assert 12e6 / 2**20 + inputs_mib <= measured.peak_mib < 40e6 / 2**20 + inputs_mib
    # Working memory: less the inputs, the output (4 bytes) and x's gradient (4 MB); the
    # intermediates b and c (12 MB) at least, by the same upper bound.
    returned_mib = (4 + x.nbytes) / 2**20
    assert measured.extra_mib == pytest.approx(measured.peak_mib - inputs_mib - returned_mib)
    assert 8e6 / 2**20 <= measured.extra_mib < 40e6 / 2**20


def test_roi_pool_workload_on_cpu(tmp_path):
    code, records = _bench(
        tmp_path, *("--op", "roi", "--dtype", "fp32", "--impl", "deformops", "reference")
    )
    assert code == 0, records
    assert [(r["workload"], r["impl"]) for r in records] == [
        ("roi_k512", "deformops"),
        ("roi_k512", "reference"),
    ]
    for r in records:
        assert r["fwd_ms"] > 0
        assert r["rel_err"] < TOLERANCE["fp32"], r
        assert set(r["rel_err_parts"]) == {"output", "input", "offset"}
    assert (tmp_path / "out" / "roi.png").is_file()


def test_roi_pool_inputs_are_proposals_on_the_image():
    workload = workloads.WORKLOADS["roi_k512"]
    assert (workload.n, workload.channels, workload.height, workload.width) == (1, 256, 64, 64)
    assert workload.rois == 512
    inputs = workloads.make_inputs(workload.scaled(0.25), torch.float32, "cpu", seed=1)
    rois = inputs["rois"]
    assert rois.shape == (512, 5)
    assert not rois[:, 0].any()  # one image
    image = 64 * 0.25 / workload.spatial_scale
    assert rois[:, 1:].min() >= 0
    assert rois[:, 1:].max() <= image
    sides = rois[:, 3:] - rois[:, 1:3]
    assert sides.min() >= 0
    assert sides.max() <= workload.roi_max * 0.25
    assert inputs["offset"].shape == (512, 2, 7, 7)
    assert inputs["grad_output"].shape == (512, 256, 7, 7)
