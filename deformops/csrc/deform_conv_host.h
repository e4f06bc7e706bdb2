// The deformable convolution's host side, shared by every device: argument
// checks, layouts, the loop over chunks of output rows with one bounded columns
// buffer, and the weight contraction as GEMMs through ATen (cuBLAS on CUDA, so
// tensor cores, with float32 following torch.backends.cuda.matmul.allow_tf32),
// around a device's two sampling kernels.
//
// A device provides a `Kernels` type (sizes and chunks are those of sizes.h):
//   static constexpr int64_t kColumnsBudgetBytes;  // most bytes of one chunk's columns
//   template <typename V> static at::ScalarType compute_type();  // see below
//   template <typename V> static void im2col(sizes, chunk, input, offset, mask, columns);
//   template <typename V> static void col2im(sizes, chunk, input, offset, mask,
//                                            grad_columns, columns, grad_input,
//                                            grad_offset, grad_mask);
//   static at::Tensor to_layout(t, dtype, memory_format);  // t in that dtype and format
//   static void gemm(c, a, b, beta);  // c = a x b + beta * c (beta 0 or 1), see below
// with the tensors of the kernels (cpu/kernels.h, cuda/deform_conv.h): input (channels-last),
// offset, mask, columns [P, K*C], grad_offset and grad_mask in compute_type<V>()
// (V itself on CUDA; float for the half types on the CPU), grad_input
// [N, H, W, C] in acc_t<V>; mask and grad_mask undefined without a mask; col2im
// also writes the columns. The kernels read offset and mask, and write their
// gradients, through their strides (any layout: a channels-last model's offsets,
// a channel slice of the offset predictor's output), so none is copied for
// its layout; their gradients come back dense in the offset's and mask's layout.
//
// gemm's matrices are 2-d views: c with unit column stride, a and b with a unit
// stride in either dimension (a transposed view is not copied); c is of a's type,
// or float32 where a and b are of a half type (the weight gradient's sum: the
// products are summed in float32 by the GEMM itself).
//
// Output and output gradient are handled as channels-last pixel rows
// [N * H_out * W_out, C_out], so that each chunk takes one GEMM per group (a
// contiguous tensor costs one transposing copy). Forward, per chunk: im2col,
// then output rows = columns x weight^T (+ bias). Backward, per chunk:
// grad_columns = grad_out x weight, then col2im, which samples the input again
// (nothing is kept from the forward) and writes the columns too, then
// grad_weight += grad_out^T x columns. Accumulations are in float32 (float64).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "sampling.h"

namespace deformops_native {
namespace conv_host {

inline void check_conv(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                       const at::Tensor& mask, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  check_dim(input, 4, "input");
  check_dim(offset, 4, "offset");
  check_dim(weight, 4, "weight");
  TORCH_CHECK(stride_h > 0 && stride_w > 0 && dilation_h > 0 && dilation_w > 0 && pad_h >= 0 &&
                  pad_w >= 0,
              "deformops: stride and dilation must be positive and padding non-negative");
  for (const at::Tensor* t : {&offset, &weight, &mask}) {
    if (t->defined()) {
      check_dtype(*t, input.scalar_type(), "offset, weight and mask");
      check_same_device(*t, input, "offset, weight and mask");
    }
  }
  const int64_t c_in = input.size(1);
  const int64_t c_per_group = weight.size(1);
  const int64_t kernel_points = weight.size(2) * weight.size(3);
  TORCH_CHECK(c_per_group > 0 && c_in >= c_per_group && c_in % c_per_group == 0 &&
                  weight.size(0) % (c_in / c_per_group) == 0,
              "deformops: weight must be [C_out, C_in/groups, kh, kw] with groups dividing C_in "
              "and C_out, got ",
              weight.sizes(), " for C_in = ", c_in);
  TORCH_CHECK(kernel_points > 0 && offset.size(1) > 0 &&
                  offset.size(1) % (2 * kernel_points) == 0 &&
                  c_in % (offset.size(1) / (2 * kernel_points)) == 0,
              "deformops: offset must be [N, 2*G*kh*kw, H_out, W_out] with G dividing C_in, got ",
              offset.sizes());
  const int64_t h_out =
      deformops::conv_out_size(input.size(2), weight.size(2), stride_h, pad_h, dilation_h);
  const int64_t w_out =
      deformops::conv_out_size(input.size(3), weight.size(3), stride_w, pad_w, dilation_w);
  TORCH_CHECK(offset.size(0) == input.size(0) && offset.size(2) == h_out && offset.size(3) == w_out,
              "deformops: offset must be [N, 2*G*kh*kw, H_out, W_out] with N = ", input.size(0),
              ", H_out = ", h_out, ", W_out = ", w_out, ", got ", offset.sizes());
  if (mask.defined()) {
    TORCH_CHECK(mask.sizes() == at::IntArrayRef({input.size(0), offset.size(1) / 2, h_out, w_out}),
                "deformops: mask must be [N, G*kh*kw, H_out, W_out] = ",
                at::IntArrayRef({input.size(0), offset.size(1) / 2, h_out, w_out}), ", got ",
                mask.sizes());
  }
}

inline ConvSizes conv_sizes(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                 int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                 int64_t dilation_h, int64_t dilation_w) {
  const int64_t kernel_points = weight.size(2) * weight.size(3);
  return ConvSizes{input.size(0),
               input.size(1),
               input.size(2),
               input.size(3),
               offset.size(2),
               offset.size(3),
               weight.size(2),
               weight.size(3),
               stride_h,
               stride_w,
               pad_h,
               pad_w,
               dilation_h,
               dilation_w,
               input.size(1) / weight.size(1),
               offset.size(1) / (2 * kernel_points)};
}

// Output rows (n, h_out) in the fewest chunks whose columns hold at most
// `budget` elements (at least one row each), of equal sizes (but the last).
inline std::vector<ConvChunk> conv_chunks(const ConvSizes& s, int64_t budget) {
  const int64_t rows = s.batch * s.out_height;
  const int64_t per_row = s.out_width * s.kernel_h * s.kernel_w * s.channels;
  const int64_t most = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_row));
  const int64_t count = (rows + most - 1) / most;
  const int64_t step = count == 0 ? 1 : (rows + count - 1) / count;
  std::vector<ConvChunk> chunks;
  for (int64_t r = 0; r < rows && s.out_width > 0; r += step) {
    chunks.push_back(ConvChunk{r, std::min(rows, r + step)});
  }
  return chunks;
}

inline int64_t chunk_pixels(const ConvSizes& s, const ConvChunk& chunk) {
  return (chunk.row_end - chunk.row_begin) * s.out_width;
}

// `t` [N, C, H_out, W_out] as the [N * H_out * W_out, C] matrix of its pixels'
// channels (channels-last), in `dtype`: a view when `t` is channels-last and of
// that type, else a copy.
template <typename Kernels>
at::Tensor pixel_rows(const at::Tensor& t, at::ScalarType dtype) {
  return Kernels::to_layout(t, dtype, at::MemoryFormat::ChannelsLast)
      .permute({0, 2, 3, 1})
      .view({-1, t.size(1)});
}

// The chunk's rows of a pixel_rows matrix.
inline at::Tensor chunk_rows(const ConvSizes& s, const ConvChunk& chunk, const at::Tensor& rows) {
  return rows.narrow(0, chunk.row_begin * s.out_width, chunk_pixels(s, chunk));
}

// The weight [C_out, C/groups, kh, kw] as the [C_out, K * C/groups] matrix
// matching the columns layout (kernel point major, channel minor), in `dtype`.
inline at::Tensor weight_matrix(const at::Tensor& weight, at::ScalarType dtype) {
  return weight.to(dtype).permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
}

// Group g of `groups` equal slices of `t` along dimension `dim` (`t` itself for one
// group: no narrow, whose dispatch costs host time on every chunk).
inline at::Tensor group_slice(const at::Tensor& t, int64_t dim, int64_t groups, int64_t g) {
  if (groups == 1) {
    return t;
  }
  const int64_t size = t.size(dim) / groups;
  return t.narrow(dim, g * size, size);
}

template <typename Kernels>
at::Tensor forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                   int64_t dilation_h, int64_t dilation_w) {
  check_conv(input, offset, weight, mask.value_or(at::Tensor()), stride_h, stride_w, pad_h,
             pad_w, dilation_h, dilation_w);
  const ConvSizes s = conv_sizes(input, offset, weight, stride_h, stride_w, pad_h, pad_w,
                                    dilation_h, dilation_w);
  const int64_t c_out = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dtype(*bias, input.scalar_type(), "bias");
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({c_out}), "deformops: bias must be [C_out] = [",
                c_out, "], got ", bias->sizes());
  }
  at::Tensor output;
  dispatch_floating(input.scalar_type(), "input", [&](auto tag) {
    using V = typename decltype(tag)::type;
    const at::ScalarType compute = Kernels::template compute_type<V>();
    // The output's pixel rows [N * H_out * W_out, C_out], channels-last.
    const at::Tensor rows = at::empty({s.batch * s.out_height * s.out_width, c_out},
                                      input.options().dtype(compute));
    output = rows.view({s.batch, s.out_height, s.out_width, c_out}).permute({0, 3, 1, 2});
    const std::vector<ConvChunk> chunks = conv_chunks(
        s, Kernels::kColumnsBudgetBytes / c10::elementSize(compute));
    if (chunks.empty() || c_out == 0) {
      return;
    }
    const at::Tensor in = Kernels::to_layout(input, compute, at::MemoryFormat::ChannelsLast);
    const at::Tensor off = in_dtype(offset, compute);
    const at::Tensor msk = in_dtype_or_undefined(mask, compute);
    const at::Tensor w = weight_matrix(weight, compute);
    const at::Tensor b = has_bias ? bias->to(compute) : at::Tensor();
    const at::Tensor buffer = at::empty({chunk_pixels(s, chunks.front()), w.size(1) * s.groups},
                                        in.options().dtype(compute));
    if (b.defined()) {
      rows.copy_(b);  // every row starts as the bias; the products are added to it
    }
    const double beta = b.defined() ? 1.0 : 0.0;
    for (const ConvChunk& chunk : chunks) {
      const at::Tensor columns = buffer.narrow(0, 0, chunk_pixels(s, chunk));
      Kernels::template im2col<V>(s, chunk, in, off, msk, columns);
      const at::Tensor out = chunk_rows(s, chunk, rows);
      for (int64_t g = 0; g < s.groups; ++g) {
        Kernels::gemm(group_slice(out, 1, s.groups, g), group_slice(columns, 1, s.groups, g),
                      group_slice(w, 0, s.groups, g).t(), beta);
      }
    }
  });
  return Kernels::to_layout(output, input.scalar_type(), output_memory_format(input));
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  check_conv(input, offset, weight, mask.value_or(at::Tensor()), stride_h, stride_w, pad_h,
             pad_w, dilation_h, dilation_w);
  const ConvSizes s = conv_sizes(input, offset, weight, stride_h, stride_w, pad_h, pad_w,
                                    dilation_h, dilation_w);
  const int64_t c_out = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, c_out, s.out_height, s.out_width}),
              "deformops: grad_output must be [N, C_out, H_out, W_out], got ", grad_output.sizes());
  check_dtype(grad_output, input.scalar_type(), "grad_output");
  check_same_device(grad_output, input, "grad_output");
  at::Tensor grad_input;
  at::Tensor grad_offset;
  at::Tensor grad_mask = at::empty({0}, input.options());
  at::Tensor grad_weight;
  dispatch_floating(input.scalar_type(), "input", [&](auto tag) {
    using V = typename decltype(tag)::type;
    const at::ScalarType compute = Kernels::template compute_type<V>();
    const at::Tensor in = Kernels::to_layout(input, compute, at::MemoryFormat::ChannelsLast);
    const at::Tensor off = in_dtype(offset, compute);
    const at::Tensor msk = in_dtype_or_undefined(mask, compute);
    // Two buffers (columns and their gradient) share the budget.
    const std::vector<ConvChunk> chunks = conv_chunks(
        s, Kernels::kColumnsBudgetBytes / (2 * c10::elementSize(compute)));
    const bool sampled = !chunks.empty() && c_out > 0;
    // col2im writes every offset and mask gradient, and the first chunk's GEMM
    // the whole weight gradient: zeros only where no chunk runs.
    const auto written = [sampled](const at::Tensor& t) {
      return sampled ? at::empty_like(t) : at::zeros_like(t);
    };
    const at::Tensor grad_off = written(off);
    const at::Tensor grad_msk = msk.defined() ? written(msk) : at::Tensor();
    const at::TensorOptions acc = in.options().dtype(c10::CppTypeToScalarType<acc_t<V>>::value);
    // Channels-last [N, H, W, C] (summed into chunk by chunk); [C_out, K * C/groups]
    // like the weight matrix.
    const at::Tensor grad_in = at::zeros({s.batch, s.height, s.width, s.channels}, acc);
    const std::vector<int64_t> w_sizes{c_out, weight.size(1) * s.kernel_h * s.kernel_w};
    const at::Tensor grad_w = sampled ? at::empty(w_sizes, acc) : at::zeros(w_sizes, acc);
    if (sampled) {
      const at::Tensor w = weight_matrix(weight, compute);
      const at::Tensor grad_rows = pixel_rows<Kernels>(grad_output, compute);
      const at::Tensor buffers = at::empty(
          {2, chunk_pixels(s, chunks.front()), w.size(1) * s.groups},
          in.options().dtype(compute));
      for (const ConvChunk& chunk : chunks) {
        const at::Tensor columns = buffers[0].narrow(0, 0, chunk_pixels(s, chunk));
        const at::Tensor grad_columns = buffers[1].narrow(0, 0, chunk_pixels(s, chunk));
        const at::Tensor grad_out = chunk_rows(s, chunk, grad_rows);
        for (int64_t g = 0; g < s.groups; ++g) {
          Kernels::gemm(group_slice(grad_columns, 1, s.groups, g),
                        group_slice(grad_out, 1, s.groups, g), group_slice(w, 0, s.groups, g),
                        0.0);
        }
        Kernels::template col2im<V>(s, chunk, in, off, msk, grad_columns, columns, grad_in,
                                    grad_off, grad_msk);
        const double beta = &chunk == &chunks.front() ? 0.0 : 1.0;
        for (int64_t g = 0; g < s.groups; ++g) {
          Kernels::gemm(group_slice(grad_w, 0, s.groups, g),
                        group_slice(grad_out, 1, s.groups, g).t(),
                        group_slice(columns, 1, s.groups, g), beta);
        }
      }
    }
    grad_input = Kernels::to_layout(grad_in.permute({0, 3, 1, 2}), input.scalar_type(),
                                    output_memory_format(input));
    // [C_out, kh, kw, C/groups] is the channels-last layout of the weight.
    grad_weight = Kernels::to_layout(
        grad_w.view({c_out, s.kernel_h, s.kernel_w, weight.size(1)}).permute({0, 3, 1, 2}),
        input.scalar_type(), output_memory_format(weight));
    grad_offset = in_dtype(grad_off, input.scalar_type());
    if (grad_msk.defined()) {
      grad_mask = in_dtype(grad_msk, input.scalar_type());
    }
  });
  return {grad_input, grad_offset, grad_weight, grad_mask};
}

}  // namespace conv_host
}  // namespace deformops_native
