// Tensor checks and dtype dispatch shared by the bindings of every device
// (bindings.cpp for the CPU, bindings_cuda.cpp for CUDA). Torch-only: nothing
// here is specific to one device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <utility>

#include "sizes.h"

namespace deformops_native {

using deformops::ConvChunk;
using deformops::ConvSizes;
using deformops::MsdaSizes;
using deformops::RoiPoolSizes;

// Carries a C++ element type through a generic lambda: `[&](auto tag) { using T =
// typename decltype(tag)::type; ... }`.
template <typename T>
struct TypeTag {
  using type = T;
};

// The type in which an element type is computed: float for the half types, the
// type itself otherwise.
template <typename T>
using acc_t = at::opmath_type<T>;

// Calls `f(TypeTag<T>{})` with T the C++ type of `dtype`, one of float16, bfloat16,
// float32 and float64.
template <typename F>
decltype(auto) dispatch_floating(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kHalf:
      return std::forward<F>(f)(TypeTag<at::Half>{});
    case at::kBFloat16:
      return std::forward<F>(f)(TypeTag<at::BFloat16>{});
    case at::kFloat:
      return std::forward<F>(f)(TypeTag<float>{});
    case at::kDouble:
      return std::forward<F>(f)(TypeTag<double>{});
    default:
      TORCH_CHECK(false, "deformops: ", what,
                  " must be float16, bfloat16, float32 or float64, got ", dtype);
  }
}

// Checks that `t` has `dim` dimensions.
inline void check_dim(const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim, "deformops: ", what, " must have ", dim, " dimensions, got shape ",
              t.sizes());
}

// Checks that `t` has dtype `dtype`.
inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype, "deformops: ", what, " must be ", dtype, ", got ",
              t.scalar_type());
}

// Checks that `t` has dtype `dtype` or float32 (MSDA's sampling locations and
// attention weights, which may keep float32 beside a half-precision value).
inline void check_dtype_or_float(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, "deformops: ", what,
              " must be ", dtype, " or float32, got ", t.scalar_type());
}

// Checks that `t` lives on the device of `like`.
inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device() == like.device(), "deformops: ", what, " must be on ", like.device(),
              ", got ", t.device());
}

// The memory format an output of the 4-d `input` follows: channels_last when
// `input` is channels-last (and not also plain contiguous), contiguous otherwise.
inline at::MemoryFormat output_memory_format(const at::Tensor& input) {
  if (input.dim() == 4 && !input.is_contiguous() &&
      input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// `t` in `dtype` and contiguous in `format`, with at most one copy (none when it
// already is).
inline at::Tensor as_layout(const at::Tensor& t, at::ScalarType dtype,
                            at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  // Tensor::to alone returns a non-contiguous tensor of the right dtype unchanged.
  return t.scalar_type() == dtype ? t.contiguous(format)
                                  : t.to(dtype, /*non_blocking=*/false, /*copy=*/false, format);
}

// `t` in `dtype`, in its own layout (strides) when it is dense, else dense in
// the layout it suggests (PyTorch's preserve_format): `t` itself when it has
// that dtype. For tensors the kernels read and write through their strides.
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype); }

// in_dtype of `t`, or an undefined tensor when `t` is absent or undefined.
inline at::Tensor in_dtype_or_undefined(const std::optional<at::Tensor>& t,
                                        at::ScalarType dtype) {
  return t.has_value() && t->defined() ? in_dtype(*t, dtype) : at::Tensor();
}

// as_layout of `t` (contiguous, in `dtype`), or an undefined tensor when `t` is
// absent or undefined.
inline at::Tensor as_layout_or_undefined(const std::optional<at::Tensor>& t,
                                         at::ScalarType dtype) {
  return t.has_value() && t->defined() ? as_layout(*t, dtype) : at::Tensor();
}

// The data and the strides of a 4-d tensor as a device's Plane<T> (cpu/kernels.h,
// cuda/deform_conv.h), with `data(t)` its elements as T*; an undefined tensor
// gives a null Plane.
template <typename Plane, typename Data>
Plane plane_of(const at::Tensor& t, Data data) {
  if (!t.defined()) {
    return Plane{nullptr, 0, 0, 0, 0};
  }
  return Plane{data(t), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Checks the arguments of the attention (value [N, S, M, D], locations
// [N, Q, M, L, P, 2], weights [N, Q, M, L, P], shapes [L, 2], starts [L]) on every
// device.
inline void check_msda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                const at::Tensor& attention_weights) {
  check_dim(value, 4, "value");
  check_dim(sampling_locations, 6, "sampling_locations");
  check_dtype(spatial_shapes, at::kLong, "spatial_shapes");
  check_dtype(level_start_index, at::kLong, "level_start_index");
  check_dtype_or_float(sampling_locations, value.scalar_type(), "sampling_locations");
  check_dtype_or_float(attention_weights, value.scalar_type(), "attention_weights");
  for (const auto& [tensor, what] : {std::pair{&spatial_shapes, "spatial_shapes"},
                                     std::pair{&level_start_index, "level_start_index"},
                                     std::pair{&sampling_locations, "sampling_locations"},
                                     std::pair{&attention_weights, "attention_weights"}}) {
    check_same_device(*tensor, value, what);
  }
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

inline MsdaSizes msda_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4)};
}

// Checks the arguments of the deformable RoI pooling (input [N, C, H, W], rois
// [K, 5], offset [K, 2, out_h, out_w] or absent; rois and offset in the input's
// dtype or float32) on every device, and returns its sizes. The batch indices
// are not checked here (that reads them): the kernels skip a RoI whose index is
// outside [0, N).
inline RoiPoolSizes roi_pool_sizes(const at::Tensor& input, const at::Tensor& rois,
                                   const std::optional<at::Tensor>& offset,
                                   int64_t pooled_height, int64_t pooled_width,
                                   double spatial_scale, int64_t sampling_ratio, double gamma) {
  check_dim(input, 4, "input");
  check_dim(rois, 2, "rois");
  check_dtype_or_float(rois, input.scalar_type(), "rois");
  check_same_device(rois, input, "rois");
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0,
              "deformops: the output size must be positive, got (", pooled_height, ", ",
              pooled_width, ")");
  const int64_t k = rois.size(0);
  TORCH_CHECK(rois.size(1) == 5, "deformops: rois must be [K, 5], got ", rois.sizes());
  if (offset.has_value() && offset->defined()) {
    check_dtype_or_float(*offset, input.scalar_type(), "offset");
    check_same_device(*offset, input, "offset");
    TORCH_CHECK(offset->sizes() == at::IntArrayRef({k, 2, pooled_height, pooled_width}),
                "deformops: offset must be [K, 2, out_h, out_w] = ",
                at::IntArrayRef({k, 2, pooled_height, pooled_width}), ", got ", offset->sizes());
  }
  return {input.size(0), input.size(1), input.size(2), input.size(3), k,
          pooled_height, pooled_width, sampling_ratio, spatial_scale, gamma};
}

// Checks the output gradient of the deformable RoI pooling: [K, C, out_h, out_w]
// in the input's dtype, on its device.
inline void check_roi_pool_grad(const at::Tensor& grad_output, const RoiPoolSizes& s,
                                const at::Tensor& input) {
  const std::array<int64_t, 4> expected{s.rois, s.channels, s.out_height, s.out_width};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected),
              "deformops: grad_output must be [K, C, out_h, out_w] = ", at::IntArrayRef(expected),
              ", got ", grad_output.sizes());
  check_dtype(grad_output, input.scalar_type(), "grad_output");
  check_same_device(grad_output, input, "grad_output");
}

}  // namespace deformops_native
