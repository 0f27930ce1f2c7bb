// Device helpers shared by the TT-Rec CUDA kernels (impl/cuda/*.cu).
//
// The kernels are compiled three ways from the same text: by NVRTC at run time (impl/cuda/loader.py),
// by nvcc in tests/test_cuda_compile.py, and as plain C++ by g++ with impl/cuda/emulation.h
// force-included (tests/test_cuda_emulated.py). So this header uses only what all three have: no C++
// standard library, no warp primitives, 1-D blocks and grids, and the per-row arithmetic of
// impl/include/tt_row.h.
//
// Conventions: core k is (R_k, p_k, q_k, R_{k+1}) row-major fp32 with 0-based k and R_0 = R_d = 1.
// Q_k = q_0 ... q_k. The partial product after cores 0..k, P_k, is a (Q_k x R_{k+1}) row-major matrix;
// P_0 is the slice G_0[0, i_0] itself (q_0 x R_1, contiguous in core 0), the row is P_{d-1} (D floats).
// A "prefix" is idx / p_{d-1}: the digits i_0..i_{d-2} as one number.
#ifndef TTREC_TT_COMMON_CUH
#define TTREC_TT_COMMON_CUH

#include "tt_row.h"

#define TTK static __device__ __forceinline__

// Dynamic shared memory of the launch, as a T* named `name`. emulation.h defines its own version.
#ifndef TT_DYN_SMEM
#define TT_DYN_SMEM(T, name)                \
  extern __shared__ long long tt_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(tt_dyn_smem_)
#endif

// Length of the shape descriptor (int64): d, p[4], q[4], r[5] (see launch.shape_descriptor).
#define TT_DESC_LEN (1 + 3 * TT_MAX_D + 1)

TTK void ttk_load_shape(const int64_t* __restrict__ desc, tt_shape_t* s) {
  s->d = (int32_t)desc[0];
  for (int k = 0; k < TT_MAX_D; ++k) {
    s->p[k] = desc[1 + k];
    s->q[k] = (int32_t)desc[1 + TT_MAX_D + k];
  }
  for (int k = 0; k <= TT_MAX_D; ++k) s->r[k] = (int32_t)desc[1 + 2 * TT_MAX_D + k];
}

TTK int64_t ttk_min64(int64_t a, int64_t b) { return a < b ? a : b; }
TTK int64_t ttk_max64(int64_t a, int64_t b) { return a > b ? a : b; }
TTK int ttk_min(int a, int b) { return a < b ? a : b; }

// Grid-stride loop bounds: every element in [0, total) is visited once whatever the grid size.
TTK int64_t ttk_first() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
TTK int64_t ttk_stride() { return (int64_t)gridDim.x * blockDim.x; }

// Floats of P_k (k = 0..d-1; P_{d-1} is the row).
TTK int64_t ttk_partial_size(const tt_shape_t* s, int k) {
  return (int64_t)tt_cols_through(s, k) * s->r[k + 1];
}

// Digit k (0 <= k <= d-2) of a prefix (= idx / p_{d-1}).
TTK int64_t ttk_prefix_digit(const tt_shape_t* s, int64_t prefix, int k) {
  for (int j = s->d - 2; j > k; --j) prefix /= s->p[j];
  return k == 0 ? prefix : prefix % s->p[k];
}

// Element (r, n) of the slice G_k[:, i_k] seen as an R_k x (q_k R_{k+1}) matrix.
TTK int64_t ttk_slice_offset(const tt_shape_t* s, int k, int64_t i_k, int r, int n) {
  const int64_t width = (int64_t)s->q[k] * s->r[k + 1];
  return ((int64_t)r * s->p[k] + i_k) * width + n;
}

// 1 / bag size for mean pooling (empty bags: 1; they pool nothing anyway).
TTK float ttk_bag_scale(const int64_t* __restrict__ offsets, int64_t b, int mean) {
  const int64_t n = offsets[b + 1] - offsets[b];
  return (mean && n > 0) ? 1.0f / (float)n : 1.0f;
}

// Lookups j0 .. j0+La-1 of a bag into shared memory: their digits (TT_MAX_D each, from
// tt_split_index) and their weights times `scale`. Every thread of the block takes part (any block
// size, even one smaller than La); the caller synchronizes before reading.
TTK void ttk_load_lookups(const tt_shape_t* s, const int64_t* __restrict__ indices, const float* __restrict__ weights,
                          int64_t j0, int La, float scale, int64_t* dig, float* w) {
  for (int l = (int)threadIdx.x; l < La; l += (int)blockDim.x) {
    tt_split_index(s, indices[j0 + l], dig + (int64_t)l * TT_MAX_D);
    w[l] = (weights ? weights[j0 + l] : 1.f) * scale;
  }
}

TTK const float* ttk_core(const float* c0, const float* c1, const float* c2, const float* c3, int k) {
  return k == 0 ? c0 : k == 1 ? c1 : k == 2 ? c2 : c3;
}

TTK float* ttk_grad(float* g0, float* g1, float* g2, float* g3, int k) {
  return k == 0 ? g0 : k == 1 ? g1 : k == 2 ? g2 : g3;
}

// out[m, n] = sum_r A[m, r] * G_k[r, i_k, n]: one element of the chain step P_k = P_{k-1} @ S_k
// (A is P_{k-1}, rows K = R_k apart; N = q_k R_{k+1}).
TTK float ttk_step_elem(const tt_shape_t* s, const float* __restrict__ core_k, int k, int64_t i_k,
                        const float* A, int m, int n) {
  const int K = s->r[k];
  const int64_t width = (int64_t)s->q[k] * s->r[k + 1];
  const float* B = core_k + i_k * width + n;
  const int64_t ldb = s->p[k] * width;
  const float* a = A + (int64_t)m * K;
  float acc = 0.f;
  for (int r = 0; r < K; ++r) acc += a[r] * B[r * ldb];
  return acc;
}

#endif  // TTREC_TT_COMMON_CUH
