// The CUDA library of deformops: CUDA kernels for the deformops_native operators,
// whose schemas the CPU library (bindings.cpp, loaded first) defines. This file
// handles tensors only (device guard, current stream, contiguity, allocation, dtype
// mapping); the kernels and their launchers are torch-free (cuda/msda.h).
//
// Environment: DEFORMOPS_MSDA_HALF_GRAD chooses how msda_backward accumulates the
// value gradient of float16 / bfloat16 values (read at every call):
//   "fp32"   - float32 atomics into a float32 buffer of value's size, rounded once
//              at the end (accurate; 4 extra bytes per value element while the
//              backward runs);
//   "direct" - atomics straight into the half-precision gradient (no extra memory;
//              each add rounds, so the error grows with the samples per element);
//   unset or "auto" - the default: "fp32" for bfloat16 and "direct" for float16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "cuda/msda.h"

namespace deformops_native {
namespace {

namespace gpu = deformops::gpu;

gpu::Dtype launcher_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::Dtype::kFloat32;
    case at::kHalf:
      return gpu::Dtype::kFloat16;
    case at::kBFloat16:
      return gpu::Dtype::kBFloat16;
    case at::kDouble:
      return gpu::Dtype::kFloat64;
    default:
      TORCH_CHECK(false, "deformops: ", what, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "deformops: the CUDA kernels of ", what, " failed: ",
              cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

// Whether the value gradient of a half-precision value accumulates in a float32
// buffer (DEFORMOPS_MSDA_HALF_GRAD, see the file comment).
bool half_grad_in_float32(at::ScalarType dtype) {
  const char* setting = std::getenv("DEFORMOPS_MSDA_HALF_GRAD");
  const std::string mode = setting == nullptr ? "" : setting;
  if (mode.empty() || mode == "auto") {
    return dtype == at::kBFloat16;
  }
  TORCH_CHECK(mode == "fp32" || mode == "direct",
              "deformops: DEFORMOPS_MSDA_HALF_GRAD must be fp32, direct or auto, got '", mode,
              "'");
  return mode == "fp32";
}

// Checks what the kernels rely on (the Python layer has checked the rest) and
// gathers the contiguous inputs, on the value's device, for the launchers.
struct MsdaTensors {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  gpu::MsdaInputs inputs;
};

MsdaTensors msda_tensors(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  check_dim(value, 4, "value");
  check_dim(sampling_locations, 6, "sampling_locations");
  check_dim(attention_weights, 5, "attention_weights");
  check_dtype(spatial_shapes, at::kLong, "spatial_shapes");
  check_dtype(level_start_index, at::kLong, "level_start_index");
  check_same_device(sampling_locations, value, "sampling_locations");
  check_same_device(attention_weights, value, "attention_weights");
  const int64_t levels = sampling_locations.size(3);
  TORCH_CHECK(spatial_shapes.numel() == 2 * levels && level_start_index.numel() == levels,
              "deformops: spatial_shapes must be [L, 2] and level_start_index [L] with L = ",
              levels);
  MsdaTensors t;
  t.value = value.contiguous();
  t.spatial_shapes = spatial_shapes.to(value.device()).contiguous();
  t.level_start_index = level_start_index.to(value.device()).contiguous();
  t.sampling_locations = sampling_locations.contiguous();
  t.attention_weights = attention_weights.contiguous();
  gpu::MsdaInputs& in = t.inputs;
  in.sizes = {value.size(0),
              value.size(1),
              value.size(2),
              value.size(3),
              sampling_locations.size(1),
              levels,
              sampling_locations.size(4)};
  in.value_dtype = launcher_dtype(value, "value");
  in.locations_dtype = launcher_dtype(sampling_locations, "sampling_locations");
  in.weights_dtype = launcher_dtype(attention_weights, "attention_weights");
  for (const auto& [tensor, what] :
       {std::pair{&sampling_locations, "sampling_locations"},
        std::pair{&attention_weights, "attention_weights"}}) {
    TORCH_CHECK(tensor->scalar_type() == value.scalar_type() || tensor->scalar_type() == at::kFloat,
                "deformops: ", what, " must be ", value.scalar_type(), " or float32, got ",
                tensor->scalar_type());
  }
  in.value = t.value.const_data_ptr();
  in.spatial_shapes = t.spatial_shapes.const_data_ptr<int64_t>();
  in.level_start_index = t.level_start_index.const_data_ptr<int64_t>();
  in.sampling_locations = t.sampling_locations.const_data_ptr();
  in.attention_weights = t.attention_weights.const_data_ptr();
  return t;
}

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaTensors t = msda_tensors(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
  const gpu::MsdaSizes& s = t.inputs.sizes;
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  check_launch(gpu::msda_forward(t.inputs, output.mutable_data_ptr(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "msda_forward");
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaTensors t = msda_tensors(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
  const gpu::MsdaSizes& s = t.inputs.sizes;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
              "deformops: grad_output must be [N, Q, M*D] = ",
              at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}), ", got ",
              grad_output.sizes());
  check_dtype(grad_output, value.scalar_type(), "grad_output");
  check_same_device(grad_output, value, "grad_output");
  const at::Tensor grad_out = grad_output.contiguous();
  at::Tensor grad_value = at::empty_like(t.value);
  at::Tensor grad_locations = at::empty_like(t.sampling_locations);
  at::Tensor grad_weights = at::empty_like(t.attention_weights);
  const bool half = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  at::Tensor workspace;
  if (half && half_grad_in_float32(value.scalar_type())) {
    workspace = at::empty({gpu::msda_workspace_elements(s)}, value.options().dtype(at::kFloat));
  }
  const gpu::MsdaGrads grads{grad_value.mutable_data_ptr(), grad_locations.mutable_data_ptr(),
                             grad_weights.mutable_data_ptr(),
                             workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr};
  check_launch(gpu::msda_backward(t.inputs, grad_out.const_data_ptr(), grads,
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "msda_backward");
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(deformops_native, CUDA, m) {
  m.impl("msda_forward", &msda_forward_cuda);
  m.impl("msda_backward", &msda_backward_cuda);
}

}  // namespace deformops_native
