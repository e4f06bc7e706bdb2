// CUDA kernels of the deformable convolution's sampling half: the launchers.
// Torch-free: raw device pointers, sizes and a stream; each launcher returns the
// launch's error code (cudaSuccess when the kernel was queued).
//
// The weight contraction (GEMMs on the columns) runs on the host side, through
// cuBLAS; see deform_conv.cu for the layouts and the work decomposition.
//
// Element types V: __half, __nv_bfloat16, float, double; they are computed in
// float (double for double), the type of the input gradient's accumulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "sizes.h"

namespace deformops::gpu {

// The element type of the input gradient's accumulator for elements of type V.
template <typename V>
using conv_grad_t = std::conditional_t<std::is_same_v<V, double>, double, float>;

// A strided [N, channels, H_out, W_out] tensor of the convolution (offset, mask
// and their gradients), in any layout: contiguous, channels-last, or a channel
// slice of a larger tensor, read and written in place (element strides). V is
// const for inputs.
template <typename V>
struct Plane {
  V* data;  // null for an absent mask
  int64_t stride_n, stride_c, stride_h, stride_w;
};

// Largest chunk the kernels index: P * K * C (and P * C) below 2^31, so that
// positions inside a chunk are 32-bit (addresses in the tensors stay 64-bit).
constexpr int64_t kMaxChunkElements = (int64_t(1) << 31) - 1;

// Fills `columns` (see ConvChunk) with the bilinear samples of the
// channels-last `input` [N, H, W, C], times the mask when `mask.data` is not null.
template <typename V>
cudaError_t deform_conv_im2col(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                               const Plane<const V>& offset, const Plane<const V>& mask,
                               V* columns, cudaStream_t stream);

// Bytes of the workspace of deform_conv_col2im for the chunk (the samples filed
// by bilinear cell, a few ints and floats per sample and per cell; in
// deterministic mode also a sort's buffers, 8 more bytes per sample and scratch).
template <typename V>
size_t deform_conv_col2im_workspace(const ConvSizes& s, const ConvChunk& chunk,
                                    bool deterministic);

// The backward of deform_conv_im2col given `grad_columns` (columns layout):
// adds the input gradient into the channels-last `grad_input` [N, H, W, C]
// (zero-initialised by the caller; a gather, no atomics) and writes the chunk's
// pixels of `grad_offset` and, with a mask, `grad_mask`. It also writes
// `columns` as deform_conv_im2col does (from
// the same corner loads). `workspace` (16-byte aligned) holds at least
// deform_conv_col2im_workspace(s, chunk, deterministic) bytes. Every output but
// the input gradient is the same at every run; with `deterministic`, the input
// gradient is too (its sums run in sample order), at the cost of a sort.
template <typename V>
cudaError_t deform_conv_col2im(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                               const Plane<const V>& offset, const Plane<const V>& mask,
                               const V* grad_columns, V* columns, conv_grad_t<V>* grad_input,
                               const Plane<V>& grad_offset, const Plane<V>& grad_mask,
                               void* workspace, size_t workspace_bytes, bool deterministic,
                               cudaStream_t stream);

// dst[b][c][r] = src[b][r][c] for b < batch, r < rows, c < cols, converted to D
// (S = D, or S = float): the NCHW <-> channels-last conversions of
// the convolution's tensors.
template <typename S, typename D>
cudaError_t deform_conv_transpose(const S* src, D* dst, int64_t batch, int64_t rows, int64_t cols,
                                  cudaStream_t stream);

}  // namespace deformops::gpu
