// The sort and scan of sort.h, on cub. cub lives here in a namespace of
// deformops' own, so that its kernels cannot clash with the copy of cub inside
// PyTorch or another extension loaded in the same process.
#define CUB_WRAPPED_NAMESPACE deformops_cub
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "sort.h"

namespace deformops::gpu {

namespace cub = ::deformops_cub::cub;

size_t sort_pairs_scratch_bytes(int32_t count, int key_bits) {
  size_t bytes = 0;
  const cudaError_t status = cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), count, 0, key_bits);
  return status == cudaSuccess ? bytes : 0;
}

cudaError_t sort_pairs(const uint32_t* keys_in, uint32_t* keys_out, const int32_t* values_in,
                       int32_t* values_out, int32_t count, int key_bits, void* scratch,
                       size_t scratch_bytes, cudaStream_t stream) {
  if (count == 0) {
    return cudaSuccess;
  }
  return cub::DeviceRadixSort::SortPairs(scratch, scratch_bytes, keys_in, keys_out, values_in,
                                         values_out, count, 0, key_bits, stream);
}

size_t exclusive_sum_scratch_bytes(int32_t count) {
  size_t bytes = 0;
  const cudaError_t status = cub::DeviceScan::ExclusiveSum(
      nullptr, bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), count);
  return status == cudaSuccess ? bytes : 0;
}

cudaError_t exclusive_sum(const int32_t* in, int32_t* out, int32_t count, void* scratch,
                          size_t scratch_bytes, cudaStream_t stream) {
  if (count == 0) {
    return cudaSuccess;
  }
  return cub::DeviceScan::ExclusiveSum(scratch, scratch_bytes, in, out, count, stream);
}

}  // namespace deformops::gpu
