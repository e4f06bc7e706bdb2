// The CPU library of deformops: the schemas of the deformops_native operators and
// their CPU implementations (checks, layouts, allocation, dtype dispatch; the
// deformable convolution's chunked GEMMs are the host side shared with CUDA,
// deform_conv_host.h, around the sampling kernels of cpu/).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "bindings_common.h"
#include "cpu/kernels.h"
#include "deform_conv_host.h"

namespace deformops_native {
namespace {

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

at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const MsdaSizes s = msda_sizes(value, sampling_locations);
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
  const MsdaSizes s = msda_sizes(value, sampling_locations);
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
    // cpu::msda_backward zeroes the value gradient itself, pair by pair.
    const at::Tensor grad_value = s.spatial > 0 ? at::empty_like(v) : at::zeros_like(v);
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

// The CPU kernels of cpu/ for the shared host side (deform_conv_host.h): they
// compute in float (double for float64).
struct CpuConvKernels {
  // Columns of one chunk: 4 MiB, about what the caches of a few cores hold.
  static constexpr int64_t kColumnsBudgetBytes = int64_t(4) << 20;

  template <typename V>
  static at::ScalarType compute_type() {
    return scalar_type_of<acc_t<V>>();
  }

  // The elements and strides of an offset- or mask-like tensor, to read.
  template <typename T>
  static cpu::Plane<const T> input_plane(const at::Tensor& t) {
    return plane_of<cpu::Plane<const T>>(t, [](const at::Tensor& u) {
      return u.const_data_ptr<T>();
    });
  }

  // The elements and strides of an offset- or mask-like tensor, to write.
  template <typename T>
  static cpu::Plane<T> output_plane(const at::Tensor& t) {
    return plane_of<cpu::Plane<T>>(t, [](const at::Tensor& u) {
      return u.mutable_data_ptr<T>();
    });
  }

  template <typename V>
  static void im2col(const ConvSizes& s, const ConvChunk& chunk, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& columns) {
    using T = acc_t<V>;
    cpu::deform_conv_im2col<T>(s, chunk, input.const_data_ptr<T>(), input_plane<T>(offset),
                               input_plane<T>(mask), columns.mutable_data_ptr<T>());
  }

  template <typename V>
  static void col2im(const ConvSizes& s, const ConvChunk& chunk, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask,
                     const at::Tensor& grad_columns, const at::Tensor& columns,
                     const at::Tensor& grad_input, const at::Tensor& grad_offset,
                     const at::Tensor& grad_mask) {
    using T = acc_t<V>;
    cpu::deform_conv_col2im<T>(s, chunk, input.const_data_ptr<T>(), input_plane<T>(offset),
                               input_plane<T>(mask), grad_columns.const_data_ptr<T>(),
                               columns.mutable_data_ptr<T>(), grad_input.mutable_data_ptr<T>(),
                               output_plane<T>(grad_offset),
                               output_plane<T>(grad_mask),
                               at::globalContext().deterministicAlgorithms());
  }

  static at::Tensor to_layout(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
    return as_layout(t, dtype, format);
  }

  // c = a x b + beta * c; on the CPU all three are of the compute type.
  static void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta) {
    if (beta == 0.0) {
      at::Tensor out = c;
      at::mm_out(out, a, b);
    } else {
      c.addmm_(a, b);
    }
  }
};

at::Tensor deform_conv2d_forward(const at::Tensor& input, const at::Tensor& offset,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& bias, int64_t stride_h,
                                 int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                 int64_t dilation_h, int64_t dilation_w) {
  return conv_host::forward<CpuConvKernels>(input, offset, weight, mask, bias, stride_h, stride_w,
                                            pad_h, pad_w, dilation_h, dilation_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  return conv_host::backward<CpuConvKernels>(grad_output, input, offset, weight, mask, stride_h,
                                             stride_w, pad_h, pad_w, dilation_h, dilation_w);
}

// ---------------------------------------------------------------------------
// Deformable RoI pooling

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

at::Tensor deform_roi_pool_forward(const at::Tensor& input, const at::Tensor& rois,
                                   const std::optional<at::Tensor>& offset, int64_t pooled_height,
                                   int64_t pooled_width, double spatial_scale,
                                   int64_t sampling_ratio, double gamma) {
  const RoiPoolSizes s = roi_pool_sizes(input, rois, offset, pooled_height, pooled_width,
                                        spatial_scale, sampling_ratio, gamma);
  at::Tensor output;
  dispatch_compute_type(input.scalar_type(), "input", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor x = as_layout(input, dtype, at::MemoryFormat::ChannelsLast);
    const at::Tensor r = as_layout(rois, dtype);
    const at::Tensor o = as_layout_or_undefined(offset, dtype);
    const at::Tensor out = at::empty({s.rois, s.channels, s.out_height, s.out_width}, r.options());
    cpu::deform_roi_pool_forward<T>(s, x.const_data_ptr<T>(), r.const_data_ptr<T>(),
                                    data_or_null<T>(o), out.mutable_data_ptr<T>());
    output = out.to(input.scalar_type());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
    const std::optional<at::Tensor>& offset, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, int64_t sampling_ratio, double gamma) {
  const RoiPoolSizes s = roi_pool_sizes(input, rois, offset, pooled_height, pooled_width,
                                        spatial_scale, sampling_ratio, gamma);
  check_roi_pool_grad(grad_output, s, input);
  std::tuple<at::Tensor, at::Tensor> grads;
  dispatch_compute_type(input.scalar_type(), "input", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const at::ScalarType dtype = scalar_type_of<T>();
    const at::Tensor x = as_layout(input, dtype, at::MemoryFormat::ChannelsLast);
    const at::Tensor r = as_layout(rois, dtype);
    const at::Tensor o = as_layout_or_undefined(offset, dtype);
    // [K, out_h, out_w, C]: the channels of a bin contiguous.
    const at::Tensor grad = as_layout(grad_output.permute({0, 2, 3, 1}), dtype);
    const at::Tensor grad_x = at::zeros_like(x);
    const at::Tensor grad_o = o.defined() ? at::empty_like(o) : at::Tensor();
    cpu::deform_roi_pool_backward<T>(s, grad.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                     r.const_data_ptr<T>(), data_or_null<T>(o),
                                     grad_x.mutable_data_ptr<T>(),
                                     grad_o.defined() ? grad_o.mutable_data_ptr<T>() : nullptr);
    grads = {grad_x.to(input.scalar_type()).contiguous(output_memory_format(input)),
             grad_o.defined() ? grad_o.to(offset->scalar_type()) : at::empty({0}, input.options())};
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
  m.def(
      "deform_roi_pool_forward(Tensor input, Tensor rois, Tensor? offset, int pooled_height, "
      "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> Tensor");
  m.def(
      "deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, "
      "int pooled_height, int pooled_width, float spatial_scale, int sampling_ratio, "
      "float gamma) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deformops_native, CPU, m) {
  m.impl("msda_forward", &deformops_native::msda_forward);
  m.impl("msda_backward", &deformops_native::msda_backward);
  m.impl("deform_conv2d_forward", &deformops_native::deform_conv2d_forward);
  m.impl("deform_conv2d_backward", &deformops_native::deform_conv2d_backward);
  m.impl("deform_roi_pool_forward", &deformops_native::deform_roi_pool_forward);
  m.impl("deform_roi_pool_backward", &deformops_native::deform_roi_pool_backward);
}
