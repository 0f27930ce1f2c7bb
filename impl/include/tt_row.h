/* Per-row TT arithmetic shared by the CPU kernel (impl/cpu) and the CUDA kernels (impl/cuda).
 *
 * Core k is stored as (R_{k-1}, p_k, q_k, R_k), row-major fp32. The slice G_k[:, i_k] is an
 * R_{k-1} x (q_k R_k) matrix whose rows are p_k q_k R_k floats apart. Row index i splits into
 * digits with the first core most significant: i_1 = i / (p_2 ... p_d), ..., i_d = i % p_d.
 * All index arithmetic is int64.
 */
#ifndef TTREC_TT_ROW_H
#define TTREC_TT_ROW_H

#if defined(__CUDACC_RTC__)
/* NVRTC (the CUDA run-time compiler, impl/cuda/loader.py) ships no C library headers. */
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define TT_HD __host__ __device__ __forceinline__
#else
#define TT_HD static inline
#endif

#define TT_MAX_D 4

typedef struct {
  int32_t d;                  /* number of cores, 2..TT_MAX_D */
  int64_t p[TT_MAX_D];        /* row factors */
  int32_t q[TT_MAX_D];        /* column factors */
  int32_t r[TT_MAX_D + 1];    /* ranks R_0..R_d, R_0 = R_d = 1 */
} tt_shape_t;

/* digits[k] of row `idx` (first core's digit first). */
TT_HD void tt_split_index(const tt_shape_t* s, int64_t idx, int64_t* digits) {
  for (int k = s->d - 1; k > 0; --k) {
    digits[k] = idx % s->p[k];
    idx /= s->p[k];
  }
  digits[0] = idx;
}

/* Pointer to G_k[0, i_k, 0, 0] and the stride between the slice's R_{k-1} rows. */
TT_HD const float* tt_slice(const tt_shape_t* s, const float* core_k, int k, int64_t i_k, int64_t* row_stride) {
  const int64_t width = (int64_t)s->q[k] * s->r[k + 1];
  *row_stride = s->p[k] * width;
  return core_k + i_k * width;
}

/* Columns of the partial product after cores 1..k (q_1 ... q_k). */
TT_HD int32_t tt_cols_through(const tt_shape_t* s, int k) {
  int32_t c = 1;
  for (int j = 0; j <= k; ++j) c *= s->q[j];
  return c;
}

#endif /* TTREC_TT_ROW_H */
