// CUDA helpers shared by the deformops kernels: element types, conversions,
// 16-byte vector loads and stores, vector atomics and warp reductions.
// Torch-free: plain CUDA C++ that nvcc compiles on a machine without torch.
//
// Element types are the CUDA ones: float, double, __half and __nv_bfloat16.
// Conversions go through the named intrinsics, so this header compiles whether
// or not __CUDA_NO_HALF_CONVERSIONS__ and friends are defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace deformops::gpu {

// The type an element type is computed in: float for the half types and float,
// double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// Widens an element to its computation type (float or double).
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds a computed value (float or double) to the element type T, to nearest.
template <typename T>
struct Narrow {
  template <typename A>
  __device__ __forceinline__ static T from(A v) {
    return static_cast<T>(v);
  }
};
template <>
struct Narrow<__half> {
  template <typename A>
  __device__ __forceinline__ static __half from(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct Narrow<__nv_bfloat16> {
  template <typename A>
  __device__ __forceinline__ static __nv_bfloat16 from(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) {
  return Narrow<T>::from(v);
}

// The unsigned word type of `Bytes` bytes, as loaded by one instruction.
template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};
// 32 bytes: two 16-byte words, accessed with two instructions.
template <>
struct Word<32> {
  struct type {
    uint4 lo, hi;
  };
};

// Widens the N elements of type T packed in `word` to A.
template <int N, typename T, typename A, typename W>
__device__ __forceinline__ void unpack_vec(const W& word, A (&out)[N]) {
  T elements[N];
  memcpy(elements, &word, sizeof(word));
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out[k] = static_cast<A>(widen(elements[k]));
  }
}

// N elements of type T as one instruction loads them (not yet widened).
template <int N, typename T>
using Packed = typename Word<N * static_cast<int>(sizeof(T))>::type;

// Loads N consecutive elements at `p` (aligned to N * sizeof(T), or to 16
// bytes for 32 of them) in one instruction (two for 32 bytes) through the
// read-only cache, packed.
template <int N, typename T>
__device__ __forceinline__ Packed<N, T> load_packed(const T* p) {
  using W = Packed<N, T>;
  if constexpr (sizeof(W) == 32) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    return W{__ldg(q), __ldg(q + 1)};
  } else {
    return __ldg(reinterpret_cast<const W*>(p));
  }
}

// Loads N consecutive elements at `p` (aligned to N * sizeof(T)) in one
// instruction through the read-only cache, widened to A.
template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  unpack_vec<N, T>(load_packed<N>(p), out);
}

// Loads N consecutive elements at `p` (aligned to N * sizeof(T), at most 16
// bytes) in one instruction, marked as streamed (read once: evicted first from
// L1 and L2).
template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec_streaming(const T* p, A (&out)[N]) {
  using W = typename Word<N * static_cast<int>(sizeof(T))>::type;
  unpack_vec<N, T>(__ldcs(reinterpret_cast<const W*>(p)), out);
}

// Rounds N values to T and stores them at `p` (aligned to N * sizeof(T), or
// to 16 bytes for more) in one instruction per 16 bytes, marked as streamed.
template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec_streaming(T* p, const A (&in)[N]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (N > kPiece) {
#pragma unroll
    for (int j = 0; j < N; j += kPiece) {
      A part[kPiece];
#pragma unroll
      for (int e = 0; e < kPiece; ++e) {
        part[e] = in[j + e];
      }
      store_vec_streaming<kPiece>(p + j, part);
    }
  } else {
    using W = typename Word<N * static_cast<int>(sizeof(T))>::type;
    T elements[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      elements[k] = narrow<T>(in[k]);
    }
    W word;
    memcpy(&word, elements, sizeof(word));
    __stcs(reinterpret_cast<W*>(p), word);
  }
}

// Element `i` of an array stored as float (`is_float`) or as T, widened to A.
template <typename A, typename T>
__device__ __forceinline__ A load_either(const void* p, bool is_float, int64_t i) {
  if (is_float) {
    return static_cast<A>(__ldcs(static_cast<const float*>(p) + i));
  }
  return static_cast<A>(widen(__ldcs(static_cast<const T*>(p) + i)));
}

// Elements 2i and 2i + 1 of an array stored as float (`is_float`) or as T,
// widened to A: one load where `paired` (`p` aligned to two elements), else two.
template <typename A, typename T>
__device__ __forceinline__ void load_pair_either(const void* p, bool is_float, bool paired,
                                                 int64_t i, A (&out)[2]) {
  if (paired && is_float) {
    load_vec_streaming<2>(static_cast<const float*>(p) + 2 * i, out);
  } else if (paired) {
    load_vec_streaming<2>(static_cast<const T*>(p) + 2 * i, out);
  } else {
    out[0] = load_either<A, T>(p, is_float, 2 * i);
    out[1] = load_either<A, T>(p, is_float, 2 * i + 1);
  }
}

// Stores `v` as element `i` of an array stored as float (`is_float`) or as T.
template <typename T, typename A>
__device__ __forceinline__ void store_either(void* p, bool is_float, int64_t i, A v) {
  if (is_float) {
    __stcs(static_cast<float*>(p) + i, static_cast<float>(v));
  } else {
    __stcs(static_cast<T*>(p) + i, narrow<T>(v));
  }
}

// Stores `x` and `y` as elements 2i and 2i + 1 of an array stored as float
// (`is_float`) or as T, in one instruction (`p` is aligned to two elements).
template <typename T, typename A>
__device__ __forceinline__ void store_pair_either(void* p, bool is_float, int64_t i, A x, A y) {
  const A v[2] = {x, y};
  if (is_float) {
    store_vec_streaming<2>(static_cast<float*>(p) + 2 * i, v);
  } else {
    store_vec_streaming<2>(static_cast<T*>(p) + 2 * i, v);
  }
}

// Two values rounded to a packed pair of half-precision elements, as a 32-bit word.
__device__ __forceinline__ unsigned int pack2(__half, float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  unsigned int word;
  memcpy(&word, &h, sizeof(word));
  return word;
}
__device__ __forceinline__ unsigned int pack2(__nv_bfloat16, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  unsigned int word;
  memcpy(&word, &h, sizeof(word));
  return word;
}

// Scalar atomic add of a computed value to an element, for every element type.
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(__half* p, float v) {
  atomicAdd(p, __float2half_rn(v));
}
__device__ __forceinline__ void atomic_add(__nv_bfloat16* p, float v) {
  atomicAdd(p, __float2bfloat16_rn(v));
}

// Atomic add of a packed pair of halves (`word`, made by pack2) to p[0], p[1].
__device__ __forceinline__ void atomic_add_pair(__half* p, unsigned int word) {
  __half2 h;
  memcpy(&h, &word, sizeof(h));
  atomicAdd(reinterpret_cast<__half2*>(p), h);
}
__device__ __forceinline__ void atomic_add_pair(__nv_bfloat16* p, unsigned int word) {
  __nv_bfloat162 h;
  memcpy(&h, &word, sizeof(h));
  atomicAdd(reinterpret_cast<__nv_bfloat162*>(p), h);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// 16-byte reductions of 8 halves (sm_90 and later: one vector red instruction).
__device__ __forceinline__ void red_add_x8(__half* p, const unsigned int (&w)[4]) {
  asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};" ::"l"(
                   __cvta_generic_to_global(p)),
               "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}
__device__ __forceinline__ void red_add_x8(__nv_bfloat16* p, const unsigned int (&w)[4]) {
  asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(
                   __cvta_generic_to_global(p)),
               "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}
#endif

// Atomically adds N computed values to the N consecutive elements at `p`
// (aligned to N * sizeof(T) when N > 1), with the widest atomic the target
// offers: on sm_90 one 16-byte vector reduction per 4 floats or 8 halves, else
// pairs of halves or single elements.
template <int N, typename T, typename A>
__device__ __forceinline__ void atomic_add_vec(T* p, const A (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVectorRed = true;
#else
  constexpr bool kVectorRed = false;
#endif
  if constexpr (sizeof(T) == 4 && N % 4 == 0 && kVectorRed) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + k), make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]));
    }
  } else if constexpr (sizeof(T) == 4 && N % 2 == 0 && kVectorRed) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      atomicAdd(reinterpret_cast<float2*>(p + k), make_float2(v[k], v[k + 1]));
    }
  } else if constexpr (sizeof(T) == 2 && N % 2 == 0) {
    unsigned int words[N / 2];
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      words[k] = pack2(T{}, v[2 * k], v[2 * k + 1]);
    }
    if constexpr (N % 8 == 0 && kVectorRed) {
#pragma unroll
      for (int k = 0; k < N / 2; k += 4) {
        const unsigned int chunk[4] = {words[k], words[k + 1], words[k + 2], words[k + 3]};
        red_add_x8(p + 2 * k, chunk);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N / 2; ++k) {
        atomic_add_pair(p + 2 * k, words[k]);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      atomic_add(p + k, v[k]);
    }
  }
}

// Sum of `v` over the lanes whose index differs from this lane's only in the
// bits from `first` (a power of two) up to, not including, `end`: an xor
// butterfly. Every lane in `mask` (which must hold those lanes) must call it;
// each gets the sum.
template <typename A>
__device__ __forceinline__ A lane_sum(A v, int first, int end, unsigned int mask = 0xffffffffu) {
  for (int offset = first; offset < end; offset <<= 1) {
    v += __shfl_xor_sync(mask, v, offset);
  }
  return v;
}

// Whether `p` is aligned to `bytes` (a power of two).
inline bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Bytes of the widest access one instruction makes.
constexpr int kMaxVectorBytes = 16;

// Elements per vector for elements of `Bytes` bytes: the most (a power of two,
// kMaxVectorBytes at most) that divide `elements`, with each of the `count`
// pointers aligned to the vector.
template <int Bytes>
int vector_width(int64_t elements, const void* const* pointers, int count) {
  for (int vec = kMaxVectorBytes / Bytes; vec > 1; vec /= 2) {
    bool ok = elements % vec == 0;
    for (int i = 0; i < count; ++i) {
      ok = ok && is_aligned(pointers[i], static_cast<uintptr_t>(vec) * Bytes);
    }
    if (ok) {
      return vec;
    }
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>{}) for VEC = vec, among the widths
// whose vectors of elements of `Bytes` bytes fit kMaxVectorBytes (so that no
// kernel is instantiated for a width it cannot load in one instruction); 1 for
// any other vec. Returns what f returns.
template <int Bytes, typename F>
cudaError_t with_vector_width(int vec, F&& f) {
  switch (vec) {
    case 8:
      if constexpr (Bytes * 8 <= kMaxVectorBytes) {
        return f(std::integral_constant<int, 8>{});
      }
      break;
    case 4:
      if constexpr (Bytes * 4 <= kMaxVectorBytes) {
        return f(std::integral_constant<int, 4>{});
      }
      break;
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      break;
  }
  return f(std::integral_constant<int, 1>{});
}

}  // namespace deformops::gpu
