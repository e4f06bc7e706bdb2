// The CUDA MSDA kernels for float16 values (see msda_kernels.cuh).
#include "msda_kernels.cuh"

namespace deformops::gpu::msda_detail {

template cudaError_t forward<__half>(const MsdaInputs&, void*, cudaStream_t);
template cudaError_t backward<__half>(const MsdaInputs&, const void*, const MsdaGrads&, cudaStream_t);

}  // namespace deformops::gpu::msda_detail
