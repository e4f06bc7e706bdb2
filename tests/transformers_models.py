"""Randomly initialised transformers models with multi-scale deformable attention, and their
forward + backward, for the tests of ``deformops.integrations.transformers`` (CPU, in
``tests/``) and its CUDA speed-up (``tests/gpu/``). No downloads: every config is built here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: Parameters of the deformable attention layers (transformers' names, as Deformable DETR's).
ATTENTION_PARAMETERS = (
    ".sampling_offsets.",
    ".attention_weights.",
    ".value_proj.",
    ".output_proj.",
)


@dataclasses.dataclass(frozen=True)
class Size:
    """Sizes of a model: ``layers`` encoder and decoder layers each (where both exist)."""

    d_model: int
    heads: int
    layers: int
    points: int
    queries: int
    ffn: int
    backbone: tuple[int, int, int, int]  # ResNet stage widths


TINY = Size(d_model=32, heads=2, layers=1, points=3, queries=10, ffn=32, backbone=(8, 16, 32, 64))
BENCH = Size(
    d_model=256, heads=8, layers=3, points=4, queries=300, ffn=1024, backbone=(16, 32, 64, 128)
)


def _resnet(transformers: Any, size: Size) -> Any:
    return transformers.ResNetConfig(
        embedding_size=size.backbone[0],
        hidden_sizes=list(size.backbone),
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )


def _deformable_detr(transformers: Any, size: Size) -> tuple[nn.Module, dict[str, Tensor]]:
    config = transformers.DeformableDetrConfig(
        backbone_config=_resnet(transformers, size),
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_ffn_dim=size.ffn,
        decoder_ffn_dim=size.ffn,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_n_points=size.points,
        decoder_n_points=size.points,
        num_queries=size.queries,
        two_stage=True,  # the decoder samples around boxes [..., 4]
        two_stage_num_proposals=size.queries,
        with_box_refine=True,
    )
    return transformers.DeformableDetrForObjectDetection(config), {}


def _mask2former(transformers: Any, size: Size) -> tuple[nn.Module, dict[str, Tensor]]:
    swin = transformers.SwinConfig(
        patch_size=4,
        embed_dim=size.backbone[0],
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin,
        feature_size=size.d_model,
        mask_feature_size=size.d_model,
        hidden_dim=size.d_model,
        encoder_feedforward_dim=size.ffn,
        dim_feedforward=size.ffn,
        encoder_layers=size.layers,
        decoder_layers=size.layers + 1,  # mask2former needs at least 2
        num_attention_heads=size.heads,
        num_queries=size.queries,
    )
    return transformers.Mask2FormerModel(config), {}


def _rt_detr(transformers: Any, size: Size) -> tuple[nn.Module, dict[str, Tensor]]:
    widths = list(size.backbone)
    backbone = transformers.RTDetrResNetConfig(
        embedding_size=widths[0],
        hidden_sizes=widths,
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = transformers.RTDetrConfig(
        backbone_config=backbone,
        encoder_hidden_dim=size.d_model,
        encoder_in_channels=widths[1:],
        encoder_ffn_dim=size.ffn,
        encoder_attention_heads=size.heads,
        d_model=size.d_model,
        decoder_in_channels=[size.d_model] * 3,
        decoder_ffn_dim=size.ffn,
        decoder_layers=size.layers,
        decoder_attention_heads=size.heads,
        decoder_n_points=size.points,
        num_feature_levels=3,
        num_queries=size.queries,
        num_denoising=0,
    )
    return transformers.RTDetrModel(config), {}


def _grounding_dino(transformers: Any, size: Size) -> tuple[nn.Module, dict[str, Tensor]]:
    text = transformers.BertConfig(
        vocab_size=50,
        hidden_size=size.d_model,
        num_hidden_layers=1,
        num_attention_heads=size.heads,
        intermediate_size=size.ffn,
    )
    config = transformers.GroundingDinoConfig(
        backbone_config=_resnet(transformers, size),
        text_config=text,
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_ffn_dim=size.ffn,
        decoder_ffn_dim=size.ffn,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_n_points=size.points,
        decoder_n_points=size.points,
        num_queries=size.queries,
        max_text_len=16,
    )
    input_ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    return transformers.GroundingDinoModel(config), {"input_ids": input_ids}


Builder = Callable[[Any, Size], tuple[nn.Module, dict[str, Tensor]]]

#: name: (builder, deformable attention layers per ``Size.layers``).
MODELS: dict[str, tuple[Builder, int]] = {
    "deformable_detr": (_deformable_detr, 2),  # encoder and decoder
    "mask2former": (_mask2former, 1),  # pixel decoder
    "rt_detr": (_rt_detr, 1),  # decoder
    "grounding_dino": (_grounding_dino, 2),  # encoder and decoder
}


def build(
    transformers: Any,
    name: str,
    size: Size,
    pixel_values: Tensor,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """The model ``name`` in ``pixel_values``' dtype and device, ready to compare, and its
    other inputs.

    The offset predictors are randomised: as initialised they put every sample a whole
    number of pixels from a pixel centre, where bilinear sampling has a kink whose one-sided
    gradient rounding decides (grid_sample and deformops may decide differently). The
    batch norms get scale 1 and the statistics of ``pixel_values``: transformers
    initialises RT-DETR's scales as N(0, 0.02) with running statistics (0, 1), which shrinks
    activations layer after layer (to 1e-16). Then eval mode.
    """
    builder, _ = MODELS[name]
    model, extra = builder(transformers, size)
    model = model.to(pixel_values)
    extra = {key: value.to(pixel_values.device) for key, value in extra.items()}
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".sampling_offsets." in key:
                parameter.add_(0.1 * torch.randn_like(parameter))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
            module.momentum = None  # cumulative average: the statistics of this batch
    model.train()
    with torch.no_grad():
        model(pixel_values=pixel_values, **extra)
    return model.eval(), extra


def attention_layers(name: str, size: Size) -> int:
    """The number of deformable attention calls in one forward of the model."""
    return MODELS[name][1] * size.layers


def floating_tensors(output: Any) -> list[Tensor]:
    """Every floating tensor of a (nested) model output, in order."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in floating_tensors(item)]
    return []


def forward_backward(
    model: nn.Module, pixel_values: Tensor, extra: dict[str, Tensor]
) -> tuple[list[Tensor], dict[str, Tensor | None]]:
    """The model's floating outputs and the gradients of a fixed random projection of them
    (non-finite outputs, such as masked logits, left out), for the pixels and every
    parameter."""
    model.zero_grad(set_to_none=True)
    pixels = pixel_values.detach().requires_grad_()
    outputs = floating_tensors(model(pixel_values=pixels, **extra))
    generator = torch.Generator().manual_seed(3)
    loss = sum(
        (out.nan_to_num(0.0, 0.0, 0.0) * torch.randn(out.shape, generator=generator).to(out)).sum()
        for out in outputs
    )
    loss.backward()
    grads = {"pixel_values": pixels.grad} | {name: p.grad for name, p in model.named_parameters()}
    return [out.detach() for out in outputs], grads


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Relative error (norm) of the finite elements; the others must be equal."""
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite)
    assert torch.equal(actual[~finite], expected[~finite])
    actual, expected = actual[finite].double(), expected[finite].double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def largest_errors(
    before: tuple[list[Tensor], dict[str, Tensor | None]],
    after: tuple[list[Tensor], dict[str, Tensor | None]],
) -> tuple[float, float, str]:
    """The largest relative error of the outputs, that of the gradients and whose gradient
    it is, of ``after`` against ``before`` (results of :func:`forward_backward`).

    Gradients of the attention's own parameters and of the pixels (which pass through
    every layer) are measured against their own norm; the others against the largest
    gradient, since some are zero up to rounding (a bias followed by a normalisation).
    """
    (outputs, grads), (outputs_after, grads_after) = before, after
    assert len(outputs_after) == len(outputs) > 0
    output_error = 0.0
    for a, b in zip(outputs_after, outputs, strict=True):
        assert a.shape == b.shape
        output_error = max(output_error, relative_error(a, b))
    assert grads_after.keys() == grads.keys()
    largest = max(g.norm().item() for g in grads.values() if g is not None)
    grad_error, worst = 0.0, ""
    for key, grad in grads.items():
        assert (grad is None) == (grads_after[key] is None), key
        if grad is None:
            continue
        own = key == "pixel_values" or any(name in key for name in ATTENTION_PARAMETERS)
        scale = grad.norm().item() if own else largest
        assert scale > 0, f"the gradient of {key} is zero"
        error = (grads_after[key].double() - grad.double()).norm().item() / scale
        if error >= grad_error:
            grad_error, worst = error, key
    return output_error, grad_error, worst
