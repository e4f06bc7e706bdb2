"""How one implementation is measured: time, peak memory and its results.

This module imports nothing but torch: the peer worker loads it by file path, so that
peers are measured exactly as this package's implementations are.

Method (DESIGN.md, "Benchmark workloads"):

- one first call whose output and gradients are kept for the error check (it also pays
  any compilation or autotuning), then ``warmup`` calls of forward and of forward+backward;
- forward alone is timed under ``torch.no_grad()`` (inference); forward+backward computes
  the gradient of every floating input with ``torch.autograd.grad`` for a fixed random
  ``grad_output``;
- on CUDA each call is timed by a pair of CUDA events, and the L2 cache is flushed (a
  256 MiB buffer is zeroed, outside the events) before each call, so that no call finds
  its inputs in L2 from the previous one; on the CPU ``time.perf_counter``;
- the median over ``runs`` calls is reported, in milliseconds;
- peak memory: the largest amount allocated during one forward+backward above what was
  allocated before it, plus the bytes of the case's inputs (differentiable inputs, index
  tables and ``grad_output``); so it is the peak of the whole forward+backward including
  its inputs, and independent of anything else the process holds. On CUDA it is read from
  ``torch.cuda.max_memory_allocated``; on the CPU it is the running sum of the
  allocations and frees that ``torch.profiler`` records (``profile_memory=True``), per
  operator: a buffer that one operator allocates and frees inside itself (a native
  kernel's workspace) is not seen, so on the CPU the figure is a lower bound;
- working memory (``extra_mib``): that peak less the inputs, the output and the
  gradients, i.e. what the implementation holds beyond what it takes and returns (a
  decoder's value and its gradient can be most of its peak, whatever the implementation).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Bytes zeroed before each timed CUDA call to evict the L2 cache (50 MiB on an H100).
L2_FLUSH_BYTES = 256 << 20

_flush_buffers: dict[torch.device, Tensor] = {}


@dataclasses.dataclass
class Case:
    """One implementation bound to one set of inputs.

    Attributes
    ----------
    leaves : list of Tensor
        The floating inputs, requiring grad, in the implementation's own layout.
    forward : callable
        Computes the output from ``leaves`` (and whatever else it closes over).
    grad_output : Tensor
        Gradient of the output, in the implementation's output layout.
    others : list of Tensor
        Non-differentiable inputs (index tables), counted in the peak memory.
    canonical : callable, optional
        Maps ``(output, gradients of leaves)`` to the harness layout and order (output
        first, then the gradients in :func:`workloads.differentiable` order). Default:
        identity.
    """

    leaves: list[Tensor]
    forward: Callable[[], Tensor]
    grad_output: Tensor
    others: list[Tensor] = dataclasses.field(default_factory=list)
    canonical: Callable[[Tensor, Sequence[Tensor]], list[Tensor]] | None = None


@dataclasses.dataclass
class Measurement:
    """Median times (ms), peak and working memory (MiB) and the results of the
    first call (output, then gradients, in the harness layout, detached)."""

    fwd_ms: float
    fwdbwd_ms: float
    peak_mib: float
    extra_mib: float
    results: list[Tensor]


def _forward_backward(case: Case) -> tuple[Tensor, tuple[Tensor, ...]]:
    out = case.forward()
    grads = torch.autograd.grad(out, case.leaves, case.grad_output)
    return out, grads


def _forward(case: Case) -> None:
    with torch.no_grad():
        case.forward()


def _flush_buffer(device: torch.device) -> Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _flush_buffers[device]


def _times_ms(fn: Callable[[], object], runs: int, device: torch.device) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn``."""
    if device.type != "cuda":
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    flush = _flush_buffer(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


def _cuda_peak_above(case: Case, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = _forward_backward(case)
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak_above(case: Case) -> int:
    """Peak of the running sum of the profiler's allocation (+) and free (-) records."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        result = _forward_backward(case)
        del result
    events = sorted(
        (e for e in profiler.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _peak_mib(case: Case, device: torch.device) -> float:
    above = _cuda_peak_above(case, device) if device.type == "cuda" else _cpu_peak_above(case)
    inputs = sum(t.nbytes for t in [*case.leaves, *case.others, case.grad_output])
    return (above + inputs) / 2**20


def measure(case: Case, runs: int, warmup: int) -> Measurement:
    """Measure one case (see the module docstring for the method).

    Parameters
    ----------
    case : Case
        The implementation and its inputs.
    runs : int
        Timed calls of forward and of forward+backward (the median is reported).
    warmup : int
        Untimed calls of each before timing.

    Returns
    -------
    Measurement
    """
    device = case.grad_output.device
    out, grads = _forward_backward(case)
    canonical = case.canonical or (lambda o, g: [o, *g])
    results = [t.detach() for t in canonical(out, grads)]
    del out, grads
    for _ in range(warmup):
        _forward(case)
        _forward_backward(case)
    peak = _peak_mib(case, device)
    fwd = _times_ms(lambda: _forward(case), runs, device)
    fwdbwd = _times_ms(lambda: _forward_backward(case), runs, device)
    inputs = sum(t.nbytes for t in [*case.leaves, *case.others, case.grad_output])
    extra = peak - (inputs + sum(t.nbytes for t in results)) / 2**20
    return Measurement(statistics.median(fwd), statistics.median(fwdbwd), peak, extra, results)
