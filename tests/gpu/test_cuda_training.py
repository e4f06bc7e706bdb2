"""Training setups on CUDA: autocast (float16, bfloat16) with a GradScaler and
torch.compile, the deterministic backward passes (bitwise equal runs, accuracy, kernels
selected, time on the benchmark workloads) and channels_last without layout copies.

The CPU versions are ``tests/test_autocast.py``, ``tests/test_determinism.py`` and
``tests/test_channels_last.py``.
"""

from __future__ import annotations

import os
import re

# The convolution's GEMMs run on cuBLAS, which PyTorch allows under deterministic
# algorithms only with this setting, read at the first cuBLAS call of the process (test
# collection imports this module before any test runs).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from cases import CONV_CASES, MSDA_CASES, conv_inputs, msda_inputs
from test_autocast import Model, RecordDtypes, model_inputs
from test_channels_last import layout_copies, model_of
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

import deformops
from deformops import reference
from deformops.bench.impls import IMPLS
from deformops.bench.timing import measure
from deformops.bench.workloads import WORKLOADS, make_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)

HALF = [torch.float16, torch.bfloat16]
F32 = torch.float32
CONV_FLOATS = ("input", "offset", "weight", "bias", "mask")
MSDA_AUTOCAST = [None, torch.int64, torch.int64, F32, F32]  # value's dtype first
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _native() -> Iterator[None]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    deformops.set_backend(None)
    yield
    deformops.set_backend(None)
    torch._dynamo.reset()


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _outputs_and_grads(fn: Callable[..., Tensor], leaves: list[Tensor]) -> list[Tensor]:
    """The output and the gradient of every leaf for a fixed random output gradient."""
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


# ----------------------------------------------------------------------------------------
# Autocast


# Bitwise comparisons of two backward passes need the deterministic ones.
@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_conv_autocast(dtype: torch.dtype) -> None:
    kwargs = conv_inputs(CONV_CASES[0], "cuda", F32)
    names = [k for k in CONV_FLOATS if kwargs[k] is not None]
    params = {k: v for k, v in kwargs.items() if k not in names}
    leaves = [kwargs[k].requires_grad_() for k in names]

    def op(*tensors: Tensor) -> Tensor:
        return deformops.deform_conv2d(**dict(zip(names, tensors, strict=True)), **params)

    with torch.autocast("cuda", dtype=dtype), RecordDtypes() as record:
        results = _outputs_and_grads(op, leaves)
    assert results[0].dtype == dtype
    assert record.calls["deform_conv2d"][:5] == [dtype] * 5
    assert [g.dtype for g in results[1:]] == [F32] * len(names)
    by_hand = [t.detach().to(dtype).requires_grad_() for t in leaves]
    expected = _outputs_and_grads(op, by_hand)
    for r, e in zip(results, expected, strict=True):
        assert torch.equal(r, e.to(r.dtype))


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_msda_autocast(dtype: torch.dtype) -> None:
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", F32)
    leaves = [t.requires_grad_() for t in (value, loc, weights)]

    def op(v: Tensor, lo: Tensor, w: Tensor) -> Tensor:
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w)

    with torch.autocast("cuda", dtype=dtype), RecordDtypes() as record:
        results = _outputs_and_grads(op, leaves)
    assert results[0].dtype == dtype
    assert record.calls["multi_scale_deformable_attention"] == [dtype, *MSDA_AUTOCAST[1:]]
    assert [g.dtype for g in results[1:]] == [F32] * 3
    by_hand = [
        value.detach().to(dtype).requires_grad_(),
        *(t.detach().requires_grad_() for t in leaves[1:]),
    ]
    expected = _outputs_and_grads(op, by_hand)
    for r, e in zip(results, expected, strict=True):
        assert torch.equal(r, e.to(r.dtype))


def test_grad_scaler_float16_training_step() -> None:
    model = Model().cuda()
    inputs = [t.cuda() for t in model_inputs()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(*inputs).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() == 2.0**10  # no step was skipped for an inf or NaN
    assert all(p.dtype == F32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_compiled_matches_eager(dtype: torch.dtype) -> None:
    model = Model().cuda()
    inputs = [t.cuda() for t in model_inputs()]

    def outputs_and_grads(fn: Callable[..., Tensor]) -> list[Tensor]:
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            out = fn(*inputs)
        assert out.dtype == dtype
        out.float().square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = outputs_and_grads(model)
    compiled = outputs_and_grads(torch.compile(model, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        assert _relative_error(c, e) <= 2e-2


# ----------------------------------------------------------------------------------------
# Deterministic backward


def _msda_case(dtype: torch.dtype) -> tuple[Callable[..., Tensor], list[Tensor], Callable]:
    """Many queries on small maps: each value element receives many samples."""
    levels = ((6, 8), (3, 4))
    shapes = torch.tensor(levels, device="cuda")
    starts = torch.tensor([0, 48], device="cuda")
    n, q, m, d, p = 2, 600, 4, 32, 4
    value = torch.randn(n, 60, m, d, device="cuda").to(dtype)
    loc = (torch.rand(n, q, m, 2, p, 2, device="cuda") * 1.4 - 0.2).to(dtype)
    weights = torch.rand(n, q, m, 2, p, device="cuda").softmax(-1).to(dtype)

    def op(v: Tensor, lo: Tensor, w: Tensor) -> Tensor:
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w)

    def op64(v: Tensor, lo: Tensor, w: Tensor) -> Tensor:
        return reference.multi_scale_deformable_attention(v, shapes.cpu(), starts.cpu(), lo, w)

    return op, [value, loc, weights], op64


def _conv_case(dtype: torch.dtype) -> tuple[Callable[..., Tensor], list[Tensor], Callable]:
    kwargs = conv_inputs((2, 32, 16, 12, 13, (3, 3), 1, 1, 1, 1, 2, True, True), "cuda", dtype)
    names = [k for k in CONV_FLOATS if kwargs[k] is not None]
    params = {k: v for k, v in kwargs.items() if k not in names}

    def op(*tensors: Tensor) -> Tensor:
        return deformops.deform_conv2d(**dict(zip(names, tensors, strict=True)), **params)

    return op, [kwargs[k] for k in names], op


CASES = {"msda": _msda_case, "conv": _conv_case}


def _run(op: Callable[..., Tensor], tensors: list[Tensor]) -> list[Tensor]:
    return _outputs_and_grads(op, [t.detach().requires_grad_() for t in tensors])


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_deterministic_backward_is_bitwise_reproducible(case: str, dtype: torch.dtype) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    op, tensors, op64 = CASES[case](dtype)
    first = _run(op, tensors)
    for _ in range(3):
        again = _run(op, tensors)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
    expected = _run(op64, [t.double().cpu() for t in tensors])
    for r, e in zip(first, expected, strict=True):
        assert _relative_error(r, e) <= TOLERANCE[dtype]


def _kernel_names(fn: Callable[[], object]) -> str:
    """The names of the CUDA kernels ``fn`` launches, one a line."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return "\n".join(e.name for e in prof.events())


@pytest.mark.parametrize("case", CASES)
def test_deterministic_flag_selects_the_kernels(case: str, request: pytest.FixtureRequest) -> None:
    """The flag switches to the sorted paths; without it the fast path runs, unsorted."""
    op, tensors, _ = CASES[case](F32)
    fast = _kernel_names(lambda: _run(op, tensors))
    request.getfixturevalue("deterministic")
    sorted_path = _kernel_names(lambda: _run(op, tensors))
    specific = "msda_detail::gather_kernel" if case == "msda" else "fill_sorted_kernel"
    for marker in ("RadixSort", specific):
        assert marker in sorted_path
        assert marker not in fast


BENCH_WORKLOADS = ("m2f_enc", "detr_enc", "detr_dec", "r50_dcn", "hires_dcn")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
def test_deterministic_backward_time_on_benchmark_workloads(
    dtype: torch.dtype, request: pytest.FixtureRequest
) -> None:
    """Backward (forward+backward minus forward) at most 2x the default path's; the table
    is printed (``pytest -s``) for the record."""
    rows: list[tuple[str, float, float]] = []
    backward: dict[bool, dict[str, float]] = {False: {}, True: {}}
    for flag in (False, True):
        if flag:
            request.getfixturevalue("deterministic")
        for name in BENCH_WORKLOADS:
            workload = WORKLOADS[name]
            case = IMPLS[workload.op]["deformops"].build(
                workload, make_inputs(workload, dtype, "cuda")
            )
            timed = measure(case, runs=20, warmup=3)
            backward[flag][name] = timed.fwdbwd_ms - timed.fwd_ms
    for name in BENCH_WORKLOADS:
        rows.append((name, backward[False][name], backward[True][name]))
    table = "\n".join(f"{n:10s} {d:8.3f} ms {s:8.3f} ms  x{s / d:.2f}" for n, d, s in rows)
    print(
        f"\nbackward, default vs deterministic ({dtype}, {torch.cuda.get_device_name()}):\n{table}"
    )
    assert all(s <= 2.0 * d for _, d, s in rows), table


# ----------------------------------------------------------------------------------------
# channels_last


def test_channels_last_model_makes_no_layout_copy() -> None:
    model = model_of(torch.channels_last).cuda()
    x = torch.randn(2, 8, 9, 11, device="cuda").to(memory_format=torch.channels_last)
    grad = torch.randn(2, 12, 9, 11, device="cuda").to(memory_format=torch.channels_last)
    copies = layout_copies(model, x.requires_grad_(), grad)
    assert copies == {"deform_conv2d_forward": [], "deform_conv2d_backward": []}
    # Nor any of the binding's own NCHW <-> channels-last transposes.
    ours = re.compile(r"deformops::gpu::.*transpose_kernel")
    assert not ours.search(_kernel_names(lambda: model(x).backward(grad)))
    contiguous = model_of(torch.contiguous_format).cuda()
    assert ours.search(
        _kernel_names(lambda: contiguous(x.contiguous()).backward(grad.contiguous()))
    )
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert model.weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_strided_offset_matches_contiguous() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    kwargs: dict[str, Any] = conv_inputs(CONV_CASES[2], "cuda", F32)
    offset, mask = kwargs["offset"], kwargs["mask"]
    predicted = torch.cat([offset, mask, mask], dim=1).to(memory_format=torch.channels_last)
    strided = {
        "offset": predicted[:, : offset.shape[1]],
        "mask": predicted[:, offset.shape[1] : offset.shape[1] + mask.shape[1]],
        "input": kwargs["input"].to(memory_format=torch.channels_last),
    }
    names = [k for k in CONV_FLOATS if kwargs[k] is not None]
    params = {k: v for k, v in kwargs.items() if k not in names}

    def run(arguments: dict[str, Any]) -> list[Tensor]:
        def op(*tensors: Tensor) -> Tensor:
            return deformops.deform_conv2d(**dict(zip(names, tensors, strict=True)), **params)

        return _run(op, [arguments[k] for k in names])

    for r, e in zip(run(kwargs | strided), run(kwargs), strict=True):
        assert _relative_error(r, e) <= 1e-6
