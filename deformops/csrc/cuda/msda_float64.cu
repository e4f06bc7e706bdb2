// The CUDA MSDA kernels for float64 values (see msda_kernels.cuh).
#include "msda_kernels.cuh"

namespace deformops::gpu::msda_detail {

template cudaError_t forward<double>(const MsdaInputs&, void*, cudaStream_t);
template cudaError_t backward<double>(const MsdaInputs&, const void*, const MsdaGrads&, cudaStream_t);

}  // namespace deformops::gpu::msda_detail
