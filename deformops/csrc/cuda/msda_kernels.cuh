// Kernels and launch logic of the CUDA multi-scale deformable attention, as
// templates over the value's element type T (float, __half, __nv_bfloat16,
// double). msda_<type>.cu instantiates them for one T each, so that the types
// compile in parallel; msda.cu dispatches on the dtype.
//
// Work decomposition. A group of threads serves one (n, m, q) triple; groups
// are ordered with q fastest, so that the threads resident on an SM at a time
// mostly sample one head of one batch element and share its rows in L1 / L2.
// A group has 2^log_c channel lanes, each owning VEC consecutive channels (one
// vector of up to 16 bytes on the fast path, or two in the float32 forward's
// wide lanes: wide_forward), and 2^log_s point lanes that
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
//    attention weight, which it writes once (no atomics) at the end of the
//    round, when the lanes of the group store their samples' together.
// Every lane of a warp runs the same rounds (lanes with nothing left take empty
// samples), so the shuffles take the whole warp and need no convergence checks.
// Fast path: D = lanes * VEC with lanes a power of two <= 32, aligned
// pointers and a row of M * D elements within 2^32 bytes (a corner's address
// is one wide multiply-add), one pass over the channels. Generic path (any D;
// float64): VEC = 1, up to 32 channel lanes and as many passes as D needs.
//
// Deterministic backward. The order in which the atomics add into an element
// of the value gradient changes from run to run, and so do the rounding errors.
// In deterministic mode the backward kernel skips the scatter, and the value
// gradient is gathered instead, with every sum in a fixed order:
//  1. file_kernel: each sample computes its corners again, files itself under
//     its bilinear cell (the four pixels around it, on its level, for its
//     (n, m)) with an integer count per cell, and keeps its four weights
//     (attention * corner weight);
//  2. a scan of the counts gives each cell's start, and a stable radix sort of
//     (cell, sample) pairs (sort.h) lists the samples of each cell in sample
//     order;
//  3. arrange_kernel puts the samples' grad_output rows and weights in that
//     order, and gather_kernel: a team of lanes per (n, position, m) sums, over the four
//     cells that have the position as a corner and their samples in that
//     order, weight * grad_output, in float32 (float64), and writes the
//     element once (half types: one rounding).
// The images are processed in chunks of a bounded number of samples, so that
// the workspace (about 48 bytes per sample, 8 per cell) stays bounded.
#pragma once

#include <atomic>
#include <type_traits>

#include "../sampling.h"
#include "common.cuh"
#include "msda.h"
#include "msda_gather.h"
#include "sort.h"

namespace deformops::gpu::msda_detail {

constexpr int kBlock = 256;

// Threads per block the forward and backward kernels are compiled for (their
// launch bounds). They are launched with sample_block() threads: one warp where
// the GPU keeps 32 blocks per SM resident (sm_80, sm_90), so that a block's
// slot on its SM frees as soon as its own warp ends rather than when the slowest
// of several does, and the SMs stay busy later into the kernel's tail
// (benchmarks/NOTES.md, twelfth session: m2f_enc float32's forward 0.228 ->
// 0.223 ms in the benchmark on an H100, against blocks of 256 threads); else
// kSampleBlock, so that GPUs with fewer resident blocks per SM (16 on sm_86, 24
// on sm_89) still fill the threads below.
constexpr int kSampleBlock = 128;

// Resident threads per SM the kernels are compiled for (their register budget,
// chosen so that nothing spills: scripts/check_cuda_compile.py). The forward
// with forward_in_flight() samples' loads in flight fits 64 registers (1,024
// threads per SM).
constexpr int kForwardBlocks = 1024 / kSampleBlock;

// The backward with kBackwardInFlight: on sm_90, 896 threads (72 registers)
// where the fast path adds into float32 (float values, or half precision with
// a float32 workspace), which fits without spilling, and 768 (80 registers)
// elsewhere; on older GPUs, whose reductions without vector atomics take more
// registers, 512 (128 registers).
template <typename G, bool ONE_PASS>
__host__ __device__ constexpr int backward_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return 512 / kSampleBlock;
#else
  return (ONE_PASS && sizeof(G) == 4 ? 896 : 768) / kSampleBlock;
#endif
}

// Vector shape of the fast path for values of type T whose value gradient is
// accumulated in G (the forward uses G = T): a lane owns VEC consecutive
// channels, LANE_BYTES bytes of the wider of T and G (16: one load, store or
// vector atomic; 32: two), so that the lanes of a group cover whole 32-byte
// sectors together (a half-precision value with a float32 gradient workspace
// reads VEC * 2 bytes and adds VEC * 4).
// float64 takes the generic path only (it serves gradcheck, not speed).
template <typename T, typename G, int LANE_BYTES>
struct FastShape {
  static constexpr int kWidest = static_cast<int>(sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
  static constexpr int kVec = sizeof(T) == 8 ? 1 : LANE_BYTES / kWidest;
  static constexpr bool kEnabled = sizeof(T) < 8;
};

// The backward's lanes take 16 bytes (two 16-byte reductions per lane would
// cover half of each sector per instruction); so do the forward's, but for the
// float32 rows that wide_forward picks.
template <typename T, typename G>
using NarrowShape = FastShape<T, G, 16>;
template <typename T>
using WideShape = FastShape<T, T, 32>;

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
  bool locations_paired;  // locations aligned to two elements: (x, y) in one load
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
  int64_t index;    // the sample's index in attention_weights; -1: an empty sample
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
  C xy[2];
  load_pair_either<C, T>(a.locations, a.locations_float, a.locations_paired, index, xy);
  at.x = xy[0] * static_cast<C>(at.w) - C(0.5);
  at.y = xy[1] * static_cast<C>(at.h) - C(0.5);
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
// GRADIENTS: the backward marks the corners it need not read (kNoCorner); the
// forward reads a corner only where its scaled weight is not 0, so it skips that
// test (and with it the weight derivatives, then unused).
template <typename C, bool GRADIENTS, typename T, typename A>
__device__ __forceinline__ Sample<A> owner_sample(const Args<T>& a, int64_t nqm, uint32_t j) {
  const MsdaSizes& s = a.s;
  Sample<A> smp;
  smp.index = nqm * (s.levels * s.points) + j;
  smp.attention = load_either<A, T>(a.weights, a.weights_float, smp.index);
  const Located<C> at = locate<C>(a, smp.index, j / static_cast<uint32_t>(s.points));
  const Corners<C>& c = at.corners;
  smp.h = static_cast<A>(at.h);
  smp.w = static_cast<A>(at.w);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool read = !GRADIENTS || c.weight[k] != C(0) || c.dweight_dy[k] != C(0) ||
                      c.dweight_dx[k] != C(0);
    smp.pos[k] = read ? static_cast<uint32_t>(c.offset[k]) : kNoCorner;
    smp.weight[k] = static_cast<A>(c.weight[k]);
    smp.dweight_dy[k] = static_cast<A>(c.dweight_dy[k]);
    smp.dweight_dx[k] = static_cast<A>(c.dweight_dx[k]);
    // 0, not attention * 0, for a corner not read: a NaN or infinite attention weight
    // must not make the scatter add at kNoCorner.
    smp.scaled[k] = read ? smp.attention * smp.weight[k] : A(0);
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
  smp.index = -1;
  return smp;
}

// The corner positions and scaled weights of the sample owned by lane `owner`
// of this lane's segment of `lanes` lanes.
template <typename A>
struct Shared {
  uint32_t pos[4];
  A scaled[4];
};

// The corners of the sample owned by lane `owner` of this lane's segment of
// `lanes` lanes, if `owner` is below `count` (uniform over the warp, so that
// all 32 lanes reach the shuffles and they need no convergence checks), else a
// sample with nothing to read or add.
template <typename A>
__device__ __forceinline__ Shared<A> receive(const Sample<A>& mine, int owner, int count,
                                             int lanes) {
  Shared<A> sh;
  if (owner < count) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sh.pos[k] = __shfl_sync(0xffffffffu, mine.pos[k], owner, lanes);
      sh.scaled[k] = __shfl_sync(0xffffffffu, mine.scaled[k], owner, lanes);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sh.pos[k] = kNoCorner;
      sh.scaled[k] = A(0);
    }
  }
  return sh;
}

// Samples whose corner loads a lane issues together, before using any: the
// forward's gathers are latency-bound, and one sample's four loads at a time
// left the memory system idle between samples. The backward, bound by L2
// throughput, keeps more warps resident instead (768 or 896 threads per SM with
// one sample in flight, against 512 with two: backward_blocks).
constexpr int kBackwardInFlight = 1;

// Samples in flight in the forward: two, or one where a lane's vector takes 32
// bytes (the same bytes in flight, in the 64 registers of four blocks per SM).
template <typename T, int VEC>
__host__ __device__ constexpr int forward_in_flight() {
  return VEC * sizeof(T) > 16 ? 1 : 2;
}

// An opaque copy of the offset `x`: the compiler cannot fold the sizes that
// made it into the offsets added to it later, so that at_position stays one
// multiply-add (folded, the sum of the (n, m) and position offsets was
// recomputed in 64 bits for every corner). An offset, not a pointer, so that
// the pointer keeps its known global address space (a generic pointer turns
// the gradient's reductions into generic atomics).
__device__ __forceinline__ int64_t opaque(int64_t x) {
  asm("" : "+l"(x));
  return x;
}

// The element at flat position `pos` of a value-shaped array whose positions
// are `row` elements apart, from `base` (the element at position 0). BYTES
// (the fast path, where a row's bytes fit 32 bits): one wide multiply-add of
// the row's bytes; else 64-bit element arithmetic.
template <bool BYTES, typename P>
__device__ __forceinline__ P* at_position(P* base, uint32_t pos, uint32_t row) {
  if constexpr (BYTES) {
    using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
    const uint32_t row_bytes = row * static_cast<uint32_t>(sizeof(P));
    return reinterpret_cast<P*>(reinterpret_cast<Byte*>(base) +
                                static_cast<uint64_t>(pos) * row_bytes);
  } else {
    return base + static_cast<uint64_t>(pos) * row;
  }
}

// Loads the lane's VEC channels of the corners at positions pos[k] (see
// at_position) from `data` (the lane's first channel at position 0), packed
// (widened where they are used, so that several samples' loads fit in
// registers together), or zeros where read[k] is false. The loads are
// independent, so they are in flight together.
template <int VEC, bool BYTES, typename T>
__device__ __forceinline__ void load_corners(const T* data, uint32_t row, const uint32_t (&pos)[4],
                                             const bool (&read)[4], Packed<VEC, T> (&v)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = read[k] ? load_packed<VEC>(at_position<BYTES>(data, pos[k], row)) : Packed<VEC, T>{};
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

// This thread's lanes in its group (see the file comment) and the shape of the
// group's work, the same in the forward and the backward.
struct GroupLanes {
  int lanes;           // channel lanes of a group
  int lane_c, lane_s;  // this thread's channel lane and point lane
  uint32_t row;        // elements between positions of the value (M * D)
  int64_t samples;     // L * P samples of an (n, q, m) row
  int64_t rounds;      // rounds of `lanes` samples
};

__device__ __forceinline__ GroupLanes group_lanes(const MsdaSizes& s, const Layout& lay) {
  GroupLanes g;
  g.lanes = 1 << lay.log_c;
  g.lane_c = threadIdx.x & (g.lanes - 1);
  g.lane_s = (threadIdx.x >> lay.log_c) & ((1 << lay.log_s) - 1);
  g.row = static_cast<uint32_t>(s.heads * s.channels);
  g.samples = s.levels * s.points;
  g.rounds = (g.samples + g.lanes - 1) >> lay.log_c;
  return g;
}

// The sample this lane owns in the round of point-lane rounds starting at r0:
// sample (r0 + lane_s) * lanes + lane_c of its group's row, or an empty one
// (beyond L * P, or a thread past the last group).
template <typename C, bool GRADIENTS, typename T, typename A>
__device__ __forceinline__ Sample<A> round_sample(const Args<T>& a, const GroupLanes& g,
                                                  const Position& pos, int64_t r0) {
  // L * P < 2^31 (valid_sizes): 32-bit sample indices, and a 32-bit division in
  // owner_sample.
  const uint32_t j = ((static_cast<uint32_t>(r0) + g.lane_s) << a.lay.log_c) + g.lane_c;
  return pos.valid && j < g.samples ? owner_sample<C, GRADIENTS, T, A>(a, pos.nqm, j)
                                    : empty_sample<A>();
}

// Samples in the round starting at r0 of the warp's first point lane, the most
// any of its point lanes has (the others' extra slots receive empty samples):
// uniform over the warp, so that every lane takes the same shuffles.
__device__ __forceinline__ int round_count(const GroupLanes& g, int log_c, int64_t r0) {
  const int64_t left = g.samples - (r0 << log_c);
  return static_cast<int>(left < g.lanes ? left : g.lanes);
}

// The loops of both kernels run the same number of times in every lane of a
// warp (the block-stride loop's bound is uniform over the block, the rounds'
// over the problem), so that their shuffles take the whole warp.
template <typename T, int VEC, bool ONE_PASS>
__global__ void __launch_bounds__(kSampleBlock, kForwardBlocks)
    msda_forward_kernel(const Args<T> a, T* __restrict__ output) {
  using A = acc_type<T>;
  constexpr int kInFlight = forward_in_flight<T, VEC>();
  const MsdaSizes& s = a.s;
  const Layout& lay = a.lay;
  const GroupLanes g = group_lanes(s, lay);
  const int passes = ONE_PASS ? 1 : lay.passes;
  const int64_t block = blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * block; base < lay.threads;
       base += static_cast<int64_t>(gridDim.x) * block) {
    const Position pos = locate(s, lay, base + threadIdx.x);
    const T* value_nm = a.value + opaque(pos.n * s.spatial * g.row + pos.m * s.channels);
    for (int pass = 0; pass < passes; ++pass) {
      const int64_t d = first_channel<VEC>(pass, g.lane_c, lay.log_c);
      const bool has_channels = ONE_PASS || d < s.channels;
      A acc[VEC] = {};
      for (int64_t r0 = 0; r0 < g.rounds; r0 += int64_t{1} << lay.log_s) {
        const Sample<A> mine = round_sample<A, false, T, A>(a, g, pos, r0);
        const int count = round_count(g, lay.log_c, r0);
        for (int first = 0; first < count; first += kInFlight) {
          Shared<A> sh[kInFlight];
          Packed<VEC, T> v[kInFlight][4];
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            sh[i] = receive(mine, first + i, count, g.lanes);
            bool read[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              read[k] = has_channels && sh[i].scaled[k] != A(0);
            }
            load_corners<VEC, ONE_PASS>(value_nm + d, g.row, sh[i].pos, read, v[i]);
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
          acc[e] = lane_sum(acc[e], g.lanes, 1 << (lay.log_c + lay.log_s));
        }
      }
      if (pos.valid && has_channels && g.lane_s == 0) {
        store_vec_streaming<VEC>(output + pos.nqm * s.channels + d, acc);
      }
    }
  }
}

// G: element type of the value gradient the atomics accumulate into (T, or
// float for a half-precision T with a float32 workspace). A null grad_value:
// no scatter (the deterministic backward gathers the value gradient apart).
template <typename T, typename G, int VEC, bool ONE_PASS>
__global__ void __launch_bounds__(kSampleBlock, backward_blocks<G, ONE_PASS>())
    msda_backward_kernel(const Args<T> a, const T* __restrict__ grad_output,
                         G* __restrict__ grad_value, void* __restrict__ grad_locations,
                         void* __restrict__ grad_weights) {
  using A = acc_type<T>;
  const MsdaSizes& s = a.s;
  const Layout& lay = a.lay;
  const GroupLanes g = group_lanes(s, lay);
  const int passes = ONE_PASS ? 1 : lay.passes;
  const int64_t block = blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * block; base < lay.threads;
       base += static_cast<int64_t>(gridDim.x) * block) {
    const Position pos = locate(s, lay, base + threadIdx.x);
    const int64_t value_offset = opaque(pos.n * s.spatial * g.row + pos.m * s.channels);
    const T* value_nm = a.value + value_offset;
    G* grad_value_nm = grad_value != nullptr ? grad_value + value_offset : nullptr;
    const T* grad_out = grad_output + pos.nqm * s.channels;
    A go[VEC] = {};
    if constexpr (ONE_PASS) {
      const int64_t d = first_channel<VEC>(0, g.lane_c, lay.log_c);
      if (pos.valid && d < s.channels) {
        load_vec_streaming<VEC>(grad_out + d, go);
      }
    }
    for (int64_t r0 = 0; r0 < g.rounds; r0 += int64_t{1} << lay.log_s) {
      const Sample<A> mine = round_sample<double, true, T, A>(a, g, pos, r0);
      const int count = round_count(g, lay.log_c, r0);
      A grad_a = A(0);  // of the owned sample: d loss / d attention weight,
      A grad_y = A(0);  // d loss / d y (pixels) / attention weight,
      A grad_x = A(0);  // d loss / d x (pixels) / attention weight
      for (int first = 0; first < count; first += kBackwardInFlight) {
        Shared<A> sh[kBackwardInFlight];
#pragma unroll
        for (int i = 0; i < kBackwardInFlight; ++i) {
          sh[i] = receive(mine, first + i, count, g.lanes);
        }
        A dot[kBackwardInFlight][4] = {};  // this lane's part of (corner value) . grad_output
        for (int pass = 0; pass < passes; ++pass) {
          const int64_t d = first_channel<VEC>(pass, g.lane_c, lay.log_c);
          if (d >= s.channels) {
            continue;
          }
          if constexpr (!ONE_PASS) {
            if (pos.valid) {
              load_vec_streaming<VEC>(grad_out + d, go);
            }
          }
          Packed<VEC, T> v[kBackwardInFlight][4];
#pragma unroll
          for (int i = 0; i < kBackwardInFlight; ++i) {
            bool read[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              read[k] = sh[i].pos[k] != kNoCorner;
            }
            load_corners<VEC, ONE_PASS>(value_nm + d, g.row, sh[i].pos, read, v[i]);
          }
#pragma unroll
          for (int i = 0; i < kBackwardInFlight; ++i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              A corner[VEC];
              unpack_vec<VEC, T>(v[i][k], corner);
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                dot[i][k] += corner[e] * go[e];
              }
              if (grad_value_nm != nullptr && sh[i].scaled[k] != A(0)) {
                A add[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                  add[e] = sh[i].scaled[k] * go[e];
                }
                atomic_add_vec<VEC>(at_position<ONE_PASS>(grad_value_nm + d, sh[i].pos[k], g.row),
                                    add);
              }
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kBackwardInFlight; ++i) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            dot[i][k] = lane_sum(dot[i][k], 1, g.lanes);
          }
          if (g.lane_c == first + i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              grad_a += mine.weight[k] * dot[i][k];
              grad_y += mine.dweight_dy[k] * dot[i][k];
              grad_x += mine.dweight_dx[k] * dot[i][k];
            }
          }
        }
      }
      // Every lane writes the gradients of the sample it owns at once, so that
      // the lanes of a group store consecutive elements together.
      if (mine.index >= 0) {
        store_either<T>(grad_weights, a.weights_float, mine.index, grad_a);
        store_pair_either<T>(grad_locations, a.locations_float, mine.index,
                             mine.attention * grad_x * mine.w, mine.attention * grad_y * mine.h);
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

// Attribute kAttr of the current device (`fallback` if it cannot be read),
// cached per device.
template <cudaDeviceAttr kAttr>
int device_attribute(int fallback) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    return fallback;
  }
  if (device >= 0 && device < kDevices && cache[device].load(std::memory_order_relaxed) > 0) {
    return cache[device].load(std::memory_order_relaxed);
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess || value <= 0) {
    return fallback;
  }
  if (device >= 0 && device < kDevices) {
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Number of SMs of the current device (132 if it cannot be read).
inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(132); }

// Threads per block of the forward and backward kernels at launch (kSampleBlock
// says why): one warp where 32 blocks of it cover the 1,024 threads per SM the
// kernels are compiled for at most, else kSampleBlock.
inline int sample_block() {
  return device_attribute<cudaDevAttrMaxBlocksPerMultiprocessor>(0) * 32 >= 1024 ? 32
                                                                                 : kSampleBlock;
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
// generic path only); `aligned`: every vector-accessed pointer is 16-byte
// aligned; `element_bytes`: the largest element addressed by position (the
// fast path needs a row of them, M * D, to fit 32 bits: at_position).
inline Layout make_layout(const MsdaSizes& s, int lane_channels, size_t element_bytes,
                          bool aligned) {
  Layout lay;
  lay.groups = s.batch * s.heads * s.queries;
  const int64_t lanes = lane_channels > 0 ? s.channels / lane_channels : 0;
  const bool row_fits = s.heads * s.channels * static_cast<int64_t>(element_bytes) <
                        (int64_t{1} << 32);
  lay.fast = lane_channels > 0 && aligned && row_fits && s.channels % lane_channels == 0 &&
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

inline unsigned int grid_for(int64_t threads, int block = kBlock) {
  const int64_t blocks = (threads + block - 1) / block;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 30) ? blocks : (int64_t{1} << 30));
}

// Non-negative sizes, with S and M * D below 2^32 and L * P below 2^31
// (positions, rows and the samples of a row, with a round's lanes past the
// last, are indexed with 32-bit factors; element offsets are 64-bit).
inline bool valid_sizes(const MsdaSizes& s) {
  constexpr int64_t kLimit = int64_t{1} << 32;
  return s.batch >= 0 && s.spatial >= 0 && s.heads >= 0 && s.channels >= 0 && s.queries >= 0 &&
         s.levels >= 0 && s.points >= 0 && s.spatial < kLimit && s.heads * s.channels < kLimit &&
         s.levels * s.points < kLimit / 2;
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
  a.locations_paired =
      is_aligned(in.sampling_locations, a.locations_float ? 2 * sizeof(float) : 2 * sizeof(T));
  a.weights_float = in.weights_dtype == Dtype::kFloat32;
  return a;
}

template <typename F>
constexpr int fast_lane_channels() {
  return F::kEnabled ? F::kVec : 0;
}

// Whether the forward takes float32 values (T, which forward() instantiates
// this for) in lanes of 32 bytes (WideShape):
// where that leaves fewer owner lanes idle in a row's last round of samples.
// m2f_enc (D = 32, L * P = 12): four lanes of 32 bytes fill three rounds, where
// eight of 16 bytes take two rounds with four owners idle in the second; the
// owners' corner computations and the shuffles that share them are most of the
// forward's instructions. detr_enc (L * P = 16) fills both, and keeps 16 bytes
// with two samples in flight.
template <typename T>
bool wide_forward(const MsdaSizes& s) {
  if (s.channels % WideShape<T>::kVec != 0 ||
      !small_power_of_two(s.channels / WideShape<T>::kVec)) {
    return false;
  }
  const int64_t samples = s.levels * s.points;
  const auto owner_slots = [samples](int64_t lanes) {
    return (samples + lanes - 1) / lanes * lanes;
  };
  return owner_slots(s.channels / WideShape<T>::kVec) <
         owner_slots(s.channels / NarrowShape<T, T>::kVec);
}

template <typename T, typename F>
cudaError_t launch_forward(const MsdaInputs& in, T* output, bool aligned, cudaStream_t stream) {
  const Layout lay = make_layout(in.sizes, fast_lane_channels<F>(), sizeof(T), aligned);
  if (lay.threads == 0 || in.sizes.channels == 0) {
    return cudaSuccess;
  }
  const Args<T> a = make_args<T>(in, lay);
  const int block = sample_block();
  const unsigned int grid = grid_for(lay.threads, block);
  if constexpr (F::kEnabled) {
    if (lay.fast) {
      msda_forward_kernel<T, F::kVec, true><<<grid, block, 0, stream>>>(a, output);
      return cudaGetLastError();
    }
  }
  msda_forward_kernel<T, 1, false><<<grid, block, 0, stream>>>(a, output);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward(const MsdaInputs& in, void* output, cudaStream_t stream) {
  if (!valid_inputs(in)) {
    return cudaErrorInvalidValue;
  }
  const bool aligned = is_aligned(in.value, 16) && is_aligned(output, 16);
  T* out = static_cast<T*>(output);
  if constexpr (sizeof(T) == 4) {
    if (wide_forward<T>(in.sizes)) {
      return launch_forward<T, WideShape<T>>(in, out, aligned, stream);
    }
  }
  return launch_forward<T, NarrowShape<T, T>>(in, out, aligned, stream);
}

template <typename T, typename G>
cudaError_t launch_backward(const MsdaInputs& in, const T* grad_output, G* grad_value,
                            const MsdaGrads& grads, bool aligned, cudaStream_t stream) {
  using F = NarrowShape<T, G>;
  const Layout lay = make_layout(in.sizes, fast_lane_channels<F>(), F::kWidest, aligned);
  if (lay.threads == 0) {
    return cudaSuccess;
  }
  const Args<T> a = make_args<T>(in, lay);
  const int block = sample_block();
  const unsigned int grid = grid_for(lay.threads, block);
  if constexpr (F::kEnabled) {
    if (lay.fast) {
      msda_backward_kernel<T, G, F::kVec, true><<<grid, block, 0, stream>>>(
          a, grad_output, grad_value, grads.grad_sampling_locations,
          grads.grad_attention_weights);
      return cudaGetLastError();
    }
  }
  msda_backward_kernel<T, G, 1, false><<<grid, block, 0, stream>>>(
      a, grad_output, grad_value, grads.grad_sampling_locations, grads.grad_attention_weights);
  return cudaGetLastError();
}

template <typename T>
cudaError_t narrow_into(const float* src, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) {
    return cudaSuccess;
  }
  const int64_t cap = int64_t{16} * sm_count() * (2048 / kBlock);
  if (n % 4 == 0 && is_aligned(src, 16) && is_aligned(dst, 4 * sizeof(T))) {
    const int64_t vectors = n / 4;
    const unsigned int grid = grid_for(vectors < cap * kBlock ? vectors : cap * kBlock);
    narrow_kernel<T, 4><<<grid, kBlock, 0, stream>>>(src, dst, vectors);
  } else {
    const unsigned int grid = grid_for(n < cap * kBlock ? n : cap * kBlock);
    narrow_kernel<T, 1><<<grid, kBlock, 0, stream>>>(src, dst, n);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------
// Deterministic backward: the value gradient gathered (see the file comment).

// The cells of a level of h x w pixels among `cells`: none for an empty level,
// all of them for a level too large to index.
__device__ __forceinline__ int64_t level_cells(int64_t h, int64_t w, int64_t cells) {
  if (h <= 0 || w <= 0) {
    return 0;
  }
  return h < cells && w < cells ? (h + 1) * (w + 1) : cells;
}

// The first cell of level l among a pair's `cells` (the cells of the levels
// before it), at most `cells`.
template <typename T>
__device__ __forceinline__ int64_t level_cells_begin(const Args<T>& a, int64_t l,
                                                     int64_t cells) {
  int64_t begin = 0;
  for (int64_t k = 0; k < l; ++k) {
    begin += level_cells(__ldg(a.spatial_shapes + 2 * k), __ldg(a.spatial_shapes + 2 * k + 1),
                         cells);
    begin = begin < cells ? begin : cells;
  }
  return begin;
}

// A sample's four corner weights times its attention weight, as the scatter
// would add them (Sample::scaled).
template <typename A>
struct alignas(4 * sizeof(A)) Quad {
  A w[4];
};

// The key of a sample that touches no position (sorts after every cell).
constexpr uint32_t kNoCell = 0xffffffffu;

// One chunk of images of the deterministic backward, in the workspace.
template <typename A>
struct Filing {
  int64_t n_begin, images, samples, keys;  // the chunk's first image, and its sizes
  int64_t cells;                           // pair_cells
  int32_t* counts;
  int32_t* starts;
  uint32_t* cell_keys;
  int32_t* ids;
  const int32_t* sorted_ids;
  A* weights;  // [samples][4] (Quad<A>)
  // In key order (arrange_kernel): the samples' grad_output rows ((n - n_begin,
  // q, m) of the chunk) and their weights.
  int32_t* sorted_rows;
  A* sorted_weights;  // [samples][4]
};

// Files each sample of the chunk under its cell key: counts it there, keeps its
// weights; cell_keys[i] = kNoCell for a sample that touches no position.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    file_kernel(const Args<T> a, const Filing<acc_type<T>> f) {
  using A = acc_type<T>;
  const MsdaSizes& s = a.s;
  const int64_t per_row = s.levels * s.points;  // samples of one (n, q, m) row
  const int64_t first = f.n_begin * s.queries * s.heads * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < f.samples;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = i / per_row;  // (n - n_begin, q, m) of the chunk
    const int64_t l = (i - row * per_row) / s.points;
    // The location in float64, as the backward kernel computes it (owner_sample).
    const Located<double> at = locate<double>(a, first + i, l);
    bool touches = false;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      touches = touches || at.corners.weight[k] != 0.0;
    }
    uint32_t key = kNoCell;
    if (touches && at.h < f.cells && at.w < f.cells) {  // else as gather_kernel: left out
      const int64_t cell = level_cells_begin(a, l, f.cells) +
                           (static_cast<int64_t>(floor(at.y)) + 1) * (at.w + 1) +
                           static_cast<int64_t>(floor(at.x)) + 1;
      if (cell >= 0 && cell < f.cells) {
        const int64_t m = row % s.heads;
        const int64_t n = row / (s.queries * s.heads);
        key = static_cast<uint32_t>((n * s.heads + m) * f.cells + cell);
        atomicAdd(f.counts + key, 1);
        const A attention = load_either<A, T>(a.weights, a.weights_float, first + i);
        Quad<A> quad;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          quad.w[k] = attention * static_cast<A>(at.corners.weight[k]);
        }
        reinterpret_cast<Quad<A>*>(f.weights)[i] = quad;
      }
    }
    f.cell_keys[i] = key;
    f.ids[i] = static_cast<int32_t>(i);
  }
}

// Puts the samples' grad_output rows and weights in key order, so that the
// gather reads them contiguously and waits for one memory round trip per batch
// of samples (their rows) before loading grad_output, not two (ids, then rows).
template <typename A>
__global__ void __launch_bounds__(kBlock)
    arrange_kernel(const Filing<A> f, int64_t per_row) {
  const auto* weights = reinterpret_cast<const Quad<A>*>(f.weights);
  auto* sorted = reinterpret_cast<Quad<A>*>(f.sorted_weights);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < f.samples;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int32_t id = f.sorted_ids[i];
    f.sorted_rows[i] = static_cast<int32_t>(id / per_row);
    sorted[i] = weights[id];
  }
}

// Samples of one cell whose loads a lane of the gather keeps in flight together:
// kGatherBatch of one vector each (the encoders' layout), or kSparseBatch of
// sparse_span<VEC>() vectors each (the decoders': under kSparseSamples samples
// per position and head on average, so that a team's work is mostly finding its
// cells, which fewer lanes per team repeat less often).
constexpr int kGatherBatch = 8;
constexpr int kSparseBatch = 1;
constexpr int64_t kSparseSamples = 2;

// Vectors of VEC channels per lane in the sparse layout: 16 channels, two lanes
// per team at the common head dim 32.
template <int VEC>
constexpr int sparse_span() {
  return VEC >= 16 ? 1 : 16 / VEC;
}

// Resident blocks per SM the gather is compiled for: 3 (80 registers) when a
// lane's sums of VEC channels take 16 bytes or less for float32 values (8 for
// the half types, which also hold their loads packed), 2 (128) otherwise and in
// the sparse layout, so that nothing spills (scripts/check_cuda_compile.py).
template <typename T>
constexpr int gather_blocks(int vec, int span) {
  return sizeof(T) < 8 &&
                 (span > 1 ? vec > 1 : vec * sizeof(acc_type<T>) <= (sizeof(T) == 4 ? 16 : 8))
             ? 3
             : 2;
}

// One team of 2^log_c lanes per (n, position, m) of the chunk, each lane SPAN
// vectors of VEC channels at a time: the element's value gradient, the sum over
// the levels holding the position, the four cells that have it as corner q (in
// order of q) and their samples (in sample order) of weight q * grad_output.
template <typename T, int VEC, int SPAN, int BATCH>
__global__ void __launch_bounds__(kBlock, gather_blocks<T>(VEC, SPAN))
    gather_kernel(const Args<T> a, const Filing<acc_type<T>> f, const T* __restrict__ grad_output,
                  T* __restrict__ grad_value, int log_c) {
  using A = acc_type<T>;
  const MsdaSizes& s = a.s;
  const int64_t lanes = int64_t{1} << log_c;
  const int64_t lane = threadIdx.x & (lanes - 1);
  const int64_t vectors = s.channels / VEC;
  const int64_t first_row = f.n_begin * s.queries * s.heads;
  const int64_t threads = (f.images * s.spatial * s.heads) << log_c;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; t < threads;
       t += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t team = t >> log_c;
    const int64_t m = team % s.heads;
    const int64_t element = team / s.heads;  // (n - n_begin) * S + position
    const int64_t pos = element % s.spatial;
    const int64_t pair = (element / s.spatial * s.heads + m) * f.cells;
    T* out = grad_value + ((f.n_begin * s.spatial + element) * s.heads + m) * s.channels;
    for (int64_t v0 = lane * SPAN; v0 < vectors; v0 += lanes * SPAN) {
      A sum[SPAN][VEC] = {};
      int64_t begin = 0;  // the level's first cell
      for (int64_t l = 0; l < s.levels; ++l) {
        const int64_t h = __ldg(a.spatial_shapes + 2 * l);
        const int64_t w = __ldg(a.spatial_shapes + 2 * l + 1);
        const int64_t level_begin = begin;
        begin += level_cells(h, w, f.cells);
        begin = begin < f.cells ? begin : f.cells;
        const int64_t local = pos - __ldg(a.level_start + l);
        if (h <= 0 || w <= 0 || h >= f.cells || w >= f.cells || local < 0 || local >= h * w) {
          continue;
        }
        const int64_t y = local / w;
        const int64_t x = local - y * w;
        // The four cells' sample ranges, loaded together (one memory round trip).
        int32_t first[4], last[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t cell = level_begin + (y + 1 - (q >> 1)) * (w + 1) + (x + 1 - (q & 1));
          first[q] = cell < f.cells ? f.starts[pair + cell] : 0;
          last[q] = cell < f.cells ? f.starts[pair + cell + 1] : 0;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int32_t end = last[q];
          for (int32_t i0 = first[q]; i0 < end; i0 += BATCH) {
            int32_t rows[BATCH];
            A weight[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
              const bool in = i0 + b < end;
              rows[b] = in ? f.sorted_rows[i0 + b] : 0;
              weight[b] = in ? f.sorted_weights[4 * int64_t{i0 + b} + q] : A(0);
            }
            A g[BATCH][SPAN][VEC];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
              const T* row = grad_output + (first_row + rows[b]) * s.channels;
#pragma unroll
              for (int j = 0; j < SPAN; ++j) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                  g[b][j][e] = A(0);
                }
                if (weight[b] != A(0) && v0 + j < vectors) {
                  load_vec<VEC>(row + (v0 + j) * VEC, g[b][j]);
                }
              }
            }
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
              if (weight[b] != A(0)) {
#pragma unroll
                for (int j = 0; j < SPAN; ++j) {
#pragma unroll
                  for (int e = 0; e < VEC; ++e) {
                    sum[j][e] += weight[b] * g[b][j][e];
                  }
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < SPAN; ++j) {
        if (v0 + j < vectors) {
          store_vec_streaming<VEC>(out + (v0 + j) * VEC, sum[j]);
        }
      }
    }
  }
}

// Launches gather_kernel with vectors of `vec` channels (common.cuh's vector_width),
// in the sparse layout when the chunk has under kSparseSamples samples per
// position and head on average.
template <typename T>
cudaError_t launch_gather(int vec, const Args<T>& a, const Filing<acc_type<T>>& f,
                          const T* grad_output, T* grad_value, cudaStream_t stream) {
  const bool sparse = f.samples < kSparseSamples * f.images * a.s.spatial * a.s.heads;
  const auto launch = [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    constexpr int SPAN = sparse_span<VEC>();
    const int64_t vectors = a.s.channels / VEC;
    const int64_t per_lane = sparse ? (vectors + SPAN - 1) / SPAN : vectors;
    const int log_c = ceil_log2(per_lane < 32 ? per_lane : 32);
    const int64_t threads = (f.images * a.s.spatial * a.s.heads) << log_c;
    if (sparse) {
      gather_kernel<T, VEC, SPAN, kSparseBatch>
          <<<grid_for(threads), kBlock, 0, stream>>>(a, f, grad_output, grad_value, log_c);
    } else {
      gather_kernel<T, VEC, 1, kGatherBatch>
          <<<grid_for(threads), kBlock, 0, stream>>>(a, f, grad_output, grad_value, log_c);
    }
    return cudaGetLastError();
  };
  return with_vector_width<sizeof(T)>(vec, launch);
}

// The value gradient of the deterministic backward, written entirely.
template <typename T>
cudaError_t gather_value_grad(const MsdaInputs& in, const T* grad_output, T* grad_value,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_type<T>;
  const MsdaSizes& s = in.sizes;
  const GatherPlan plan = gather_plan(s, sizeof(A));
  if (!plan.valid || workspace_bytes < plan.total || !is_aligned(workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  if (s.batch * s.spatial * s.heads * s.channels == 0) {
    return cudaSuccess;
  }
  const Args<T> a = make_args<T>(in, Layout{});
  char* base = static_cast<char*>(workspace);
  const int64_t per_image = s.queries * s.heads * s.levels * s.points;
  const void* vector_pointers[] = {grad_output, grad_value};
  const int vec = vector_width<sizeof(T)>(s.channels, vector_pointers, 2);
  for (int64_t n = 0; n < s.batch; n += plan.images) {
    Filing<A> f;
    f.n_begin = n;
    f.images = plan.images < s.batch - n ? plan.images : s.batch - n;
    f.samples = f.images * per_image;
    f.keys = f.images * s.heads * pair_cells(s);
    f.cells = pair_cells(s);
    f.counts = reinterpret_cast<int32_t*>(base + plan.counts);
    f.starts = reinterpret_cast<int32_t*>(base + plan.starts);
    f.cell_keys = reinterpret_cast<uint32_t*>(base + plan.cell_keys);
    f.ids = reinterpret_cast<int32_t*>(base + plan.ids);
    f.sorted_ids = reinterpret_cast<const int32_t*>(base + plan.sorted_ids);
    f.weights = reinterpret_cast<A*>(base + plan.weights);
    f.sorted_rows = reinterpret_cast<int32_t*>(base + plan.ids);  // the ids are sorted by then
    f.sorted_weights = reinterpret_cast<A*>(base + plan.sorted_weights);
    cudaError_t status =
        cudaMemsetAsync(f.counts, 0, static_cast<size_t>(f.keys + 1) * sizeof(int32_t), stream);
    if (status != cudaSuccess) {
      return status;
    }
    if (f.samples > 0) {
      file_kernel<T><<<grid_for(f.samples), kBlock, 0, stream>>>(a, f);
    }
    status = exclusive_sum(f.counts, f.starts, static_cast<int32_t>(f.keys + 1),
                           base + plan.scan_scratch, plan.scan_scratch_bytes, stream);
    if (status == cudaSuccess) {
      status = sort_pairs(f.cell_keys, reinterpret_cast<uint32_t*>(base + plan.sorted_keys), f.ids,
                          reinterpret_cast<int32_t*>(base + plan.sorted_ids),
                          static_cast<int32_t>(f.samples), plan.key_bits,
                          base + plan.sort_scratch, plan.sort_scratch_bytes, stream);
    }
    if (status == cudaSuccess && f.samples > 0) {
      arrange_kernel<A><<<grid_for(f.samples), kBlock, 0, stream>>>(f, s.levels * s.points);
      status = cudaGetLastError();
    }
    if (status == cudaSuccess) {
      status = launch_gather<T>(vec, a, f, grad_output, grad_value, stream);
    }
    if (status != cudaSuccess) {
      return status;
    }
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward(const MsdaInputs& in, const void* grad_output, const MsdaGrads& grads,
                     cudaStream_t stream) {
  const size_t location_bytes =
      in.locations_dtype == Dtype::kFloat32 ? sizeof(float) : sizeof(T);
  if (!valid_inputs(in) || !is_aligned(grads.grad_sampling_locations, 2 * location_bytes)) {
    return cudaErrorInvalidValue;
  }
  if (grads.deterministic) {
    const T* go = static_cast<const T*>(grad_output);
    const bool aligned = is_aligned(in.value, 16) && is_aligned(grad_output, 16);
    const cudaError_t launched =
        launch_backward(in, go, static_cast<T*>(nullptr), grads, aligned, stream);
    if (launched != cudaSuccess) {
      return launched;
    }
    return gather_value_grad<T>(in, go, static_cast<T*>(grads.grad_value),
                                grads.gather_workspace, grads.gather_workspace_bytes, stream);
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
      const cudaError_t launched = launch_backward(
          in, go, grads.grad_value_workspace, grads, aligned, stream);
      if (launched != cudaSuccess) {
        return launched;
      }
      return narrow_into(grads.grad_value_workspace, static_cast<T*>(grads.grad_value), elements,
                         stream);
    }
  }
  return launch_backward(in, go, static_cast<T*>(target), grads, aligned, stream);
}

}  // namespace deformops::gpu::msda_detail
