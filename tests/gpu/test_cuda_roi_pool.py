"""Deformable RoI pooling on CUDA against the float64 reference and torchvision's
``roi_align(aligned=True)``; empty inputs, bad batch indices, layouts, CUDA graphs and the
deterministic-algorithms error."""

from __future__ import annotations

import pytest
import torch
from cases import ROI_CASES, roi_inputs

import deformops
from deformops import ops, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)
FLOATS = ("input", "offset")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _forward_backward(fn, kwargs: dict) -> dict[str, torch.Tensor]:
    """The output and the gradients of input and offset, for a fixed random output
    gradient."""
    kwargs = dict(kwargs)
    leaves = {}
    for name in FLOATS:
        if kwargs[name] is not None:
            leaves[name] = kwargs[name] = kwargs[name].detach().requires_grad_()
    out = fn(**kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad) if leaves else ()
    return {"output": out.detach(), **dict(zip(leaves, grads, strict=True))}


def _float64_cpu(kwargs: dict) -> dict:
    return {
        k: v.detach().double().cpu() if isinstance(v, torch.Tensor) else v
        for k, v in kwargs.items()
    }


def _reference(**kwargs) -> torch.Tensor:
    return reference.deform_roi_pool(**kwargs)


@pytest.fixture(autouse=True)
def _native_backend():
    torch.manual_seed(0)
    deformops.set_backend(None)
    yield
    deformops.set_backend(None)
    torch.use_deterministic_algorithms(False)


def test_native_cuda_kernels_are_used():
    assert deformops.backend("cuda", "deform_roi_pool") == "native"


def _case_id(case) -> str:
    _, c, h, w, k, _, _, ratio, _, offset = case
    return f"C{c}-{h}x{w}-K{k}-r{ratio}" + ("" if offset else "-no-offset")


@pytest.mark.parametrize("case", ROI_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("float32_rois", [False, True], ids=["rois-same", "rois-fp32"])
def test_matches_float64(case, dtype, float32_rois):
    if float32_rois and dtype in (torch.float32, torch.float64):
        pytest.skip("float32 RoIs differ from the input's dtype only for half inputs")
    kwargs = roi_inputs(case, "cuda", dtype, torch.float32 if float32_rois else None)
    results = _forward_backward(deformops.deform_roi_pool, kwargs)
    expected = _forward_backward(_reference, _float64_cpu(kwargs))
    for name, value in results.items():
        assert value.dtype == (dtype if name in ("output", "input") else kwargs["rois"].dtype)
        assert value.shape == expected[name].shape, name
        assert _relative_error(value, expected[name]) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("offset", ["none", "zeros"])
def test_zero_offsets_equal_torchvision_roi_align(dtype, sampling_ratio, offset):
    """The forward and the input gradient of torchvision's RoIAlign with aligned=True,
    RoIs inside, across and outside the map."""
    torchvision = pytest.importorskip("torchvision")
    case = (2, 16, 20, 24, 50, 7, 0.5, sampling_ratio, 0.1, offset == "zeros")
    kwargs = roi_inputs(case, "cuda", dtype)
    if kwargs["offset"] is not None:
        kwargs["offset"] = torch.zeros_like(kwargs["offset"])

    def roi_align(input, offset, **others):
        return torchvision.ops.roi_align(
            input,
            others["rois"],
            others["output_size"],
            others["spatial_scale"],
            others["sampling_ratio"],
            aligned=True,
        )

    ours = _forward_backward(deformops.deform_roi_pool, kwargs)
    theirs = _forward_backward(roi_align, {**kwargs, "offset": None})
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours["output"], theirs["output"], **tolerance)
    torch.testing.assert_close(ours["input"], theirs["input"], **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_rois(dtype):
    kwargs = roi_inputs((2, 8, 5, 6, 0, (3, 4), 1.0, 0, 0.1, True), "cuda", dtype)
    results = _forward_backward(deformops.deform_roi_pool, kwargs)
    assert results["output"].shape == (0, 8, 3, 4)
    assert results["input"].shape == kwargs["input"].shape
    assert not results["input"].any()
    assert results["offset"].shape == (0, 2, 3, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bad_batch_indices_are_skipped_safely(dtype):
    """The custom op without the public checks (as under torch.compile or graph capture):
    RoIs with a batch index outside [0, N), NaN or infinite coordinates pool zeros and take
    no gradient; nothing is read or written out of bounds (run compute-sanitizer's memcheck
    on tests/gpu/sanitize_cases.py to see it)."""
    kwargs = roi_inputs(ROI_CASES[0], "cuda", dtype)
    rois = kwargs["rois"]
    rois[0, 0] = 2.0
    rois[1, 0] = -1.0
    rois[2, 0] = 65504.0 if dtype == torch.float16 else 1e30
    rois[3, 0] = float("nan")
    rois[4, 1] = float("inf")
    size = kwargs["output_size"]

    def op(input, offset, **others):
        return ops.deform_roi_pool(
            input,
            others["rois"],
            offset,
            *size,
            others["spatial_scale"],
            others["sampling_ratio"],
            others["gamma"],
        )

    results = _forward_backward(op, kwargs)
    torch.cuda.synchronize()
    assert not results["output"][:5].any()
    assert not results["offset"][:5].any()
    expected = _forward_backward(_reference, _float64_cpu(kwargs))
    for name, value in results.items():
        assert value.isfinite().all(), name
        assert _relative_error(value, expected[name]) <= TOLERANCE[dtype], name


def test_channels_last_input():
    kwargs = roi_inputs(ROI_CASES[2], "cuda", torch.float32)
    contiguous = _forward_backward(deformops.deform_roi_pool, kwargs)
    kwargs["input"] = kwargs["input"].contiguous(memory_format=torch.channels_last)
    last = _forward_backward(deformops.deform_roi_pool, kwargs)
    assert last["input"].is_contiguous(memory_format=torch.channels_last)
    for name, value in contiguous.items():
        torch.testing.assert_close(last[name], value, msg=name)


def test_in_cuda_graph():
    """Captured in a CUDA graph (the batch-index check is skipped while capturing) and
    replayed on new input values."""
    kwargs = roi_inputs(ROI_CASES[0], "cuda", torch.float32)

    def op():
        return deformops.deform_roi_pool(**kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op()
    kwargs["input"].copy_(torch.randn_like(kwargs["input"]))
    graph.replay()
    torch.testing.assert_close(captured, op())


def test_backward_raises_under_deterministic_algorithms():
    kwargs = roi_inputs(ROI_CASES[0], "cuda", torch.float32)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="deform_roi_pool_backward"):
        _forward_backward(deformops.deform_roi_pool, kwargs)


@pytest.mark.slow
def test_past_2_31_output_elements():
    """K*C*out_h*out_w = 2.15e9 output elements (64-bit indices): the last RoIs equal the
    same RoIs pooled alone (32-bit indices)."""
    k, c, size = 65600, 512, 8
    input = torch.randn(1, c, 16, 16, device="cuda", dtype=torch.float16)
    corner = torch.rand(k, 2, device="cuda") * 12
    rois = torch.cat([torch.zeros(k, 1, device="cuda"), corner, corner + 4], 1).half()
    assert k * c * size * size > 2**31
    out = deformops.deform_roi_pool(input, rois, output_size=size, sampling_ratio=1)
    tail = deformops.deform_roi_pool(input, rois[-8:], output_size=size, sampling_ratio=1)
    torch.testing.assert_close(out[-8:], tail, rtol=0, atol=0)
    assert out[-8:].abs().sum() > 0
