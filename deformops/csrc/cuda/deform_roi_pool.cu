// CUDA kernels of the deformable RoI pooling: the RoI geometry of roi_pool.h,
// samples taken with sampling.h's RoIAlign corners. Torch-free.
//
// Work decomposition: one thread per output element (k, c, ph, pw), in the
// output's order, so that a warp covers neighbouring bins of one channel plane:
// its output stores are coalesced and its samples fall in one RoI of one plane
// (cached). The forward sums the bin's samples in registers. The backward
// scatters each sample's input gradient with atomic adds (RoIs overlap), and
// sums the bin's location derivatives in registers before one atomic add per
// offset component (the C channels of a bin share its offset).
//
// Indices: a flat output index of type Index, 32-bit when the output has at
// most 2^31 elements (fast division), else 64-bit; addresses are 64-bit.
#include <cstdint>

#include "../roi_pool.h"
#include "common.cuh"
#include "deform_roi_pool.h"

namespace deformops::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops beyond
constexpr int64_t kMax32 = int64_t(1) << 31;

// Output element e = ((k * C + c) * out_h + ph) * out_w + pw.
struct Element {
  int64_t k, c, ph, pw;
};

template <typename Index>
__device__ __forceinline__ Element element_of(const RoiPoolSizes& s, Index e) {
  const Index out_w = static_cast<Index>(s.out_width);
  const Index out_h = static_cast<Index>(s.out_height);
  const Index channels = static_cast<Index>(s.channels);
  Element at;
  Index rest = e / out_w;
  at.pw = static_cast<int64_t>(e - rest * out_w);
  Index next = rest / out_h;
  at.ph = static_cast<int64_t>(rest - next * out_h);
  rest = next / channels;
  at.c = static_cast<int64_t>(next - rest * channels);
  at.k = static_cast<int64_t>(rest);
  return at;
}

// Where the bin of element `at` starts (offsets read from `offset` unless null).
template <typename A>
__device__ __forceinline__ BinStart<A> start_of(const RoiPoolSizes& s, const RoiGrid<A>& g,
                                                const Element& at, const A* offset) {
  A offset_x = A(0);
  A offset_y = A(0);
  if (offset != nullptr) {
    const int64_t bins = s.out_height * s.out_width;
    const A* o = offset + at.k * 2 * bins + at.ph * s.out_width + at.pw;
    offset_x = __ldg(o);
    offset_y = __ldg(o + bins);
  }
  return bin_start(g, static_cast<A>(s.gamma), offset_x, offset_y);
}

template <typename V, typename Index>
__global__ void __launch_bounds__(kThreads)
    roi_pool_forward_kernel(const RoiPoolSizes s, const Index total, const V* __restrict__ input,
                            const roi_pool_acc_t<V>* __restrict__ rois,
                            const roi_pool_acc_t<V>* __restrict__ offset,
                            V* __restrict__ output) {
  using A = roi_pool_acc_t<V>;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index e = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += stride) {
    const Element at = element_of(s, e);
    const RoiGrid<A> g = roi_grid(s, rois + 5 * at.k);
    A sum = A(0);
    if (g.batch >= 0) {
      const V* plane = input + (g.batch * s.channels + at.c) * s.height * s.width;
      const BinStart<A> start = start_of(s, g, at, offset);
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
          const Corners<A> corners =
              roi_sample_corners(g, start, at.ph, at.pw, iy, ix, s.height, s.width);
          sum += bilinear_sample(plane, 1, corners, guard_of(corners));
        }
      }
    }
    output[e] = narrow<V>(sum / g.count);
  }
}

template <typename V, typename Index>
__global__ void __launch_bounds__(kThreads)
    roi_pool_backward_kernel(const RoiPoolSizes s, const Index total,
                             const V* __restrict__ grad_output, const V* __restrict__ input,
                             const roi_pool_acc_t<V>* __restrict__ rois,
                             const roi_pool_acc_t<V>* __restrict__ offset,
                             roi_pool_acc_t<V>* __restrict__ grad_input,
                             roi_pool_acc_t<V>* __restrict__ grad_offset) {
  using A = roi_pool_acc_t<V>;
  const auto add = [](A* p, A v) { atomic_add(p, v); };
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  for (Index e = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += stride) {
    const Element at = element_of(s, e);
    const RoiGrid<A> g = roi_grid(s, rois + 5 * at.k);
    if (g.batch < 0) {
      continue;
    }
    const A grad = static_cast<A>(widen(grad_output[e])) / g.count;
    const int64_t plane_start = (g.batch * s.channels + at.c) * s.height * s.width;
    const V* plane = input + plane_start;
    A* grad_plane = grad_input + plane_start;
    const BinStart<A> start = start_of(s, g, at, offset);
    A grad_y = A(0);
    A grad_x = A(0);
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const Corners<A> corners =
            roi_sample_corners(g, start, at.ph, at.pw, iy, ix, s.height, s.width);
        if (offset != nullptr) {
          bilinear_sample_backward(plane, grad_plane, 1, corners, guard_of(corners), grad,
                                   grad_y, grad_x, add);
        } else {
          for_each_corner(corners,
                          [&](int64_t corner, A weight) { add(grad_plane + corner, grad * weight); });
        }
      }
    }
    if (offset != nullptr) {
      const int64_t bins = s.out_height * s.out_width;
      A* o = grad_offset + at.k * 2 * bins + at.ph * s.out_width + at.pw;
      add(o, grad_x * start.dx_doffset);
      add(o + bins, grad_y * start.dy_doffset);
    }
  }
}

// Threads and blocks for `total` output elements.
inline unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

inline bool valid_sizes(const RoiPoolSizes& s) {
  return s.batch >= 0 && s.channels >= 0 && s.height >= 0 && s.width >= 0 && s.rois >= 0 &&
         s.out_height > 0 && s.out_width > 0;
}

}  // namespace

template <typename V>
cudaError_t deform_roi_pool_forward(const RoiPoolSizes& s, const V* input,
                                    const roi_pool_acc_t<V>* rois,
                                    const roi_pool_acc_t<V>* offset, V* output,
                                    cudaStream_t stream) {
  if (!valid_sizes(s)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = s.rois * s.channels * s.out_height * s.out_width;
  if (total == 0) {
    return cudaSuccess;
  }
  if (total <= kMax32) {
    roi_pool_forward_kernel<V, uint32_t><<<blocks_for(total), kThreads, 0, stream>>>(
        s, static_cast<uint32_t>(total), input, rois, offset, output);
  } else {
    roi_pool_forward_kernel<V, int64_t>
        <<<blocks_for(total), kThreads, 0, stream>>>(s, total, input, rois, offset, output);
  }
  return cudaGetLastError();
}

template <typename V>
cudaError_t deform_roi_pool_backward(const RoiPoolSizes& s, const V* grad_output, const V* input,
                                     const roi_pool_acc_t<V>* rois,
                                     const roi_pool_acc_t<V>* offset,
                                     roi_pool_acc_t<V>* grad_input,
                                     roi_pool_acc_t<V>* grad_offset, cudaStream_t stream) {
  if (!valid_sizes(s)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = s.rois * s.channels * s.out_height * s.out_width;
  if (total == 0) {
    return cudaSuccess;
  }
  if (total <= kMax32) {
    roi_pool_backward_kernel<V, uint32_t><<<blocks_for(total), kThreads, 0, stream>>>(
        s, static_cast<uint32_t>(total), grad_output, input, rois, offset, grad_input,
        grad_offset);
  } else {
    roi_pool_backward_kernel<V, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
        s, total, grad_output, input, rois, offset, grad_input, grad_offset);
  }
  return cudaGetLastError();
}

#define DEFORMOPS_INSTANTIATE_ROI_POOL(V)                                                       \
  template cudaError_t deform_roi_pool_forward<V>(const RoiPoolSizes&, const V*,                \
                                                  const roi_pool_acc_t<V>*,                     \
                                                  const roi_pool_acc_t<V>*, V*, cudaStream_t);  \
  template cudaError_t deform_roi_pool_backward<V>(                                             \
      const RoiPoolSizes&, const V*, const V*, const roi_pool_acc_t<V>*,                        \
      const roi_pool_acc_t<V>*, roi_pool_acc_t<V>*, roi_pool_acc_t<V>*, cudaStream_t);

DEFORMOPS_INSTANTIATE_ROI_POOL(float)
DEFORMOPS_INSTANTIATE_ROI_POOL(double)
DEFORMOPS_INSTANTIATE_ROI_POOL(__half)
DEFORMOPS_INSTANTIATE_ROI_POOL(__nv_bfloat16)

}  // namespace deformops::gpu
