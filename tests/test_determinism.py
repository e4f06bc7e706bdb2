"""Bitwise reproducible gradients on the CPU, with and without deterministic algorithms.

The native CPU backward passes use no atomics and sum in a fixed order, so their gradients
are the same at every run for a given number of threads. The attention's do not depend on
the number of threads at all; the convolution's offset and mask gradients do (their sums
over channels are split among threads), except under
``torch.use_deterministic_algorithms(True)``, which splits them as for one thread. The
CUDA tests are in ``tests/gpu/test_cuda_training.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import TOLERANCE, make_conv_inputs, make_msda_inputs
from naive import relative_error
from torch import Tensor

import deformops

F32 = torch.float32
CONV_FLOATS = ("input", "offset", "weight", "mask", "bias")
MSDA_FLOATS = ("value", "sampling_locations", "attention_weights")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _conv_inputs(dtype: torch.dtype) -> dict[str, Any]:
    """One image of 64 channels: with 2 threads the channels are split in two blocks."""
    return make_conv_inputs(n=1, c_in=64, c_out=8, h=9, w=11) | {"dtype": dtype}


def _msda_inputs(dtype: torch.dtype) -> dict[str, Any]:
    """Many queries on small maps: each value element receives many samples."""
    return make_msda_inputs(n=2, levels=((4, 5), (2, 3)), m=2, d=8, q=40, p=4) | {"dtype": dtype}


def _run(
    fn: Callable[..., Tensor], kwargs: dict[str, Any], names: tuple[str, ...], threads: int
) -> list[Tensor]:
    """Output and gradients of every floating input, computed with ``threads`` threads."""
    torch.set_num_threads(threads)
    args = dict(kwargs)
    dtype = args.pop("dtype")
    for name in names:
        args[name] = args[name].to(dtype).requires_grad_()
    out = fn(**args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, [args[n] for n in names], grad.to(out.dtype))
    return [out.detach(), *grads]


OPS = {
    "conv": (deformops.deform_conv2d, _conv_inputs, CONV_FLOATS),
    "msda": (deformops.multi_scale_deformable_attention, _msda_inputs, MSDA_FLOATS),
}


def _assert_bitwise_equal(a: list[Tensor], b: list[Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        assert torch.equal(x, y)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flag", [False, True], ids=["default", "deterministic"])
def test_repeated_runs_are_bitwise_equal(
    backend: str, op: str, dtype: torch.dtype, flag: bool, request: pytest.FixtureRequest
) -> None:
    if flag:
        request.getfixturevalue("deterministic")
    fn, make, names = OPS[op]
    kwargs = make(dtype)
    first = _run(fn, kwargs, names, threads=2)
    for _ in range(2):
        _assert_bitwise_equal(_run(fn, kwargs, names, threads=2), first)


@pytest.mark.usefixtures("deterministic", "restore_threads")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [F32, torch.float16], ids=str)
def test_deterministic_mode_ignores_thread_count(op: str, dtype: torch.dtype) -> None:
    deformops.set_backend("native")
    try:
        fn, make, names = OPS[op]
        kwargs = make(dtype)
        _assert_bitwise_equal(_run(fn, kwargs, names, threads=2), _run(fn, kwargs, names, 1))
    finally:
        deformops.set_backend(None)


@pytest.mark.usefixtures("restore_threads")
def test_deterministic_mode_splits_work_as_one_thread(
    request: pytest.FixtureRequest,
) -> None:
    """Without the flag the convolution's fast path splits channels among the threads
    (different rounding); with it, 2 threads give what 1 thread gives without it."""
    deformops.set_backend("native")
    try:
        fn, make, names = OPS["conv"]
        kwargs = make(F32)
        one_thread = _run(fn, kwargs, names, threads=1)
        fast = _run(fn, kwargs, names, threads=2)
        offset_grad = names.index("offset") + 1
        assert not torch.equal(fast[offset_grad], one_thread[offset_grad])
        request.getfixturevalue("deterministic")
        _assert_bitwise_equal(_run(fn, kwargs, names, threads=2), one_thread)
    finally:
        deformops.set_backend(None)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("op", OPS)
def test_deterministic_results_match_float64(backend: str, op: str) -> None:
    fn, make, names = OPS[op]
    kwargs = make(F32)
    threads = torch.get_num_threads()
    results = _run(fn, kwargs, names, threads)
    expected = _run(fn, kwargs | {"dtype": torch.float64}, names, threads)
    for r, e in zip(results, expected, strict=True):
        assert relative_error(r, e) <= TOLERANCE[F32]
