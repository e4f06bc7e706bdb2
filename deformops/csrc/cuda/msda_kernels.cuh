// Kernels and launch logic of the CUDA multi-scale deformable attention, as
// templates over the value's element type T (float, __half, __nv_bfloat16,
// double). msda_<type>.cu instantiates them for one T each, so that the types
// compile in parallel; msda.cu dispatches on the dtype.
//
// Work decomposition. A group of threads serves one (n, m, q) triple; groups
// are ordered with q fastest, so that the threads resident on an SM at a time
// mostly sample one head of one batch element and share its rows in L1 / L2.
// A group has 2^log_c channel lanes, each owning VEC consecutive channels (one
// vector of up to 16 bytes on the fast path), and 2^log_s point lanes that
// share out the L * P samples in rounds of one sample per channel lane.
//
// In a round, channel lane c computes the corners of sample (round * lanes + c)
// with sampling.h (once per sample, not once per lane) and the lanes take turns
// broadcasting theirs with warp shuffles; every lane then reads its channels of
// the four corners (all loads in flight together) and
//  - forward: accumulates attention * weight * value in float (double), and
//    the point lanes are summed with shuffles at the end;
//  - backward: dots the corner vectors with its grad_output channels, scatters
//    attention * weight * grad_output into the value gradient with vector
//    atomics (16-byte red on sm_90), and the dots, summed over the channel lanes
//    with shuffles, give the owner lane the gradients of the location and the
//    attention weight, which it writes once (no atomics).
// Fast path: D = lanes * VEC with lanes a power of two <= 32 and aligned
// pointers, one pass over the channels. Generic path (any D; float64): VEC = 1,
// up to 32 channel lanes and as many passes as D needs.
//
// Deterministic backward. The order in which floating-point atomics add into
// an element of the value gradient changes from run to run, and so do the
// rounding errors. In deterministic mode the same kernel scatters the value
// gradient into a fixed-point accumulator instead, with 64-bit integer atomics,
// whose sums do not depend on the order:
//  1. max_abs_kernel: the largest |attention weight| and |grad_output|, a and g;
//  2. the backward kernel adds round(x * 2^e) for every term x, with e chosen
//     (fixed_point_scale) so that no sum of an element, at most Q*L*P * a * g
//     in magnitude, reaches 2^62; each term is exact to 2^-e, about 2^-62 of
//     that bound (2^-40 of a * g on the benchmark workloads: far below float32
//     rounding for every element not many orders smaller than the largest);
//  3. from_fixed_kernel rounds each element once to the value's type (NaN
//     everywhere when a or g is not finite).
// The accumulator takes 8 bytes per value element.
#pragma once

#include <atomic>
#include <type_traits>

#include "../sampling.h"
#include "common.cuh"
#include "msda.h"

namespace deformops::gpu::msda_detail {

constexpr int kBlock = 256;

// Resident blocks per SM the kernels are compiled for (their register budget,
// chosen so that nothing spills: scripts/check_cuda_compile.py): the forward
// with kInFlight samples' loads in flight fits 80 registers, the backward 128.
constexpr int kForwardBlocks = 3;
constexpr int kBackwardBlocks = 2;

// Vector shape of the fast path for values of type T whose value gradient is
// accumulated in G (the forward uses G = T): VEC elements per load, with
// VEC * sizeof(T) and VEC * sizeof(G) at most 16 bytes, so that a lane's loads,
// stores and vector atomics are single instructions and the lanes of a group
// cover whole 32-byte sectors together (a half-precision value with a float32
// gradient workspace reads 8 bytes and adds 16).
// float64 takes the generic path only (it serves gradcheck, not speed).
template <typename T, typename G>
struct FastShape {
  static constexpr int kVec =
      sizeof(T) == 8 ? 1 : 16 / static_cast<int>(sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
  static constexpr bool kEnabled = sizeof(T) < 8;
};

// How threads map onto the problem (see the file comment).
struct Layout {
  int64_t groups;   // N * M * Q
  int64_t threads;  // groups << (log_c + log_s)
  int log_c;        // log2 of the channel lanes of a group
  int log_s;        // log2 of the point lanes of a group
  int passes;       // passes over the channels (1 on the fast path)
  bool fast;        // the fast path
};

// Kernel arguments shared by the forward and the backward.
template <typename T>
struct Args {
  MsdaSizes s;
  Layout lay;
  const T* value;
  const int64_t* spatial_shapes;
  const int64_t* level_start;
  const void* locations;
  const void* weights;
  bool locations_float;  // locations stored as float (else as T)
  bool weights_float;    // attention weights stored as float (else as T)
};

// Marks a corner the backward need not read (outside the map or dropped).
constexpr uint32_t kNoCorner = 0xffffffffu;

// What the owner lane of a sample computes and shares (pos, scaled) or keeps
// for the gradients of its location and attention weight.
template <typename A>
struct Sample {
  uint32_t pos[4];  // flat position of each corner in [0, S); kNoCorner: not read
  A scaled[4];      // attention * corner weight (0 for a corner not read)
  A weight[4], dweight_dy[4], dweight_dx[4];
  A attention;
  A w, h;           // the level's width and height
  int64_t index;    // the sample's index in attention_weights
};

// A sample's corners on its level of h x w pixels (sampling.h, in precision C),
// those outside the value's S positions dropped (rebase_corners: memory safety
// even when the level tables disagree with S), and its pixel coordinates.
template <typename C>
struct Located {
  Corners<C> corners;
  C y, x;
  int64_t h, w;
};

// Loads the location of the sample of index `index` (in attention_weights), on
// level l, and locates it.
template <typename C, typename T>
__device__ __forceinline__ Located<C> locate(const Args<T>& a, int64_t index, int64_t l) {
  Located<C> at;
  at.h = __ldg(a.spatial_shapes + 2 * l);
  at.w = __ldg(a.spatial_shapes + 2 * l + 1);
  at.x = load_either<C, T>(a.locations, a.locations_float, 2 * index) * static_cast<C>(at.w) -
         C(0.5);
  at.y = load_either<C, T>(a.locations, a.locations_float, 2 * index + 1) *
             static_cast<C>(at.h) -
         C(0.5);
  at.corners = bilinear_corners<C>(at.y, at.x, at.h, at.w);
  rebase_corners(at.corners, __ldg(a.level_start + l), a.s.spatial);
  return at;
}

// The owner's work for sample j (< L * P) of the (n, q, m) row `nqm`: load its
// location and attention weight, compute its corners (sampling.h) in precision
// C, drop those outside the value's S positions (rebase_corners: memory safety
// even when the level tables disagree with S).
//
// The backward uses C = double whatever T: rounding a pixel coordinate to float
// can move a point across a pixel edge, where the location gradient jumps
// (float64 does not round there). The forward's output is continuous in the
// location, so it uses C = A.
template <typename C, typename T, typename A>
__device__ __forceinline__ Sample<A> owner_sample(const Args<T>& a, int64_t nqm, int64_t j) {
  const MsdaSizes& s = a.s;
  Sample<A> smp;
  smp.index = nqm * (s.levels * s.points) + j;
  smp.attention = load_either<A, T>(a.weights, a.weights_float, smp.index);
  const Located<C> at = locate<C>(a, smp.index, j / s.points);
  const Corners<C>& c = at.corners;
  smp.h = static_cast<A>(at.h);
  smp.w = static_cast<A>(at.w);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool read = c.weight[k] != C(0) || c.dweight_dy[k] != C(0) || c.dweight_dx[k] != C(0);
    smp.pos[k] = read ? static_cast<uint32_t>(c.offset[k]) : kNoCorner;
    smp.weight[k] = static_cast<A>(c.weight[k]);
    smp.dweight_dy[k] = static_cast<A>(c.dweight_dy[k]);
    smp.dweight_dx[k] = static_cast<A>(c.dweight_dx[k]);
    smp.scaled[k] = smp.attention * smp.weight[k];
  }
  return smp;
}

// An empty sample (beyond L * P): nothing to read, nothing to add.
template <typename A>
__device__ __forceinline__ Sample<A> empty_sample() {
  Sample<A> smp;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    smp.pos[k] = kNoCorner;
    smp.scaled[k] = A(0);
    smp.weight[k] = smp.dweight_dy[k] = smp.dweight_dx[k] = A(0);
  }
  smp.attention = smp.w = smp.h = A(0);
  smp.index = 0;
  return smp;
}

// The corner positions and scaled weights of the sample owned by lane `owner`
// of this lane's segment of `lanes` lanes.
template <typename A>
struct Shared {
  uint32_t pos[4];
  A scaled[4];
};

template <typename A>
__device__ __forceinline__ Shared<A> receive(const Sample<A>& mine, int owner, int lanes,
                                             unsigned int mask) {
  Shared<A> sh;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    sh.pos[k] = __shfl_sync(mask, mine.pos[k], owner, lanes);
    sh.scaled[k] = __shfl_sync(mask, mine.scaled[k], owner, lanes);
  }
  return sh;
}

// Samples whose corner loads a lane issues together, before using any: the
// gathers are latency-bound, and one sample's four loads at a time left the
// memory system idle between samples.
constexpr int kInFlight = 2;

// receive() of owner `owner` when it is below `count` (uniform over the
// segment, so every lane reaches the shuffles), else a sample with nothing to
// read or add.
template <typename A>
__device__ __forceinline__ Shared<A> receive_or_empty(const Sample<A>& mine, int owner, int count,
                                                      int lanes, unsigned int mask) {
  if (owner < count) {
    return receive(mine, owner, lanes, mask);
  }
  Shared<A> sh;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    sh.pos[k] = kNoCorner;
    sh.scaled[k] = A(0);
  }
  return sh;
}

// Loads the lane's VEC channels of the corners at positions pos[k] (row:
// elements between positions) from `data` (the lane's first channel at position
// 0), packed (widened where they are used, so that several samples' loads fit
// in registers together), or zeros where read[k] is false. The loads are
// independent, so they are in flight together.
template <int VEC, typename T>
__device__ __forceinline__ void load_corners(const T* data, uint32_t row, const uint32_t (&pos)[4],
                                             const bool (&read)[4], Packed<VEC, T> (&v)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = read[k] ? load_packed<VEC>(data + static_cast<uint64_t>(pos[k]) * row)
                   : Packed<VEC, T>{};
  }
}

// The decoded (n, m, q) triple of thread `t`.
struct Position {
  int64_t n, m;
  int64_t nqm;  // (n * Q + q) * M + m: the row of the output and of the samples
  bool valid;   // t serves an existing group
};

__device__ __forceinline__ Position locate(const MsdaSizes& s, const Layout& lay, int64_t t) {
  Position pos;
  const int64_t g = t >> (lay.log_c + lay.log_s);
  pos.valid = g < lay.groups;
  const int64_t gg = pos.valid ? g : 0;
  const int64_t q = gg % s.queries;
  const int64_t nm = gg / s.queries;
  pos.m = nm % s.heads;
  pos.n = nm / s.heads;
  pos.nqm = (pos.n * s.queries + q) * s.heads + pos.m;
  return pos;
}

// The first of the VEC channels of lane c in pass `pass`: ((pass * lanes) + c) *
// VEC, so that the lanes of a group read and add consecutive vectors.
template <int VEC>
__device__ __forceinline__ int64_t first_channel(int pass, int lane_c, int log_c) {
  return ((static_cast<int64_t>(pass) << log_c) + lane_c) * VEC;
}

// The lanes of this thread's channel segment (its group's channel lanes for one
// point lane), as a shuffle mask.
__device__ __forceinline__ unsigned int segment_mask(int lanes) {
  const unsigned int bits = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  return bits << ((threadIdx.x & 31) & ~(lanes - 1));
}

template <typename T, int VEC, bool ONE_PASS>
__global__ void __launch_bounds__(kBlock, kForwardBlocks)
    msda_forward_kernel(const Args<T> a, T* __restrict__ output) {
  using A = acc_type<T>;
  const MsdaSizes& s = a.s;
  const Layout& lay = a.lay;
  const int lanes = 1 << lay.log_c;
  const int lane_c = threadIdx.x & (lanes - 1);
  const int lane_s = (threadIdx.x >> lay.log_c) & ((1 << lay.log_s) - 1);
  const unsigned int mask = segment_mask(lanes);
  const uint32_t row = static_cast<uint32_t>(s.heads * s.channels);
  const int64_t samples = s.levels * s.points;
  const int64_t rounds = (samples + lanes - 1) >> lay.log_c;
  const int passes = ONE_PASS ? 1 : lay.passes;
  // The loop bound is uniform over the block, so every lane reaches the shuffles.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kBlock; base < lay.threads;
       base += static_cast<int64_t>(gridDim.x) * kBlock) {
    const Position pos = locate(s, lay, base + threadIdx.x);
    const T* value_nm = a.value + (pos.n * s.spatial * row + pos.m * s.channels);
    for (int pass = 0; pass < passes; ++pass) {
      const int64_t d = first_channel<VEC>(pass, lane_c, lay.log_c);
      const bool has_channels = d < s.channels;
      A acc[VEC] = {};
      for (int64_t r = lane_s; pos.valid && r < rounds; r += int64_t{1} << lay.log_s) {
        const int64_t j = (r << lay.log_c) + lane_c;
        const Sample<A> mine =
            j < samples ? owner_sample<A, T, A>(a, pos.nqm, j) : empty_sample<A>();
        const int count = static_cast<int>(min(int64_t{lanes}, samples - (r << lay.log_c)));
        for (int first = 0; first < count; first += kInFlight) {
          Shared<A> sh[kInFlight];
          Packed<VEC, T> v[kInFlight][4];
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            sh[i] = receive_or_empty(mine, first + i, count, lanes, mask);
            bool read[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              read[k] = has_channels && sh[i].scaled[k] != A(0);
            }
            load_corners<VEC>(value_nm + d, row, sh[i].pos, read, v[i]);
          }
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              A corner[VEC];
              unpack_vec<VEC, T>(v[i][k], corner);
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                acc[e] += sh[i].scaled[k] * corner[e];
              }
            }
          }
        }
      }
      if (lay.log_s > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          acc[e] = lane_sum(acc[e], lanes, 1 << (lay.log_c + lay.log_s));
        }
      }
      if (pos.valid && has_channels && lane_s == 0) {
        store_vec_streaming<VEC>(output + pos.nqm * s.channels + d, acc);
      }
    }
  }
}

// An element of the deterministic backward's fixed-point accumulator: a
// two's-complement integer in an unsigned word (atomic adds wrap around).
using Fixed = unsigned long long;

// 2^e such that every sum of an element of the value gradient, at most
// Q*L*P * max|attention weight| * max|grad_output| in magnitude (each sample
// adds to an element at most once, with a bilinear weight <= 1), stays below
// 2^62 in fixed point; 0 when a maximum is not finite. `maxima`: the bits of the
// two maxima (max_abs_kernel).
__device__ __forceinline__ double fixed_point_scale(const unsigned int* maxima,
                                                    const MsdaSizes& s) {
  const double bound = static_cast<double>(__uint_as_float(maxima[0])) *
                       static_cast<double>(__uint_as_float(maxima[1])) *
                       static_cast<double>(s.queries * s.levels * s.points);
  if (!isfinite(bound)) {
    return 0.0;
  }
  int e = 0;
  frexp(bound, &e);  // bound < 2^e
  return ldexp(1.0, min(62 - e, 1000));
}

// x in fixed point of scale `scale`, rounded to nearest.
__device__ __forceinline__ Fixed to_fixed(double x, double scale) {
  return static_cast<Fixed>(llrint(x * scale));
}

// G: element type of the value gradient the atomics accumulate into (T, float
// for a half-precision T with a float32 workspace, or Fixed in deterministic
// mode, scaled by fixed_point_scale of `maxima`).
template <typename T, typename G, int VEC, bool ONE_PASS>
__global__ void __launch_bounds__(kBlock, kBackwardBlocks)
    msda_backward_kernel(const Args<T> a, const T* __restrict__ grad_output,
                         G* __restrict__ grad_value, void* __restrict__ grad_locations,
                         void* __restrict__ grad_weights, const unsigned int* maxima) {
  using A = acc_type<T>;
  constexpr bool kFixed = std::is_same_v<G, Fixed>;
  const double scale = kFixed ? fixed_point_scale(maxima, a.s) : 0.0;
  const MsdaSizes& s = a.s;
  const Layout& lay = a.lay;
  const int lanes = 1 << lay.log_c;
  const int lane_c = threadIdx.x & (lanes - 1);
  const int lane_s = (threadIdx.x >> lay.log_c) & ((1 << lay.log_s) - 1);
  const unsigned int mask = segment_mask(lanes);
  const uint32_t row = static_cast<uint32_t>(s.heads * s.channels);
  const int64_t samples = s.levels * s.points;
  const int64_t rounds = (samples + lanes - 1) >> lay.log_c;
  const int passes = ONE_PASS ? 1 : lay.passes;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kBlock; base < lay.threads;
       base += static_cast<int64_t>(gridDim.x) * kBlock) {
    const Position pos = locate(s, lay, base + threadIdx.x);
    const int64_t value_offset = pos.n * s.spatial * row + pos.m * s.channels;
    const T* grad_out = grad_output + pos.nqm * s.channels;
    A go[VEC] = {};
    if constexpr (ONE_PASS) {
      const int64_t d = first_channel<VEC>(0, lane_c, lay.log_c);
      if (pos.valid && d < s.channels) {
        load_vec_streaming<VEC>(grad_out + d, go);
      }
    }
    for (int64_t r = lane_s; pos.valid && r < rounds; r += int64_t{1} << lay.log_s) {
      const int64_t j = (r << lay.log_c) + lane_c;
      const Sample<A> mine =
          j < samples ? owner_sample<double, T, A>(a, pos.nqm, j) : empty_sample<A>();
      const int count = static_cast<int>(min(int64_t{lanes}, samples - (r << lay.log_c)));
      for (int first = 0; first < count; first += kInFlight) {
        Shared<A> sh[kInFlight];
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
          sh[i] = receive_or_empty(mine, first + i, count, lanes, mask);
        }
        A dot[kInFlight][4] = {};  // this lane's part of (corner value) . grad_output
        for (int pass = 0; pass < passes; ++pass) {
          const int64_t d = first_channel<VEC>(pass, lane_c, lay.log_c);
          if (d >= s.channels) {
            continue;
          }
          if constexpr (!ONE_PASS) {
            load_vec_streaming<VEC>(grad_out + d, go);
          }
          Packed<VEC, T> v[kInFlight][4];
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            bool read[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              read[k] = sh[i].pos[k] != kNoCorner;
            }
            load_corners<VEC>(a.value + value_offset + d, row, sh[i].pos, read, v[i]);
          }
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              A corner[VEC];
              unpack_vec<VEC, T>(v[i][k], corner);
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                dot[i][k] += corner[e] * go[e];
              }
              if (grad_value != nullptr && sh[i].scaled[k] != A(0)) {
                A add[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                  add[e] = sh[i].scaled[k] * go[e];
                }
                G* target = grad_value + value_offset + d + static_cast<uint64_t>(sh[i].pos[k]) * row;
                if constexpr (kFixed) {
#pragma unroll
                  for (int e = 0; e < VEC; ++e) {
                    atomicAdd(target + e, to_fixed(add[e], scale));
                  }
                } else {
                  atomic_add_vec<VEC>(target, add);
                }
              }
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            dot[i][k] = lane_sum(dot[i][k], 1, lanes, mask);
          }
          if (lane_c == first + i && first + i < count) {
            A grad_a = A(0);  // d loss / d attention weight
            A grad_y = A(0);  // d loss / d y (pixels) / attention
            A grad_x = A(0);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              grad_a += mine.weight[k] * dot[i][k];
              grad_y += mine.dweight_dy[k] * dot[i][k];
              grad_x += mine.dweight_dx[k] * dot[i][k];
            }
            store_either<T>(grad_weights, a.weights_float, mine.index, grad_a);
            store_either<T>(grad_locations, a.locations_float, 2 * mine.index,
                            mine.attention * grad_x * mine.w);
            store_either<T>(grad_locations, a.locations_float, 2 * mine.index + 1,
                            mine.attention * grad_y * mine.h);
          }
        }
      }
    }
  }
}

// dst[i] = src[i] rounded to T, VEC elements per thread and step.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock)
    narrow_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t vectors) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    float v[VEC];
    load_vec_streaming<VEC>(src + i * VEC, v);
    store_vec_streaming<VEC>(dst + i * VEC, v);
  }
}

// Number of SMs of the current device (132 if it cannot be read), cached per device.
inline int sm_count() {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return 132;
  }
  if (device >= 0 && device < kDevices && cache[device].load(std::memory_order_relaxed) > 0) {
    return cache[device].load(std::memory_order_relaxed);
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      count <= 0) {
    return 132;
  }
  if (device >= 0 && device < kDevices) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

inline int ceil_log2(int64_t x) {
  int k = 0;
  while ((int64_t{1} << k) < x) {
    ++k;
  }
  return k;
}

// Whether x is a power of two no larger than 32.
inline bool small_power_of_two(int64_t x) { return x > 0 && x <= 32 && (x & (x - 1)) == 0; }

// The layout of a problem for the fast path's lane width `lane_channels` (0:
// generic path only); `aligned`: every vector-accessed pointer is 16-byte aligned.
inline Layout make_layout(const MsdaSizes& s, int lane_channels, bool aligned) {
  Layout lay;
  lay.groups = s.batch * s.heads * s.queries;
  const int64_t lanes = lane_channels > 0 ? s.channels / lane_channels : 0;
  lay.fast = lane_channels > 0 && aligned && s.channels % lane_channels == 0 &&
             small_power_of_two(lanes);
  if (lay.fast) {
    lay.log_c = ceil_log2(lanes);
    lay.passes = 1;
  } else {
    lay.log_c = ceil_log2(s.channels < 32 ? s.channels : 32);
    lay.passes = static_cast<int>((s.channels + (1 << lay.log_c) - 1) >> lay.log_c);
  }
  // Point lanes: enough threads to fill the GPU several times over (and fewer
  // (n, m) pairs in flight at once, so that their rows stay in L2).
  const int64_t target = int64_t{4} * 2048 * sm_count();
  const int64_t rounds = (s.levels * s.points + (1 << lay.log_c) - 1) >> lay.log_c;
  lay.log_s = 0;
  while (lay.log_c + lay.log_s < 5 && (int64_t{2} << lay.log_s) <= rounds &&
         (lay.groups << (lay.log_c + lay.log_s)) < target) {
    ++lay.log_s;
  }
  lay.threads = lay.groups << (lay.log_c + lay.log_s);
  return lay;
}

inline unsigned int grid_for(int64_t threads) {
  const int64_t blocks = (threads + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 30) ? blocks : (int64_t{1} << 30));
}

// Non-negative sizes, with S and M * D below 2^32 (positions and rows are
// indexed with 32-bit factors; element offsets are 64-bit).
inline bool valid_sizes(const MsdaSizes& s) {
  constexpr int64_t kLimit = int64_t{1} << 32;
  return s.batch >= 0 && s.spatial >= 0 && s.heads >= 0 && s.channels >= 0 && s.queries >= 0 &&
         s.levels >= 0 && s.points >= 0 && s.spatial < kLimit && s.heads * s.channels < kLimit;
}

// Locations and attention weights are stored in the value's dtype or in float32.
inline bool stored_as_value_or_float(Dtype dtype, Dtype value_dtype) {
  return dtype == value_dtype || dtype == Dtype::kFloat32;
}

inline bool valid_inputs(const MsdaInputs& in) {
  return valid_sizes(in.sizes) && stored_as_value_or_float(in.locations_dtype, in.value_dtype) &&
         stored_as_value_or_float(in.weights_dtype, in.value_dtype);
}

template <typename T>
Args<T> make_args(const MsdaInputs& in, const Layout& lay) {
  Args<T> a;
  a.s = in.sizes;
  a.lay = lay;
  a.value = static_cast<const T*>(in.value);
  a.spatial_shapes = in.spatial_shapes;
  a.level_start = in.level_start_index;
  a.locations = in.sampling_locations;
  a.weights = in.attention_weights;
  a.locations_float = in.locations_dtype == Dtype::kFloat32;
  a.weights_float = in.weights_dtype == Dtype::kFloat32;
  return a;
}

template <typename T, typename G>
constexpr int fast_lane_channels() {
  using F = FastShape<T, G>;
  return F::kEnabled ? F::kVec : 0;
}

template <typename T>
cudaError_t forward(const MsdaInputs& in, void* output, cudaStream_t stream) {
  if (!valid_inputs(in)) {
    return cudaErrorInvalidValue;
  }
  const bool aligned = is_aligned(in.value, 16) && is_aligned(output, 16);
  const Layout lay = make_layout(in.sizes, fast_lane_channels<T, T>(), aligned);
  if (lay.threads == 0 || in.sizes.channels == 0) {
    return cudaSuccess;
  }
  const Args<T> a = make_args<T>(in, lay);
  T* out = static_cast<T*>(output);
  const unsigned int grid = grid_for(lay.threads);
  using F = FastShape<T, T>;
  if constexpr (F::kEnabled) {
    if (lay.fast) {
      msda_forward_kernel<T, F::kVec, true><<<grid, kBlock, 0, stream>>>(a, out);
      return cudaGetLastError();
    }
  }
  msda_forward_kernel<T, 1, false><<<grid, kBlock, 0, stream>>>(a, out);
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch_backward(const MsdaInputs& in, const T* grad_output, G* grad_value,
                            const MsdaGrads& grads, bool aligned, const unsigned int* maxima,
                            cudaStream_t stream) {
  const Layout lay = make_layout(in.sizes, fast_lane_channels<T, G>(), aligned);
  if (lay.threads == 0) {
    return cudaSuccess;
  }
  const Args<T> a = make_args<T>(in, lay);
  const unsigned int grid = grid_for(lay.threads);
  using F = FastShape<T, G>;
  if constexpr (F::kEnabled) {
    if (lay.fast) {
      msda_backward_kernel<T, G, F::kVec, true><<<grid, kBlock, 0, stream>>>(
          a, grad_output, grad_value, grads.grad_sampling_locations, grads.grad_attention_weights,
          maxima);
      return cudaGetLastError();
    }
  }
  msda_backward_kernel<T, G, 1, false><<<grid, kBlock, 0, stream>>>(
      a, grad_output, grad_value, grads.grad_sampling_locations, grads.grad_attention_weights,
      maxima);
  return cudaGetLastError();
}

// Blocks of a grid-stride launch over n elements: enough to fill the GPU.
inline unsigned int stride_grid(int64_t n) {
  const int64_t cap = int64_t{8} * sm_count() * (2048 / kBlock);
  return grid_for(n < cap * kBlock ? n : cap * kBlock);
}

template <typename T>
cudaError_t narrow_into(const float* src, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  if (n % 4 == 0 && is_aligned(src, 16) && is_aligned(dst, 4 * sizeof(T))) {
    narrow_kernel<T, 4><<<stride_grid(n / 4), kBlock, 0, stream>>>(src, dst, n / 4);
  } else {
    narrow_kernel<T, 1><<<stride_grid(n), kBlock, 0, stream>>>(src, dst, n);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Deterministic backward: the value gradient in fixed point (see the file comment).

// *max_bits = max(*max_bits, bits of max |x|) over the n elements of x (stored
// as float or as T). The bits of non-negative floats order like the floats, so
// the integer atomic max gives the same result in any order; a NaN (positive
// after fabsf) wins over everything.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    max_abs_kernel(const void* __restrict__ x, bool is_float, int64_t n,
                   unsigned int* __restrict__ max_bits) {
  unsigned int m = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const unsigned int bits = __float_as_uint(fabsf(load_either<float, T>(x, is_float, i)));
    m = bits > m ? bits : m;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned int other = __shfl_xor_sync(0xffffffffu, m, offset);
    m = other > m ? other : m;
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMax(max_bits, m);
  }
}

// out[i] = acc[i] / scale rounded to T (NaN when the scale is 0: a maximum was
// not finite).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    from_fixed_kernel(const Fixed* __restrict__ acc, const unsigned int* __restrict__ maxima,
                      const MsdaSizes s, T* __restrict__ out, int64_t n) {
  const double scale = fixed_point_scale(maxima, s);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const double v = scale == 0.0 ? NAN : static_cast<double>(static_cast<long long>(acc[i])) / scale;
    out[i] = narrow<T>(v);
  }
}

// The deterministic backward: every output written entirely.
template <typename T>
cudaError_t deterministic_backward(const MsdaInputs& in, const T* grad_output,
                                   const MsdaGrads& grads, cudaStream_t stream) {
  const MsdaSizes& s = in.sizes;
  const int64_t elements = msda_workspace_elements(s);
  if (grads.deterministic_workspace_bytes < msda_deterministic_workspace_bytes(s) ||
      !is_aligned(grads.deterministic_workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  char* base = static_cast<char*>(grads.deterministic_workspace);
  auto* maxima = reinterpret_cast<unsigned int*>(base);
  auto* acc = reinterpret_cast<Fixed*>(base + kMsdaFixedHeader);
  cudaError_t status = cudaMemsetAsync(
      base, 0, kMsdaFixedHeader + static_cast<size_t>(elements) * sizeof(Fixed), stream);
  if (status != cudaSuccess) {
    return status;
  }
  const int64_t weights = s.batch * s.queries * s.heads * s.levels * s.points;
  const int64_t outputs = s.batch * s.queries * s.heads * s.channels;
  if (weights > 0) {
    max_abs_kernel<T><<<stride_grid(weights), kBlock, 0, stream>>>(
        in.attention_weights, in.weights_dtype == Dtype::kFloat32, weights, maxima);
  }
  if (outputs > 0) {
    max_abs_kernel<T><<<stride_grid(outputs), kBlock, 0, stream>>>(grad_output, false, outputs,
                                                                    maxima + 1);
  }
  const bool aligned = is_aligned(in.value, 16) && is_aligned(grad_output, 16);
  status = launch_backward(in, grad_output, acc, grads, aligned, maxima, stream);
  if (status != cudaSuccess || elements == 0) {
    return status;
  }
  from_fixed_kernel<T><<<stride_grid(elements), kBlock, 0, stream>>>(
      acc, maxima, s, static_cast<T*>(grads.grad_value), elements);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const MsdaInputs& in, const void* grad_output, const MsdaGrads& grads,
                     cudaStream_t stream) {
  if (!valid_inputs(in)) {
    return cudaErrorInvalidValue;
  }
  if (grads.deterministic) {
    return deterministic_backward<T>(in, static_cast<const T*>(grad_output), grads, stream);
  }
  constexpr bool kHalf = sizeof(T) == 2;
  const bool workspace = kHalf && grads.grad_value_workspace != nullptr;
  void* target = workspace ? static_cast<void*>(grads.grad_value_workspace) : grads.grad_value;
  const int64_t elements = msda_workspace_elements(in.sizes);
  const size_t bytes = static_cast<size_t>(elements) * (workspace ? sizeof(float) : sizeof(T));
  if (elements > 0) {
    const cudaError_t cleared = cudaMemsetAsync(target, 0, bytes, stream);
    if (cleared != cudaSuccess) {
      return cleared;
    }
  }
  const T* go = static_cast<const T*>(grad_output);
  const bool aligned =
      is_aligned(in.value, 16) && is_aligned(grad_output, 16) && is_aligned(target, 16);
  if constexpr (kHalf) {
    if (workspace) {
      const cudaError_t launched = launch_backward(in, go, grads.grad_value_workspace, grads,
                                                   aligned, nullptr, stream);
      if (launched != cudaSuccess) {
        return launched;
      }
      return narrow_into(grads.grad_value_workspace, static_cast<T*>(grads.grad_value), elements,
                         stream);
    }
  }
  return launch_backward(in, go, static_cast<T*>(target), grads, aligned, nullptr, stream);
}

}  // namespace deformops::gpu::msda_detail
