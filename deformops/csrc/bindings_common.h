// Tensor checks and dtype dispatch shared by the bindings of every device
// (bindings.cpp for the CPU, bindings_cuda.cpp for CUDA). Torch-only: nothing
// here is specific to one device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <type_traits>
#include <utility>

namespace deformops_native {

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
      TORCH_CHECK(false, "deformops: ", what, " must be float16, bfloat16, float32 or float64, got ",
                  dtype);
  }
}

// Calls `f(TypeTag<P>{})` for a tensor that may be stored either in the element
// type V of another tensor or in float32 (P = V or float).
template <typename V, typename F>
decltype(auto) dispatch_same_or_float(at::ScalarType dtype, const char* what, F&& f) {
  if (dtype == c10::CppTypeToScalarType<V>::value) {
    return std::forward<F>(f)(TypeTag<V>{});
  }
  TORCH_CHECK(dtype == at::kFloat, "deformops: ", what, " must be ",
              c10::CppTypeToScalarType<V>::value, " or float32, got ", dtype);
  return std::forward<F>(f)(TypeTag<float>{});
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

// `t` as a contiguous tensor, or an undefined tensor when `t` is absent.
inline at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// The pointer to the elements of `t` as T, or null when `t` is undefined.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace deformops_native
