"""Runs every GPU test case once, forward and backward, with the default and with the
deterministic algorithms, for compute-sanitizer
(``compute-sanitizer --tool memcheck python tests/gpu/sanitize_cases.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call

import torch
from cases import (
    CONV_CASES,
    MSDA_CASES,
    ROI_CASES,
    conv_inputs,
    msda_inputs,
    msda_non_finite_inputs,
    off_pair_alignment,
    roi_inputs,
)

import deformops
from deformops import ops


def msda_forward_backward(value, shapes, starts, loc, weights) -> None:
    tensors = [t.requires_grad_() for t in (value, loc, weights)]
    out = deformops.multi_scale_deformable_attention(tensors[0], shapes, starts, *tensors[1:])
    out.backward(torch.randn_like(out))


def run_all_cases() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for case in MSDA_CASES:
            msda_forward_backward(*msda_inputs(case, "cuda", dtype))
        # Non-finite attention weights: the backward must not add at corners it skips.
        msda_forward_backward(*msda_non_finite_inputs(dtype))
        # Locations off their pair alignment: per-element loads.
        value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", dtype)
        msda_forward_backward(value, shapes, starts, off_pair_alignment(loc), weights)
        for case in CONV_CASES:
            kwargs = conv_inputs(case, "cuda", dtype)
            for key in ("input", "offset", "weight", "mask", "bias"):
                if kwargs[key] is not None:
                    kwargs[key].requires_grad_()
            out = deformops.deform_conv2d(**kwargs)
            out.backward(torch.randn_like(out))
        for case in ROI_CASES:
            kwargs = roi_inputs(case, "cuda", dtype)
            kwargs["rois"][0, 0] = -1.0  # a bad batch index: skipped, never read
            for key in ("input", "offset"):
                if kwargs[key] is not None:
                    kwargs[key].requires_grad_()
            out = ops.deform_roi_pool(  # without the public checks, which reject index -1
                kwargs["input"],
                kwargs["rois"],
                kwargs["offset"],
                *kwargs["output_size"],
                kwargs["spatial_scale"],
                kwargs["sampling_ratio"],
                kwargs["gamma"],
            )
            if torch.are_deterministic_algorithms_enabled():
                continue  # its backward has no deterministic path (it raises)
            out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def main() -> None:
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        run_all_cases()
        print(f"sanitize cases (deterministic={deterministic}): done")


if __name__ == "__main__":
    main()
