// Multi-scale deformable attention on the CPU.
//
// The forward is parallel over (n, q) queries, each writing its own output row.
// The backward is parallel over (n, m) pairs: the value gradient of pair (n, m)
// is the slice grad_value[n, :, m, :], written (zeroed, then summed into) by that
// pair only, so the scatter-adds are plain adds with no lost update, and every
// sum runs in a fixed order whatever the number of threads.
#include <algorithm>
#include <array>

#include "../sampling.h"
#include "kernels.h"

namespace deformops_native::cpu {
namespace {

// Samples of one (n, q, m) located, and their corner rows prefetched, before the
// first is used: the rows lie anywhere in the value (tens of MB), so that their
// cache misses overlap instead of being waited for one after the other.
constexpr int64_t kPrefetchBatch = 16;

// Asks the cache for the n elements from p, to read (write = false) or update.
template <typename T>
void prefetch_span(const T* p, int64_t n, bool write) {
  constexpr int64_t kLine = 64;
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t at = 0; at < n * static_cast<int64_t>(sizeof(T)); at += kLine) {
    if (write) {
      __builtin_prefetch(bytes + at, 1);
    } else {
      __builtin_prefetch(bytes + at, 0);
    }
  }
}

// Calls prefetch(corners) and then f(i, corners, height, width) for the L*P
// samples of one (n, q, m), in batches of kPrefetchBatch (every prefetch of a
// batch before its first f); the first sample is sample `first` of the flattened
// [N, Q, M, L, P] samples. `corners` are those of the sample on its level of
// height x width pixels, with offsets that are flat spatial indices of the value
// (corners outside it dropped: weight 0), located in precision C (see corners_as
// in sampling.h).
// Always inlined: called out of line, f's loops read the caller's variables
// through its captures, which its stores might alias, and measured 20% slower.
template <typename C, typename T, typename P, typename F>
[[gnu::always_inline]] inline void for_each_sample(const MsdaSizes& s,
                                                   const int64_t* spatial_shapes,
                                                   const int64_t* level_start, const T* locations,
                                                   int64_t first, P&& prefetch, F&& f) {
  const int64_t count = s.levels * s.points;
  deformops::Corners<T> corners[kPrefetchBatch];
  for (int64_t begin = 0; begin < count; begin += kPrefetchBatch) {
    const int64_t end = std::min(count, begin + kPrefetchBatch);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t l = j / s.points;
      const int64_t i = first + j;
      const C x = static_cast<C>(locations[2 * i]) * static_cast<C>(spatial_shapes[2 * l + 1]) -
                  C(0.5);
      const C y =
          static_cast<C>(locations[2 * i + 1]) * static_cast<C>(spatial_shapes[2 * l]) - C(0.5);
      deformops::Corners<C> located =
          deformops::bilinear_corners<C>(y, x, spatial_shapes[2 * l], spatial_shapes[2 * l + 1]);
      deformops::rebase_corners(located, level_start[l], s.spatial);
      corners[j - begin] = deformops::corners_as<T>(located);
      prefetch(corners[j - begin]);
    }
    for (int64_t j = begin; j < end; ++j) {
      const int64_t l = j / s.points;
      // f gets a copy of its own, which none of its stores can alias.
      const deformops::Corners<T> sample = corners[j - begin];
      f(first + j, sample, spatial_shapes[2 * l], spatial_shapes[2 * l + 1]);
    }
  }
}

// Prefetches the rows of `corners` (depth elements each, `row` apart) in `data`.
template <typename T>
void prefetch_corners(const T* data, int64_t row, int64_t depth,
                      const deformops::Corners<T>& corners, bool write) {
  for (int q = 0; q < 4; ++q) {
    if (corners.weight[q] != T(0)) {
      prefetch_span(data + corners.offset[q] * row, depth, write);
    }
  }
}

}  // namespace

template <typename T>
void msda_forward(const MsdaSizes& s, const T* value, const int64_t* spatial_shapes,
                  const int64_t* level_start, const T* locations, const T* attention, T* output) {
  const int64_t depth = s.channels;
  const int64_t row = s.heads * depth;  // distance between spatial indices of the value
  const int64_t samples = s.levels * s.points;
  const int64_t grain = grain_for(s.heads * samples * depth * 8);
  at::parallel_for(0, s.batch * s.queries, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nq = begin; nq < end; ++nq) {
      const T* value_n = value + (nq / s.queries) * s.spatial * row;
      for (int64_t m = 0; m < s.heads; ++m) {
        const T* value_m = value_n + m * depth;
        T* sum = output + (nq * s.heads + m) * depth;
        std::fill_n(sum, depth, T(0));
        const auto accumulate = [&](int64_t i, const deformops::Corners<T>& corners, int64_t,
                                    int64_t) {
          const T a = attention[i];
          deformops::with_guard(corners, [&](const auto& guard) {
#pragma omp simd
            for (int64_t d = 0; d < depth; ++d) {
              sum[d] += a * deformops::bilinear_sample(value_m + d, row, corners, guard);
            }
          });
        };
        const auto prefetch = [&](const deformops::Corners<T>& corners) {
          prefetch_corners(value_m, row, depth, corners, false);
        };
        // The output is continuous in the location: locate in T.
        for_each_sample<T>(s, spatial_shapes, level_start, locations,
                           (nq * s.heads + m) * samples, prefetch, accumulate);
      }
    }
  });
}

template <typename T>
void msda_backward(const MsdaSizes& s, const T* grad_output, const T* value,
                   const int64_t* spatial_shapes, const int64_t* level_start, const T* locations,
                   const T* attention, T* grad_value, T* grad_locations, T* grad_attention) {
  const int64_t depth = s.channels;
  const int64_t row = s.heads * depth;
  const int64_t samples = s.levels * s.points;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / s.heads;
      const int64_t m = nm % s.heads;
      const T* value_m = value + n * s.spatial * row + m * depth;
      T* grad_value_m = grad_value + n * s.spatial * row + m * depth;
      // The pair's slice is zeroed here, not by the caller: it then sits in this
      // core's cache when the scatter-adds below update it.
      for (int64_t pos = 0; pos < s.spatial; ++pos) {
        std::fill_n(grad_value_m + pos * row, depth, T(0));
      }
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t nqm = (n * s.queries + q) * s.heads + m;
        const T* grad = grad_output + nqm * depth;
        const auto sample_backward = [&](int64_t i, const deformops::Corners<T>& corners,
                                         int64_t height, int64_t width) {
          const T a = attention[i];
          // Sums over channels of grad * (sample, d sample / dy, d sample / dx).
          const std::array<T, 3> sums = deformops::with_guard(corners, [&](const auto& guard) {
            T grad_a = T(0);
            T grad_y = T(0);
            T grad_x = T(0);
#pragma omp simd reduction(+ : grad_a, grad_y, grad_x)
            for (int64_t d = 0; d < depth; ++d) {
              grad_a += grad[d] * deformops::bilinear_sample(value_m + d, row, corners, guard);
              T dy = T(0);
              T dx = T(0);
              deformops::bilinear_sample_grad_location(value_m + d, row, corners, guard, dy, dx);
              grad_y += grad[d] * dy;
              grad_x += grad[d] * dx;
            }
            return std::array<T, 3>{grad_a, grad_y, grad_x};
          });
          const auto [grad_a, grad_y, grad_x] = sums;
          deformops::for_each_corner(corners, [&](int64_t corner, T weight) {
            T* target = grad_value_m + corner * row;
            const T scale = a * weight;
#pragma omp simd
            for (int64_t d = 0; d < depth; ++d) {
              target[d] += scale * grad[d];
            }
          });
          grad_attention[i] = grad_a;
          grad_locations[2 * i] = a * grad_x * static_cast<T>(width);
          grad_locations[2 * i + 1] = a * grad_y * static_cast<T>(height);
        };
        const auto prefetch = [&](const deformops::Corners<T>& corners) {
          prefetch_corners(value_m, row, depth, corners, false);
          prefetch_corners(grad_value_m, row, depth, corners, true);
        };
        // The location gradient jumps at pixel edges: locate in double.
        for_each_sample<double>(s, spatial_shapes, level_start, locations, nqm * samples,
                                prefetch, sample_backward);
      }
    }
  });
}

#define DEFORMOPS_INSTANTIATE_MSDA(T)                                                       \
  template void msda_forward<T>(const MsdaSizes&, const T*, const int64_t*, const int64_t*,    \
                                const T*, const T*, T*);                                       \
  template void msda_backward<T>(const MsdaSizes&, const T*, const T*, const int64_t*,         \
                                 const int64_t*, const T*, const T*, T*, T*, T*);

DEFORMOPS_INSTANTIATE_MSDA(float)
DEFORMOPS_INSTANTIATE_MSDA(double)

}  // namespace deformops_native::cpu
