// CUDA kernels of the deformable convolution's sampling half (im2col and its
// backward), built on the bilinear core of sampling.h. Torch-free.
//
// Work decomposition. The input is read channels-last, so the C channels of one
// bilinear corner are contiguous. A "team" of TS lanes (a power of two, at most a
// warp) owns one output pixel p and one offset group og, and walks the K kernel
// points in phases of up to TS points; lane l handles the channel vectors l,
// l + TS, ... of the group, a vector being VEC channels in 16 bytes or less.
// In a phase, the block's threads compute the bilinear corners (sampling.h) of
// its teams' points into shared memory, one (team, point) each, numbered so that
// the busy threads are the first ones (no warp runs the corner arithmetic for a
// few lanes: a team has at most TS points to locate, often fewer); then each
// lane loads, for each kernel point, the four corners' vectors (coalesced
// across the team) and interpolates them in registers with sampling.h's
// functions.
//  - im2col stores the modulated samples as one vector of the columns row.
//  - col2im, given the columns' gradient, forms per corner the dot product of
//    the column gradient with the corner's values, reduces the four dots over
//    the team's lanes with warp shuffles, and lane 0 writes the location and
//    mask gradients (sampling.h's functions of the dots, by linearity; no
//    atomics). It also stores the columns (the weight gradient's GEMM needs
//    them), so that the backward gathers the corners once.
// The input gradient is a gather, not a scatter: col2im also files every sample
// (p, k, og) that touches the map under its bilinear cell (floor(y), floor(x))
// with an integer atomic (its rank in the cell); a scan of the cell counts and
// a fill pass sort the samples by cell; then one team per input pixel sums
// grad_column * mask * corner weight over the samples of the four cells that
// have the pixel as a corner, and adds the sum to the float32 (float64) input
// gradient with a plain read-modify-write. No floating-point atomics: the
// float4 atomics of a scatter measured ~140 G/s on an H100, which made them the
// largest cost of the backward.
// The ranks given by the integer atomic depend on the order in which threads
// run, and so does the order of the samples summed in a cell. Deterministic
// mode ranks the samples of a cell in sample order instead: a stable radix sort
// of (cell, sample) pairs (sort.h) replaces the atomic ranks, so that every sum
// runs in the same order at every run.
//
// Indices: positions inside a chunk are 32-bit (the host keeps a chunk's columns
// under 2^31 elements); addresses into the tensors are 64-bit.
#include <cstring>
#include <type_traits>

#include "../sampling.h"
#include "common.cuh"
#include "deform_conv.h"
#include "sort.h"

namespace deformops::gpu {
namespace {

constexpr int kThreads = 256;
// Occupancy of the sampling kernels, whose gathers are latency-bound: im2col at
// 3 blocks per multiprocessor (80 registers), col2im at 4 (64 registers). On an
// H100 these beat 2 blocks with two kernel points' loads in flight per lane.
constexpr int kIm2colMinBlocks = 3;
constexpr int kCol2imMinBlocks = 4;
constexpr int kGatherMinBlocks = 4;
// Elements of one tile of the cell-count scan: 8 per thread.
constexpr int kScanPerThread = 8;
constexpr int kScanTile = kThreads * kScanPerThread;
// Samples of one cell whose loads the input-gradient gather keeps in flight.
constexpr int kGatherBatch = 4;
// Transposes: tiles of 64 x 64 elements.
constexpr int kTransposeTile = 64;

// Element strides of an offset- or mask-like tensor [N, channels, H_out, W_out].
struct Strides {
  int64_t n, c, h, w;
};

// Everything a kernel needs about the convolution and the chunk.
struct Geometry {
  int64_t channels;    // C
  int64_t height;      // H
  int64_t width;       // W
  int64_t image_size;  // H * W * C, elements of one channels-last input image
  int64_t row;         // K * C, elements of one columns row
  Strides offset_strides, mask_strides, grad_offset_strides, grad_mask_strides;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t n_begin;                 // image of the chunk's first row
  uint32_t ho_begin;               // output row (in its image) of the chunk's first row
  uint32_t out_height;             // H_out
  uint32_t out_width;              // W_out
  uint32_t pixels;                 // P, output pixels of the chunk
  uint32_t teams;                  // P * G
  uint32_t group_channels;         // C / groups
  uint32_t offset_group_channels;  // C / G
  uint32_t vectors;                // (C / G) / VEC, channel vectors of one team
  uint32_t cell_width;             // W + 1: cells (y0, x0) for y0 in [-1, H-1], x0 in [-1, W-1]
  uint32_t cells_per_map;          // (H + 1) * (W + 1)
  uint32_t images;                 // images the chunk's rows touch
  uint32_t map_pixels;             // H * W
  int32_t kernel_h, kernel_w;
  int32_t kernel_points;  // K
  int32_t offset_groups;  // G
  int32_t lanes_log2;     // log2 of the team size TS
  bool grouped;           // groups > 1
};

__device__ __forceinline__ uint32_t team_lanes(const Geometry& g) { return 1u << g.lanes_log2; }

// Where a team of im2col / col2im works: output pixel p of the chunk, its image
// n, output row ho and column wo, and offset group og.
struct Place {
  uint32_t p;
  int64_t n;
  uint32_t ho, wo;
  uint32_t og;
};

__device__ __forceinline__ Place place_of(const Geometry& g, uint32_t team) {
  Place at;
  at.og = team / g.pixels;
  at.p = team - at.og * g.pixels;
  const uint32_t q = at.p / g.out_width;
  at.wo = at.p - q * g.out_width;
  const uint32_t t = g.ho_begin + q;
  const uint32_t images = t / g.out_height;
  at.ho = t - images * g.out_height;
  at.n = g.n_begin + images;
  return at;
}

// This thread's team of im2col / col2im, its lane there, whether the team exists
// (the threads past the last one work on team 0's place, so that every lane of a
// warp keeps in step), and where the team works.
struct TeamThread {
  uint32_t team;
  bool active;
  uint32_t lane;
  Place at;
};

__device__ __forceinline__ TeamThread team_thread(const Geometry& g) {
  const uint32_t thread = blockIdx.x * kThreads + threadIdx.x;
  TeamThread t;
  t.team = thread >> g.lanes_log2;
  t.active = t.team < g.teams;
  t.lane = thread & (team_lanes(g) - 1u);
  t.at = place_of(g, t.active ? t.team : 0);
  return t;
}

// Index, in an offset-like tensor [N, 2*G*K, H_out, W_out] of strides `st`, of
// the dy of kernel point 0 of the team's offset group at its pixel (kernel point
// k's dy is 2k channels later, its dx one more).
__device__ __forceinline__ int64_t offset_base(const Geometry& g, const Strides& st,
                                               const Place& at) {
  return at.n * st.n + int64_t(at.og) * 2 * g.kernel_points * st.c + int64_t(at.ho) * st.h +
         int64_t(at.wo) * st.w;
}

// Index, in a mask-like tensor [N, G*K, H_out, W_out] of strides `st`, of kernel
// point 0's mask (kernel point k's is k channels later).
__device__ __forceinline__ int64_t mask_base(const Geometry& g, const Strides& st,
                                             const Place& at) {
  return at.n * st.n + int64_t(at.og) * g.kernel_points * st.c + int64_t(at.ho) * st.h +
         int64_t(at.wo) * st.w;
}

// The sampling location (y, x) of kernel point k at the team's pixel; `dy` is
// the index of its dy in offset.
template <typename T, typename V>
__device__ __forceinline__ void sample_location(const Geometry& g, const Place& at,
                                                const V* offset, int64_t dy, int k, T& y,
                                                T& x) {
  const int i = k / g.kernel_w;
  const int j = k - i * g.kernel_w;
  y = static_cast<T>(int64_t(at.ho) * g.stride_h - g.pad_h + i * g.dilation_h) +
      static_cast<T>(widen(offset[dy]));
  x = static_cast<T>(int64_t(at.wo) * g.stride_w - g.pad_w + j * g.dilation_w) +
      static_cast<T>(widen(offset[dy + g.offset_strides.c]));
}

// Offset, within a columns row, of channel c's column of kernel point 0 (kernel
// point k's is k * C/groups later): [groups, K, C/groups] layout.
__device__ __forceinline__ int64_t column_base(const Geometry& g, uint32_t c) {
  if (!g.grouped) {
    return c;
  }
  const int64_t group = c / g.group_channels;
  return c + group * (g.kernel_points - 1) * int64_t(g.group_channels);
}

// Widens a packed vector (common.cuh's load_packed) into out[0, VEC), or writes
// zeros when `present` is false.
template <typename T, typename V, int VEC>
__device__ __forceinline__ void widen_raw(const Packed<VEC, V>& raw, bool present, T* out) {
  V elements[VEC];
  memcpy(elements, &raw, sizeof(raw));
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    out[j] = present ? static_cast<T>(widen(elements[j])) : T(0);
  }
}

// p[0, N) += v[0, N) (not atomic), with 16-byte accesses where they fit.
template <int N, typename T>
__device__ __forceinline__ void add_vector(T* p, const T (&v)[N]) {
  if constexpr (std::is_same_v<T, float> && N % 4 == 0) {
#pragma unroll
    for (int e = 0; e < N; e += 4) {
      float4* q = reinterpret_cast<float4*>(p + e);
      const float4 old = *q;
      *q = make_float4(old.x + v[e], old.y + v[e + 1], old.z + v[e + 2], old.w + v[e + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      p[e] += v[e];
    }
  }
}

// Per sample s = (og * P + p) * K + k of a chunk, what the input-gradient gather
// needs: its bilinear cell, its rank in the cell, and its corner weights times
// the mask.
template <typename T>
struct alignas(4 * sizeof(T)) CornerWeights {
  T w[4];
};

struct SampleFiles {
  int32_t* cell_counts;  // [cells + 1], zero on entry of col2im
  int32_t* tile_sums;    // [tiles] of the scan
  int32_t* cell;         // [S], -1 for a sample that touches no pixel
  int32_t* rank;         // [S]: rank in its cell (atomic order), or s when `stable`
  void* weights;         // [S] CornerWeights<T>
  void* sorted_weights;  // [4][S] T, by cell
  int32_t* sorted_base;  // [S], by cell: p * K * C + k * C/groups
  // Deterministic mode: (cell, s) pairs stably sorted by cell, so that the
  // samples of a cell are in sample order.
  bool stable;
  uint32_t* sorted_cell;   // [S] the sorted cells (-1 last)
  int32_t* sorted_sample;  // [S] their samples
};

// One kernel point's corners at a team's pixel, as the team's lanes share them
// in shared memory: spatial indices (int32: H * W < 2^31) and the weights, with
// the mask (m = 1 without one).
template <typename T>
struct CornerSlot {
  int32_t offset[4];
  T weight[4];
  T dweight_dy[4];
  T dweight_dx[4];
  T m;
};

// The slots of this thread's team in a phase of `points` kernel points (the
// block's kThreads slots hold its teams' points, team after team).
template <typename T>
__device__ __forceinline__ const CornerSlot<T>* team_slots(const CornerSlot<T>* block_slots,
                                                           const Geometry& g, int points) {
  return block_slots + (threadIdx.x >> g.lanes_log2) * uint32_t(points);
}

// Computes kernel point k into `slot` at place `at`; returns the location
// (y, x), in precision C, and its corners for the caller's own use.
// The backward uses C = double whatever V (sampling.h's bilinear_corners): a
// location rounded to float can fall across a pixel edge, where the offset
// gradient jumps (float64 does not round there). The forward's output is
// continuous in the location, so it uses C = T.
template <typename C, typename T, typename V>
__device__ __forceinline__ deformops::Corners<T> fill_slot(const Geometry& g, const Place& at,
                                                           const V* offset, const V* mask,
                                                           int k, CornerSlot<T>& slot, C& y,
                                                           C& x) {
  const int64_t dy = offset_base(g, g.offset_strides, at) + 2 * k * g.offset_strides.c;
  sample_location(g, at, offset, dy, k, y, x);
  const deformops::Corners<T> corners =
      deformops::bilinear_corners<T>(y, x, g.height, g.width);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    slot.offset[q] = static_cast<int32_t>(corners.offset[q]);
    slot.weight[q] = corners.weight[q];
    slot.dweight_dy[q] = corners.dweight_dy[q];
    slot.dweight_dx[q] = corners.dweight_dx[q];
  }
  slot.m = mask == nullptr ? T(1)
                          : static_cast<T>(widen(
                                mask[mask_base(g, g.mask_strides, at) + k * g.mask_strides.c]));
  return corners;
}

// One phase's corners: the block's threads compute, for each team of the block
// and each of the `points` kernel points from k0, one slot of `block_slots` (of
// kThreads slots; points <= TS, so one slot per thread at most) with fill_slot in
// precision C, and call on_slot(team, at, k, corners, slot, y, x) after each.
// Every thread of the block must call it; the slots are read after a
// __syncthreads().
template <typename C, typename T, typename V, typename OnSlot>
__device__ __forceinline__ void fill_block_slots(const Geometry& g, const V* offset,
                                                 const V* mask, int k0, int points,
                                                 CornerSlot<T>* block_slots, OnSlot&& on_slot) {
  const uint32_t teams_in_block = kThreads >> g.lanes_log2;
  const uint32_t s = threadIdx.x;
  if (s < teams_in_block * uint32_t(points)) {
    const uint32_t local = s / uint32_t(points);
    const int k = k0 + int(s - local * uint32_t(points));
    const uint32_t team = blockIdx.x * teams_in_block + local;
    if (team < g.teams) {
      const Place at = place_of(g, team);
      C y, x;
      const deformops::Corners<T> corners =
          fill_slot<C>(g, at, offset, mask, k, block_slots[s], y, x);
      on_slot(team, at, k, corners, block_slots[s], y, x);
    }
  }
}

// The Corners of a slot with corner i at position i of a register array of four
// vectors: sampling.h's functions then interpolate vectors held in registers
// (data[i * VEC + j] is channel j of corner i). The kernels load no corner they
// do not use and put zeros there (widen_raw), so those functions run unguarded.
template <typename T>
__device__ __forceinline__ deformops::Corners<T> in_registers(const CornerSlot<T>& slot) {
  deformops::Corners<T> local;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    local.offset[i] = i;
    local.weight[i] = slot.weight[i];
    local.dweight_dy[i] = slot.dweight_dy[i];
    local.dweight_dx[i] = slot.dweight_dx[i];
  }
  return local;
}

template <typename V, int VEC>
__global__ void __launch_bounds__(kThreads, kIm2colMinBlocks)
    im2col_kernel(const Geometry g, const V* __restrict__ input, const V* __restrict__ offset,
                  const V* __restrict__ mask, V* __restrict__ columns) {
  using T = acc_type<V>;
  __shared__ CornerSlot<T> block_slots[kThreads];
  const auto [team, active, lane, at] = team_thread(g);
  const V* image = input + at.n * g.image_size;
  V* row = columns + int64_t(at.p) * g.row;
  for (int k0 = 0; k0 < g.kernel_points; k0 += int(team_lanes(g))) {
    const int points = min(int(team_lanes(g)), g.kernel_points - k0);
    fill_block_slots<T>(g, offset, mask, k0, points, block_slots, [](auto&&...) {});
    __syncthreads();
    const CornerSlot<T>* slots = team_slots(block_slots, g, points);
    for (int kk = 0; active && kk < points; ++kk) {
      const CornerSlot<T>& slot = slots[kk];
      const deformops::Corners<T> local = in_registers(slot);
      for (uint32_t v = lane; v < g.vectors; v += team_lanes(g)) {
        const uint32_t c = at.og * g.offset_group_channels + v * VEC;
        Packed<VEC, V> raw[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (slot.weight[q] != T(0)) {
            raw[q] = load_packed<VEC>(image + int64_t(slot.offset[q]) * g.channels + c);
          }
        }
        T values[4 * VEC];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          widen_raw<T, V, VEC>(raw[q], slot.weight[q] != T(0), values + q * VEC);
        }
        T out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          out[e] = slot.m *
                   deformops::bilinear_sample(values + e, VEC, local, deformops::Unguarded{});
        }
        store_vec_streaming<VEC>(row + column_base(g, c) + int64_t(k0 + kk) * g.group_channels,
                                 out);
      }
    }
    __syncthreads();
  }
}

template <typename V, int VEC>
__global__ void __launch_bounds__(kThreads, kCol2imMinBlocks)
    col2im_kernel(const Geometry g, const V* __restrict__ input, const V* __restrict__ offset,
                  const V* __restrict__ mask, const V* __restrict__ grad_columns,
                  V* __restrict__ columns, V* __restrict__ grad_offset,
                  V* __restrict__ grad_mask, const SampleFiles files) {
  using T = acc_type<V>;
  __shared__ CornerSlot<T> block_slots[kThreads];
  // Lanes past the last team stay to take part in the team sums.
  const auto [team, active, lane, at] = team_thread(g);
  const V* image = input + at.n * g.image_size;
  const V* grad_row = grad_columns + int64_t(at.p) * g.row;
  V* row = columns + int64_t(at.p) * g.row;
  auto* weights = static_cast<CornerWeights<T>*>(files.weights);
  for (int k0 = 0; k0 < g.kernel_points; k0 += int(team_lanes(g))) {
    const int points = min(int(team_lanes(g)), g.kernel_points - k0);
    // Each (team, point): its corners, and the sample's filing under its cell
    // for the input gradient.
    fill_block_slots<double>(
        g, offset, mask, k0, points, block_slots,
        [&](uint32_t slot_team, const Place& slot_at, int k,
            const deformops::Corners<T>& corners, const CornerSlot<T>& slot, double y,
            double x) {
          const T m = slot.m;
          const uint32_t s = slot_team * g.kernel_points + k;
          const bool touches = m != T(0) &&
                               (corners.weight[0] != T(0) || corners.weight[1] != T(0) ||
                                corners.weight[2] != T(0) || corners.weight[3] != T(0));
          int32_t cell = -1;
          int32_t rank = 0;
          if (touches) {
            const int64_t cy = static_cast<int64_t>(floor(y)) + 1;
            const int64_t cx = static_cast<int64_t>(floor(x)) + 1;
            cell = static_cast<int32_t>(
                (uint32_t(slot_at.n - g.n_begin) * g.offset_groups + slot_at.og) *
                    g.cells_per_map +
                cy * g.cell_width + cx);
            rank = atomicAdd(files.cell_counts + cell, 1);
            CornerWeights<T> w;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              w.w[q] = corners.weight[q] * m;
            }
            weights[s] = w;
          }
          files.cell[s] = cell;
          files.rank[s] = files.stable ? static_cast<int32_t>(s) : rank;
        });
    __syncthreads();
    const CornerSlot<T>* slots = team_slots(block_slots, g, points);
    for (int kk = 0; kk < points; ++kk) {
      const CornerSlot<T>& slot = slots[kk];
      const deformops::Corners<T> local = in_registers(slot);
      bool used[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        used[q] = slot.weight[q] != T(0) || slot.dweight_dy[q] != T(0) ||
                  slot.dweight_dx[q] != T(0);
      }
      // dots[q] = sum over the lane's channels of grad_column * value at corner q:
      // by linearity, the sample's gradients are sampling.h's functions of them.
      T dots[4] = {T(0), T(0), T(0), T(0)};
      for (uint32_t v = lane; active && v < g.vectors; v += team_lanes(g)) {
        const uint32_t c = at.og * g.offset_group_channels + v * VEC;
        const int64_t base = column_base(g, c) + int64_t(k0 + kk) * g.group_channels;
        Packed<VEC, V> raw[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (used[q]) {
            raw[q] = load_packed<VEC>(image + int64_t(slot.offset[q]) * g.channels + c);
          }
        }
        T grad_col[VEC];
        widen_raw<T, V, VEC>(load_packed<VEC>(grad_row + base), true, grad_col);
        T values[4 * VEC];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          widen_raw<T, V, VEC>(raw[q], used[q], values + q * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            dots[q] += grad_col[e] * values[q * VEC + e];
          }
        }
        T column[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          column[e] = slot.m *
                      deformops::bilinear_sample(values + e, VEC, local, deformops::Unguarded{});
        }
        store_vec_streaming<VEC>(row + base, column);
      }
      // Team sums of the dots, then the gradients of sum_c grad_column * sample.
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        dots[q] = lane_sum(dots[q], 1, int(team_lanes(g)));
      }
      if (active && lane == 0) {
        const deformops::Corners<T> dot_corners = in_registers(slot);
        T grad_y = T(0);
        T grad_x = T(0);
        deformops::bilinear_sample_grad_location(dots, 1, dot_corners, deformops::Unguarded{},
                                                 grad_y, grad_x);
        const int k = k0 + kk;
        const int64_t dy =
            offset_base(g, g.grad_offset_strides, at) + 2 * k * g.grad_offset_strides.c;
        grad_offset[dy] = narrow<V>(slot.m * grad_y);
        grad_offset[dy + g.grad_offset_strides.c] = narrow<V>(slot.m * grad_x);
        if (mask != nullptr) {
          grad_mask[mask_base(g, g.grad_mask_strides, at) + k * g.grad_mask_strides.c] =
              narrow<V>(deformops::bilinear_sample(dots, 1, dot_corners, deformops::Unguarded{}));
        }
      }
    }
    __syncthreads();
  }
}

// Exclusive scan of the block's kScanTile values `v` (kScanPerThread consecutive
// values per thread, in thread order); returns the block's total. Every thread
// of the block must call it.
__device__ __forceinline__ int32_t block_exclusive_scan(int32_t (&v)[kScanPerThread]) {
  __shared__ int32_t warp_totals[kThreads / 32];
  int32_t sum = 0;
#pragma unroll
  for (int i = 0; i < kScanPerThread; ++i) {
    const int32_t x = v[i];
    v[i] = sum;
    sum += x;
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int32_t inclusive = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t up = __shfl_up_sync(0xffffffffu, inclusive, o);
    inclusive += lane >= o ? up : 0;
  }
  if (lane == 31) {
    warp_totals[warp] = inclusive;
  }
  __syncthreads();
  int32_t before = inclusive - sum;
  int32_t total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    total += warp_totals[w];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kScanPerThread; ++i) {
    v[i] += before;
  }
  return total;
}

// Exclusive scan of each tile of kScanTile values of data[0, n), in place; the
// tile's total goes to tile_sums[tile].
__global__ void __launch_bounds__(kThreads)
    scan_tiles_kernel(int32_t* __restrict__ data, uint32_t n, int32_t* __restrict__ tile_sums) {
  const uint32_t first = blockIdx.x * kScanTile + threadIdx.x * kScanPerThread;
  int32_t v[kScanPerThread];
#pragma unroll
  for (int i = 0; i < kScanPerThread; ++i) {
    v[i] = first + i < n ? data[first + i] : 0;
  }
  const int32_t total = block_exclusive_scan(v);
#pragma unroll
  for (int i = 0; i < kScanPerThread; ++i) {
    if (first + i < n) {
      data[first + i] = v[i];
    }
  }
  if (threadIdx.x == 0) {
    tile_sums[blockIdx.x] = total;
  }
}

// Exclusive scan of tile_sums[0, tiles) in place, by one block.
__global__ void __launch_bounds__(kThreads)
    scan_tile_sums_kernel(int32_t* __restrict__ tile_sums, uint32_t tiles) {
  int32_t carry = 0;
  for (uint32_t base = 0; base < tiles; base += kScanTile) {
    const uint32_t first = base + threadIdx.x * kScanPerThread;
    int32_t v[kScanPerThread];
#pragma unroll
    for (int i = 0; i < kScanPerThread; ++i) {
      v[i] = first + i < tiles ? tile_sums[first + i] : 0;
    }
    const int32_t total = block_exclusive_scan(v);
#pragma unroll
    for (int i = 0; i < kScanPerThread; ++i) {
      if (first + i < tiles) {
        tile_sums[first + i] = v[i] + carry;
      }
    }
    carry += total;
  }
}

// Start of cell `cell` in the by-cell order (the scan is tile-local plus the
// scanned tile sums).
__device__ __forceinline__ int32_t cell_start(const SampleFiles& files, uint32_t cell) {
  return files.cell_counts[cell] + files.tile_sums[cell / kScanTile];
}

// Puts sample s at `position` of the by-cell order.
template <typename T>
__device__ __forceinline__ void file_sample(const Geometry& g, const SampleFiles& files,
                                            uint32_t samples, uint32_t s, uint32_t position) {
  const uint32_t k = s % g.kernel_points;
  const uint32_t p = (s / g.kernel_points) % g.pixels;
  files.sorted_base[position] = static_cast<int32_t>(p * g.row + k * int64_t(g.group_channels));
  const CornerWeights<T> w = static_cast<const CornerWeights<T>*>(files.weights)[s];
  T* sorted = static_cast<T*>(files.sorted_weights);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    sorted[q * int64_t(samples) + position] = w.w[q];
  }
}

// Moves each filed sample to its place in the by-cell order: its cell's start
// plus its rank.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fill_kernel(const Geometry g, const SampleFiles files, uint32_t samples) {
  const uint32_t s = blockIdx.x * kThreads + threadIdx.x;
  if (s >= samples) {
    return;
  }
  const int32_t cell = files.cell[s];
  if (cell >= 0) {
    file_sample<T>(g, files, samples, s, cell_start(files, cell) + files.rank[s]);
  }
}

// Deterministic mode: position i of the stably sorted pairs is the place of its
// sample (cell starts plus ranks in sample order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fill_sorted_kernel(const Geometry g, const SampleFiles files, uint32_t samples) {
  const uint32_t i = blockIdx.x * kThreads + threadIdx.x;
  if (i < samples && static_cast<int32_t>(files.sorted_cell[i]) >= 0) {
    file_sample<T>(g, files, samples, files.sorted_sample[i], i);
  }
}

// One team per input pixel (y, x) of each image of the chunk and offset group:
// grad_input[pixel] += sum over the samples of which the pixel is corner q of
// grad_column * (corner weight q * mask).
template <typename V, int VEC>
__global__ void __launch_bounds__(kThreads, kGatherMinBlocks)
    gather_kernel(const Geometry g, const V* __restrict__ grad_columns,
                  acc_type<V>* __restrict__ grad_input, const SampleFiles files,
                  uint32_t samples) {
  using T = acc_type<V>;
  const uint32_t thread = blockIdx.x * kThreads + threadIdx.x;
  const uint32_t team = thread >> g.lanes_log2;
  if (team >= g.images * g.offset_groups * g.map_pixels) {
    return;
  }
  const uint32_t lane = thread & (team_lanes(g) - 1u);
  const uint32_t map = team / g.map_pixels;  // image * G + og
  const uint32_t pixel = team - map * g.map_pixels;
  const uint32_t image = map / g.offset_groups;
  const uint32_t og = map - image * g.offset_groups;
  const uint32_t y = pixel / uint32_t(g.width);
  const uint32_t x = pixel - y * uint32_t(g.width);
  const T* sorted = static_cast<const T*>(files.sorted_weights);
  // Cell (y - a, x - b) has the pixel as corner q = 2a + b.
  uint32_t begin[4], end[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t cell =
        map * g.cells_per_map + (y + 1 - (q >> 1)) * g.cell_width + (x + 1 - (q & 1));
    begin[q] = cell_start(files, cell);
    end[q] = cell_start(files, cell + 1);
  }
  if (begin[0] == end[0] && begin[1] == end[1] && begin[2] == end[2] && begin[3] == end[3]) {
    return;
  }
  T* grad_pixel = grad_input + ((g.n_begin + image) * g.map_pixels + pixel) * g.channels;
  for (uint32_t v = lane; v < g.vectors; v += team_lanes(g)) {
    const uint32_t c = og * g.offset_group_channels + v * VEC;
    const int64_t column = column_base(g, c);
    T sum[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      sum[e] = T(0);
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // Batches of samples: their indices first, then their vectors, in flight together.
      for (uint32_t i0 = begin[q]; i0 < end[q]; i0 += kGatherBatch) {
        int32_t bases[kGatherBatch];
        T w[kGatherBatch];
#pragma unroll
        for (int b = 0; b < kGatherBatch; ++b) {
          const bool present = i0 + b < end[q];
          bases[b] = present ? files.sorted_base[i0 + b] : 0;
          w[b] = present ? sorted[q * int64_t(samples) + i0 + b] : T(0);
        }
        Packed<VEC, V> raw[kGatherBatch];
#pragma unroll
        for (int b = 0; b < kGatherBatch; ++b) {
          if (i0 + b < end[q]) {
            raw[b] = load_packed<VEC>(grad_columns + bases[b] + column);
          }
        }
#pragma unroll
        for (int b = 0; b < kGatherBatch; ++b) {
          T grad_col[VEC];
          widen_raw<T, V, VEC>(raw[b], i0 + b < end[q], grad_col);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            sum[e] += w[b] * grad_col[e];
          }
        }
      }
    }
    add_vector<VEC>(grad_pixel + c, sum);
  }
}

// dst[b][c][r] = src[b][r][c] for one kTransposeTile-square tile per block,
// through shared memory; each thread reads VEC consecutive elements of a src row
// and writes VEC consecutive elements of a dst row (rows and cols multiples of
// VEC, pointers aligned to VEC elements).
template <typename S, typename D, int VEC>
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t rows, int64_t cols,
                     uint32_t row_tiles, uint32_t col_tiles) {
  using A = decltype(widen(S()));
  constexpr int kVectors = kTransposeTile / VEC;  // vectors of one tile row
  __shared__ A tile[kTransposeTile][kTransposeTile + 1];
  uint32_t t = blockIdx.x;
  const uint32_t col_tile = t % col_tiles;
  t /= col_tiles;
  const uint32_t row_tile = t % row_tiles;
  const int64_t batch = t / row_tiles;
  const S* in = src + batch * rows * cols;
  D* out = dst + batch * rows * cols;
  const int64_t r0 = int64_t(row_tile) * kTransposeTile;
  const int64_t c0 = int64_t(col_tile) * kTransposeTile;
  for (int i = threadIdx.x; i < kTransposeTile * kVectors; i += kThreads) {
    const int r = i / kVectors;
    const int c = (i % kVectors) * VEC;
    if (r0 + r < rows && c0 + c < cols) {
      A v[VEC];
      load_vec<VEC>(in + (r0 + r) * cols + c0 + c, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        tile[r][c + e] = v[e];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTransposeTile * kVectors; i += kThreads) {
    const int c = i / kVectors;
    const int r = (i % kVectors) * VEC;
    if (c0 + c < cols && r0 + r < rows) {
      A v[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[e] = tile[r + e][c];
      }
      store_vec_streaming<VEC>(out + (c0 + c) * rows + r0 + r, v);
    }
  }
}

int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Channels per vector: the most (16 bytes at most) that divide the channels of
// an offset group and of a convolution group, with every vector-accessed
// pointer aligned to the vector.
template <typename V>
int conv_vector_width(const ConvSizes& s, const void* const* pointers, int count) {
  const int64_t channels = gcd(s.channels / s.groups, s.channels / s.offset_groups);
  return vector_width<sizeof(V)>(channels, pointers, count);
}

int64_t chunk_pixels(const ConvSizes& s, const ConvChunk& chunk) {
  return (chunk.row_end - chunk.row_begin) * s.out_width;
}

int64_t chunk_images(const ConvSizes& s, const ConvChunk& chunk) {
  return chunk.row_end > chunk.row_begin
             ? (chunk.row_end - 1) / s.out_height - chunk.row_begin / s.out_height + 1
             : 0;
}

int64_t chunk_cells(const ConvSizes& s, const ConvChunk& chunk) {
  return chunk_images(s, chunk) * s.offset_groups * (s.height + 1) * (s.width + 1);
}

// The geometry of the chunk for vectors of `vec` channels, or false when the
// chunk is too large for 32-bit positions.
bool make_geometry(const ConvSizes& s, const ConvChunk& chunk, int vec, Geometry& g) {
  const int64_t kernel_points = s.kernel_h * s.kernel_w;
  const int64_t pixels = chunk_pixels(s, chunk);
  const int64_t vectors = s.channels / s.offset_groups / vec;
  int lanes_log2 = 0;
  while ((int64_t(1) << lanes_log2) < vectors && lanes_log2 < 5) {
    ++lanes_log2;
  }
  const int64_t images = chunk_images(s, chunk);
  const int64_t map_teams = images * s.offset_groups * s.height * s.width;
  if (pixels * kernel_points * s.channels > kMaxChunkElements ||
      (pixels * s.offset_groups << lanes_log2) > kMaxChunkElements ||
      (map_teams << lanes_log2) > kMaxChunkElements || chunk_cells(s, chunk) >= kMaxChunkElements ||
      s.out_height > kMaxChunkElements || s.out_width > kMaxChunkElements ||
      s.height * s.width > kMaxChunkElements) {
    return false;
  }
  g.channels = s.channels;
  g.height = s.height;
  g.width = s.width;
  g.image_size = s.height * s.width * s.channels;
  g.row = kernel_points * s.channels;
  g.stride_h = s.stride_h;
  g.stride_w = s.stride_w;
  g.pad_h = s.pad_h;
  g.pad_w = s.pad_w;
  g.dilation_h = s.dilation_h;
  g.dilation_w = s.dilation_w;
  g.n_begin = chunk.row_begin / s.out_height;
  g.ho_begin = static_cast<uint32_t>(chunk.row_begin % s.out_height);
  g.out_height = static_cast<uint32_t>(s.out_height);
  g.out_width = static_cast<uint32_t>(s.out_width);
  g.pixels = static_cast<uint32_t>(pixels);
  g.teams = static_cast<uint32_t>(pixels * s.offset_groups);
  g.group_channels = static_cast<uint32_t>(s.channels / s.groups);
  g.offset_group_channels = static_cast<uint32_t>(s.channels / s.offset_groups);
  g.vectors = static_cast<uint32_t>(vectors);
  g.cell_width = static_cast<uint32_t>(s.width + 1);
  g.cells_per_map = static_cast<uint32_t>((s.height + 1) * (s.width + 1));
  g.images = static_cast<uint32_t>(images);
  g.map_pixels = static_cast<uint32_t>(s.height * s.width);
  g.kernel_h = static_cast<int32_t>(s.kernel_h);
  g.kernel_w = static_cast<int32_t>(s.kernel_w);
  g.kernel_points = static_cast<int32_t>(kernel_points);
  g.offset_groups = static_cast<int32_t>(s.offset_groups);
  g.lanes_log2 = lanes_log2;
  g.grouped = s.groups > 1;
  return true;
}

unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreads - 1) / kThreads);
}

// Bits of the cell keys of a chunk: enough that a key of all ones (the cell -1
// of a sample that touches no pixel) sorts after every cell.
int cell_key_bits(const ConvSizes& s, const ConvChunk& chunk) {
  int bits = 1;
  while (bits < 32 && (int64_t(1) << bits) <= chunk_cells(s, chunk)) {
    ++bits;
  }
  return bits;
}

// Byte layout of the col2im workspace: the arrays of SampleFiles, each aligned
// to 16 bytes, and in deterministic mode those of the sort and its scratch.
struct WorkspaceLayout {
  size_t counts, tile_sums, cell, rank, weights, sorted_weights, sorted_base;
  size_t sorted_cell, sorted_sample, sort_scratch, sort_scratch_bytes;
  size_t total;
};

template <typename T>
WorkspaceLayout workspace_layout(const ConvSizes& s, const ConvChunk& chunk, bool deterministic) {
  const size_t samples =
      static_cast<size_t>(chunk_pixels(s, chunk) * s.offset_groups * s.kernel_h * s.kernel_w);
  const size_t cells = static_cast<size_t>(chunk_cells(s, chunk)) + 1;
  const size_t tiles = (cells + kScanTile - 1) / kScanTile;
  WorkspaceLayout l{};
  size_t at = 0;
  const auto take = [&at](size_t bytes) {
    const size_t start = at;
    at += (bytes + 15) / 16 * 16;
    return start;
  };
  l.counts = take(cells * sizeof(int32_t));
  l.tile_sums = take(tiles * sizeof(int32_t));
  l.cell = take(samples * sizeof(int32_t));
  l.rank = take(samples * sizeof(int32_t));
  l.weights = take(samples * sizeof(CornerWeights<T>));
  l.sorted_weights = take(4 * samples * sizeof(T));
  l.sorted_base = take(samples * sizeof(int32_t));
  if (deterministic) {
    l.sorted_cell = take(samples * sizeof(uint32_t));
    l.sorted_sample = take(samples * sizeof(int32_t));
    l.sort_scratch_bytes =
        sort_pairs_scratch_bytes(static_cast<int32_t>(samples), cell_key_bits(s, chunk));
    l.sort_scratch = take(l.sort_scratch_bytes);
  }
  l.total = at;
  return l;
}

template <typename V>
Strides strides_of(const Plane<V>& plane) {
  return Strides{plane.stride_n, plane.stride_c, plane.stride_h, plane.stride_w};
}

}  // namespace

template <typename V>
cudaError_t deform_conv_im2col(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                               const Plane<const V>& offset, const Plane<const V>& mask,
                               V* columns, cudaStream_t stream) {
  const void* pointers[] = {input, columns};
  const int vec = conv_vector_width<V>(s, pointers, 2);
  Geometry g;
  if (!make_geometry(s, chunk, vec, g)) {
    return cudaErrorInvalidValue;
  }
  if (g.teams == 0) {
    return cudaSuccess;
  }
  g.offset_strides = strides_of(offset);
  g.mask_strides = strides_of(mask);
  return with_vector_width<sizeof(V)>(vec, [&](auto width) {
    im2col_kernel<V, decltype(width)::value>
        <<<blocks_for(int64_t(g.teams) << g.lanes_log2), kThreads, 0, stream>>>(
            g, input, offset.data, mask.data, columns);
    return cudaGetLastError();
  });
}

template <typename V>
size_t deform_conv_col2im_workspace(const ConvSizes& s, const ConvChunk& chunk,
                                    bool deterministic) {
  return workspace_layout<acc_type<V>>(s, chunk, deterministic).total;
}

template <typename V>
cudaError_t deform_conv_col2im(const ConvSizes& s, const ConvChunk& chunk, const V* input,
                               const Plane<const V>& offset, const Plane<const V>& mask,
                               const V* grad_columns, V* columns, conv_grad_t<V>* grad_input,
                               const Plane<V>& grad_offset, const Plane<V>& grad_mask,
                               void* workspace, size_t workspace_bytes, bool deterministic,
                               cudaStream_t stream) {
  using T = acc_type<V>;
  const void* pointers[] = {input, grad_columns, columns};
  const int vec = conv_vector_width<V>(s, pointers, 3);
  Geometry g;
  const WorkspaceLayout layout = workspace_layout<T>(s, chunk, deterministic);
  if (!make_geometry(s, chunk, vec, g) || workspace_bytes < layout.total ||
      !is_aligned(workspace, 16)) {
    return cudaErrorInvalidValue;
  }
  if (g.teams == 0) {
    return cudaSuccess;
  }
  g.offset_strides = strides_of(offset);
  g.mask_strides = strides_of(mask);
  g.grad_offset_strides = strides_of(grad_offset);
  g.grad_mask_strides = strides_of(grad_mask);
  char* base = static_cast<char*>(workspace);
  const SampleFiles files{reinterpret_cast<int32_t*>(base + layout.counts),
                          reinterpret_cast<int32_t*>(base + layout.tile_sums),
                          reinterpret_cast<int32_t*>(base + layout.cell),
                          reinterpret_cast<int32_t*>(base + layout.rank),
                          base + layout.weights,
                          base + layout.sorted_weights,
                          reinterpret_cast<int32_t*>(base + layout.sorted_base),
                          deterministic,
                          reinterpret_cast<uint32_t*>(base + layout.sorted_cell),
                          reinterpret_cast<int32_t*>(base + layout.sorted_sample)};
  const uint32_t samples = g.teams * g.kernel_points;
  const uint32_t cells = static_cast<uint32_t>(chunk_cells(s, chunk)) + 1;
  const uint32_t tiles = (cells + kScanTile - 1) / kScanTile;
  cudaError_t status = cudaMemsetAsync(files.cell_counts, 0, cells * sizeof(int32_t), stream);
  if (status != cudaSuccess) {
    return status;
  }
  return with_vector_width<sizeof(V)>(vec, [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    col2im_kernel<V, VEC><<<blocks_for(int64_t(g.teams) << g.lanes_log2), kThreads, 0, stream>>>(
        g, input, offset.data, mask.data, grad_columns, columns, grad_offset.data, grad_mask.data,
        files);
    scan_tiles_kernel<<<tiles, kThreads, 0, stream>>>(files.cell_counts, cells, files.tile_sums);
    scan_tile_sums_kernel<<<1, kThreads, 0, stream>>>(files.tile_sums, tiles);
    if (deterministic) {
      const cudaError_t sorted = sort_pairs(
          reinterpret_cast<const uint32_t*>(files.cell), files.sorted_cell, files.rank,
          files.sorted_sample, static_cast<int32_t>(samples), cell_key_bits(s, chunk),
          base + layout.sort_scratch, layout.sort_scratch_bytes, stream);
      if (sorted != cudaSuccess) {
        return sorted;
      }
      fill_sorted_kernel<T><<<blocks_for(samples), kThreads, 0, stream>>>(g, files, samples);
    } else {
      fill_kernel<T><<<blocks_for(samples), kThreads, 0, stream>>>(g, files, samples);
    }
    const int64_t map_teams = int64_t(g.images) * g.offset_groups * g.map_pixels;
    gather_kernel<V, VEC><<<blocks_for(map_teams << g.lanes_log2), kThreads, 0, stream>>>(
        g, grad_columns, grad_input, files, samples);
    return cudaGetLastError();
  });
}

template <typename S, typename D>
cudaError_t deform_conv_transpose(const S* src, D* dst, int64_t batch, int64_t rows, int64_t cols,
                                  cudaStream_t stream) {
  const int64_t row_tiles = (rows + kTransposeTile - 1) / kTransposeTile;
  const int64_t col_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
  const int64_t blocks = batch * row_tiles * col_tiles;
  if (blocks == 0) {
    return cudaSuccess;
  }
  if (blocks > kMaxChunkElements) {
    return cudaErrorInvalidValue;
  }
  // Vectors of 16 bytes of the wider type at most, dividing both sizes.
  constexpr int kMaxVec =
      kMaxVectorBytes / static_cast<int>(sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D));
  int vec = kMaxVec;
  while (vec > 1 && (rows % vec != 0 || cols % vec != 0 || !is_aligned(src, vec * sizeof(S)) ||
                     !is_aligned(dst, vec * sizeof(D)))) {
    vec /= 2;
  }
  const auto launch = [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    transpose_kernel<S, D, VEC><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        src, dst, rows, cols, static_cast<uint32_t>(row_tiles), static_cast<uint32_t>(col_tiles));
    return cudaGetLastError();
  };
  return with_vector_width<(sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D))>(vec, launch);
}

#define DEFORMOPS_INSTANTIATE_CONV(V)                                                         \
  template cudaError_t deform_conv_im2col<V>(const ConvSizes&, const ConvChunk&, const V*,   \
                                             const Plane<const V>&, const Plane<const V>&,   \
                                             V*, cudaStream_t);                              \
  template size_t deform_conv_col2im_workspace<V>(const ConvSizes&, const ConvChunk&, bool); \
  template cudaError_t deform_conv_col2im<V>(                                                \
      const ConvSizes&, const ConvChunk&, const V*, const Plane<const V>&,                   \
      const Plane<const V>&, const V*, V*, conv_grad_t<V>*, const Plane<V>&,                 \
      const Plane<V>&, void*, size_t, bool, cudaStream_t);

#define DEFORMOPS_INSTANTIATE_TRANSPOSE(S, D)                                                    \
  template cudaError_t deform_conv_transpose<S, D>(const S*, D*, int64_t, int64_t, int64_t, \
                                                   cudaStream_t);

DEFORMOPS_INSTANTIATE_TRANSPOSE(__half, __half)
DEFORMOPS_INSTANTIATE_TRANSPOSE(__nv_bfloat16, __nv_bfloat16)
DEFORMOPS_INSTANTIATE_TRANSPOSE(float, float)
DEFORMOPS_INSTANTIATE_TRANSPOSE(double, double)
DEFORMOPS_INSTANTIATE_TRANSPOSE(float, __half)
DEFORMOPS_INSTANTIATE_TRANSPOSE(float, __nv_bfloat16)
DEFORMOPS_INSTANTIATE_TRANSPOSE(float, double)

DEFORMOPS_INSTANTIATE_CONV(__half)
DEFORMOPS_INSTANTIATE_CONV(__nv_bfloat16)
DEFORMOPS_INSTANTIATE_CONV(float)
DEFORMOPS_INSTANTIATE_CONV(double)

}  // namespace deformops::gpu
