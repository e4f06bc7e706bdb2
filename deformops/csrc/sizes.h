// The sizes of one problem of each operator, shared by the kernels of every
// device and by the bindings. Torch-free: plain C++ that nvcc also compiles.
#pragma once

#include <cstdint>

namespace deformops {

// Sizes of a multi-scale deformable attention: value [N, S, M, D], sampling
// locations [N, Q, M, L, P, 2], attention weights [N, Q, M, L, P].
struct MsdaSizes {
  int64_t batch;     // N
  int64_t spatial;   // S = sum over levels of H_l * W_l
  int64_t heads;     // M
  int64_t channels;  // D, channels per head
  int64_t queries;   // Q
  int64_t levels;    // L
  int64_t points;    // P, sampling points per level
};

// Sizes of a deformable convolution: input [N, C, H, W] (read channels-last),
// offset [N, 2*G*K, H_out, W_out], mask [N, G*K, H_out, W_out], K = kernel_h *
// kernel_w kernel points, `groups` convolution groups and G = `offset_groups`.
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

// Sizes and parameters of a deformable RoI pooling: input [N, C, H, W], rois
// [K, 5] rows (batch index, x1, y1, x2, y2), offset [K, 2, out_h, out_w] and
// output [K, C, out_h, out_w].
struct RoiPoolSizes {
  int64_t batch, channels, height, width;
  int64_t rois;  // K
  int64_t out_height, out_width;
  int64_t sampling_ratio;  // samples per bin side; <= 0: ceil(RoI side / bins)
  double spatial_scale;    // input coordinates per RoI coordinate
  double gamma;            // scale of the offsets
};

// A chunk of the convolution: the output rows [row_begin, row_end) of the
// flattened (n, h_out) rows, that is P = (row_end - row_begin) * W_out output
// pixels p = (row - row_begin) * W_out + w_out.
//
// Columns layout: [P, groups, K, C/groups] (row p holds K*C elements), so that
// the columns of group g are the [P, K*C/groups] matrix at column offset
// g*K*C/groups, to be contracted with the group's weight laid out
// [C_out/groups, K, C/groups].
struct ConvChunk {
  int64_t row_begin;
  int64_t row_end;
};

}  // namespace deformops
