// The bilinear sampling core of deformops: one copy, shared by every kernel on
// every device. Torch-free: it compiles as plain C++ and under nvcc.
//
// Conventions (DESIGN.md): a location (y, x) is in pixel units of an h x w map
// whose pixel centres are at integer coordinates. The four corners are
// (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) with y0 = floor(y),
// x0 = floor(x). A corner outside the map contributes zero (zero padding).
// A location that is not finite, or lies at or beyond one pixel outside the map,
// samples zero and has zero gradient.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DEFORMOPS_HD __host__ __device__ __forceinline__
#define DEFORMOPS_UNROLL _Pragma("unroll")
#else
#define DEFORMOPS_HD inline
#define DEFORMOPS_UNROLL
#endif

namespace deformops {

// The four corners of one bilinear sample. `offset[i]` is the flat spatial index
// y * w + x of corner i (0 for a corner outside the map, so that a load from it is
// always in bounds), `weight[i]` its interpolation weight (0 outside the map), and
// `dweight_dy[i]`, `dweight_dx[i]` the derivatives of that weight with respect to
// the location (0 outside the map). Corner order: (y0,x0), (y0,x0+1), (y0+1,x0),
// (y0+1,x0+1). A corner outside the map is the number 0, never the value at
// offset 0 (which may be NaN or infinite) times a zero weight: the per-channel
// functions below take each corner's value through a guard (see with_guard).
template <typename T>
struct Corners {
  int64_t offset[4];
  T weight[4];
  T dweight_dy[4];
  T dweight_dx[4];
};

// The corners of a sample that reads nothing: zero weights and derivatives.
template <typename T>
DEFORMOPS_HD Corners<T> empty_corners() {
  Corners<T> c;
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    c.offset[i] = 0;
    c.weight[i] = T(0);
    c.dweight_dy[i] = T(0);
    c.dweight_dx[i] = T(0);
  }
  return c;
}

// Computes the corners of the sample at (y, x) on an h x w map, in precision T.
// The location is given, bounded and split into pixel and fraction in precision
// C (default T): with C = double and T = float, a float32 kernel locates its
// samples like a float64 one (a location rounded to float can fall across a
// pixel edge, where the location gradient jumps) at the cost of a few double
// operations, and weighs them in float.
template <typename T, typename C = T>
DEFORMOPS_HD Corners<T> bilinear_corners(C y, C x, int64_t h, int64_t w) {
  Corners<T> c = empty_corners<T>();
  // Negated test so that NaN fails it.
  if (!(y > C(-1) && x > C(-1) && y < static_cast<C>(h) && x < static_cast<C>(w))) {
    return c;
  }
  const C fy = floor(y);
  const C fx = floor(x);
  const int64_t y0 = static_cast<int64_t>(fy);
  const int64_t x0 = static_cast<int64_t>(fx);
  const T ly = static_cast<T>(y - fy);
  const T lx = static_cast<T>(x - fx);
  const T hy = T(1) - ly;
  const T hx = T(1) - lx;
  const bool in_y[2] = {y0 >= 0, y0 + 1 < h};
  const bool in_x[2] = {x0 >= 0, x0 + 1 < w};
  const T wy[2] = {hy, ly};
  const T wx[2] = {hx, lx};
  const T sy[2] = {T(-1), T(1)};  // d wy[a] / dy
  const T sx[2] = {T(-1), T(1)};  // d wx[b] / dx
DEFORMOPS_UNROLL
  for (int a = 0; a < 2; ++a) {
DEFORMOPS_UNROLL
    for (int b = 0; b < 2; ++b) {
      const int i = 2 * a + b;
      if (in_y[a] && in_x[b]) {
        c.offset[i] = (y0 + a) * w + (x0 + b);
        c.weight[i] = wy[a] * wx[b];
        c.dweight_dy[i] = sy[a] * wx[b];
        c.dweight_dx[i] = wy[a] * sx[b];
      }
    }
  }
  return c;
}

// The corners of the sample at (y, x) under RoIAlign's border rule (torchvision's
// roi_align, mmcv's RoI operators) in place of zero padding: a location with
// -1 <= y <= h and -1 <= x <= w is moved to the nearest point of the pixel
// centres' box [0, h-1] x [0, w-1] and sampled there (bilinear_corners); a
// location outside that band, or not finite, or on an empty map, samples zero.
// The location derivatives are those of the moved sample, from the right: zero
// along a coordinate that is moved (y < 0 or y >= h-1; x likewise), the bilinear
// ones otherwise.
template <typename T>
DEFORMOPS_HD Corners<T> roi_align_corners(T y, T x, int64_t h, int64_t w) {
  // Negated test so that NaN fails it.
  if (!(y >= T(-1) && x >= T(-1) && y <= static_cast<T>(h) && x <= static_cast<T>(w)) ||
      h <= 0 || w <= 0) {
    return empty_corners<T>();
  }
  const T last_y = static_cast<T>(h - 1);
  const T last_x = static_cast<T>(w - 1);
  const bool free_y = y >= T(0) && y < last_y;
  const bool free_x = x >= T(0) && x < last_x;
  const T cy = free_y ? y : (y < T(0) ? T(0) : last_y);
  const T cx = free_x ? x : (x < T(0) ? T(0) : last_x);
  Corners<T> c = bilinear_corners<T>(cy, cx, h, w);
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    c.dweight_dy[i] = free_y ? c.dweight_dy[i] : T(0);
    c.dweight_dx[i] = free_x ? c.dweight_dx[i] : T(0);
  }
  return c;
}

// Moves the corners of a sample taken on a map whose spatial index 0 lies at
// flat spatial index `base` of a buffer holding `size` (> 0) spatial indices:
// offsets become flat indices into the buffer, and a corner whose flat index
// falls outside [0, size) is dropped (offset 0, zero weight and derivatives),
// so that loads stay in bounds even when a map's shape or start disagrees with
// the buffer (MSDA's spatial_shapes and level_start_index).
template <typename T>
DEFORMOPS_HD void rebase_corners(Corners<T>& c, int64_t base, int64_t size) {
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int64_t flat = base + c.offset[i];
    const bool inside = flat >= 0 && flat < size;
    c.offset[i] = inside ? flat : 0;
    if (!inside) {
      c.weight[i] = T(0);
      c.dweight_dy[i] = T(0);
      c.dweight_dx[i] = T(0);
    }
  }
}

// The corners `c`, computed in precision C, with weights and derivatives in T:
// a location rounded to T can fall across a pixel edge where C's does not, and the
// location gradient jumps there, so a backward may locate in double and
// accumulate in float.
template <typename T, typename C>
DEFORMOPS_HD Corners<T> corners_as(const Corners<C>& c) {
  Corners<T> out;
  DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    out.offset[i] = c.offset[i];
    out.weight[i] = static_cast<T>(c.weight[i]);
    out.dweight_dy[i] = static_cast<T>(c.dweight_dy[i]);
    out.dweight_dx[i] = static_cast<T>(c.dweight_dx[i]);
  }
  return out;
}

// Loads element `i` of `data` (any storage type convertible to T: float, double,
// half and bfloat16 of either CUDA or ATen) as the accumulation type T.
template <typename T, typename V>
DEFORMOPS_HD T load_as(const V* data, int64_t i) {
  return static_cast<T>(data[i]);
}

// Whether corner `i` takes part in the sample or its location gradient: false
// outside the map (and for the far corner of a location on a pixel centre, which
// adds nothing either way).
template <typename T>
DEFORMOPS_HD bool corner_used(const Corners<T>& c, int i) {
  return c.weight[i] != T(0) || c.dweight_dy[i] != T(0) || c.dweight_dx[i] != T(0);
}

// Guards of a corner's value, as the per-channel functions below take it:
// Unguarded keeps the value loaded, for a sample whose four corners are used (or
// values that hold zeros at the unused corners); Guarded drops the values of
// the unused corners (a select per corner and channel, its flags set once per
// sample).
struct Unguarded {
  template <typename T>
  DEFORMOPS_HD T take(T v, int) const {
    return v;
  }
};

struct Guarded {
  bool used[4];
  template <typename T>
  DEFORMOPS_HD T take(T v, int i) const {
    return used[i] ? v : T(0);
  }
};

// The guard of the corners `c`: which are used.
template <typename T>
DEFORMOPS_HD Guarded guard_of(const Corners<T>& c) {
  return Guarded{{corner_used(c, 0), corner_used(c, 1), corner_used(c, 2), corner_used(c, 3)}};
}

// Calls f(Unguarded) when every corner of `c` has a nonzero weight (the common
// sample, wholly on the map and off the pixel centres' lines), else
// f(guard_of(c)), and returns its result: a caller's loop over channels then
// pays for the guard only at the border.
template <typename T, typename F>
DEFORMOPS_HD auto with_guard(const Corners<T>& c, F&& f) {
  if (c.weight[0] != T(0) && c.weight[1] != T(0) && c.weight[2] != T(0) && c.weight[3] != T(0)) {
    return f(Unguarded{});
  }
  return f(guard_of(c));
}

// The bilinear sample of one channel: `data` points at the channel's value at
// spatial index 0, and `stride` is the distance in elements between consecutive
// spatial indices (1 for NCHW planes, C for channels-last, M * D for MSDA values).
template <typename T, typename V, typename Guard>
DEFORMOPS_HD T bilinear_sample(const V* data, int64_t stride, const Corners<T>& c,
                               const Guard& guard) {
  T out = T(0);
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    out += c.weight[i] * guard.take(load_as<T>(data, c.offset[i] * stride), i);
  }
  return out;
}

// The backward of one channel's sample, given the upstream gradient `g` of the
// sampled value:
//  - adds g * weight[i] to the value gradient at each corner through `add(ptr, v)`
//    (a plain add on the CPU under partitioning, an atomic add on the GPU);
//  - accumulates d(sample)/dy * g and d(sample)/dx * g into `grad_y`, `grad_x`.
// `grad_data` may be null when the value gradient is not wanted.
template <typename T, typename V, typename G, typename Guard, typename Add>
DEFORMOPS_HD void bilinear_sample_backward(const V* data, G* grad_data, int64_t stride,
                                           const Corners<T>& c, const Guard& guard, T g,
                                           T& grad_y, T& grad_x, Add add) {
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    const T v = guard.take(load_as<T>(data, c.offset[i] * stride), i);
    grad_y += g * v * c.dweight_dy[i];
    grad_x += g * v * c.dweight_dx[i];
    if (grad_data != nullptr && c.weight[i] != T(0)) {
      add(grad_data + c.offset[i] * stride, g * c.weight[i]);
    }
  }
}

// Calls `visit(offset, weight)` for each corner of nonzero weight: the scatter
// pattern of the value gradient, for a caller that adds a whole run of channels
// at each corner (offset in spatial indices, as in Corners).
template <typename T, typename Visit>
DEFORMOPS_HD void for_each_corner(const Corners<T>& c, Visit visit) {
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    if (c.weight[i] != T(0)) {
      visit(c.offset[i], c.weight[i]);
    }
  }
}

// Derivatives of the sample with respect to the location only (no value gradient).
template <typename T, typename V, typename Guard>
DEFORMOPS_HD void bilinear_sample_grad_location(const V* data, int64_t stride,
                                                const Corners<T>& c, const Guard& guard,
                                                T& dsample_dy, T& dsample_dx) {
DEFORMOPS_UNROLL
  for (int i = 0; i < 4; ++i) {
    const T v = guard.take(load_as<T>(data, c.offset[i] * stride), i);
    dsample_dy += v * c.dweight_dy[i];
    dsample_dx += v * c.dweight_dx[i];
  }
}

// Output size of a convolution along one dimension.
DEFORMOPS_HD int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                   int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace deformops
