// Deformable convolution on the CPU: the sampling half (im2col with bilinear
// samples, and its backward). The GEMMs with the weight run in the bindings.
//
// The input is read channels-last, so that the C channels of one sampled pixel
// are contiguous: one bilinear corner computation serves a run of channels in a
// vectorised loop.
//
// im2col is parallel over output pixels (each writes its own columns row).
// col2im is parallel over (image, channel block) units: a unit scatters into the
// input gradient of its image and its channels only, so the scatter-adds are
// plain adds with no lost update. Each unit also writes its partial sums of the
// offset and mask gradients (a sum over its channels) to a buffer of its own,
// reduced afterwards in a fixed order. The blocks are narrower when a chunk has
// fewer images than there are threads, so the offset and mask gradients depend
// on the number of threads through the rounding of these sums only; in
// deterministic mode the blocks are those of one thread, whatever the number.
#include <algorithm>
#include <array>
#include <vector>

#include "../sampling.h"
#include "kernels.h"

namespace deformops_native::cpu {
namespace {

// Channels of one col2im unit: up to 64, but enough units for `threads` threads
// when the chunk has few images, and no fewer than 16 channels (every unit
// computes the corners of its samples again).
int64_t block_channels(const ConvSizes& s, int64_t images, int64_t threads) {
  const int64_t blocks_per_image = (threads + images - 1) / images;
  const int64_t channels = (s.channels + blocks_per_image - 1) / blocks_per_image;
  return std::clamp<int64_t>((channels + 7) / 8 * 8, 16, 64);
}

// A run of channels [begin, end) inside one offset group and one convolution group.
struct ChannelBlock {
  int64_t begin;
  int64_t end;
  int64_t offset_group;
  int64_t group;
};

// The channels split at offset group and convolution group boundaries, and in
// runs of at most `most` channels, in channel order.
std::vector<ChannelBlock> channel_blocks(const ConvSizes& s, int64_t most) {
  const int64_t per_group = s.channels / s.groups;
  const int64_t per_offset_group = s.channels / s.offset_groups;
  std::vector<ChannelBlock> blocks;
  for (int64_t c = 0; c < s.channels;) {
    const int64_t og = c / per_offset_group;
    const int64_t g = c / per_group;
    const int64_t end = std::min({c + most, (og + 1) * per_offset_group, (g + 1) * per_group});
    blocks.push_back({c, end, og, g});
    c = end;
  }
  return blocks;
}

// Output pixel p of a chunk: image n, output row ho, output column wo.
struct Pixel {
  int64_t n, ho, wo;

  Pixel(const ConvSizes& s, const ConvChunk& chunk, int64_t p) {
    const int64_t r = chunk.row_begin + p / s.out_width;
    n = r / s.out_height;
    ho = r % s.out_height;
    wo = p % s.out_width;
  }

  // Channel `channel` of this pixel in an offset- or mask-like tensor.
  template <typename T>
  T& at(const Plane<T>& plane, int64_t channel) const {
    return plane.at(n, channel, ho, wo);
  }
};

// Kernel point k = i * kw + j of offset group og: the channels of its offset
// (dy; dx is the next channel) and of its mask.
struct KernelPoint {
  int64_t i, j, k, og;

  int64_t offset_channel(const ConvSizes& s) const {
    return 2 * (og * s.kernel_h * s.kernel_w + k);
  }

  int64_t mask_channel(const ConvSizes& s) const { return og * s.kernel_h * s.kernel_w + k; }
};

// The bilinear corners of the kernel point's sample at the pixel, located in
// float64 (sampling.h's bilinear_corners): a location rounded to float can fall
// across a pixel edge, where the offset gradient jumps.
template <typename T>
[[gnu::always_inline]] inline deformops::Corners<T> sample_corners(const ConvSizes& s,
                                                                   const Pixel& px,
                                                                   const KernelPoint& kp,
                                                                   const Plane<const T>& offset) {
  const int64_t c = kp.offset_channel(s);
  const double y = static_cast<double>(px.ho * s.stride_h - s.pad_h + kp.i * s.dilation_h) +
                   static_cast<double>(px.at(offset, c));
  const double x = static_cast<double>(px.wo * s.stride_w - s.pad_w + kp.j * s.dilation_w) +
                   static_cast<double>(px.at(offset, c + 1));
  return deformops::bilinear_corners<T>(y, x, s.height, s.width);
}

// The kernel point's mask at the pixel (1 without mask).
template <typename T>
T modulation(const ConvSizes& s, const Pixel& px, const KernelPoint& kp,
             const Plane<const T>& mask) {
  return mask.data == nullptr ? T(1) : px.at(mask, kp.mask_channel(s));
}

// Calls f(kernel_point) for each kernel point of offset group og.
template <typename F>
void for_each_kernel_point(const ConvSizes& s, int64_t og, F&& f) {
  for (int64_t i = 0; i < s.kernel_h; ++i) {
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      f(KernelPoint{i, j, i * s.kernel_w + j, og});
    }
  }
}

// The columns of kernel point k in a columns row (see ConvChunk), indexed by
// the channels of block b.
template <typename T>
T* block_columns(const ConvSizes& s, const ChannelBlock& b, int64_t k, T* row) {
  const int64_t per_group = s.channels / s.groups;
  return row + (b.group * s.kernel_h * s.kernel_w + k) * per_group - b.group * per_group;
}

}  // namespace

template <typename T>
void deform_conv_im2col(const ConvSizes& s, const ConvChunk& chunk, const T* input,
                        const Plane<const T>& offset, const Plane<const T>& mask, T* columns) {
  const int64_t row = s.kernel_h * s.kernel_w * s.channels;
  const int64_t pixels = (chunk.row_end - chunk.row_begin) * s.out_width;
  if (s.height * s.width == 0) {  // an empty map: every sample is zero padding
    std::fill_n(columns, pixels * row, T(0));
    return;
  }
  const std::vector<ChannelBlock> blocks = channel_blocks(s, s.channels);
  at::parallel_for(0, pixels, grain_for(row * 4), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Pixel px(s, chunk, p);
      const T* image = input + px.n * s.height * s.width * s.channels;
      for (const ChannelBlock& b : blocks) {
        for_each_kernel_point(s, b.offset_group, [&](const KernelPoint& kp) {
          const deformops::Corners<T> corners = sample_corners(s, px, kp, offset);
          const T m = modulation(s, px, kp, mask);
          T* out = block_columns(s, b, kp.k, columns + p * row);
          deformops::with_guard(corners, [&](const auto& guard) {
#pragma omp simd
            for (int64_t c = b.begin; c < b.end; ++c) {
              out[c] = m * deformops::bilinear_sample(image + c, s.channels, corners, guard);
            }
          });
        });
      }
    }
  });
}

template <typename T>
void deform_conv_col2im(const ConvSizes& s, const ConvChunk& chunk, const T* input,
                        const Plane<const T>& offset, const Plane<const T>& mask,
                        const T* grad_columns, T* columns, T* grad_input,
                        const Plane<T>& grad_offset, const Plane<T>& grad_mask,
                        bool deterministic) {
  const int64_t points = s.kernel_h * s.kernel_w;
  const int64_t row = points * s.channels;
  const int64_t image_size = s.height * s.width * s.channels;
  const int64_t pixels = (chunk.row_end - chunk.row_begin) * s.out_width;
  const int64_t first_image = chunk.row_begin / s.out_height;
  const int64_t images = (chunk.row_end - 1) / s.out_height - first_image + 1;
  const int64_t threads = deterministic ? 1 : at::get_num_threads();
  const std::vector<ChannelBlock> blocks = channel_blocks(s, block_channels(s, images, threads));
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // partial[((block * pixels + p) * K + k) * 3 + {0, 1, 2}]: the block's sums of
  // the y, x and mask gradients of kernel point k at pixel p.
  std::vector<T> partial(num_blocks * pixels * points * 3);
  const auto partial_at = [&](int64_t block, int64_t p, int64_t k) {
    return partial.data() + ((block * pixels + p) * points + k) * 3;
  };

  // An empty map has no pixel to scatter to, zero samples, and zero offset and mask
  // gradients.
  const int64_t units = s.height * s.width > 0 ? images * num_blocks : 0;
  if (units == 0) {
    std::fill_n(columns, pixels * row, T(0));
  }
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = first_image + unit / num_blocks;
      const int64_t block = unit % num_blocks;
      const ChannelBlock& b = blocks[block];
      const T* image = input + n * image_size;
      T* grad_image = grad_input + n * image_size;
      // The chunk's output rows of image n, counted from the chunk's first row.
      const int64_t rows_begin = std::max<int64_t>(0, n * s.out_height - chunk.row_begin);
      const int64_t rows_end = std::min(chunk.row_end, (n + 1) * s.out_height) - chunk.row_begin;
      for (int64_t p = rows_begin * s.out_width; p < rows_end * s.out_width; ++p) {
        const Pixel px(s, chunk, p);
        for_each_kernel_point(s, b.offset_group, [&](const KernelPoint& kp) {
          const deformops::Corners<T> corners = sample_corners(s, px, kp, offset);
          const T m = modulation(s, px, kp, mask);
          const T* grad = block_columns(s, b, kp.k, grad_columns + p * row);
          T* sampled = block_columns(s, b, kp.k, columns + p * row);
          // Sums over the block's channels of grad * (d sample / dy, d sample / dx, sample).
          const std::array<T, 3> sums = deformops::with_guard(corners, [&](const auto& guard) {
            T grad_y = T(0);
            T grad_x = T(0);
            T grad_m = T(0);
#pragma omp simd reduction(+ : grad_y, grad_x, grad_m)
            for (int64_t c = b.begin; c < b.end; ++c) {
              const T value = deformops::bilinear_sample(image + c, s.channels, corners, guard);
              sampled[c] = m * value;
              grad_m += grad[c] * value;
              T dy = T(0);
              T dx = T(0);
              deformops::bilinear_sample_grad_location(image + c, s.channels, corners, guard, dy,
                                                       dx);
              grad_y += grad[c] * dy;
              grad_x += grad[c] * dx;
            }
            return std::array<T, 3>{grad_y, grad_x, grad_m};
          });
          const auto [grad_y, grad_x, grad_m] = sums;
          deformops::for_each_corner(corners, [&](int64_t corner, T weight) {
            T* target = grad_image + corner * s.channels;
            const T scale = m * weight;
#pragma omp simd
            for (int64_t c = b.begin; c < b.end; ++c) {
              target[c] += scale * grad[c];
            }
          });
          T* out = partial_at(block, p, kp.k);
          out[0] = m * grad_y;
          out[1] = m * grad_x;
          out[2] = grad_m;
        });
      }
    }
  });

  const int64_t grain = grain_for(num_blocks * points * 3);
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Pixel px(s, chunk, p);
      for (int64_t og = 0; og < s.offset_groups; ++og) {
        for_each_kernel_point(s, og, [&](const KernelPoint& kp) {
          T sum[3] = {T(0), T(0), T(0)};
          for (int64_t block = 0; block < num_blocks; ++block) {
            if (blocks[block].offset_group == og) {
              const T* part = partial_at(block, p, kp.k);
              for (int e = 0; e < 3; ++e) {
                sum[e] += part[e];
              }
            }
          }
          const int64_t c = kp.offset_channel(s);
          px.at(grad_offset, c) = sum[0];
          px.at(grad_offset, c + 1) = sum[1];
          if (grad_mask.data != nullptr) {
            px.at(grad_mask, kp.mask_channel(s)) = sum[2];
          }
        });
      }
    }
  });
}

#define DEFORMOPS_INSTANTIATE_CONV(T)                                                         \
  template void deform_conv_im2col<T>(const ConvSizes&, const ConvChunk&, const T*,          \
                                      const Plane<const T>&, const Plane<const T>&, T*);     \
  template void deform_conv_col2im<T>(const ConvSizes&, const ConvChunk&, const T*,          \
                                      const Plane<const T>&, const Plane<const T>&, const T*, \
                                      T*, T*, const Plane<T>&, const Plane<T>&, bool);

DEFORMOPS_INSTANTIATE_CONV(float)
DEFORMOPS_INSTANTIATE_CONV(double)

}  // namespace deformops_native::cpu
