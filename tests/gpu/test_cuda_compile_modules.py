"""The modules compiled with ``mode="reduce-overhead"`` (inductor, CUDA graphs) on CUDA:
forward and backward equal to eager on repeated calls, no CUDA graph skipped, and dynamic
shapes compiled once (batch and map sizes changing; the batch only for ``DeformConv2d``,
see ``CONV_BATCH_SHAPES``). The cases are those of ``tests/test_compile_modules.py``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
import torch._dynamo
from test_compile_modules import CASES, assert_all_close, outputs_and_grads
from torch._dynamo.utils import counters

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)

REPLAYS = 3
TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}  # float64 throughout


@pytest.fixture(autouse=True)
def _fresh_compile_state() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _cuda(inputs: Sequence[object]) -> tuple[object, ...]:
    """The call's tensors (and lists of tensors) moved to the GPU."""
    return tuple(
        [t.cuda() for t in item] if isinstance(item, list) else item.cuda() for item in inputs
    )


@pytest.mark.parametrize("case", CASES)
def test_reduce_overhead_matches_eager(case: str) -> None:
    make_module, make_inputs, shapes = CASES[case]
    module, inputs = make_module().cuda(), _cuda(make_inputs(*shapes[0]))
    compiled = torch.compile(module, fullgraph=True, mode="reduce-overhead")
    expected = outputs_and_grads(module, module, inputs)
    for _ in range(REPLAYS):  # record, then replay the CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
        assert_all_close(outputs_and_grads(compiled, module, inputs), expected, **TOLERANCE)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# Inductor's lowering of the backward of torch.nn.Conv2d (DeformConv2d.conv_offset)
# specialises the map size: with torch 2.13 on the CPU a plain nn.Conv2d recompiles for
# every new (H, W) under dynamic=True too. The convolution case changes the batch only.
CONV_BATCH_SHAPES = ((5, 11, 13), (7, 11, 13), (2, 11, 13))


@pytest.mark.parametrize("case", list(CASES))
def test_reduce_overhead_dynamic_shapes_compile_once(case: str) -> None:
    make_module, make_inputs, shapes = CASES[case]
    shapes = CONV_BATCH_SHAPES if case == "conv" else shapes
    module = make_module().cuda()
    calls = [_cuda(make_inputs(*shape)) for shape in shapes]
    compiled = torch.compile(module, fullgraph=True, dynamic=True, mode="reduce-overhead")
    torch.compiler.cudagraph_mark_step_begin()
    first = outputs_and_grads(compiled, module, calls[0])
    assert_all_close(first, outputs_and_grads(module, module, calls[0]), **TOLERANCE)
    assert counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for inputs in calls[1:]:
            torch.compiler.cudagraph_mark_step_begin()
            actual = outputs_and_grads(compiled, module, inputs)
            assert_all_close(actual, outputs_and_grads(module, module, inputs), **TOLERANCE)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
