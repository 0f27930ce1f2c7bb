// Kernels an LFU row cache in front of the TT table needs (see tt_kernels.cuh): frequency counting,
// the cached / TT partition of a batch, pooling of cached rows and their SGD step.
// All are flat grid-stride loops; int64 indices throughout.
#include "tt_common.cuh"
#include "tt_kernels.cuh"

TT_KERNEL void tt_count_rows(const int64_t* indices, int64_t n, int64_t* counts) {
  unsigned long long* c = reinterpret_cast<unsigned long long*>(counts);
  for (int64_t j = ttk_first(); j < n; j += ttk_stride()) atomicAdd(c + indices[j], 1ULL);
}

TT_KERNEL void tt_cache_partition(const int64_t* indices, int64_t n, const int64_t* row_slot, int64_t* slot,
                                  uint8_t* cached) {
  for (int64_t j = ttk_first(); j < n; j += ttk_stride()) {
    const int64_t sl = row_slot[indices[j]];
    slot[j] = sl;
    cached[j] = sl >= 0 ? 1 : 0;
  }
}

// One thread per (bag, column); adds into out so it composes with the TT part of the batch.
TT_KERNEL void tt_cache_gather(const float* cache, int64_t dim, const int64_t* slot, const int64_t* offsets,
                               int64_t n_bags, const float* weights, int32_t mean, float* out) {
  const int64_t total = n_bags * dim;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t b = e / dim, c = e - b * dim;
    float v = 0.f;
    for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) {
      const int64_t sl = slot[j];
      if (sl >= 0) v += (weights ? weights[j] : 1.f) * cache[sl * dim + c];
    }
    out[e] += v * ttk_bag_scale(offsets, b, mean);
  }
}

// One thread per (bag, column); a row cached in several lookups receives several atomic updates.
TT_KERNEL void tt_cache_sgd(float* cache, int64_t dim, const int64_t* slot, const int64_t* offsets, int64_t n_bags,
                            const float* weights, int32_t mean, const float* grad_out, float lr) {
  const int64_t total = n_bags * dim;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t b = e / dim, c = e - b * dim;
    const float g = lr * ttk_bag_scale(offsets, b, mean) * grad_out[e];
    for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) {
      const int64_t sl = slot[j];
      if (sl >= 0) atomicAdd(cache + sl * dim + c, -((weights ? weights[j] : 1.f) * g));
    }
  }
}
