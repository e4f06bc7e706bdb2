// Launchers of the CUDA deformable RoI pooling kernels (geometry: roi_pool.h).
// Torch-free: raw device pointers, sizes and a cudaStream_t; host-only header,
// included by the CUDA binding (bindings_cuda.cpp) and by deform_roi_pool.cu.
//
// Layouts (all contiguous, row-major):
//   input        [N, C, H, W]          V
//   rois         [K, 5]                A, rows (batch index, x1, y1, x2, y2)
//   offset       [K, 2, out_h, out_w]  A, or null (no offsets)
//   output       [K, C, out_h, out_w]  V
// V is __half, __nv_bfloat16, float or double; A = roi_pool_acc_t<V> is the type
// the kernels compute in (float; double for double).
//
// The launchers enqueue work on `stream` and never synchronise with the host;
// they return cudaSuccess, cudaErrorInvalidValue for a negative size, or the
// error of a failed launch. Indices are 64-bit (32-bit only where the number of
// output elements allows). A RoI whose batch index is not in [0, N), or whose
// coordinates are not finite, is skipped: it pools zeros and takes no gradient,
// so that no input makes a kernel read or write outside its buffers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "sizes.h"

namespace deformops::gpu {

// The type the kernels compute elements of type V in.
template <typename V>
using roi_pool_acc_t = std::conditional_t<std::is_same_v<V, double>, double, float>;

// output = the deformable RoI pooling of input (one thread per output element).
template <typename V>
cudaError_t deform_roi_pool_forward(const RoiPoolSizes& s, const V* input,
                                    const roi_pool_acc_t<V>* rois,
                                    const roi_pool_acc_t<V>* offset, V* output,
                                    cudaStream_t stream);

// The backward of deform_roi_pool_forward given grad_output [K, C, out_h, out_w]
// (V): adds the input gradient into grad_input [N, C, H, W] and, when `offset`
// is not null, the offset gradient into grad_offset [K, 2, out_h, out_w], both
// of type A and zero-initialised by the caller. The adds are atomic, so the
// order of the sums (and their rounding) varies from run to run.
template <typename V>
cudaError_t deform_roi_pool_backward(const RoiPoolSizes& s, const V* grad_output, const V* input,
                                     const roi_pool_acc_t<V>* rois,
                                     const roi_pool_acc_t<V>* offset,
                                     roi_pool_acc_t<V>* grad_input,
                                     roi_pool_acc_t<V>* grad_offset, cudaStream_t stream);

}  // namespace deformops::gpu
