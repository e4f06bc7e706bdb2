"""``torch.compile(fullgraph=True)`` of the modules: forward and backward equal to eager, and
dynamic shapes (batch and map sizes changing) compiled once.

The equality tests use the ``aot_eager`` backend (dynamo and AOTAutograd, which trace the
operators through their fake kernels and autograd formulas, without inductor's C++ build)
on both backends; one test compiles a model with both modules through the default
inductor backend. The dynamic-shape tests use ``aot_eager`` too: under inductor, the
lowering of ``nn.Conv2d``'s backward (``DeformConv2d.conv_offset``) specialises the map
size, as it does for any plain convolution. The CUDA variants, with
``mode="reduce-overhead"`` (CUDA graphs), are in ``tests/gpu/test_cuda_compile_modules.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from deformops.nn import DeformAttn2d, DeformConv2d
from deformops.nn.deform_attn import level_start_index_of

F64 = torch.float64
CHANNELS = 16
LEVELS = 3

# The sizes of the first (compiled) call differ from each other and from the modules'
# constant sizes (channels, kernel points, levels, the coordinate pair): dynamo's duck
# shaping gives equal sizes one symbol, and a size equal to a constant is then specialised.
CONV_SHAPES = ((5, 11, 13), (7, 9, 14), (2, 17, 10))  # (N, H, W)
ATTN_SHAPES = (  # (N, Q, level sizes)
    (6, 11, ((20, 18), (10, 9), (5, 4))),
    (7, 13, ((22, 14), (11, 7), (6, 4))),
    (2, 9, ((12, 16), (6, 8), (3, 4))),
)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize(module: nn.Module) -> nn.Module:
    """Non-zero offset predictors, so that the sampling points are fractional."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "offset" in name or "attention_weights" in name:
                parameter.normal_(0.0, 0.3)
    return module


def _conv() -> DeformConv2d:
    return _randomize(DeformConv2d(4, 6, offset_groups=2).to(F64))


def _attn() -> DeformAttn2d:
    return _randomize(DeformAttn2d(CHANNELS, num_heads=2, num_levels=LEVELS, num_points=2).to(F64))


def _conv_inputs(n: int, h: int, w: int) -> tuple[Tensor, ...]:
    return (torch.randn(n, 4, h, w, dtype=F64),)


def _attn_inputs(n: int, q: int, levels: Sequence[tuple[int, int]]) -> tuple[object, ...]:
    """``(query, reference_points, maps)``: a list of ``[N, C, H_l, W_l]`` maps."""
    query = torch.randn(n, q, CHANNELS, dtype=F64)
    reference_points = torch.rand(n, q, LEVELS, 2, dtype=F64)
    maps = [torch.randn(n, CHANNELS, h, w, dtype=F64) for h, w in levels]
    return query, reference_points, maps


def _flattened(inputs: tuple[object, ...]) -> tuple[object, ...]:
    """The same call with ``value`` flattened to ``[N, S, C]`` plus ``spatial_shapes``."""
    query, reference_points, maps = inputs
    value = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], dim=1)
    shapes = torch.tensor([tuple(level.shape[-2:]) for level in maps])
    return query, reference_points, value, shapes, level_start_index_of(shapes)


def _tensors(inputs: Sequence[object]) -> list[Tensor]:
    flat: list[Tensor] = []
    for item in inputs:
        if isinstance(item, Tensor):
            flat.append(item)
        elif isinstance(item, list):
            flat.extend(item)
    return flat


def outputs_and_grads(
    fn: Callable[..., Tensor], module: nn.Module, inputs: Sequence[object]
) -> list[Tensor]:
    """Output, then the gradients of the floating inputs and of every parameter."""
    module.zero_grad()
    leaves = [t for t in _tensors(inputs) if t.is_floating_point()]
    for leaf in leaves:
        leaf.grad = None
        leaf.requires_grad_()
    out = fn(*inputs)
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    out.backward(grad)
    results = [out.detach(), *(leaf.grad for leaf in leaves)]
    results += [p.grad for p in module.parameters()]
    assert all(r is not None for r in results)
    return [r.clone() for r in results]


def assert_all_close(actual: list[Tensor], expected: list[Tensor], **tolerance: float) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"result {i}: {m}", **tolerance)


def _attn_flattened_inputs(n: int, q: int, levels: Sequence[tuple[int, int]]) -> tuple:
    return _flattened(_attn_inputs(n, q, levels))


CASES = {  # module factory, input factory, shapes of successive calls
    "conv": (_conv, _conv_inputs, CONV_SHAPES),
    "attn-maps": (_attn, _attn_inputs, ATTN_SHAPES),
    "attn-flattened": (_attn, _attn_flattened_inputs, ATTN_SHAPES),
}


@pytest.mark.parametrize("case", CASES)
def test_fullgraph_matches_eager(backend: str, case: str) -> None:
    make_module, make_inputs, shapes = CASES[case]
    module, inputs = make_module(), make_inputs(*shapes[0])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    expected = outputs_and_grads(module, module, inputs)
    actual = outputs_and_grads(compiled, module, inputs)
    assert counter.frame_count == 1
    assert_all_close(actual, expected, rtol=1e-12, atol=1e-12)


class _Both(nn.Module):
    """``DeformConv2d`` features, attended to from every pixel with ``DeformAttn2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(4, CHANNELS)
        self.attn = DeformAttn2d(CHANNELS, num_heads=2, num_levels=2, num_points=2)

    def forward(self, images: Tensor, reference_points: Tensor) -> Tensor:
        features = self.conv(images).relu()
        maps = [features, nn.functional.avg_pool2d(features, 2)]
        return self.attn(features.flatten(2).transpose(1, 2), reference_points, maps)


def test_inductor_matches_eager() -> None:
    module = _randomize(_Both().to(F64))
    inputs = (torch.randn(3, 4, 8, 6, dtype=F64), torch.rand(3, 48, 2, 2, dtype=F64))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    expected = outputs_and_grads(module, module, inputs)
    actual = outputs_and_grads(compiled, module, inputs)
    assert counter.frame_count == 1
    assert_all_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_shapes_compile_once(case: str) -> None:
    make_module, make_inputs, shapes = CASES[case]
    module = make_module()
    calls = [make_inputs(*shape) for shape in shapes]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    assert_all_close(
        outputs_and_grads(compiled, module, calls[0]), outputs_and_grads(module, module, calls[0])
    )
    assert counter.frame_count == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for inputs in calls[1:]:
            assert_all_close(
                outputs_and_grads(compiled, module, inputs),
                outputs_and_grads(module, module, inputs),
            )
    assert counter.frame_count == 1
