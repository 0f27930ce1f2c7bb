// Prototypes of every TT-Rec CUDA kernel: the one list of their names and argument types.
//
// Each .cu file includes this header, so a definition that drifts from its prototype fails to
// compile (C linkage). impl/cuda/launch.py parses the TT_KERNEL lines below to type-check and
// marshal the arguments of every launch (CuPy or the CPU emulation), so keep one prototype per
// statement, arguments as `type name`, and pointer types among float, int64_t, uint8_t.
//
// Argument conventions: `desc` is the int64 shape descriptor (launch.shape_descriptor); c0..c3 are
// the cores (unused ones null); indices/offsets are int64 CSR bags (offsets has n_bags + 1 entries);
// weights are per-lookup fp32 or null; mean != 0 divides by the bag size.
#ifndef TTREC_TT_KERNELS_CUH
#define TTREC_TT_KERNELS_CUH

#include "tt_row.h"

#define TT_KERNEL extern "C" __global__

// ---- forward (tt_forward.cu) ----
// One block per bag (grid-stride over bags): the chain of each lookup in shared memory, pooled.
TT_KERNEL void tt_fwd_bag(const int64_t* desc, const float* c0, const float* c1, const float* c2, const float* c3, const int64_t* indices, const int64_t* offsets, int64_t n_bags, const float* weights, int32_t mean, int32_t lookups_per_iter, float* out);
// P_k of every listed prefix (k = 1..d-2): p_out[u] = P_{k-1}[u] @ G_k[:, i_k(u)]; p_prev null for k = 1.
TT_KERNEL void tt_prefix_level(const int64_t* desc, const float* c0, const float* core_k, const int64_t* prefixes, int64_t n_prefixes, int32_t k, const float* p_prev, float* p_out);
// out[b] += pooled rows of lookups [lookup_begin, lookup_end) of bags [bag_begin, bag_end), finishing
// P_{d-2}[slot[j - lookup_begin]] (rows of `partials`) with the last core.
TT_KERNEL void tt_fwd_finish(const int64_t* desc, const float* c_last, const int64_t* indices, const int64_t* offsets, const float* weights, int32_t mean, int64_t bag_begin, int64_t bag_end, int64_t lookup_begin, int64_t lookup_end, const int64_t* slot, const float* partials, float* out);

// ---- backward (tt_backward.cu) ----
// One block per bag: the chain and its reverse per lookup in shared memory, atomicAdd into g0..g3.
TT_KERNEL void tt_bwd_bag(const int64_t* desc, const float* c0, const float* c1, const float* c2, const float* c3, const int64_t* indices, const int64_t* offsets, int64_t n_bags, const float* weights, int32_t mean, int32_t lookups_per_iter, const float* grad_out, float* g0, float* g1, float* g2, float* g3);
// Prefix-aggregated backward, per chunk of lookups [lookup_begin, lookup_end):
// gradient of the last core from each lookup (atomicAdd);
TT_KERNEL void tt_bwd_last_grad(const int64_t* desc, const int64_t* indices, const int64_t* offsets, const int64_t* bag_of, const float* weights, int32_t mean, int64_t lookup_begin, int64_t lookup_end, const int64_t* slot, const float* partials, const float* grad_out, float* g_last);
// dP_{d-2} of each unique prefix, summed over its lookups (order[prefix_start[u] .. prefix_start[u+1]));
TT_KERNEL void tt_bwd_last_dp(const int64_t* desc, const float* c_last, const int64_t* indices, const int64_t* offsets, const int64_t* bag_of, const float* weights, int32_t mean, int64_t lookup_begin, int64_t n_prefixes, const int64_t* prefix_start, const int64_t* order, const float* grad_out, float* dp_out);
// gradient of core k (1 <= k <= d-2) from dP_k of each prefix (atomicAdd); p_prev null for k = 1;
TT_KERNEL void tt_bwd_level_grad(const int64_t* desc, const float* c0, const int64_t* prefixes, int64_t n_prefixes, int32_t k, const float* p_prev, const float* dp_k, float* g_k);
// dP_{k-1} = dP_k @ G_k[:, i_k]^T per prefix;
TT_KERNEL void tt_bwd_level_dp(const int64_t* desc, const float* core_k, const int64_t* prefixes, int64_t n_prefixes, int32_t k, const float* dp_k, float* dp_prev);
// gradient of core 0: g0[0, i_0(u)] += dP_0[u] (atomicAdd).
TT_KERNEL void tt_bwd_first(const int64_t* desc, const int64_t* prefixes, int64_t n_prefixes, const float* dp0, float* g0);

// ---- fused sparse optimizer (tt_update.cu) ----
// For every listed slice id i of core k, all R_k x q_k R_{k+1} entries:
// SGD G -= lr g; Adagrad h += g^2, G -= lr g / (sqrt(h) + eps). Then g = 0 there.
TT_KERNEL void tt_sparse_update(const int64_t* desc, int32_t k, float* core, float* grad, float* state, const int64_t* ids, int64_t n_ids, int32_t adagrad, float lr, float eps);

// ---- LFU cache (tt_cache.cu) ----
// counts[indices[j]] += 1 (atomic).
TT_KERNEL void tt_count_rows(const int64_t* indices, int64_t n, int64_t* counts);
// slot[j] = row_slot[indices[j]] (-1: not cached); cached[j] = slot[j] >= 0.
TT_KERNEL void tt_cache_partition(const int64_t* indices, int64_t n, const int64_t* row_slot, int64_t* slot, uint8_t* cached);
// out[b] += scale_b * sum over cached lookups j of bag b of w_j * cache[slot[j]] (scale_b from the full bag).
TT_KERNEL void tt_cache_gather(const float* cache, int64_t dim, const int64_t* slot, const int64_t* offsets, int64_t n_bags, const float* weights, int32_t mean, float* out);
// cache[slot[j]] -= lr * scale_b * w_j * grad_out[b] for every cached lookup j (atomicAdd).
TT_KERNEL void tt_cache_sgd(float* cache, int64_t dim, const int64_t* slot, const int64_t* offsets, int64_t n_bags, const float* weights, int32_t mean, const float* grad_out, float lr);

#define TT_KERNEL_LIST(X)                                                                            \
  X(tt_fwd_bag) X(tt_prefix_level) X(tt_fwd_finish) X(tt_bwd_bag) X(tt_bwd_last_grad) X(tt_bwd_last_dp) \
  X(tt_bwd_level_grad) X(tt_bwd_level_dp) X(tt_bwd_first) X(tt_sparse_update) X(tt_count_rows)        \
  X(tt_cache_partition) X(tt_cache_gather) X(tt_cache_sgd)

#endif  // TTREC_TT_KERNELS_CUH
