// The CUDA MSDA kernels for bfloat16 values (see msda_kernels.cuh).
#include "msda_kernels.cuh"

namespace deformops::gpu::msda_detail {

template cudaError_t forward<__nv_bfloat16>(const MsdaInputs&, void*, cudaStream_t);
template cudaError_t backward<__nv_bfloat16>(const MsdaInputs&, const void*, const MsdaGrads&, cudaStream_t);

}  // namespace deformops::gpu::msda_detail
