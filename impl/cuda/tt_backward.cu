// TT-EmbeddingBag backward kernels: gradients of the cores, accumulated with atomicAdd into dense
// gradient tensors shaped like the cores. See impl/cuda/README.md and tt_common.cuh.
//
// For a lookup with upstream gradient g (w * scale * grad_out[bag], a Q_{d-2} x q_{d-1} matrix) the
// reverse chain is, with P_k the left partial products:
//   dG_{d-1}[:, i] += P_{d-2}^T g                 dP_{d-2} = g G_{d-1}[:, i]^T
//   dG_k[:, i_k]  += P_{k-1}^T dP_k  (k = d-2..1)  dP_{k-1} = dP_k G_k[:, i_k]^T
//   dG_0[0, i_0]  += dP_0
// where dP_k (Q_k x R_{k+1}) is read as Q_{k-1} x (q_k R_{k+1}).
#include "tt_common.cuh"
#include "tt_kernels.cuh"

// Floats of the stored left partials P_1..P_{d-2} of one lookup, and the offset of P_k among them.
TTK int64_t ttk_left_offset(const tt_shape_t* s, int k) {
  int64_t o = 0;
  for (int j = 1; j < k; ++j) o += ttk_partial_size(s, j);
  return o;
}

// Floats of one dP ping-pong buffer: max(|P_0|, ..., |P_{d-2}|). Must match launch.bwd_bag_smem_bytes.
TTK int64_t ttk_dp_buffer(const tt_shape_t* s) {
  int64_t b = 1;
  for (int k = 0; k <= s->d - 2; ++k) b = ttk_max64(b, ttk_partial_size(s, k));
  return b;
}

// One block per bag, grid-stride over bags; L = lookups_per_iter lookups at a time. Per lookup the
// left partials P_1..P_{d-2} and two dP buffers live in shared memory; every step is a flat loop
// over (lookup, element). Core gradients go to global memory with atomicAdd.
// Shared memory (bytes): 8*4*L + 4*L + 4*D + 4*L*(SP + 2*BD), SP = |P_1|+..+|P_{d-2}|, BD = ttk_dp_buffer.
TT_KERNEL void tt_bwd_bag(const int64_t* desc, const float* c0, const float* c1, const float* c2, const float* c3,
                          const int64_t* indices, const int64_t* offsets, int64_t n_bags, const float* weights,
                          int32_t mean, int32_t lookups_per_iter, const float* grad_out, float* g0, float* g1,
                          float* g2, float* g3) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int d = s.d;
  const int L = lookups_per_iter;
  const int D = tt_cols_through(&s, d - 1);
  const int64_t SP = ttk_left_offset(&s, d - 1);
  const int64_t BD = ttk_dp_buffer(&s);
  const int64_t W0 = ttk_partial_size(&s, 0);
  const float* cores[TT_MAX_D] = {c0, c1, c2, c3};
  float* grads[TT_MAX_D] = {g0, g1, g2, g3};
  int64_t left_off[TT_MAX_D];
  for (int k = 0; k < TT_MAX_D; ++k) left_off[k] = (k >= 1 && k <= d - 2) ? ttk_left_offset(&s, k) : 0;
  const int tid = (int)threadIdx.x;
  const int T = (int)blockDim.x;

  TT_DYN_SMEM(long long, smem);
  int64_t* dig = reinterpret_cast<int64_t*>(smem);  // L x TT_MAX_D
  float* w = reinterpret_cast<float*>(dig + (int64_t)L * TT_MAX_D);
  float* gb = w + L;                  // grad_out[bag], D floats
  float* pst = gb + D;                // lookup l: pst + l SP + left_off[k] holds P_k
  float* dbuf = pst + (int64_t)L * SP;  // lookup l, parity p: dbuf + (2 l + p) BD

  for (int64_t b = blockIdx.x; b < n_bags; b += gridDim.x) {
    const int64_t lo = offsets[b], hi = offsets[b + 1];
    const float sc = ttk_bag_scale(offsets, b, mean);
    for (int c = tid; c < D; c += T) gb[c] = grad_out[b * D + c];  // read after the next barrier
    for (int64_t j0 = lo; j0 < hi; j0 += L) {
      const int La = (int)ttk_min64(L, hi - j0);
      ttk_load_lookups(&s, indices, weights, j0, La, sc, dig, w);
      __syncthreads();
      // forward: P_k for k = 1..d-2, kept
      for (int k = 1; k <= d - 2; ++k) {
        const int M = tt_cols_through(&s, k - 1);
        const int N = s.q[k] * s.r[k + 1];
        const int per = M * N;
        for (int e = tid; e < La * per; e += T) {
          const int l = e / per, mn = e - l * per, m = mn / N, n = mn - m * N;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* A = (k == 1) ? c0 + dg[0] * W0 : pst + l * SP + left_off[k - 1];
          pst[l * SP + left_off[k] + mn] = ttk_step_elem(&s, cores[k], k, dg[k], A, m, n);
        }
        __syncthreads();
      }
      // last core: dG_{d-1} and dP_{d-2}
      {
        const int k = d - 1;
        const int K = s.r[k], N = s.q[k], M = tt_cols_through(&s, k - 1);
        for (int e = tid; e < La * K * N; e += T) {
          const int l = e / (K * N), rn = e - l * K * N, r = rn / N, n = rn - r * N;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* A = (k == 1) ? c0 + dg[0] * W0 : pst + l * SP + left_off[k - 1];
          float v = 0.f;
          for (int m = 0; m < M; ++m) v += A[(int64_t)m * K + r] * gb[m * N + n];
          atomicAdd(grads[k] + ttk_slice_offset(&s, k, dg[k], r, n), w[l] * v);
        }
        for (int e = tid; e < La * M * K; e += T) {
          const int l = e / (M * K), mr = e - l * M * K, m = mr / K, r = mr - m * K;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* S = cores[k] + ttk_slice_offset(&s, k, dg[k], r, 0);
          float v = 0.f;
          for (int n = 0; n < N; ++n) v += gb[m * N + n] * S[n];
          dbuf[(2 * l + ((k - 1) & 1)) * BD + mr] = w[l] * v;
        }
        __syncthreads();
      }
      // middle cores, k = d-2 .. 1
      for (int k = d - 2; k >= 1; --k) {
        const int K = s.r[k], N = s.q[k] * s.r[k + 1], M = tt_cols_through(&s, k - 1);
        for (int e = tid; e < La * K * N; e += T) {
          const int l = e / (K * N), rn = e - l * K * N, r = rn / N, n = rn - r * N;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* A = (k == 1) ? c0 + dg[0] * W0 : pst + l * SP + left_off[k - 1];
          const float* dP = dbuf + (2 * l + (k & 1)) * BD;
          float v = 0.f;
          for (int m = 0; m < M; ++m) v += A[(int64_t)m * K + r] * dP[(int64_t)m * N + n];
          atomicAdd(grads[k] + ttk_slice_offset(&s, k, dg[k], r, n), v);
        }
        for (int e = tid; e < La * M * K; e += T) {
          const int l = e / (M * K), mr = e - l * M * K, m = mr / K, r = mr - m * K;
          const int64_t* dg = dig + (int64_t)l * TT_MAX_D;
          const float* S = cores[k] + ttk_slice_offset(&s, k, dg[k], r, 0);
          const float* dP = dbuf + (2 * l + (k & 1)) * BD + (int64_t)m * N;
          float v = 0.f;
          for (int n = 0; n < N; ++n) v += dP[n] * S[n];
          dbuf[(2 * l + ((k - 1) & 1)) * BD + mr] = v;
        }
        __syncthreads();
      }
      // first core: dG_0[0, i_0] += dP_0 (parity 0)
      for (int e = tid; e < La * (int)W0; e += T) {
        const int l = e / (int)W0, c = e - l * (int)W0;
        atomicAdd(g0 + dig[(int64_t)l * TT_MAX_D] * W0 + c, dbuf[(2 * l) * BD + c]);
      }
      __syncthreads();  // digits and buffers are rewritten by the next iteration
    }
  }
}

// ---- prefix-aggregated backward: the chain above the last core runs once per unique prefix ----

// dG_{d-1}[:, i_j] += w_j P_{d-2}[slot_j]^T g_j, one thread per (lookup, r, n).
TT_KERNEL void tt_bwd_last_grad(const int64_t* desc, const int64_t* indices, const int64_t* offsets,
                                const int64_t* bag_of, const float* weights, int32_t mean, int64_t lookup_begin,
                                int64_t lookup_end, const int64_t* slot, const float* partials,
                                const float* grad_out, float* g_last) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int k = s.d - 1;
  const int K = s.r[k], N = s.q[k], M = tt_cols_through(&s, k - 1), D = M * N;
  const int64_t pstride = ttk_partial_size(&s, k - 1);
  const int64_t per = (int64_t)K * N;
  const int64_t total = (lookup_end - lookup_begin) * per;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t jj = e / per, rn = e - jj * per;
    const int r = (int)(rn / N), n = (int)(rn - (int64_t)r * N);
    const int64_t j = lookup_begin + jj, b = bag_of[j];
    const float wv = (weights ? weights[j] : 1.f) * ttk_bag_scale(offsets, b, mean);
    const float* A = partials + slot[jj] * pstride;
    const float* g = grad_out + b * D;
    float v = 0.f;
    for (int m = 0; m < M; ++m) v += A[(int64_t)m * K + r] * g[m * N + n];
    atomicAdd(g_last + ttk_slice_offset(&s, k, indices[j] % s.p[k], r, n), wv * v);
  }
}

// dP_{d-2}[u] = sum over the lookups j of prefix u of w_j g_j G_{d-1}[:, i_j]^T; one thread per
// (u, m, r), no atomics (the aggregation over lookups sharing a prefix happens in registers).
TT_KERNEL void tt_bwd_last_dp(const int64_t* desc, const float* c_last, const int64_t* indices,
                              const int64_t* offsets, const int64_t* bag_of, const float* weights, int32_t mean,
                              int64_t lookup_begin, int64_t n_prefixes, const int64_t* prefix_start,
                              const int64_t* order, const float* grad_out, float* dp_out) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int k = s.d - 1;
  const int K = s.r[k], N = s.q[k], M = tt_cols_through(&s, k - 1), D = M * N;
  const int64_t per = (int64_t)M * K;
  const int64_t total = n_prefixes * per;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t u = e / per, mr = e - u * per;
    const int m = (int)(mr / K), r = (int)(mr - (int64_t)m * K);
    float v = 0.f;
    for (int64_t t = prefix_start[u]; t < prefix_start[u + 1]; ++t) {
      const int64_t j = lookup_begin + order[t], b = bag_of[j];
      const float wv = (weights ? weights[j] : 1.f) * ttk_bag_scale(offsets, b, mean);
      const float* S = c_last + ttk_slice_offset(&s, k, indices[j] % s.p[k], r, 0);
      const float* g = grad_out + b * D + (int64_t)m * N;
      float a = 0.f;
      for (int n = 0; n < N; ++n) a += g[n] * S[n];
      v += wv * a;
    }
    dp_out[e] = v;
  }
}

// dG_k[:, i_k(u)] += P_{k-1}[u]^T dP_k[u] for 1 <= k <= d-2; one thread per (u, r, n).
TT_KERNEL void tt_bwd_level_grad(const int64_t* desc, const float* c0, const int64_t* prefixes, int64_t n_prefixes,
                                 int32_t k, const float* p_prev, const float* dp_k, float* g_k) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int K = s.r[k], N = s.q[k] * s.r[k + 1], M = tt_cols_through(&s, k - 1);
  const int64_t prev = ttk_partial_size(&s, k - 1), cur = ttk_partial_size(&s, k);
  const int64_t per = (int64_t)K * N;
  const int64_t total = n_prefixes * per;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t u = e / per, rn = e - u * per;
    const int r = (int)(rn / N), n = (int)(rn - (int64_t)r * N);
    const int64_t pre = prefixes[u];
    const float* A = (k == 1) ? c0 + ttk_prefix_digit(&s, pre, 0) * prev : p_prev + u * prev;
    const float* dP = dp_k + u * cur;
    float v = 0.f;
    for (int m = 0; m < M; ++m) v += A[(int64_t)m * K + r] * dP[(int64_t)m * N + n];
    atomicAdd(g_k + ttk_slice_offset(&s, k, ttk_prefix_digit(&s, pre, k), r, n), v);
  }
}

// dP_{k-1}[u] = dP_k[u] G_k[:, i_k(u)]^T; one thread per (u, m, r).
TT_KERNEL void tt_bwd_level_dp(const int64_t* desc, const float* core_k, const int64_t* prefixes, int64_t n_prefixes,
                               int32_t k, const float* dp_k, float* dp_prev) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int K = s.r[k], N = s.q[k] * s.r[k + 1];
  const int64_t prev = ttk_partial_size(&s, k - 1), cur = ttk_partial_size(&s, k);
  const int64_t total = n_prefixes * prev;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t u = e / prev, mr = e - u * prev;
    const int m = (int)(mr / K), r = (int)(mr - (int64_t)m * K);
    const float* S = core_k + ttk_slice_offset(&s, k, ttk_prefix_digit(&s, prefixes[u], k), r, 0);
    const float* dP = dp_k + u * cur + (int64_t)m * N;
    float v = 0.f;
    for (int n = 0; n < N; ++n) v += dP[n] * S[n];
    dp_prev[e] = v;
  }
}

// dG_0[0, i_0(u)] += dP_0[u]; one thread per (u, element).
TT_KERNEL void tt_bwd_first(const int64_t* desc, const int64_t* prefixes, int64_t n_prefixes, const float* dp0,
                            float* g0) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int64_t W0 = ttk_partial_size(&s, 0);
  const int64_t total = n_prefixes * W0;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t u = e / W0, c = e - u * W0;
    atomicAdd(g0 + ttk_prefix_digit(&s, prefixes[u], 0) * W0 + c, dp0[e]);
  }
}
