// Autograd of the deformops_native operators, in C++: the eager path.
//
// deformops.ops routes an eager call (plain tensors, no compile or export
// tracing, no dispatch or function mode, no functorch transform) straight to
// deformops_native::*_forward, whose Autograd kernel below records one C++ node;
// everything else goes through the torch.library custom operators of ops.py,
// which compile, export and trace. Both give the same results (the same kernels
// run): the C++ node only saves the host time of the custom operators' Python
// layers (about 0.3-0.5 ms per forward+backward on the GPU host's CPU, more than
// the kernels of a small layer take).
//
// Each node saves the forward's tensors and parameters and calls the device's
// backward operator; the bias gradient of the convolution is a sum of
// grad_output. A gradient computed with create_graph=True comes from a node whose
// own derivative raises, as the custom operators' does: the first derivatives
// are exact, the second are not implemented.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace deformops_native {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of operator deformops_native::`name`.
template <typename Signature>
c10::TypedOperatorHandle<Signature> native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The tensors of a tuple of them, as a list.
template <typename... T>
variable_list as_list(const std::tuple<T...>& tensors) {
  return std::apply([](const auto&... t) { return variable_list{t...}; }, tensors);
}

// Runs `compute` (a backward operator's call) as the forward of a node whose
// derivative raises: the node of a gradient computed with create_graph=True.
struct FirstDerivativeOnly : public torch::autograd::Function<FirstDerivativeOnly> {
  static variable_list forward(AutogradContext* /*ctx*/, const at::TensorList& /*inputs*/,
                               const std::function<variable_list()>& compute) {
    return compute();
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false,
                "deformops: double backward is not supported (a gradient was computed with "
                "create_graph=True and then differentiated again); the first derivatives are "
                "exact");
  }
};

// The gradients `compute` returns from `inputs` (the saved tensors and the
// incoming gradient), differentiable again only to raise.
variable_list first_derivatives(variable_list inputs,
                                const std::function<variable_list()>& compute) {
  inputs.erase(std::remove_if(inputs.begin(), inputs.end(),
                              [](const at::Tensor& t) { return !t.defined(); }),
               inputs.end());
  const auto below_autograd = [&compute] {
    const at::AutoDispatchBelowADInplaceOrView guard;
    return compute();
  };
  if (!at::GradMode::is_enabled()) {
    return below_autograd();
  }
  return FirstDerivativeOnly::apply(at::TensorList(inputs),
                                    std::function<variable_list()>(below_autograd));
}

// An optional tensor saved as a tensor (undefined for none), back as optional.
std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// ---------------------------------------------------------------------------

using ConvForward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
using ConvBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

struct DeformConv2d : public torch::autograd::Function<DeformConv2d> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& offset,
                            const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& bias, int64_t stride_h,
                            int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                            int64_t dilation_w) {
    ctx->save_for_backward({input, offset, weight, mask.value_or(at::Tensor())});
    ctx->saved_data["params"] =
        std::vector<int64_t>{stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w};
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    const at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<ConvForward>("deformops_native::deform_conv2d_forward");
    return op.call(input, offset, weight, mask, bias, stride_h, stride_w, pad_h, pad_w,
                   dilation_h, dilation_w);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op = native_op<ConvBackward>("deformops_native::deform_conv2d_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const std::vector<int64_t> p = ctx->saved_data["params"].toIntVector();
    const std::optional<at::Tensor> mask = optional_of(saved[3]);
    variable_list inputs = saved;
    inputs.push_back(grad);
    variable_list g = first_derivatives(inputs, [&] {
      return as_list(op.call(grad, saved[0], saved[1], saved[2], mask, p[0], p[1], p[2], p[3],
                             p[4], p[5]));
    });
    at::Tensor grad_bias;
    if (ctx->saved_data["has_bias"].toBool()) {
      // Over the pixels first, then the images: the first sum reads contiguous rows
      // of an NCHW gradient (one sum over N, H and W reduced strided rows, at a
      // third of the bandwidth on an H100).
      const at::ScalarType acc = at::promote_types(grad.scalar_type(), at::kFloat);
      grad_bias = grad.sum({2, 3}, /*keepdim=*/false, acc).sum(0).to(grad.scalar_type());
    }
    return {g[0], g[1], g[2], mask ? g[3] : at::Tensor(), grad_bias, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor deform_conv2d_autograd(const at::Tensor& input, const at::Tensor& offset,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& bias, int64_t stride_h,
                                  int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                  int64_t dilation_h, int64_t dilation_w) {
  return DeformConv2d::apply(input, offset, weight, mask, bias, stride_h, stride_w, pad_h, pad_w,
                             dilation_h, dilation_w);
}

// ---------------------------------------------------------------------------

using MsdaForward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&);
using MsdaBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&);

struct Msda : public torch::autograd::Function<Msda> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value,
                            const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
    ctx->save_for_backward(
        {value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    const at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<MsdaForward>("deformops_native::msda_forward");
    return op.call(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op = native_op<MsdaBackward>("deformops_native::msda_backward");
    const variable_list saved = ctx->get_saved_variables();
    variable_list inputs = saved;
    inputs.push_back(grads[0]);
    variable_list g = first_derivatives(inputs, [&] {
      return as_list(op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4]));
    });
    return {g[0], {}, {}, g[1], g[2]};
  }
};

at::Tensor msda_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  return Msda::apply(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights);
}

// ---------------------------------------------------------------------------

using RoiForward = at::Tensor(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t, double, int64_t,
                              double);
using RoiBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&,
                                                       const std::optional<at::Tensor>&, int64_t,
                                                       int64_t, double, int64_t, double);

struct DeformRoiPool : public torch::autograd::Function<DeformRoiPool> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& rois,
                            const std::optional<at::Tensor>& offset, int64_t pooled_height,
                            int64_t pooled_width, double spatial_scale, int64_t sampling_ratio,
                            double gamma) {
    ctx->save_for_backward({input, rois, offset.value_or(at::Tensor())});
    ctx->saved_data["sizes"] = std::vector<int64_t>{pooled_height, pooled_width, sampling_ratio};
    ctx->saved_data["scales"] = std::vector<double>{spatial_scale, gamma};
    const at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<RoiForward>("deformops_native::deform_roi_pool_forward");
    return op.call(input, rois, offset, pooled_height, pooled_width, spatial_scale,
                   sampling_ratio, gamma);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    static const auto op = native_op<RoiBackward>("deformops_native::deform_roi_pool_backward");
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> n = ctx->saved_data["sizes"].toIntVector();
    const std::vector<double> f = ctx->saved_data["scales"].toDoubleVector();
    const std::optional<at::Tensor> offset = optional_of(saved[2]);
    variable_list inputs = saved;
    inputs.push_back(grads[0]);
    variable_list g = first_derivatives(inputs, [&] {
      return as_list(op.call(grads[0], saved[0], saved[1], offset, n[0], n[1], f[0], n[2], f[1]));
    });
    return {g[0], {}, offset ? g[1] : at::Tensor(), {}, {}, {}, {}, {}};
  }
};

at::Tensor deform_roi_pool_autograd(const at::Tensor& input, const at::Tensor& rois,
                                    const std::optional<at::Tensor>& offset, int64_t pooled_height,
                                    int64_t pooled_width, double spatial_scale,
                                    int64_t sampling_ratio, double gamma) {
  return DeformRoiPool::apply(input, rois, offset, pooled_height, pooled_width, spatial_scale,
                              sampling_ratio, gamma);
}

}  // namespace
}  // namespace deformops_native

TORCH_LIBRARY_IMPL(deformops_native, Autograd, m) {
  m.impl("deform_conv2d_forward", &deformops_native::deform_conv2d_autograd);
  m.impl("msda_forward", &deformops_native::msda_autograd);
  m.impl("deform_roi_pool_forward", &deformops_native::deform_roi_pool_autograd);
}
