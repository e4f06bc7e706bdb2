// The CPU library of deformops: the schemas of the deformops_native operators and
// their CPU implementations (checks, layouts, allocation, dtype dispatch, and the
// deformable convolution's chunked GEMMs around the sampling kernels of cpu/).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bindings_common.h"
#include "cpu/kernels.h"
#include "sampling.h"

namespace deformops_native {
namespace {

// Most elements (output pixels x kernel points x channels) of the columns of one
// chunk of the convolution; chunks never hold the whole batch's columns.
constexpr int64_t kColumnsBudget = int64_t(1) << 20;

// The ScalarType of the C++ type T.
template <typename T>
constexpr at::ScalarType scalar_type_of() {
  return c10::CppTypeToScalarType<T>::value;
}

// Calls f(TypeTag<T>{}) with T the type the CPU kernels compute tensors of
// `dtype` in: double for float64, float for float32, bfloat16 and float16 (half
// tensors are converted to float once, not at every load).
template <typename F>
void dispatch_compute_type(at::ScalarType dtype, const char* what, F&& f) {
  const bool is_double = dispatch_floating(dtype, what, [](auto tag) {
    return std::is_same_v<acc_t<typename decltype(tag)::type>, double>;
  });
  if (is_double) {
    f(TypeTag<double>{});
  } else {
    f(TypeTag<float>{});
  }
}

// ---------------------------------------------------------------------------
// Multi-scale deformable attention

void check_msda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights) {
  check_dim(value, 4, "value");
  check_dim(sampling_locations, 6, "sampling_locations");
  check_dtype(spatial_shapes, at::kLong, "spatial_shapes");
  check_dtype(level_start_index, at::kLong, "level_start_index");
  check_dtype_or_float(sampling_locations, value.scalar_type(), "sampling_locations");
  check_dtype_or_float(attention_weights, value.scalar_type(), "attention_weights");
  const int64_t n = value.size(0);
  const int64_t m = value.size(2);
  const int64_t q = sampling_locations.size(1);
  const int64_t levels = sampling_locations.size(3);
  const int64_t points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef({n, q, m, levels, points, 2}),
              "deformops: sampling_locations must be [N, Q, M, L, P, 2] = [", n, ", Q, ", m,
              ", L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({n, q, m, levels, points}),
              "deformops: attention_weights must be [N, Q, M, L, P] = ",
              at::IntArrayRef({n, q, m, levels, points}), ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.sizes() == at::IntArrayRef({levels, 2}),
              "deformops: spatial_shapes must be [L, 2] = [", levels, ", 2], got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.sizes() == at::IntArrayRef({levels}),
              "deformops: level_start_index must be [L] = [", levels, "], got ",
              level_start_index.sizes());
}

cpu::MsdaSizes msda_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4)};
}

at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const cpu::MsdaSizes s = msda_sizes(value, sampling_locations);
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  at::Tensor output;
  dispatch_compute_type(value.scalar_type(), "value", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor v = as_layout(value, dtype);
    const at::Tensor loc = as_layout(sampling_locations, dtype);
    const at::Tensor attn = as_layout(attention_weights, dtype);
    const at::Tensor out = at::empty({s.batch, s.queries, s.heads * s.channels}, v.options());
    if (s.spatial == 0) {  // no pixel to sample
      out.zero_();
    } else {
      cpu::msda_forward<T>(s, v.const_data_ptr<T>(), shapes.const_data_ptr<int64_t>(),
                           starts.const_data_ptr<int64_t>(), loc.const_data_ptr<T>(),
                           attn.const_data_ptr<T>(), out.mutable_data_ptr<T>());
    }
    output = out.to(value.scalar_type());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const cpu::MsdaSizes s = msda_sizes(value, sampling_locations);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
              "deformops: grad_output must be [N, Q, M*D], got ", grad_output.sizes());
  check_dtype(grad_output, value.scalar_type(), "grad_output");
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  dispatch_compute_type(value.scalar_type(), "value", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor grad_out = as_layout(grad_output, dtype);
    const at::Tensor v = as_layout(value, dtype);
    const at::Tensor loc = as_layout(sampling_locations, dtype);
    const at::Tensor attn = as_layout(attention_weights, dtype);
    const at::Tensor grad_value = at::zeros_like(v);
    const at::Tensor grad_loc = at::zeros_like(loc);
    const at::Tensor grad_attn = at::zeros_like(attn);
    if (s.spatial > 0) {  // else no pixel was sampled
      cpu::msda_backward<T>(s, grad_out.const_data_ptr<T>(), v.const_data_ptr<T>(),
                            shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                            loc.const_data_ptr<T>(), attn.const_data_ptr<T>(),
                            grad_value.mutable_data_ptr<T>(), grad_loc.mutable_data_ptr<T>(),
                            grad_attn.mutable_data_ptr<T>());
    }
    grads = {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
             grad_attn.to(attention_weights.scalar_type())};
  });
  return grads;
}

// ---------------------------------------------------------------------------
// Deformable convolution

void check_conv(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
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
  const int64_t h_out = deformops::conv_out_size(input.size(2), weight.size(2), stride_h, pad_h,
                                                 dilation_h);
  const int64_t w_out = deformops::conv_out_size(input.size(3), weight.size(3), stride_w, pad_w,
                                                 dilation_w);
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

cpu::ConvSizes conv_sizes(const at::Tensor& input, const at::Tensor& offset,
                          const at::Tensor& weight, int64_t stride_h, int64_t stride_w,
                          int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  const int64_t kernel_points = weight.size(2) * weight.size(3);
  return {input.size(0),
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

// Output rows (n, h_out) in chunks whose columns hold at most kColumnsBudget
// elements (at least one row each).
std::vector<cpu::ConvChunk> conv_chunks(const cpu::ConvSizes& s) {
  const int64_t rows = s.batch * s.out_height;
  const int64_t per_row = s.out_width * s.kernel_h * s.kernel_w * s.channels;
  const int64_t step = std::max<int64_t>(1, kColumnsBudget / std::max<int64_t>(1, per_row));
  std::vector<cpu::ConvChunk> chunks;
  for (int64_t r = 0; r < rows && s.out_width > 0; r += step) {
    chunks.push_back({r, std::min(rows, r + step)});
  }
  return chunks;
}

int64_t chunk_pixels(const cpu::ConvSizes& s, const cpu::ConvChunk& chunk) {
  return (chunk.row_end - chunk.row_begin) * s.out_width;
}

// The output pixels of one image in a chunk: pixels [begin, begin + count) of
// image n (numbered h_out * W_out + w_out), which are the pixels [first,
// first + count) of the chunk (see cpu::ConvChunk).
struct ImagePixels {
  int64_t n, begin, count, first;
};

// The pixels of the chunk, image by image.
std::vector<ImagePixels> chunk_images(const cpu::ConvSizes& s, const cpu::ConvChunk& chunk) {
  std::vector<ImagePixels> images;
  for (int64_t r = chunk.row_begin; r < chunk.row_end;) {
    const int64_t n = r / s.out_height;
    const int64_t end = std::min(chunk.row_end, (n + 1) * s.out_height);
    images.push_back({n, (r - n * s.out_height) * s.out_width, (end - r) * s.out_width,
                      (r - chunk.row_begin) * s.out_width});
    r = end;
  }
  return images;
}

// The [count, C] matrix (a view) of pixels [begin, begin + count) of image n of
// `t` [N, C, H, W], contiguous in either memory format.
at::Tensor pixel_rows(const at::Tensor& t, const ImagePixels& image) {
  const at::Tensor matrix = t[image.n].view({t.size(1), t.size(2) * t.size(3)}).t();
  return matrix.narrow(0, image.begin, image.count);
}

// The weight [C_out, C/groups, kh, kw] as the [C_out, K * C/groups] matrix
// matching the columns layout (kernel point major, channel minor), in `dtype`.
at::Tensor weight_matrix(const at::Tensor& weight, at::ScalarType dtype) {
  return weight.to(dtype).permute({0, 2, 3, 1}).reshape(
      {weight.size(0), weight.size(1) * weight.size(2) * weight.size(3)});
}

// Group g's block of columns of `t` [rows, groups * width].
at::Tensor group_columns(const at::Tensor& t, int64_t groups, int64_t g) {
  const int64_t width = t.size(1) / groups;
  return t.narrow(1, g * width, width);
}

// Group g's block of rows of `t` [groups * height, ...].
at::Tensor group_rows(const at::Tensor& t, int64_t groups, int64_t g) {
  const int64_t height = t.size(0) / groups;
  return t.narrow(0, g * height, height);
}

at::Tensor deform_conv2d_forward(const at::Tensor& input, const at::Tensor& offset,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& bias, int64_t stride_h,
                                 int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                 int64_t dilation_h, int64_t dilation_w) {
  check_conv(input, offset, weight, mask.value_or(at::Tensor()), stride_h, stride_w, pad_h, pad_w,
             dilation_h, dilation_w);
  const cpu::ConvSizes s =
      conv_sizes(input, offset, weight, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w);
  const int64_t c_out = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dtype(*bias, input.scalar_type(), "bias");
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({c_out}), "deformops: bias must be [C_out] = [",
                c_out, "], got ", bias->sizes());
  }
  const std::vector<cpu::ConvChunk> chunks = conv_chunks(s);
  at::Tensor output;
  dispatch_compute_type(input.scalar_type(), "input", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor in = as_layout(input, dtype, at::MemoryFormat::ChannelsLast);
    const at::Tensor off = as_layout(offset, dtype);
    const at::Tensor msk = as_layout_or_undefined(mask, dtype);
    const at::Tensor w = weight_matrix(weight, dtype);
    const at::Tensor b = has_bias ? bias->to(dtype) : at::zeros({c_out}, w.options());
    const at::Tensor out = at::empty({s.batch, c_out, s.out_height, s.out_width},
                                     w.options().memory_format(output_memory_format(input)));
    const int64_t most = chunks.empty() ? 0 : chunk_pixels(s, chunks.front());
    const at::Tensor columns_buffer = at::empty({most, w.size(1) * s.groups}, w.options());
    for (const cpu::ConvChunk& chunk : chunks) {
      const at::Tensor columns = columns_buffer.narrow(0, 0, chunk_pixels(s, chunk));
      cpu::deform_conv_im2col<T>(s, chunk, in.const_data_ptr<T>(), off.const_data_ptr<T>(),
                                 const_data_or_null<T>(msk), columns.mutable_data_ptr<T>());
      for (const ImagePixels& image : chunk_images(s, chunk)) {
        const at::Tensor out_n = pixel_rows(out, image);
        const at::Tensor columns_n = columns.narrow(0, image.first, image.count);
        for (int64_t g = 0; g < s.groups; ++g) {
          at::Tensor out_g = group_columns(out_n, s.groups, g);
          at::addmm_out(out_g, group_rows(b, s.groups, g), group_columns(columns_n, s.groups, g),
                        group_rows(w, s.groups, g).t());
        }
      }
    }
    output = out.to(input.scalar_type());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  check_conv(input, offset, weight, mask.value_or(at::Tensor()), stride_h, stride_w, pad_h, pad_w,
             dilation_h, dilation_w);
  const cpu::ConvSizes s =
      conv_sizes(input, offset, weight, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w);
  const int64_t c_out = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, c_out, s.out_height, s.out_width}),
              "deformops: grad_output must be [N, C_out, H_out, W_out], got ", grad_output.sizes());
  check_dtype(grad_output, input.scalar_type(), "grad_output");
  const at::MemoryFormat format = output_memory_format(input);
  const std::vector<cpu::ConvChunk> chunks = conv_chunks(s);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grads;
  dispatch_compute_type(input.scalar_type(), "input", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor in = as_layout(input, dtype, at::MemoryFormat::ChannelsLast);
    const at::Tensor off = as_layout(offset, dtype);
    const at::Tensor msk = as_layout_or_undefined(mask, dtype);
    const at::Tensor grad_out = as_layout(grad_output, dtype, format);
    const at::Tensor w = weight_matrix(weight, dtype);
    // Channels-last [N, H, W, C], and [C_out, K * C/groups] like w.
    const at::Tensor grad_in = at::zeros({s.batch, s.height, s.width, s.channels}, w.options());
    const at::Tensor grad_w = at::zeros_like(w);
    const at::Tensor grad_off = at::empty_like(off);
    const at::Tensor grad_msk = msk.defined() ? at::empty_like(msk) : at::Tensor();
    const int64_t most = chunks.empty() ? 0 : chunk_pixels(s, chunks.front());
    const at::Tensor columns_buffer = at::empty({most, w.size(1) * s.groups}, w.options());
    const at::Tensor grad_columns_buffer = at::empty({most, w.size(1) * s.groups}, w.options());
    for (const cpu::ConvChunk& chunk : chunks) {
      const int64_t pixels = chunk_pixels(s, chunk);
      const at::Tensor columns = columns_buffer.narrow(0, 0, pixels);
      const at::Tensor grad_columns = grad_columns_buffer.narrow(0, 0, pixels);
      cpu::deform_conv_im2col<T>(s, chunk, in.const_data_ptr<T>(), off.const_data_ptr<T>(),
                                 const_data_or_null<T>(msk), columns.mutable_data_ptr<T>());
      for (const ImagePixels& image : chunk_images(s, chunk)) {
        const at::Tensor grad_out_n = pixel_rows(grad_out, image);
        const at::Tensor columns_n = columns.narrow(0, image.first, image.count);
        const at::Tensor grad_columns_n = grad_columns.narrow(0, image.first, image.count);
        for (int64_t g = 0; g < s.groups; ++g) {
          const at::Tensor grad_out_g = group_columns(grad_out_n, s.groups, g);
          group_rows(grad_w, s.groups, g)
              .addmm_(grad_out_g.t(), group_columns(columns_n, s.groups, g));
          at::Tensor grad_columns_g = group_columns(grad_columns_n, s.groups, g);
          at::mm_out(grad_columns_g, grad_out_g, group_rows(w, s.groups, g));
        }
      }
      cpu::deform_conv_col2im<T>(s, chunk, in.const_data_ptr<T>(), off.const_data_ptr<T>(),
                                 const_data_or_null<T>(msk), grad_columns.const_data_ptr<T>(),
                                 grad_in.mutable_data_ptr<T>(), grad_off.mutable_data_ptr<T>(),
                                 msk.defined() ? grad_msk.mutable_data_ptr<T>() : nullptr);
    }
    const at::ScalarType out_dtype = input.scalar_type();
    grads = {grad_in.permute({0, 3, 1, 2}).to(out_dtype, false, false, format),
             grad_off.to(out_dtype),
             grad_w.view({c_out, weight.size(2), weight.size(3), weight.size(1)})
                 .permute({0, 3, 1, 2})
                 .to(out_dtype, false, false, at::MemoryFormat::Contiguous),
             msk.defined() ? grad_msk.to(out_dtype) : at::empty({0}, input.options())};
  });
  return grads;
}

}  // namespace
}  // namespace deformops_native

TORCH_LIBRARY(deformops_native, m) {
  m.def(
      "msda_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "msda_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "deform_conv2d_forward(Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, "
      "Tensor? mask, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, "
      "int dilation_w) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deformops_native, CPU, m) {
  m.impl("msda_forward", &deformops_native::msda_forward);
  m.impl("msda_backward", &deformops_native::msda_backward);
  m.impl("deform_conv2d_forward", &deformops_native::deform_conv2d_forward);
  m.impl("deform_conv2d_backward", &deformops_native::deform_conv2d_backward);
}
