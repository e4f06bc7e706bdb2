// Device-wide sort and scan for the deterministic backward passes (cub, compiled
// once in sort.cu). Torch-free: raw device pointers, sizes and a cudaStream_t.
//
// Each function takes a scratch buffer of at least the bytes its *_scratch_bytes
// function returns for the same sizes (a size query runs no kernel), enqueues its
// work on `stream` and returns the error of the launch. Integer results do not
// depend on the order in which threads run: the same inputs give the same outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace deformops::gpu {

// Scratch bytes of sort_pairs for `count` pairs and keys of `key_bits` bits.
size_t sort_pairs_scratch_bytes(int32_t count, int key_bits);

// Sorts `count` (key, value) pairs by the low `key_bits` bits of their keys, in
// ascending order and stably: pairs of equal keys keep their input order.
// Inputs and outputs are distinct buffers.
cudaError_t sort_pairs(const uint32_t* keys_in, uint32_t* keys_out, const int32_t* values_in,
                       int32_t* values_out, int32_t count, int key_bits, void* scratch,
                       size_t scratch_bytes, cudaStream_t stream);

// Scratch bytes of exclusive_sum for `count` elements.
size_t exclusive_sum_scratch_bytes(int32_t count);

// out[i] = in[0] + ... + in[i - 1] (out[0] = 0) for i < count; `in` and `out`
// are distinct buffers.
cudaError_t exclusive_sum(const int32_t* in, int32_t* out, int32_t count, void* scratch,
                          size_t scratch_bytes, cudaStream_t stream);

}  // namespace deformops::gpu
