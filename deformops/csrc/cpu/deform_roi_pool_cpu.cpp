// Deformable RoI pooling on the CPU: the RoI geometry of roi_pool.h, samples
// taken with sampling.h's RoIAlign corners.
//
// The input is read channels-last, so that the C channels of one sampled pixel
// are contiguous: the corners of a sample serve a vectorised loop over channels.
//
// The forward and the offset gradient are parallel over bins (k, ph, pw), each
// task writing its own bins. The input gradient is parallel over (image, channel
// block) units: a unit scatters into its image and its channels only, walking
// the image's RoIs, bins and samples in order, so the adds are plain (no lost
// update) and each element's sum runs in the same order whatever the number of
// threads.
#include <algorithm>
#include <array>
#include <vector>

#include "../roi_pool.h"
#include "kernels.h"

namespace deformops_native::cpu {
namespace {

using deformops::BinStart;
using deformops::Corners;
using deformops::RoiGrid;

// Bin b of the flattened [K, out_h, out_w] bins: RoI k, row ph, column pw.
struct Bin {
  int64_t k, ph, pw;

  Bin(const RoiPoolSizes& s, int64_t b)
      : k(b / (s.out_height * s.out_width)),
        ph(b / s.out_width % s.out_height),
        pw(b % s.out_width) {}
};

// The start of the bin's samples (offsets read from `offset` unless it is null).
template <typename T>
BinStart<T> start_of(const RoiPoolSizes& s, const RoiGrid<T>& g, const Bin& bin, const T* offset) {
  T offset_x = T(0);
  T offset_y = T(0);
  if (offset != nullptr) {
    const int64_t plane = s.out_height * s.out_width;
    const T* o = offset + bin.k * 2 * plane + bin.ph * s.out_width + bin.pw;
    offset_x = o[0];
    offset_y = o[plane];
  }
  return deformops::bin_start(g, static_cast<T>(s.gamma), offset_x, offset_y);
}

// Calls f(corners) for each sample of the bin, in row-major sample order.
template <typename T, typename F>
void for_each_sample(const RoiPoolSizes& s, const RoiGrid<T>& g, const BinStart<T>& start,
                     const Bin& bin, F&& f) {
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      f(deformops::roi_sample_corners(g, start, bin.ph, bin.pw, iy, ix, s.height, s.width));
    }
  }
}

// Writes the offset gradient of every bin (`grad_output` [K, out_h, out_w, C]).
template <typename T>
void offset_gradient(const RoiPoolSizes& s, const T* grad_output, const T* input, const T* rois,
                     const T* offset, T* grad_offset) {
  const int64_t channels = s.channels;
  const int64_t plane = s.out_height * s.out_width;
  at::parallel_for(0, s.rois * plane, grain_for(channels * 64), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Bin bin(s, b);
      const RoiGrid<T> g = deformops::roi_grid(s, rois + 5 * bin.k);
      T* out = grad_offset + bin.k * 2 * plane + bin.ph * s.out_width + bin.pw;
      if (g.batch < 0) {
        out[0] = T(0);
        out[plane] = T(0);
        continue;
      }
      const T* image = input + g.batch * s.height * s.width * channels;
      const T* grad = grad_output + b * channels;
      const BinStart<T> start = start_of(s, g, bin, offset);
      T grad_y = T(0);
      T grad_x = T(0);
      for_each_sample(s, g, start, bin, [&](const Corners<T>& corners) {
        const std::array<T, 2> sums = deformops::with_guard(corners, [&](const auto& guard) {
          T dy = T(0);
          T dx = T(0);
#pragma omp simd reduction(+ : dy, dx)
          for (int64_t c = 0; c < channels; ++c) {
            T sample_dy = T(0);
            T sample_dx = T(0);
            deformops::bilinear_sample_grad_location(image + c, channels, corners, guard,
                                                     sample_dy, sample_dx);
            dy += grad[c] * sample_dy;
            dx += grad[c] * sample_dx;
          }
          return std::array<T, 2>{dy, dx};
        });
        grad_y += sums[0];
        grad_x += sums[1];
      });
      out[0] = grad_x / g.count * start.dx_doffset;
      out[plane] = grad_y / g.count * start.dy_doffset;
    }
  });
}

// Adds the input gradient into the channels-last `grad_input`.
template <typename T>
void input_gradient(const RoiPoolSizes& s, const T* grad_output, const T* rois, const T* offset,
                    T* grad_input) {
  const int64_t channels = s.channels;
  const int64_t plane = s.out_height * s.out_width;
  if (s.batch == 0 || channels == 0 || s.height * s.width == 0) {
    return;  // nothing was sampled
  }
  // Channel blocks per image: enough units for the threads when there are few images.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = std::clamp<int64_t>((threads + s.batch - 1) / s.batch, 1, channels);
  const int64_t width = (channels + blocks - 1) / blocks;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / blocks;
      const int64_t first = unit % blocks * width;
      const int64_t last = std::min(channels, first + width);
      T* grad_image = grad_input + n * s.height * s.width * channels;
      for (int64_t k = 0; k < s.rois; ++k) {
        const RoiGrid<T> g = deformops::roi_grid(s, rois + 5 * k);
        if (g.batch != n) {
          continue;
        }
        for (int64_t b = k * plane; b < (k + 1) * plane; ++b) {
          const Bin bin(s, b);
          const T* grad = grad_output + b * channels;
          for_each_sample(s, g, start_of(s, g, bin, offset), bin, [&](const Corners<T>& corners) {
            deformops::for_each_corner(corners, [&](int64_t corner, T weight) {
              T* target = grad_image + corner * channels;
              const T scale = weight / g.count;
#pragma omp simd
              for (int64_t c = first; c < last; ++c) {
                target[c] += scale * grad[c];
              }
            });
          });
        }
      }
    }
  });
}

}  // namespace

template <typename T>
void deform_roi_pool_forward(const RoiPoolSizes& s, const T* input, const T* rois,
                             const T* offset, T* output) {
  const int64_t channels = s.channels;
  const int64_t plane = s.out_height * s.out_width;
  at::parallel_for(0, s.rois * plane, grain_for(channels * 64), [&](int64_t begin, int64_t end) {
    std::vector<T> sum(channels);
    for (int64_t b = begin; b < end; ++b) {
      const Bin bin(s, b);
      const RoiGrid<T> g = deformops::roi_grid(s, rois + 5 * bin.k);
      std::fill(sum.begin(), sum.end(), T(0));
      if (g.batch >= 0) {
        const T* image = input + g.batch * s.height * s.width * channels;
        T* acc = sum.data();
        for_each_sample(s, g, start_of(s, g, bin, offset), bin, [&](const Corners<T>& corners) {
          deformops::with_guard(corners, [&](const auto& guard) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
              acc[c] += deformops::bilinear_sample(image + c, channels, corners, guard);
            }
          });
        });
      }
      T* out = output + bin.k * channels * plane + bin.ph * s.out_width + bin.pw;
      for (int64_t c = 0; c < channels; ++c) {
        out[c * plane] = sum[c] / g.count;
      }
    }
  });
}

template <typename T>
void deform_roi_pool_backward(const RoiPoolSizes& s, const T* grad_output, const T* input,
                              const T* rois, const T* offset, T* grad_input, T* grad_offset) {
  if (offset != nullptr) {
    offset_gradient(s, grad_output, input, rois, offset, grad_offset);
  }
  input_gradient(s, grad_output, rois, offset, grad_input);
}

#define DEFORMOPS_INSTANTIATE_ROI_POOL(T)                                                     \
  template void deform_roi_pool_forward<T>(const RoiPoolSizes&, const T*, const T*, const T*, \
                                           T*);                                              \
  template void deform_roi_pool_backward<T>(const RoiPoolSizes&, const T*, const T*, const T*, \
                                            const T*, T*, T*);

DEFORMOPS_INSTANTIATE_ROI_POOL(float)
DEFORMOPS_INSTANTIATE_ROI_POOL(double)

}  // namespace deformops_native::cpu
