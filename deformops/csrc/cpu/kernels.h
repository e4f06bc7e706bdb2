// CPU kernels of deformops: the bilinear sampling loops of both operators on raw
// pointers, parallel with at::parallel_for. The bindings (bindings.cpp) check and
// allocate the tensors, dispatch on dtypes and run the convolution's GEMMs.
//
// Element types: V is the storage type of the sampled data (at::Half,
// at::BFloat16, float or double) and acc_t<V> the type it is computed in (float
// for the half types); MSDA's locations (L) and attention weights (A) are stored
// in V or in float. Sizes and indices are 64-bit.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "deformops: torch parallelises with OpenMP; compile the CPU kernels with -fopenmp"
#endif

namespace deformops_native::cpu {

template <typename T>
using acc_t = at::opmath_type<T>;

// Sizes of a multi-scale deformable attention: value [N, S, M, D], sampling
// locations [N, Q, M, L, P, 2], attention weights [N, Q, M, L, P].
struct MsdaSizes {
  int64_t batch;     // N
  int64_t spatial;   // S
  int64_t heads;     // M
  int64_t channels;  // D
  int64_t queries;   // Q
  int64_t levels;    // L
  int64_t points;    // P
};

// output [N, Q, M*D] = for each head, the attention-weighted sum of the L*P
// bilinear samples. `spatial_shapes` [L, 2] holds (H_l, W_l), `level_start`
// [L] the flat spatial index of each level's first pixel.
template <typename V, typename L, typename A>
void msda_forward(const MsdaSizes& s, const V* value, const int64_t* spatial_shapes,
                  const int64_t* level_start, const L* locations, const A* attention,
                  V* output);

// Gradients of msda_forward given `grad_output` [N, Q, M*D]: adds the value
// gradient into `grad_value` [N, S, M, D] (zero-initialised by the caller) and
// writes `grad_locations` and `grad_attention` (shapes of their inputs).
template <typename V, typename L, typename A>
void msda_backward(const MsdaSizes& s, const V* grad_output, const V* value,
                   const int64_t* spatial_shapes, const int64_t* level_start, const L* locations,
                   const A* attention, acc_t<V>* grad_value, L* grad_locations,
                   A* grad_attention);

// Sizes of a deformable convolution: input [N, C, H, W] (read channels-last),
// offset [N, 2*G*K, H_out, W_out], mask [N, G*K, H_out, W_out], K = kh*kw kernel
// points, `groups` convolution groups and G = `offset_groups`.
struct ConvSizes {
  int64_t batch, channels, height, width;
  int64_t out_height, out_width;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t groups;
  int64_t offset_groups;
};

// A chunk of the convolution: the output rows [row_begin, row_end) of the
// flattened (n, h_out) rows, that is P = (row_end - row_begin) * W_out output
// pixels p = (row - row_begin) * W_out + w_out.
//
// Columns layout: [P, groups, K, C/groups], so that the columns of group g are
// the [P, K*C/groups] matrix at column offset g*K*C/groups (row stride K*C), to
// be contracted with the group's weight laid out [C_out/groups, K, C/groups].
struct ConvChunk {
  int64_t row_begin;
  int64_t row_end;
};

// Fills `columns` (see ConvChunk) with the bilinear samples of the channels-last
// `input` [N, H, W, C], times the mask when `mask` is not null.
template <typename V>
void deform_conv_im2col(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                        const V* offset, const V* mask, acc_t<V>* columns);

// The backward of deform_conv_im2col given `grad_columns` (columns layout): adds
// the input gradient into the channels-last `grad_input` [N, H, W, C] and writes
// the chunk's pixels of `grad_offset` and, when `mask` is not null, `grad_mask`
// (layouts of offset and mask).
template <typename V>
void deform_conv_col2im(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                        const V* offset, const V* mask, const acc_t<V>* grad_columns,
                        acc_t<V>* grad_input, V* grad_offset, V* grad_mask);

}  // namespace deformops_native::cpu
