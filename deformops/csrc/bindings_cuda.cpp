// The CUDA library of deformops: CUDA kernels for the deformops_native operators,
// whose schemas the CPU library (bindings.cpp, loaded first) defines. This file
// handles tensors only (device guard, current stream, contiguity, allocation, dtype
// mapping; for the deformable convolution, the host side shared with the CPU,
// deform_conv_host.h); the kernels and their launchers are torch-free
// (cuda/msda.h, cuda/deform_conv.h, cuda/deform_roi_pool.h).
//
// Environment: DEFORMOPS_MSDA_HALF_GRAD chooses how msda_backward accumulates the
// value gradient of float16 / bfloat16 values (read at every call):
//   "fp32"   - float32 atomics into a float32 buffer of value's size, rounded once
//              at the end (accurate; 4 extra bytes per value element while the
//              backward runs);
//   "direct" - atomics straight into the half-precision gradient (no extra memory;
//              each add rounds, so the error grows with the samples per element);
//   unset or "auto" - the default: "fp32" for bfloat16 and "direct" for float16.
// Under torch.use_deterministic_algorithms(True) both backward passes take their
// deterministic paths (the same gradients, bit for bit, at every run): msda_backward
// gathers the value gradient in a fixed order instead of scattering it with atomics
// (the setting above then does not apply: one rounding per element), and
// deform_conv2d_backward sums the input gradient in sample order;
// deform_roi_pool_backward has no deterministic path (its input gradient is an
// atomic scatter) and raises there, as torchvision's roi_align backward does.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "cuda/deform_conv.h"
#include "cuda/deform_roi_pool.h"
#include "cuda/msda.h"
#include "deform_conv_host.h"

namespace deformops_native {
namespace {

namespace gpu = deformops::gpu;

gpu::Dtype launcher_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::Dtype::kFloat32;
    case at::kHalf:
      return gpu::Dtype::kFloat16;
    case at::kBFloat16:
      return gpu::Dtype::kBFloat16;
    case at::kDouble:
      return gpu::Dtype::kFloat64;
    default:
      TORCH_CHECK(false, "deformops: ", what, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

// `bytes` of scratch memory on the current device from PyTorch's caching
// allocator, given back (in the order of the current stream) when the pointer
// goes out of scope. Unlike at::empty, it is not filled under
// torch.use_deterministic_algorithms(True) (fill_uninitialized_memory): the
// kernels write scratch before they read it.
c10::DataPtr scratch(size_t bytes) {
  return c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
}

// An uninitialised contiguous tensor for a kernel that writes every element of
// it. Unlike at::empty, not filled with NaN under
// torch.use_deterministic_algorithms(True) (fill_uninitialized_memory), a pass
// over memory that the kernel overwrites anyway.
at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_cuda(sizes, options));
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "deformops: the CUDA kernels of ", what, " failed: ",
              cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

// Whether the value gradient of a half-precision value accumulates in a float32
// buffer (DEFORMOPS_MSDA_HALF_GRAD, see the file comment).
bool half_grad_in_float32(at::ScalarType dtype) {
  const char* setting = std::getenv("DEFORMOPS_MSDA_HALF_GRAD");
  const std::string mode = setting == nullptr ? "" : setting;
  if (mode.empty() || mode == "auto") {
    return dtype == at::kBFloat16;
  }
  TORCH_CHECK(mode == "fp32" || mode == "direct",
              "deformops: DEFORMOPS_MSDA_HALF_GRAD must be fp32, direct or auto, got '", mode,
              "'");
  return mode == "fp32";
}

// Checks what the kernels rely on (the Python layer has checked the rest) and
// gathers the contiguous inputs, on the value's device, for the launchers.
struct MsdaTensors {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  gpu::MsdaInputs inputs;
};

MsdaTensors msda_tensors(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  MsdaTensors t;
  t.value = value.contiguous();
  t.spatial_shapes = spatial_shapes.contiguous();
  t.level_start_index = level_start_index.contiguous();
  t.sampling_locations = sampling_locations.contiguous();
  t.attention_weights = attention_weights.contiguous();
  gpu::MsdaInputs& in = t.inputs;
  in.sizes = msda_sizes(value, sampling_locations);
  in.value_dtype = launcher_dtype(value, "value");
  in.locations_dtype = launcher_dtype(sampling_locations, "sampling_locations");
  in.weights_dtype = launcher_dtype(attention_weights, "attention_weights");
  in.value = t.value.const_data_ptr();
  in.spatial_shapes = t.spatial_shapes.const_data_ptr<int64_t>();
  in.level_start_index = t.level_start_index.const_data_ptr<int64_t>();
  in.sampling_locations = t.sampling_locations.const_data_ptr();
  in.attention_weights = t.attention_weights.const_data_ptr();
  return t;
}

at::Tensor msda_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaTensors t = msda_tensors(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
  const MsdaSizes& s = t.inputs.sizes;
  at::Tensor output =
      uninitialized({s.batch, s.queries, s.heads * s.channels}, value.options());
  check_launch(gpu::msda_forward(t.inputs, output.mutable_data_ptr(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "msda_forward");
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const MsdaTensors t = msda_tensors(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
  const MsdaSizes& s = t.inputs.sizes;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}),
              "deformops: grad_output must be [N, Q, M*D] = ",
              at::IntArrayRef({s.batch, s.queries, s.heads * s.channels}), ", got ",
              grad_output.sizes());
  check_dtype(grad_output, value.scalar_type(), "grad_output");
  check_same_device(grad_output, value, "grad_output");
  const at::Tensor grad_out = grad_output.contiguous();
  // Every element is written: the value gradient by the gather, or zeroed before
  // the scatter; the others by the backward kernel.
  at::Tensor grad_value = uninitialized(t.value.sizes(), t.value.options());
  at::Tensor grad_locations =
      uninitialized(t.sampling_locations.sizes(), t.sampling_locations.options());
  at::Tensor grad_weights =
      uninitialized(t.attention_weights.sizes(), t.attention_weights.options());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool half = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  at::Tensor workspace;
  if (!deterministic && half && half_grad_in_float32(value.scalar_type())) {
    workspace = at::empty({gpu::msda_workspace_elements(s)}, value.options().dtype(at::kFloat));
  }
  const size_t gather_bytes =
      deterministic ? gpu::msda_gather_workspace_bytes(s, t.inputs.value_dtype) : 0;
  TORCH_CHECK(!deterministic || gather_bytes > 0 || s.batch == 0,
              "deformops: the deterministic backward of multi_scale_deformable_attention needs "
              "fewer than 2^31 samples (Q*M*L*P) and cells (M*2*(S+L)) per image, got Q = ",
              s.queries, ", M = ", s.heads, ", L = ", s.levels, ", P = ", s.points, ", S = ",
              s.spatial);
  const c10::DataPtr gather_workspace = scratch(gather_bytes);
  const gpu::MsdaGrads grads{grad_value.mutable_data_ptr(),
                             grad_locations.mutable_data_ptr(),
                             grad_weights.mutable_data_ptr(),
                             workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr,
                             deterministic,
                             gather_workspace.get(),
                             gather_bytes};
  check_launch(gpu::msda_backward(t.inputs, grad_out.const_data_ptr(), grads,
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "msda_backward");
  return {grad_value, grad_locations, grad_weights};
}

// ---------------------------------------------------------------------------
// Deformable convolution

// The CUDA element type of an ATen element type (same bits).
template <typename V>
struct CudaElement {
  using type = V;
};
template <>
struct CudaElement<at::Half> {
  using type = __half;
};
template <>
struct CudaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

// How cuBLAS (column-major) reads the row-major matrix `t`: 'n' with leading
// dimension ld when its rows are dense (its memory is t^T column-major), 't'
// when its columns are (a transposed view). The host side passes only such
// views (slices of dense matrices and their transposes).
struct BlasOperand {
  char op;
  int64_t ld;
};

BlasOperand blas_operand(const at::Tensor& t) {
  const int64_t rows = t.size(0);
  const int64_t cols = t.size(1);
  if (t.stride(1) == 1 || cols == 1) {
    const int64_t ld = rows == 1 ? std::max<int64_t>(cols, 1) : t.stride(0);
    if (ld >= std::max<int64_t>(cols, 1)) {
      return {'n', ld};
    }
  }
  if (t.stride(0) == 1 || rows == 1) {
    const int64_t ld = cols == 1 ? std::max<int64_t>(rows, 1) : t.stride(1);
    if (ld >= std::max<int64_t>(rows, 1)) {
      return {'t', ld};
    }
  }
  TORCH_INTERNAL_ASSERT(false, "deformops: a GEMM operand of strides ", t.strides(),
                        " is neither row- nor column-major");
}

// The cuBLAS element type of a tensor of `dtype`.
cudaDataType_t blas_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kFloat:
      return CUDA_R_32F;
    case at::kDouble:
      return CUDA_R_64F;
    default:
      TORCH_CHECK(false, "deformops: no GEMM for ", dtype);
  }
}

void check_blas(cublasStatus_t status) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "deformops: a cuBLAS call of deform_conv2d failed: ",
              cublasGetStatusString(status));
}

// c = a x b + beta * c (row-major matrices, c's rows dense; beta 0 or 1) with one
// cublasGemmEx on ATen's handle (its workspace, the current stream): none of
// aten::mm's dispatch, checks and output allocation, and a half-precision
// product summed into a float32 c without a temporary. Products are summed in
// float32 (float64 for float64), with no reduced-precision split-K reduction;
// float32 uses TF32 tensor cores when torch.backends.cuda.matmul.allow_tf32 is
// set. Row-major c = a b is column-major c^T = b^T a^T.
void cuda_gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta) {
  const int64_t m = c.size(0);
  const int64_t n = c.size(1);
  const int64_t k = a.size(1);
  // The host side calls it for non-empty chunks and groups only.
  TORCH_INTERNAL_ASSERT(m > 0 && n > 0 && k > 0 && a.size(0) == m && b.size(0) == k &&
                        b.size(1) == n && (c.stride(1) == 1 || n == 1) &&
                        a.scalar_type() == b.scalar_type());
  TORCH_CHECK(std::max({m, n, k}) <= std::numeric_limits<int>::max(),
              "deformops: a GEMM of deform_conv2d has a side past 2^31");
  const BlasOperand x = blas_operand(a);
  const BlasOperand y = blas_operand(b);
  const int64_t ldc = m == 1 ? std::max<int64_t>(n, 1) : c.stride(0);
  const at::ScalarType dtype = a.scalar_type();
  const bool is_double = dtype == at::kDouble;
  const bool tf32 = dtype == at::kFloat && at::globalContext().allowTF32CuBLAS();
  const cublasComputeType_t compute =
      is_double ? CUBLAS_COMPUTE_64F : (tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  const cublasMath_t math = dtype == at::kHalf || dtype == at::kBFloat16
                                ? CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION
                                : (tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
  const double one_double = 1.0;
  const float one_float = 1.0f;
  const float beta_float = static_cast<float>(beta);
  const void* alpha_ptr = is_double ? static_cast<const void*>(&one_double) : &one_float;
  const void* beta_ptr = is_double ? static_cast<const void*>(&beta) : &beta_float;
  const auto op = [](char o) { return o == 'n' ? CUBLAS_OP_N : CUBLAS_OP_T; };
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasMath_t previous;
  check_blas(cublasGetMathMode(handle, &previous));
  check_blas(cublasSetMathMode(handle, math));
  const cublasStatus_t status = cublasGemmEx(
      handle, op(y.op), op(x.op), static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
      alpha_ptr, b.const_data_ptr(), blas_type(dtype), static_cast<int>(y.ld),
      a.const_data_ptr(), blas_type(dtype), static_cast<int>(x.ld), beta_ptr,
      c.mutable_data_ptr(), blas_type(c.scalar_type()), static_cast<int>(ldc), compute,
      CUBLAS_GEMM_DEFAULT);
  check_blas(cublasSetMathMode(handle, previous));
  check_blas(status);
}

// The elements of `t` (of ATen type V) as E, or null when `t` is undefined.
template <typename E, typename V>
E* elements(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<E*>(t.data_ptr<V>()) : nullptr;
}

struct CudaConvKernels {
  // Columns of one chunk: 80 MiB, so that the peak memory of forward+backward
  // stays under torchvision's (which holds the columns of up to 32 images): on
  // r50_dcn in half precision, 2 forward chunks and 4 backward chunks (of two
  // buffers each), each chunk costing about 8 launches of host time.
  static constexpr int64_t kColumnsBudgetBytes = int64_t(80) << 20;

  // The kernels read and write the tensors' own element type.
  template <typename V>
  static at::ScalarType compute_type() {
    return c10::CppTypeToScalarType<V>::value;
  }

  // The elements (of ATen type V, as E) and strides of an offset- or mask-like tensor.
  template <typename E, typename V>
  static gpu::Plane<E> plane(const at::Tensor& t) {
    return plane_of<gpu::Plane<E>>(t, [](const at::Tensor& u) { return elements<E, V>(u); });
  }

  template <typename V>
  static void im2col(const ConvSizes& s, const ConvChunk& chunk, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask, const at::Tensor& columns) {
    using E = typename CudaElement<V>::type;
    check_launch(gpu::deform_conv_im2col<E>(s, chunk, elements<const E, V>(input),
                                            plane<const E, V>(offset), plane<const E, V>(mask),
                                            elements<E, V>(columns),
                                            c10::cuda::getCurrentCUDAStream().stream()),
                 "deform_conv2d");
  }

  template <typename V>
  static void col2im(const ConvSizes& s, const ConvChunk& chunk, const at::Tensor& input,
                     const at::Tensor& offset, const at::Tensor& mask,
                     const at::Tensor& grad_columns, const at::Tensor& columns,
                     const at::Tensor& grad_input, const at::Tensor& grad_offset,
                     const at::Tensor& grad_mask) {
    using E = typename CudaElement<V>::type;
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const size_t bytes = gpu::deform_conv_col2im_workspace<E>(s, chunk, deterministic);
    const c10::DataPtr workspace = scratch(bytes);
    check_launch(
        gpu::deform_conv_col2im<E>(
            s, chunk, elements<const E, V>(input), plane<const E, V>(offset),
            plane<const E, V>(mask), elements<const E, V>(grad_columns), elements<E, V>(columns),
            grad_input.data_ptr<gpu::conv_grad_t<E>>(), plane<E, V>(grad_offset),
            plane<E, V>(grad_mask), workspace.get(), bytes, deterministic,
            c10::cuda::getCurrentCUDAStream().stream()),
        "deform_conv2d_backward");
  }

  static void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta) {
    cuda_gemm(c, a, b, beta);
  }

  // `t` in `dtype` and `format`. A conversion between contiguous and
  // channels-last (ATen's permuted copy is slow) is one tiled transpose.
  static at::Tensor to_layout(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
    if (t.scalar_type() == dtype && t.is_contiguous(format)) {
      return t;
    }
    const bool to_channels_last = format == at::MemoryFormat::ChannelsLast;
    const bool transposable =
        t.dim() == 4 && (to_channels_last ? t.is_contiguous()
                                          : t.permute({0, 2, 3, 1}).is_contiguous()) &&
        (t.scalar_type() == dtype || t.scalar_type() == at::kFloat);
    if (!transposable) {
      return as_layout(t, dtype, format);
    }
    at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype).memory_format(format));
    const int64_t channels = t.size(1);
    const int64_t pixels = t.size(2) * t.size(3);
    // [N][C][H*W] -> [N][H*W][C], or back.
    const int64_t rows = to_channels_last ? channels : pixels;
    const int64_t cols = to_channels_last ? pixels : channels;
    dispatch_floating(dtype, "output", [&](auto out_tag) {
      using D = typename decltype(out_tag)::type;
      const auto transpose = [&](auto in_tag) {
        using S = typename decltype(in_tag)::type;
        check_launch(gpu::deform_conv_transpose(
                         elements<const typename CudaElement<S>::type, S>(t),
                         elements<typename CudaElement<D>::type, D>(out), t.size(0), rows, cols,
                         c10::cuda::getCurrentCUDAStream().stream()),
                     "deform_conv2d");
      };
      if (t.scalar_type() == dtype) {
        transpose(TypeTag<D>{});
      } else {
        transpose(TypeTag<float>{});
      }
    });
    return out;
  }
};

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& bias, int64_t stride_h,
                                      int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                      int64_t dilation_h, int64_t dilation_w) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_host::forward<CudaConvKernels>(input, offset, weight, mask, bias, stride_h,
                                             stride_w, pad_h, pad_w, dilation_h, dilation_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_host::backward<CudaConvKernels>(grad_output, input, offset, weight, mask, stride_h,
                                              stride_w, pad_h, pad_w, dilation_h, dilation_w);
}

// ---------------------------------------------------------------------------
// Deformable RoI pooling

at::Tensor deform_roi_pool_forward_cuda(const at::Tensor& input, const at::Tensor& rois,
                                        const std::optional<at::Tensor>& offset,
                                        int64_t pooled_height, int64_t pooled_width,
                                        double spatial_scale, int64_t sampling_ratio,
                                        double gamma) {
  const c10::cuda::CUDAGuard guard(input.device());
  const RoiPoolSizes s = roi_pool_sizes(input, rois, offset, pooled_height, pooled_width,
                                        spatial_scale, sampling_ratio, gamma);
  const at::Tensor x = input.contiguous();
  at::Tensor output = at::empty({s.rois, s.channels, s.out_height, s.out_width}, x.options());
  dispatch_floating(input.scalar_type(), "input", [&](auto tag) {
    using V = typename decltype(tag)::type;
    using E = typename CudaElement<V>::type;
    using A = gpu::roi_pool_acc_t<E>;
    const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor r = as_layout(rois, acc);
    const at::Tensor o = as_layout_or_undefined(offset, acc);
    check_launch(gpu::deform_roi_pool_forward<E>(
                     s, elements<const E, V>(x), r.const_data_ptr<A>(),
                     o.defined() ? o.const_data_ptr<A>() : nullptr, elements<E, V>(output),
                     c10::cuda::getCurrentCUDAStream().stream()),
                 "deform_roi_pool");
  });
  return output;
}

// The input gradient is scattered with atomic adds into a float32 (float64)
// buffer, rounded once to the input's dtype at the end.
std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& rois,
    const std::optional<at::Tensor>& offset, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, int64_t sampling_ratio, double gamma) {
  const c10::cuda::CUDAGuard guard(input.device());
  const RoiPoolSizes s = roi_pool_sizes(input, rois, offset, pooled_height, pooled_width,
                                        spatial_scale, sampling_ratio, gamma);
  check_roi_pool_grad(grad_output, s, input);
  at::globalContext().alertNotDeterministic("deform_roi_pool_backward (CUDA)");
  const at::Tensor x = input.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  std::tuple<at::Tensor, at::Tensor> grads;
  dispatch_floating(input.scalar_type(), "input", [&](auto tag) {
    using V = typename decltype(tag)::type;
    using E = typename CudaElement<V>::type;
    using A = gpu::roi_pool_acc_t<E>;
    const at::ScalarType acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor r = as_layout(rois, acc);
    const at::Tensor o = as_layout_or_undefined(offset, acc);
    const at::Tensor grad_x = at::zeros(x.sizes(), x.options().dtype(acc));
    const at::Tensor grad_o = o.defined() ? at::zeros_like(o) : at::Tensor();
    check_launch(gpu::deform_roi_pool_backward<E>(
                     s, elements<const E, V>(grad), elements<const E, V>(x),
                     r.const_data_ptr<A>(), o.defined() ? o.const_data_ptr<A>() : nullptr,
                     grad_x.mutable_data_ptr<A>(),
                     grad_o.defined() ? grad_o.mutable_data_ptr<A>() : nullptr,
                     c10::cuda::getCurrentCUDAStream().stream()),
                 "deform_roi_pool_backward");
    grads = {grad_x.to(input.scalar_type()).contiguous(output_memory_format(input)),
             grad_o.defined() ? grad_o.to(offset->scalar_type()) : at::empty({0}, input.options())};
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(deformops_native, CUDA, m) {
  m.impl("msda_forward", &msda_forward_cuda);
  m.impl("msda_backward", &msda_backward_cuda);
  m.impl("deform_conv2d_forward", &deform_conv2d_forward_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
  m.impl("deform_roi_pool_forward", &deform_roi_pool_forward_cuda);
  m.impl("deform_roi_pool_backward", &deform_roi_pool_backward_cuda);
}

}  // namespace deformops_native
