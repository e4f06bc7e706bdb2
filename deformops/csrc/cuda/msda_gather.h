// The plan of the deterministic MSDA backward (msda_kernels.cuh): its chunks of
// images and the layout of its workspace. Host-only and torch-free, shared by
// the kernels' launcher and by msda_gather_workspace_bytes (msda.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include "msda.h"
#include "sort.h"

namespace deformops::gpu::msda_detail {

// Cells a (n, m) pair files samples under, at most: a level of H x W pixels has
// (H + 1) x (W + 1) cells (those of a sample at y in (-1, 0) or x in (-1, 0)
// included), which add up to at most 2 * S + 2 * L over the non-empty levels
// when the level tables agree with S (H + W <= H * W + 1). A sample whose cell
// falls beyond (tables that disagree with S) is left out of the value gradient.
inline int64_t pair_cells(const MsdaSizes& s) { return 2 * s.spatial + 2 * s.levels; }

// Samples per chunk of images in the deterministic backward, at most (at least
// one image): a bound on its workspace.
constexpr int64_t kGatherSamples = int64_t{1} << 23;

// Chunks and workspace of the deterministic backward. A chunk of `images`
// images files its `samples` samples under `keys` = images * M * pair_cells
// cell keys, (n - n_begin, m, cell) in that order. Byte offsets in the
// workspace, each 16-byte aligned:
struct GatherPlan {
  bool valid;  // every index fits 32 bits
  int64_t images, samples, keys;  // of a full chunk
  int key_bits;                   // 2^key_bits > keys
  size_t counts, starts;          // [keys + 1] int32: samples per cell, their scan
  size_t cell_keys, sorted_keys;  // [samples] uint32
  size_t ids, sorted_ids;         // [samples] int32: the samples, and in key order
  size_t weights;                 // [samples] Quad<A>
  size_t sorted_weights;          // [samples] Quad<A>, in key order (rows in key order: in ids)
  size_t scan_scratch, scan_scratch_bytes, sort_scratch, sort_scratch_bytes;
  size_t total;
};

inline GatherPlan gather_plan(const MsdaSizes& s, size_t acc_bytes) {
  constexpr int64_t kLimit = (int64_t{1} << 31) - 2;
  GatherPlan p{};
  const int64_t per_image = s.queries * s.heads * s.levels * s.points;
  const int64_t keys_per_image = s.heads * pair_cells(s);
  p.valid = per_image <= kLimit && keys_per_image <= kLimit;
  if (!p.valid || s.batch == 0) {
    return p;
  }
  p.images = per_image > 0 ? kGatherSamples / per_image : s.batch;
  p.images = keys_per_image > 0 && kLimit / keys_per_image < p.images ? kLimit / keys_per_image
                                                                      : p.images;
  p.images = p.images < 1 ? 1 : (p.images > s.batch ? s.batch : p.images);
  p.samples = p.images * per_image;
  p.keys = p.images * keys_per_image;
  p.key_bits = 1;
  while ((int64_t{1} << p.key_bits) <= p.keys) {
    ++p.key_bits;
  }
  const int64_t last = s.batch % p.images;  // images of a last, shorter chunk
  size_t at = 0;
  const auto take = [&at](size_t bytes) {
    const size_t start = at;
    at += (bytes + 15) / 16 * 16;
    return start;
  };
  const size_t samples = static_cast<size_t>(p.samples);
  const size_t keys = static_cast<size_t>(p.keys) + 1;
  p.counts = take(keys * sizeof(int32_t));
  p.starts = take(keys * sizeof(int32_t));
  p.cell_keys = take(samples * sizeof(uint32_t));
  p.sorted_keys = take(samples * sizeof(uint32_t));
  p.ids = take(samples * sizeof(int32_t));
  p.sorted_ids = take(samples * sizeof(int32_t));
  p.weights = take(samples * 4 * acc_bytes);
  p.sorted_weights = take(samples * 4 * acc_bytes);
  const auto larger = [](size_t x, size_t y) { return x > y ? x : y; };
  p.scan_scratch_bytes =
      larger(exclusive_sum_scratch_bytes(static_cast<int32_t>(p.keys + 1)),
             exclusive_sum_scratch_bytes(static_cast<int32_t>(last * keys_per_image + 1)));
  p.sort_scratch_bytes =
      larger(sort_pairs_scratch_bytes(static_cast<int32_t>(p.samples), p.key_bits),
             sort_pairs_scratch_bytes(static_cast<int32_t>(last * per_image), p.key_bits));
  p.scan_scratch = take(p.scan_scratch_bytes);
  p.sort_scratch = take(p.sort_scratch_bytes);
  p.total = at;
  return p;
}

}  // namespace deformops::gpu::msda_detail
