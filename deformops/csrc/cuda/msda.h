// Launchers of the CUDA multi-scale deformable attention (MSDA) kernels.
// Torch-free: raw device pointers, sizes and a cudaStream_t; host-only header,
// included by the CUDA binding (bindings_cuda.cpp) and by the kernels' .cu files.
//
// Layouts (all tensors contiguous, row-major):
//   value               [N, S, M, D]        value_dtype
//   spatial_shapes      [L, 2]              int64 (H_l, W_l), on the device
//   level_start_index   [L]                 int64, on the device
//   sampling_locations  [N, Q, M, L, P, 2]  locations_dtype, normalised (x, y)
//   attention_weights   [N, Q, M, L, P]     weights_dtype
//   output              [N, Q, M*D]         value_dtype
// locations_dtype and weights_dtype are each value_dtype or kFloat32.
//
// The launchers enqueue work on `stream` and never synchronise with the host.
// They return cudaSuccess, cudaErrorInvalidValue for an unsupported dtype
// combination, a negative size, S >= 2^32 or M * D >= 2^32 (element offsets are
// 64-bit; positions and rows are 32-bit factors), or the error of a failed
// launch (cudaGetLastError after it). Every sampled corner whose flat index
// (level start + y * W_l + x) lies outside [0, S) is skipped, so no input makes
// them read or write out of bounds, even when spatial_shapes and
// level_start_index disagree with S.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sizes.h"

namespace deformops::gpu {

enum class Dtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// The inputs of the forward, which the backward also reads.
struct MsdaInputs {
  MsdaSizes sizes;
  Dtype value_dtype;
  Dtype locations_dtype;
  Dtype weights_dtype;
  const void* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const void* sampling_locations;
  const void* attention_weights;
};

// The outputs of the backward. Each is written entirely (no need to zero it).
struct MsdaGrads {
  void* grad_value;               // [N, S, M, D], value_dtype
  void* grad_sampling_locations;  // [N, Q, M, L, P, 2], locations_dtype, aligned to a pair
  void* grad_attention_weights;   // [N, Q, M, L, P], weights_dtype
  // How the value gradient of half-precision values (kFloat16, kBFloat16) is
  // accumulated over the samples that touch an element:
  //  - null: atomic adds straight into grad_value, in half precision (no extra
  //    memory; rounding error grows with the number of samples per element);
  //  - else: a float32 buffer of N*S*M*D elements (msda_workspace_elements),
  //    accumulated with float32 atomics, then rounded into grad_value (one
  //    rounding per element; 4 bytes per element of extra memory).
  // Ignored for float32 and float64 values (their atomics are in their own type).
  float* grad_value_workspace;
  // Deterministic mode: the value gradient is not scattered with atomics but
  // gathered, every sum in a fixed order, so that every output is the same at
  // every run (see msda_kernels.cuh). It needs `gather_workspace`, 16-byte
  // aligned, of msda_gather_workspace_bytes(sizes, value_dtype) bytes (given in
  // `gather_workspace_bytes`); grad_value_workspace is then ignored.
  bool deterministic;
  void* gather_workspace;
  size_t gather_workspace_bytes;
};

// output = MSDA(inputs).
cudaError_t msda_forward(const MsdaInputs& inputs, void* output, cudaStream_t stream);

// Gradients of msda_forward with respect to value, sampling_locations and
// attention_weights, given grad_output [N, Q, M*D] in value_dtype.
cudaError_t msda_backward(const MsdaInputs& inputs, const void* grad_output,
                          const MsdaGrads& grads, cudaStream_t stream);

// Bytes of the gather_workspace of the deterministic backward: about 48 bytes
// (80 for float64) per sample of up to 2^23 samples (at least one image's
// samples) and 8 bytes per cell, 2 * (S + L) cells per (n, m) of as many images.
// 0 when an image has 2^31 samples or cells or more (unsupported).
size_t msda_gather_workspace_bytes(const MsdaSizes& sizes, Dtype value_dtype);

// Number of float32 elements a grad_value_workspace must hold: N*S*M*D.
inline int64_t msda_workspace_elements(const MsdaSizes& s) {
  return s.batch * s.spatial * s.heads * s.channels;
}

}  // namespace deformops::gpu
