// TT-EmbeddingBag forward kernels. See impl/cuda/README.md for the thread mapping and the
// shared-memory budget, and tt_common.cuh for the conventions.
#include "tt_common.cuh"
#include "tt_kernels.cuh"

// Floats of one ping-pong buffer of the per-lookup chain: max(D, |P_1|, ..., |P_{d-2}|).
// Must match launch.fwd_bag_smem_bytes.
TTK int64_t ttk_fwd_buffer(const tt_shape_t* s) {
  int64_t b = tt_cols_through(s, s->d - 1);
  for (int k = 1; k <= s->d - 2; ++k) b = ttk_max64(b, ttk_partial_size(s, k));
  return b;
}

// One block per bag, grid-stride over bags. Lookups of the bag are taken `lookups_per_iter` (L) at a
// time; for each, P_1 .. P_{d-1} are built in shared memory (two ping-pong buffers per lookup; P_0
// is read from core 0 in place), every thread computing elements of the current step for all L
// lookups (flat mapping, so any q, rank and block size works). The rows are then pooled into a
// D-float accumulator in shared memory, where column c belongs to thread c % blockDim.x.
// Shared memory (bytes): 8*4*L (digits) + 4*L (weights) + 4*D (accumulator) + 4*2*L*B (buffers).
// No atomics: the result does not depend on the launch configuration's scheduling.
TT_KERNEL void tt_fwd_bag(const int64_t* desc, const float* c0, const float* c1, const float* c2, const float* c3,
                          const int64_t* indices, const int64_t* offsets, int64_t n_bags, const float* weights,
                          int32_t mean, int32_t lookups_per_iter, float* out) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int d = s.d;
  const int L = lookups_per_iter;
  const int D = tt_cols_through(&s, d - 1);
  const int64_t B = ttk_fwd_buffer(&s);
  const int64_t W0 = ttk_partial_size(&s, 0);
  const float* cores[TT_MAX_D] = {c0, c1, c2, c3};
  const int tid = (int)threadIdx.x;
  const int T = (int)blockDim.x;

  TT_DYN_SMEM(long long, smem);
  int64_t* dig = reinterpret_cast<int64_t*>(smem);  // L x TT_MAX_D digits
  float* w = reinterpret_cast<float*>(dig + (int64_t)L * TT_MAX_D);
  float* acc = w + L;
  float* buf = acc + D;  // lookup l, parity p: buf + (2 l + p) B
  const int last = (d - 1) & 1;

  for (int64_t b = blockIdx.x; b < n_bags; b += gridDim.x) {
    const int64_t lo = offsets[b], hi = offsets[b + 1];
    for (int c = tid; c < D; c += T) acc[c] = 0.f;
    for (int64_t j0 = lo; j0 < hi; j0 += L) {
      const int La = (int)ttk_min64(L, hi - j0);
      ttk_load_lookups(&s, indices, weights, j0, La, 1.f, dig, w);
      __syncthreads();
      for (int k = 1; k < d; ++k) {  // P_k = P_{k-1} @ G_k[:, i_k]
        const int M = tt_cols_through(&s, k - 1);
        const int N = s.q[k] * s.r[k + 1];
        const int per = M * N;
        for (int e = tid; e < La * per; e += T) {
          const int l = e / per, mn = e - l * per, m = mn / N, n = mn - m * N;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* A = (k == 1) ? c0 + dg[0] * W0 : buf + (2 * l + ((k - 1) & 1)) * B;
          buf[(2 * l + (k & 1)) * B + mn] = ttk_step_elem(&s, cores[k], k, dg[k], A, m, n);
        }
        __syncthreads();
      }
      for (int c = tid; c < D; c += T) {
        float v = 0.f;
        for (int l = 0; l < La; ++l) v += w[l] * buf[(2 * l + last) * B + c];
        acc[c] += v;
      }
      __syncthreads();  // digits, weights and buffers are rewritten by the next iteration
    }
    const float sc = ttk_bag_scale(offsets, b, mean);
    for (int c = tid; c < D; c += T) out[b * D + c] = acc[c] * sc;
  }
}

// Prefix reuse, step k (1 <= k <= d-2) for every unique prefix u: P_k[u] = P_{k-1}[u] @ G_k[:, i_k(u)].
// Flat grid-stride over (u, element); global memory in and out, no shared memory.
TT_KERNEL void tt_prefix_level(const int64_t* desc, const float* c0, const float* core_k, const int64_t* prefixes,
                               int64_t n_prefixes, int32_t k, const float* p_prev, float* p_out) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int N = s.q[k] * s.r[k + 1];
  const int64_t per = ttk_partial_size(&s, k);
  const int64_t prev = ttk_partial_size(&s, k - 1);
  const int64_t total = n_prefixes * per;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t u = e / per, mn = e - u * per;
    const int m = (int)(mn / N), n = (int)(mn - (int64_t)m * N);
    const int64_t pre = prefixes[u];
    const float* A = (k == 1) ? c0 + ttk_prefix_digit(&s, pre, 0) * prev : p_prev + u * prev;
    p_out[e] = ttk_step_elem(&s, core_k, k, ttk_prefix_digit(&s, pre, k), A, m, n);
  }
}

// Finish rows from their prefix's P_{d-2} and pool them: one thread per (bag, column), looping over
// the bag's lookups inside [lookup_begin, lookup_end). `out` accumulates across chunks; each
// (bag, column) has one owner per launch, so no atomics.
TT_KERNEL void tt_fwd_finish(const int64_t* desc, const float* c_last, const int64_t* indices, const int64_t* offsets,
                             const float* weights, int32_t mean, int64_t bag_begin, int64_t bag_end,
                             int64_t lookup_begin, int64_t lookup_end, const int64_t* slot, const float* partials,
                             float* out) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int k = s.d - 1;
  const int q = s.q[k];
  const int D = tt_cols_through(&s, k);
  const int64_t pstride = ttk_partial_size(&s, k - 1);
  const int64_t total = (bag_end - bag_begin) * D;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t b = bag_begin + e / D;
    const int c = (int)(e % D), m = c / q, n = c - m * q;
    const int64_t lo = ttk_max64(offsets[b], lookup_begin), hi = ttk_min64(offsets[b + 1], lookup_end);
    float v = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      const float* A = partials + slot[j - lookup_begin] * pstride;
      const float t = ttk_step_elem(&s, c_last, k, indices[j] % s.p[k], A, m, n);
      v += (weights ? weights[j] : 1.f) * t;
    }
    out[b * D + c] += v * ttk_bag_scale(offsets, b, mean);
  }
}
