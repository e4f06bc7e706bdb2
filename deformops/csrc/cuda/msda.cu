// Dtype dispatch of the CUDA MSDA launchers declared in msda.h. The kernels
// are instantiated per value type in msda_<type>.cu (compiled in parallel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "msda.h"
#include "msda_gather.h"

namespace deformops::gpu {
namespace msda_detail {

// Defined in msda_kernels.cuh, instantiated in msda_<type>.cu.
template <typename T>
cudaError_t forward(const MsdaInputs& in, void* output, cudaStream_t stream);
template <typename T>
cudaError_t backward(const MsdaInputs& in, const void* grad_output, const MsdaGrads& grads,
                     cudaStream_t stream);

}  // namespace msda_detail

size_t msda_gather_workspace_bytes(const MsdaSizes& sizes, Dtype value_dtype) {
  const size_t acc_bytes = value_dtype == Dtype::kFloat64 ? sizeof(double) : sizeof(float);
  const msda_detail::GatherPlan plan = msda_detail::gather_plan(sizes, acc_bytes);
  return plan.valid ? plan.total : 0;
}

cudaError_t msda_forward(const MsdaInputs& inputs, void* output, cudaStream_t stream) {
  switch (inputs.value_dtype) {
    case Dtype::kFloat32:
      return msda_detail::forward<float>(inputs, output, stream);
    case Dtype::kFloat16:
      return msda_detail::forward<__half>(inputs, output, stream);
    case Dtype::kBFloat16:
      return msda_detail::forward<__nv_bfloat16>(inputs, output, stream);
    case Dtype::kFloat64:
      return msda_detail::forward<double>(inputs, output, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t msda_backward(const MsdaInputs& inputs, const void* grad_output,
                          const MsdaGrads& grads, cudaStream_t stream) {
  switch (inputs.value_dtype) {
    case Dtype::kFloat32:
      return msda_detail::backward<float>(inputs, grad_output, grads, stream);
    case Dtype::kFloat16:
      return msda_detail::backward<__half>(inputs, grad_output, grads, stream);
    case Dtype::kBFloat16:
      return msda_detail::backward<__nv_bfloat16>(inputs, grad_output, grads, stream);
    case Dtype::kFloat64:
      return msda_detail::backward<double>(inputs, grad_output, grads, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deformops::gpu
