"""Both operators on CUDA against the float64 reference, CUDA graphs, compile, streams and
64-bit indexing."""

from __future__ import annotations

import naive
import pytest
import torch
from cases import (
    CONV_CASES,
    MSDA_CASES,
    conv_inputs,
    msda_inputs,
    msda_non_finite_inputs,
    off_pair_alignment,
)
from conftest import make_conv_inputs, make_msda_inputs

import deformops
from deformops import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _forward_backward(fn, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The output and the gradient of every tensor, for a fixed random output gradient."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad)
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def _deterministic_if(flag: bool, request: pytest.FixtureRequest) -> None:
    """``torch.use_deterministic_algorithms(True)`` for the rest of the test when ``flag``
    (the ``deterministic`` fixture: a test parameter of that name would shadow it)."""
    if flag:
        request.getfixturevalue("deterministic")
    assert torch.are_deterministic_algorithms_enabled() == flag


@pytest.fixture(autouse=True)
def _native_backend():
    torch.manual_seed(0)
    deformops.set_backend(None)
    yield
    deformops.set_backend(None)


@pytest.mark.parametrize("op", ["multi_scale_deformable_attention", "deform_conv2d"])
def test_native_cuda_kernels_are_used(op):
    assert deformops.backend("cuda", op) == "native"


@pytest.mark.parametrize("case", MSDA_CASES, ids=lambda c: f"D{c[3]}-L{len(c[0])}-P{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("float32_locations", [False, True], ids=["loc-same", "loc-fp32"])
@pytest.mark.parametrize("flag", [False, True], ids=["default", "deterministic"])
def test_msda_matches_float64(case, dtype, float32_locations, flag, request):
    """Both backward paths; the deterministic gather's two layouts (cases under two
    samples per position and head on average take the sparse one) among the cases."""
    if float32_locations and dtype in (torch.float32, torch.float64):
        pytest.skip("float32 locations differ from the value's dtype only for half values")
    _deterministic_if(flag, request)
    value, shapes, starts, loc, weights = msda_inputs(
        case, "cuda", dtype, torch.float32 if float32_locations else None
    )

    def op(v, lo, w):
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w)

    def op64(v, lo, w):
        return reference.multi_scale_deformable_attention(v, shapes.cpu(), starts.cpu(), lo, w)

    results = _forward_backward(op, [value, loc, weights])
    expected = _forward_backward(op64, [t.double().cpu() for t in (value, loc, weights)])
    for name, r, e in zip(
        ("output", "value", "locations", "weights"), results, expected, strict=True
    ):
        assert r.dtype == (dtype if name in ("output", "value") else loc.dtype)
        assert _relative_error(r, e) <= TOLERANCE[dtype], name


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"k{c[5][0]}x{c[5][1]}-g{c[9]}-og{c[10]}"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_matches_float64(case, dtype, channels_last):
    torch.backends.cuda.matmul.allow_tf32 = False
    kwargs = conv_inputs(case, "cuda", dtype)
    if channels_last:
        kwargs["input"] = kwargs["input"].to(memory_format=torch.channels_last)
    names = [k for k in ("input", "offset", "weight", "bias", "mask") if kwargs[k] is not None]
    params = {k: v for k, v in kwargs.items() if k not in names}

    def op(*tensors):
        return deformops.deform_conv2d(**dict(zip(names, tensors, strict=True)), **params)

    results = _forward_backward(op, [kwargs[k] for k in names])
    if results[0].shape[-2:].numel() > 1:  # a 1x1 map is contiguous in both formats
        assert results[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    expected = _forward_backward(op, [kwargs[k].double().cpu() for k in names])
    for name, r, e in zip(["output", *names], results, expected, strict=True):
        assert _relative_error(r, e) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("flag", [False, True], ids=["default", "deterministic"])
def test_msda_locations_off_their_pair_alignment(dtype, flag, request):
    """The kernels load a location's (x, y) in one instruction where the locations are
    aligned to two elements, else element by element: the same results (the value
    gradient's atomics add in any order: bit for bit only in deterministic mode)."""
    _deterministic_if(flag, request)
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", dtype)

    def op(v, lo, w):
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w)

    expected = _forward_backward(op, [value, loc, weights])
    results = _forward_backward(op, [value, off_pair_alignment(loc), weights])
    for name, r, e in zip(
        ("output", "value", "locations", "weights"), results, expected, strict=True
    ):
        if name == "value" and not flag:
            assert _relative_error(r, e) <= TOLERANCE[dtype], name
        else:
            assert torch.equal(r, e), name


def test_msda_non_finite_attention_weights():
    """NaN and infinite attention weights in image 0 give NaN gradients there, and the
    backward adds nothing at the corners it does not read (off the map), so nothing is
    written out of bounds; image 1, all finite, matches the float64 reference."""
    value, shapes, starts, loc, weights = msda_non_finite_inputs(torch.float32)

    def op(v, lo, w):
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w)

    def op64(v, lo, w):
        return reference.multi_scale_deformable_attention(v, shapes.cpu(), starts.cpu(), lo, w)

    results = _forward_backward(op, [value, loc, weights])
    torch.cuda.synchronize()
    expected = _forward_backward(op64, [t.double().cpu() for t in (value, loc, weights)])
    for name, r, e in zip(
        ("output", "value", "locations", "weights"), results, expected, strict=True
    ):
        assert _relative_error(r[1], e[1]) <= TOLERANCE[torch.float32], name
    assert torch.isnan(results[1][0]).any()


def test_msda_in_cuda_graph_on_side_stream():
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", torch.float32)

    def op():
        return deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)

    eager = op()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op()
    value.copy_(torch.randn_like(value))
    graph.replay()
    torch.testing.assert_close(captured, op())
    assert not torch.equal(captured, eager)


def test_msda_compiled_fullgraph_matches_eager():
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", torch.float32)

    def op(v, lo, w):
        return deformops.multi_scale_deformable_attention(v, shapes, starts, lo, w).square().sum()

    compiled = torch.compile(op, fullgraph=True)
    eager = _forward_backward(op, [value, loc, weights])
    traced = _forward_backward(compiled, [value, loc, weights])
    for e, t in zip(eager, traced, strict=True):
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5)


def test_msda_follows_input_device_not_current_device():
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[1], "cuda:0", torch.float32)
    with torch.cuda.device(torch.cuda.device_count() - 1):
        out = deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
    assert out.device == value.device
    expected = reference.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_msda_past_2_31_elements():
    """A value of 2^31 + extra elements: samples at the end of the map are read correctly."""
    h, w, d = 4096, 2056, 256  # 2.16e9 elements in float16
    value = torch.randn(1, h * w, 1, d, device="cuda", dtype=torch.float16)
    shapes = torch.tensor([[h, w]], device="cuda")
    starts = torch.zeros(1, dtype=torch.long, device="cuda")
    q = 64
    loc = torch.rand(1, q, 1, 1, 2, 2, device="cuda", dtype=torch.float32)
    loc[..., 1] = 0.999 + 0.001 * loc[..., 1]  # the last rows, past element 2^31
    weights = torch.rand(1, q, 1, 1, 2, device="cuda", dtype=torch.float32)
    out = deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
    tail = 8 * w  # the last 8 rows hold every sample
    sub_value = value[:, -tail:].float()
    sub_loc = loc.clone()
    sub_loc[..., 1] = (loc[..., 1] * h - (h - 8)) / 8  # same pixel rows within an 8-row map
    sub_shapes = torch.tensor([[8, w]], device="cuda")
    expected = reference.multi_scale_deformable_attention(
        sub_value, sub_shapes, starts, sub_loc, weights
    )
    assert _relative_error(out, expected) <= 5e-3
    assert out.abs().sum() > 0


@pytest.mark.slow
def test_conv_past_2_31_column_elements():
    """C*kh*kw*H_out*W_out = 2.16e9 sampled column elements for one image: with integer
    offsets (every kernel point one row down) the result equals a dense convolution with
    the padding moved below the map, everywhere in the map."""
    c, size = 64, 1936  # 64 * 9 * 1936^2 = 2.16e9
    x = torch.randn(1, c, size, size, device="cuda", dtype=torch.float16)
    weight = torch.randn(8, c, 3, 3, device="cuda", dtype=torch.float16) / 24
    offset = torch.zeros(1, 18, size, size, device="cuda", dtype=torch.float16)
    offset[:, 0::2] = 1.0  # dy = +1 for every kernel point
    out = deformops.deform_conv2d(x, offset, weight, padding=1)
    # Kernel row i of output row ho reads input row ho + i: no padding on top, two below.
    padded = torch.nn.functional.pad(x.float(), (1, 1, 0, 2))
    expected = torch.nn.functional.conv2d(padded, weight.float())
    assert _relative_error(out, expected) <= 5e-3
    assert _relative_error(out[..., -8:, -8:], expected[..., -8:, -8:]) <= 5e-3


def _float32_vs_float64(fn, naive_fn, tensors: dict[str, torch.Tensor], fixed: dict) -> None:
    """Every gradient of ``fn`` on CUDA in float32 within 1e-5 of ``naive_fn`` in float64."""
    names = list(tensors)
    results = _forward_backward(
        lambda *ts: fn(**dict(zip(names, ts, strict=True)), **fixed),
        [t.float().cuda() for t in tensors.values()],
    )
    expected = _forward_backward(
        lambda *ts: naive_fn(**dict(zip(names, ts, strict=True)), **fixed),
        [t.float().double() for t in tensors.values()],
    )
    for name, r, e in zip(["output", *names], results, expected, strict=True):
        assert _relative_error(r, e) <= 1e-5, name


def test_conv_float32_locates_like_float64():
    """Points a rounding error from a pixel edge, where the offset gradient jumps."""
    torch.backends.cuda.matmul.allow_tf32 = False
    args = make_conv_inputs(h=40, w=48, offsets="near_edges")
    tensors = {k: args.pop(k) for k in ("input", "offset", "weight", "mask", "bias")}
    _float32_vs_float64(deformops.deform_conv2d, naive.deform_conv2d, tensors, args)


def test_msda_float32_locates_like_float64():
    """Points a rounding error from a pixel edge, where the location gradient jumps."""
    levels = ((40, 48), (20, 24), (10, 12))
    args = make_msda_inputs(levels=levels, q=200, locations="near_edges")
    tensors = {k: args.pop(k) for k in ("value", "sampling_locations", "attention_weights")}

    def op(**kw):
        shapes = {k: v.to(kw["value"].device) for k, v in args.items()}
        return deformops.multi_scale_deformable_attention(**kw, **shapes)

    def op64(**kw):
        return naive.multi_scale_deformable_attention(**kw, **args)

    _float32_vs_float64(op, op64, tensors, {})


EMPTY_CASES = {
    "conv-no-images": (deformops.deform_conv2d, lambda: make_conv_inputs(n=0), (0, 6, 5, 7)),
    "conv-no-output-channels": (
        deformops.deform_conv2d,
        lambda: make_conv_inputs(c_out=0),
        (2, 0, 5, 7),
    ),
    "msda-no-images": (
        deformops.multi_scale_deformable_attention,
        lambda: make_msda_inputs(n=0, m=2, d=4),
        (0, 5, 8),
    ),
    "msda-no-queries": (
        deformops.multi_scale_deformable_attention,
        lambda: make_msda_inputs(q=0, m=2, d=4),
        (2, 0, 8),
    ),
}


def _on_cuda(value):
    """A tensor argument on CUDA, float32 and requiring grad when floating."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.cuda()
    return value.float().requires_grad_() if value.is_floating_point() else value


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
@pytest.mark.parametrize("flag", [False, True], ids=["default", "deterministic"])
def test_empty_problems(name, flag, request):
    """No kernel of an empty problem runs on a bad size; the gradients are zeros."""
    _deterministic_if(flag, request)
    fn, make, shape = EMPTY_CASES[name]
    args = {k: _on_cuda(v) for k, v in make().items()}
    out = fn(**args)
    assert tuple(out.shape) == shape
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)
    for leaf, grad in zip(leaves, grads, strict=True):
        assert grad is not None
        assert grad.shape == leaf.shape
        assert not grad.any()
