"""transformers models on CUDA before and after ``deformops.integrations.transformers.patch()``:
outputs and gradients as accurate (against float64), and the speed-up of one forward +
backward, printed.

Models of ``transformers_models.BENCH`` size (d_model 256, 8 heads, 4 points, 3 layers,
300 queries; small ResNet/Swin backbones so that the attention weighs), batch 2 of
512x512 images, float32 without TF32. Unpatched, transformers runs its pure-PyTorch
``grid_sample`` formulation. The table shows with ``pytest -q tests/gpu`` (about 20 s); the
CPU equality tests are ``tests/test_integration_transformers.py``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import transformers_models as models

from deformops.integrations import transformers as hf_integration

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)

WARMUP, RUNS = 3, 10


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _strict_float32_unpatched() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf_integration.unpatch()
    torch.manual_seed(0)
    yield
    hf_integration.unpatch()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _median_ms(step: Callable[[], None]) -> float:
    """Median CUDA-event time of ``step`` over ``RUNS`` calls, after ``WARMUP``."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_patched_model_as_accurate_and_speed_up(
    name: str, transformers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pixel_values = torch.randn(2, 3, 512, 512, device="cuda")
    model, extra = models.build(transformers, name, models.BENCH, pixel_values)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        outputs = models.floating_tensors(model(pixel_values=pixel_values, **extra))
        sum(out.nan_to_num(0.0, 0.0, 0.0).sum() for out in outputs).backward()

    unpatched = models.forward_backward(model, pixel_values, extra)
    unpatched_ms = _median_ms(step)
    hf_integration.patch()
    patched = models.forward_backward(model, pixel_values, extra)
    patched_ms = _median_ms(step)
    hf_integration.unpatch()
    # The float32 gradients of the offset predictors of the later layers are ill-conditioned
    # (1e-3 relative error either way): both runs are measured against float64.
    reference = models.forward_backward(model.double(), pixel_values.double(), extra)
    unpatched_errors = models.largest_errors(reference, unpatched)
    patched_errors = models.largest_errors(reference, patched)

    with capsys.disabled():
        print(
            f"\n{name} ({models.attention_layers(name, models.BENCH)} attention layers): "
            f"forward+backward {unpatched_ms:.2f} ms unpatched (grid_sample), {patched_ms:.2f} ms "
            f"patched (deformops), speed-up {unpatched_ms / patched_ms:.2f}x; relative error "
            f"against float64, outputs / gradients: unpatched {unpatched_errors[0]:.1e} / "
            f"{unpatched_errors[1]:.1e}, patched {patched_errors[0]:.1e} / {patched_errors[1]:.1e}"
        )
    for which in (0, 1):  # outputs, gradients
        assert patched_errors[which] <= 2 * unpatched_errors[which] + 1e-6, patched_errors[2]
