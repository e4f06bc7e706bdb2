// CPU kernels of deformops: the bilinear sampling loops of the operators on raw
// pointers, parallel with at::parallel_for. The bindings (bindings.cpp) check and
// allocate the tensors, dispatch on dtypes and run the convolution's GEMMs.
//
// Element type T: float or double (the bindings convert half-precision tensors
// to float once, rather than every load converting again). Sizes and indices
// are 64-bit.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "sizes.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "deformops: torch parallelises with OpenMP; compile the CPU kernels with -fopenmp"
#endif

namespace deformops_native::cpu {

using deformops::ConvChunk;
using deformops::ConvSizes;
using deformops::MsdaSizes;
using deformops::RoiPoolSizes;

// The grain of at::parallel_for (the fewest iterations of one task) for a loop
// whose iterations each do about `work` elementary operations: about 32768
// operations a task.
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kTaskWork = 32768;
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work));
}

// output [N, Q, M*D] = for each head, the attention-weighted sum of the L*P
// bilinear samples. `spatial_shapes` [L, 2] holds (H_l, W_l), `level_start`
// [L] the flat spatial index of each level's first pixel; they may disagree with
// S (a corner outside [0, S) is skipped), but S must be positive.
template <typename T>
void msda_forward(const MsdaSizes& s, const T* value, const int64_t* spatial_shapes,
                  const int64_t* level_start, const T* locations, const T* attention, T* output);

// Gradients of msda_forward given `grad_output` [N, Q, M*D]: adds the value
// gradient into `grad_value` [N, S, M, D] (zero-initialised by the caller) and
// writes `grad_locations` and `grad_attention` (shapes of their inputs). S > 0.
template <typename T>
void msda_backward(const MsdaSizes& s, const T* grad_output, const T* value,
                   const int64_t* spatial_shapes, const int64_t* level_start, const T* locations,
                   const T* attention, T* grad_value, T* grad_locations, T* grad_attention);

// A strided [N, channels, H_out, W_out] tensor of the convolution (offset, mask
// and their gradients), in any layout: contiguous, channels-last, or a channel
// slice of a larger tensor, read and written in place. T is const for inputs.
template <typename T>
struct Plane {
  T* data;  // null for an absent mask
  int64_t stride_n, stride_c, stride_h, stride_w;

  // Element (n, c, h, w).
  T& at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return data[n * stride_n + c * stride_c + h * stride_h + w * stride_w];
  }
};

// Fills `columns` (see ConvChunk) with the bilinear samples of the channels-last
// `input` [N, H, W, C], times the mask when `mask.data` is not null.
template <typename T>
void deform_conv_im2col(const ConvSizes& s, const ConvChunk& chunk, const T* input,
                        const Plane<const T>& offset, const Plane<const T>& mask, T* columns);

// The backward of deform_conv_im2col given `grad_columns` (columns layout): adds
// the input gradient into the channels-last `grad_input` [N, H, W, C], writes
// the chunk's pixels of `grad_offset` and, with a mask, `grad_mask` (dense: no
// two elements share memory), and writes `columns` as deform_conv_im2col does
// (the weight gradient needs them; the samples are read once for both). Every result is the same from run to run; with
// `deterministic` it is also the same whatever the number of threads (the
// channels are split as for one thread, which leaves fewer tasks to share out
// when a chunk has fewer images than there are threads).
template <typename T>
void deform_conv_col2im(const ConvSizes& s, const ConvChunk& chunk, const T* input,
                        const Plane<const T>& offset, const Plane<const T>& mask,
                        const T* grad_columns, T* columns, T* grad_input,
                        const Plane<T>& grad_offset, const Plane<T>& grad_mask,
                        bool deterministic);

// Deformable RoI pooling (roi_pool.h) of the channels-last `input` [N, H, W, C]
// into `output` [K, C, out_h, out_w]; `rois` [K, 5], `offset` [K, 2, out_h,
// out_w] or null (no offsets). A RoI with a batch index outside [0, N) pools
// zeros. Parallel over bins, each written by one task.
template <typename T>
void deform_roi_pool_forward(const RoiPoolSizes& s, const T* input, const T* rois,
                             const T* offset, T* output);

// Gradients of deform_roi_pool_forward given `grad_output` laid out [K, out_h,
// out_w, C] (bins, then channels): adds the input gradient into the
// channels-last `grad_input` [N, H, W, C] (zero-initialised by the caller) and,
// when `offset` is not null, writes `grad_offset` [K, 2, out_h, out_w]. Every
// element is summed by one task in a fixed order: the results do not depend on
// the number of threads.
template <typename T>
void deform_roi_pool_backward(const RoiPoolSizes& s, const T* grad_output, const T* input,
                              const T* rois, const T* offset, T* grad_input, T* grad_offset);

}  // namespace deformops_native::cpu
