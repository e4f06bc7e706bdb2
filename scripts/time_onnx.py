"""Time the ONNX translations of deformops.onnx in onnxruntime (CPU) against eager deformops.

Each operator is exported alone (every tensor a graph input) in float32 on one image
(``N = 1``) of the benchmark workloads of DESIGN.md (r50_dcn and hires_dcn for the
convolution, detr_dec and detr_enc for the attention), with their random inputs. Candidates run in turn, round after round, so that background load hits
them alike; the median of the rounds is printed in milliseconds, with the error of each
output against eager (max absolute difference over max absolute value).

Usage: python scripts/time_onnx.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import onnxruntime
import torch
from torch import Tensor, nn

import deformops
import deformops.onnx
from deformops.bench.workloads import WORKLOADS, ConvWorkload, Workload, make_inputs


class _Conv(nn.Module):
    """``deformops.deform_conv2d`` of a workload, with every tensor a graph input."""

    def __init__(self, workload: ConvWorkload) -> None:
        super().__init__()
        self.params = (workload.stride, workload.padding, workload.dilation)

    def forward(self, input, offset, weight, mask, bias) -> Tensor:
        return deformops.deform_conv2d(input, offset, weight, bias, *self.params, mask=mask)


class _Attention(nn.Module):
    """``deformops.multi_scale_deformable_attention`` with every tensor a graph input."""

    def forward(
        self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ) -> Tensor:
        return deformops.multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )


def _arguments(workload: Workload, module: nn.Module) -> tuple[Tensor, ...]:
    """One image (``N = 1``) of the workload's float32 inputs, in ``module``'s order."""
    inputs = make_inputs(dataclasses.replace(workload, n=1), torch.float32, "cpu")
    names = inspect.signature(module.forward).parameters
    return tuple(inputs[name] for name in names)


def _session(module: nn.Module, args: tuple[Tensor, ...], conv: str, threads: int) -> Callable:
    program = torch.onnx.export(
        module,
        args,
        custom_translation_table=deformops.onnx.translation_table(conv),
        verbose=False,
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), args, strict=True)}
    return lambda: torch.from_numpy(session.run(None, feeds)[0])


def _compare(name: str, candidates: dict[str, Callable[[], Tensor]], rounds: int) -> None:
    expected = candidates["eager deformops"]()
    errors = {}
    for label, run in candidates.items():
        out = run()
        errors[label] = ((out - expected).abs().max() / expected.abs().max()).item()
    times: dict[str, list[float]] = {label: [] for label in candidates}
    for _ in range(rounds):
        for label, run in candidates.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    for label in candidates:
        median = statistics.median(times[label]) * 1e3
        print(f"{name:10s} {label:28s} {median:8.1f} ms   error {errors[label]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    logging.disable(logging.WARNING)  # the exporter's notes on torchvision
    warnings.filterwarnings("ignore")
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, ", end="")
    print(f"{options.threads} thread(s), deformops backend {deformops.backend('cpu')}")
    for name in ("r50_dcn", "hires_dcn", "detr_dec", "detr_enc"):
        workload = WORKLOADS[name]
        if isinstance(workload, ConvWorkload):
            module, translations = (
                _Conv(workload),
                {"DeformConv": "DeformConv", "GridSample": "GridSample"},
            )
        else:  # the attention has one translation (the conv argument does not apply)
            module, translations = _Attention(), {"GridSample": "DeformConv"}
        args = _arguments(workload, module)
        candidates = {"eager deformops": lambda module=module, args=args: module(*args)}
        for label, conv in translations.items():
            candidates[f"onnxruntime {label}"] = _session(module, args, conv, options.threads)
        with torch.no_grad():
            _compare(name, candidates, options.rounds)


if __name__ == "__main__":
    main()
