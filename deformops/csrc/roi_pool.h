// The sampling grid of deformable RoI pooling (mmcv's DeformRoIPool; with zero
// offsets, RoIAlign with aligned=True), shared by the CPU and CUDA kernels.
// Torch-free: plain C++ that nvcc also compiles (host and device).
//
// RoI k = (b, x1, y1, x2, y2) covers, in input pixels, the box from
// (x1 * scale - 0.5, y1 * scale - 0.5) to (x2 * scale - 0.5, y2 * scale - 0.5).
// It is split into out_h x out_w bins of size bin_h = roi_h / out_h and
// bin_w = roi_w / out_w; the top-left corner of bin (ph, pw) moves by
// (gamma * roi_h * offset[k, 1, ph, pw], gamma * roi_w * offset[k, 0, ph, pw]),
// and the bin averages grid_h x grid_w samples at the centres of its sub-cells
// (sampling_ratio per side, or ceil(roi side / bins) when sampling_ratio <= 0),
// each read with RoIAlign's border rule (roi_align_corners in sampling.h).
#pragma once

#include <cstdint>

#include "sampling.h"
#include "sizes.h"

namespace deformops {

// Whether v is finite (false for infinities and NaN; IEEE arithmetic).
template <typename T>
DEFORMOPS_HD bool is_finite(T v) {
  return v - v == T(0);
}

// Samples per bin side: `ratio` when positive, else ceil(extent / bins), at
// least 0 and at most 2^30 (a bound that keeps the conversion defined; no map
// is that large).
template <typename T>
DEFORMOPS_HD int64_t samples_per_side(int64_t ratio, T extent, int64_t bins) {
  if (ratio > 0) {
    return ratio;
  }
  const T n = ceil(extent / static_cast<T>(bins));
  constexpr int64_t kMost = int64_t(1) << 30;
  return n > T(0) ? (n < static_cast<T>(kMost) ? static_cast<int64_t>(n) : kMost) : 0;
}

// The geometry of one RoI.
template <typename T>
struct RoiGrid {
  int64_t batch;           // image of the RoI; -1 for a skipped RoI (no sample)
  T start_y, start_x;      // top-left corner in input pixels, before offsets
  T height, width;         // roi_h, roi_w
  T bin_h, bin_w;          // bin size
  int64_t grid_h, grid_w;  // samples per bin side (0 for a skipped RoI)
  T count;                 // samples of a bin (at least 1): the divisor of the average
};

// The geometry of RoI `roi` (5 values). A RoI whose batch index is not in
// [0, N) (or not finite), whose coordinates are not finite, or on an empty map
// is skipped: its bins average no sample and are zero, so that no input makes a
// kernel read or write outside the input.
template <typename T>
DEFORMOPS_HD RoiGrid<T> roi_grid(const RoiPoolSizes& s, const T* roi) {
  const T scale = static_cast<T>(s.spatial_scale);
  RoiGrid<T> g;
  g.start_x = roi[1] * scale - T(0.5);
  g.start_y = roi[2] * scale - T(0.5);
  const T end_x = roi[3] * scale - T(0.5);
  const T end_y = roi[4] * scale - T(0.5);
  g.width = end_x - g.start_x;
  g.height = end_y - g.start_y;
  g.bin_h = g.height / static_cast<T>(s.out_height);
  g.bin_w = g.width / static_cast<T>(s.out_width);
  const T index = roi[0];
  const bool valid = index >= T(0) && index < static_cast<T>(s.batch) && is_finite(g.height) &&
                     is_finite(g.width) && s.height > 0 && s.width > 0;
  g.batch = valid ? static_cast<int64_t>(index) : -1;
  g.grid_h = valid ? samples_per_side(s.sampling_ratio, g.height, s.out_height) : 0;
  g.grid_w = valid ? samples_per_side(s.sampling_ratio, g.width, s.out_width) : 0;
  const int64_t count = g.grid_h * g.grid_w;
  g.count = static_cast<T>(count > 0 ? count : 1);
  return g;
}

// Coordinate of sample i (of `grid`) along one side of bin `bin`, whose side
// starts at `start` (offset included) and measures `bin_size`; the evaluation
// order is torchvision's and mmcv's.
template <typename T>
DEFORMOPS_HD T sample_coordinate(T start, int64_t bin, T bin_size, int64_t i, int64_t grid) {
  return start + static_cast<T>(bin) * bin_size +
         (static_cast<T>(i) + T(0.5)) * bin_size / static_cast<T>(grid);
}

// The top-left corner (y, x) of one bin's samples, offset included.
template <typename T>
struct BinStart {
  T y, x;
  T dy_doffset, dx_doffset;  // d y / d offset_y = gamma * roi_h; d x / d offset_x = gamma * roi_w
};

// The start of a bin of RoI grid `g`: the RoI's top-left corner moved by the
// bin's offset (offset_x, offset_y) = offset[k, 0 and 1, ph, pw] (zero without
// offsets) times gamma and the RoI's size.
template <typename T>
DEFORMOPS_HD BinStart<T> bin_start(const RoiGrid<T>& g, T gamma, T offset_x, T offset_y) {
  BinStart<T> b;
  b.dy_doffset = gamma * g.height;
  b.dx_doffset = gamma * g.width;
  b.y = g.start_y + b.dy_doffset * offset_y;
  b.x = g.start_x + b.dx_doffset * offset_x;
  return b;
}

// The corners of sample (iy, ix) of bin (ph, pw) whose start is `b`, on the
// h x w map.
template <typename T>
DEFORMOPS_HD Corners<T> roi_sample_corners(const RoiGrid<T>& g, const BinStart<T>& b, int64_t ph,
                                           int64_t pw, int64_t iy, int64_t ix, int64_t h,
                                           int64_t w) {
  const T y = sample_coordinate(b.y, ph, g.bin_h, iy, g.grid_h);
  const T x = sample_coordinate(b.x, pw, g.bin_w, ix, g.grid_w);
  return roi_align_corners<T>(y, x, h, w);
}

}  // namespace deformops
