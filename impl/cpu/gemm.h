// The small GEMMs of the chains (register tiles) and the last chain step of a lookup (row44, last_stage16).
// Part of the native CPU kernel: included once, in order, by tt_cpu.cpp (one translation unit).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

// Register tiles of the small GEMMs: MR rows x NV 16-float vectors of C stay in registers.
// AVX-512 has 32 vector registers of 16 floats: tiles of up to 24 accumulators (6 x 64, 12 x 32,
// 16 x 16). AVX2 has 16 registers of 8 floats, so a 16-float vector takes two: 6 x 16 (12
// registers, 2 for B and 1 for the broadcast of A), the classic AVX2 sgemm tile.
// With AVX2 a tile is its own function: inlined into the loops around it, GCC ran out of general
// registers and reloaded the rows' offsets from the stack before every broadcast (one load per FMA
// pair more).
#ifdef __AVX512F__
constexpr int kWidestNV = 4;
constexpr int tile_rows(int nv) { return nv >= 4 ? 6 : nv == 2 ? 12 : 16; }  // (nv = 0: 8 columns, see below)
#define TILE_ATTR inline
#else
constexpr int kWidestNV = 1;
constexpr int tile_rows(int) { return 6; }
#define TILE_ATTR __attribute__((noinline))
#endif

// Calls block(std::integral_constant<int, NV>{}, n) over the columns [0, N) in blocks of 64, 32
// and 16 floats (NV vectors, at most kWidestNV), then of 8 floats (NV = 0: the low half of one
// vector), and tail(n) for the columns left over. (The 8-column block: rank 8's dP_1 = dP @ G_2^T
// is M x 8, which the scalar tail made 16% of a training step's samples by perf.)
template <class Block, class Tail>
inline void by_column_blocks(int N, Block&& block, Tail&& tail) {
  int n = 0;
  if constexpr (kWidestNV >= 4)
    for (; n + 64 <= N; n += 64) block(std::integral_constant<int, 4>{}, n);
  if constexpr (kWidestNV >= 2) {
    if (n + 32 <= N) { block(std::integral_constant<int, 2>{}, n); n += 32; }
    if (n + 16 <= N) { block(std::integral_constant<int, 1>{}, n); n += 16; }
  } else {
    for (; n + 16 <= N; n += 16) block(std::integral_constant<int, 1>{}, n);
  }
  if (n + 8 <= N) { block(std::integral_constant<int, 0>{}, n); n += 8; }
  if (n < N) tail(n);
}
// A tile's vector count and its loads and stores of B and C: NV = 0 is one vector of which only
// the low 8 lanes are read (the rest zero) and written.
constexpr int vectors(int nv) { return nv > 0 ? nv : 1; }
template <int NV>
inline v16 load_cols(const float* p) {
  if constexpr (NV == 0) return load8z(p);
  else return load16(p);
}
template <int NV>
inline void store_cols(float* p, v16 v) {
  if constexpr (NV == 0) store8(p, v);
  else store16(p, v);
}
// c + a b as one fused multiply-add per lane, written out rather than left to GCC's contraction of
// c += a * b, which it applied in some tiles and not in others (on the AVX2 build, nn_tile<0, 1>
// multiplied and added, rounding twice, while the wider tiles fused): a row of C then had other bits
// when a different tile computed it, and the forward's two paths, which stack a bucket's prefixes
// in different orders, differed in the last bit. With AVX2 and NV = 0 only the low half is live.
template <int NV>
inline v16 fma_cols(v16 a, v16 b, v16 c) {
#ifndef __AVX512F__
  if constexpr (NV == 0) return {fma8(a.lo, b.lo, c.lo), c.hi};
#endif
  return fma16(a, b, c);
}

// Where A's rows are: Strided, row m at a + m * lda; Gathered, row m at row[m] (the stacked G_1
// slices of a piece, read in place instead of copied into a stacked matrix first).
struct Strided {
  const float* a;
  int64_t lda;
  const float* at(int64_t m) const { return a + m * lda; }
  Strided from(int64_t m) const { return {a + m * lda, lda}; }
};
struct Gathered {
  const float* const* row;
  const float* at(int64_t m) const { return row[m]; }
  Gathered from(int64_t m) const { return {row + m}; }
};

// MR rows x NV vectors of C (M x N, rows ldc apart) = A (M x K) @ B (K x N, ldb), or += with ACC:
// the tile stays in registers over K, and B's NV vectors are loaded once per k for all MR rows.
template <int NV, int MR, bool ACC, class Rows>
TILE_ATTR void nn_tile(int K, Rows A, const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int V = vectors(NV);
  v16 c[MR][V];
  const float* a[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) a[m] = A.at(m);
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[m][v] = ACC ? load_cols<NV>(C + m * ldc + 16 * v) : splat16(0.f);
  for (int k = 0; k < K; ++k) {
    v16 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = load_cols<NV>(B + k * ldb + 16 * v);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const v16 am = splat16(a[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[m][v] = fma_cols<NV>(am, b[v], c[m][v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) store_cols<NV>(C + m * ldc + 16 * v, c[m][v]);
}

// Rows of C for one block of NV vectors: tiles of tile_rows(NV) rows, then smaller tiles. Every
// element is the same k-ordered sum whatever tile computes it (results do not depend on M).
template <int NV, bool ACC, class Rows>
inline void nn_block(int M, int K, Rows A, const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int MR = tile_rows(NV);
  int m = 0;
  for (; m + MR <= M; m += MR) nn_tile<NV, MR, ACC>(K, A.from(m), B, ldb, C + m * ldc, ldc);
  // (a piece of two prefixes has M = 4 rows: one tile of 4 reads B once, two tiles of 2 twice)
  if constexpr (MR > 4)
    for (; m + 4 <= M; m += 4) nn_tile<NV, 4, ACC>(K, A.from(m), B, ldb, C + m * ldc, ldc);
  for (; m + 2 <= M; m += 2) nn_tile<NV, 2, ACC>(K, A.from(m), B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) nn_tile<NV, 1, ACC>(K, A.from(m), B, ldb, C + m * ldc, ldc);
}

template <bool ACC, class Rows>
void gemm_nn_impl(int M, int N, int K, Rows A, const float* B, int64_t ldb, float* C, int64_t ldc) {
  by_column_blocks(
      N, [&](auto nv, int n) { nn_block<decltype(nv)::value, ACC>(M, K, A, B + n, ldb, C + n, ldc); },
      [&](int n0) {
        for (int m = 0; m < M; ++m)
          for (int n = n0; n < N; ++n) {
            float acc = ACC ? C[m * ldc + n] : 0.f;
            for (int k = 0; k < K; ++k) acc += A.at(m)[k] * B[k * ldb + n];
            C[m * ldc + n] = acc;
          }
      });
}

// C (M x N) = A @ B  and  C += A @ B  (see nn_block)
inline void gemm_nn(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc) {
  gemm_nn_impl<false>(M, N, K, Strided{A, lda}, B, ldb, C, ldc);
}
inline void gemm_nn_acc(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                        int64_t ldc) {
  gemm_nn_impl<true>(M, N, K, Strided{A, lda}, B, ldb, C, ldc);
}

// dst[0, n) = src[0, n): inline (rows of a few dozen floats; a libc call costs more than the copy)
inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// dst[0, n) += src[0, n)
inline void add_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, load16(dst + i) + load16(src + i));
  for (; i < n; ++i) dst[i] += src[i];
}

// dst[0, n) = a * src[0, n)
inline void scale_floats(float* dst, const float* src, float a, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, splat16(a) * load16(src + i));
  for (; i < n; ++i) dst[i] = a * src[i];
}

// dst[0..n) = src[0..n), the 64-byte lines of dst as non-temporal stores (the caller fences)
inline void stream_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) stream16(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

inline float dot(const float* a, const float* b, int K) {
  v16 acc = {};
  int k = 0;
  for (; k + 16 <= K; k += 16) acc += load16(a + k) * load16(b + k);
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// The last chain step for one lookup: out[o] = dot(P[o / qd], St[o % qd]) for o < D, where P is
// (D/qd x Rp) rows ldp apart and St (qd x Rp) the transposed last-core slice, zero-padded to Rp,
// a multiple of 16. Needs D % 16 == 0; 16 dots at a time, reduced by one transpose-add tree.
// ``arow[o]`` = (o / qd) * ldp and ``brow[o]`` = (o % qd) * Rp, in the bit-reversed order of each
// group of 16 (precomputed: no division in the loop).
template <int RV>  // Rp = 16 RV: unrolled, so the 16 sums stay in registers
inline void last_stage16_rv(int D, const float* P, const float* St, const int32_t* arow, const int32_t* brow,
                            float* out) {
  for (int g = 0; g < D; g += 16) {
    v16 acc[16];
    for (int l = 0; l < 16; ++l) {
      const float* a = P + arow[g + l];
      const float* b = St + brow[g + l];
      v16 sum = load16(a) * load16(b);
      for (int k = 1; k < RV; ++k) sum += load16(a + 16 * k) * load16(b + 16 * k);
      acc[l] = sum;
    }
    store16(out + g, hsum16_bitrev(acc));
  }
}

inline void last_stage16(int D, int Rp, const float* P, const float* St, const int32_t* arow, const int32_t* brow,
                         float* out) {
  switch (Rp) {
    case 16: return last_stage16_rv<1>(D, P, St, arow, brow, out);
    case 32: return last_stage16_rv<2>(D, P, St, arow, brow, out);
    case 48: return last_stage16_rv<3>(D, P, St, arow, brow, out);
    case 64: return last_stage16_rv<4>(D, P, St, arow, brow, out);
    default: break;
  }
  for (int g = 0; g < D; g += 16) {
    v16 acc[16];
    for (int l = 0; l < 16; ++l) {
      const float* a = P + arow[g + l];
      const float* b = St + brow[g + l];
      v16 sum = load16(a) * load16(b);
      for (int k = 16; k < Rp; k += 16) sum += load16(a + k) * load16(b + k);
      acc[l] = sum;
    }
    store16(out + g, hsum16_bitrev(acc));
  }
}

// The last chain step when M = q_1 ... q_{d-1} = 4 and q_d = 4 (D = 16, e.g. q = (2, 2, 4)), one row:
// out[a q_d + c] = sum_r P_a[r] St[c][r] (P_a: row a of the prefix's P, St: the transposed last-core
// slice, rows Rp apart, zero past R). Lane (a, s) of vector k holds P_a[4k + s] (vec(k), k < k4 =
// ceil(R / 4)), and St[c][4k .. 4k + 3] is broadcast to the four blocks by the load itself, so a row
// is 4 k4 FMAs of 16 lanes (every lane useful) and two levels of in-block shuffles that sum over s.
// Each vector is read from memory once per row and kept in a register for its four FMAs (GCC would
// fold it into all four as memory operands, two loads per FMA, which with AVX2 made the loads the
// bottleneck). Explicit FMAs: every caller computes a row with the same roundings (a forward that
// keeps its plan and one that does not give the same bits), whichever layout its vectors come from
// (P44Rows). K4 = k4 unrolled (with_k4), or 0: k4 at run time.
template <int K4, class Vec>
inline v16 row44(const Vec& vec, const float* St, int64_t Rp, int k4) {
  if constexpr (K4 > 0) {  // (Rp = R rounded up to 16, known too: with Rp at run time the St offsets took
    k4 = K4;               // address arithmetic, and the plan path's rows 1.15x as long)
    Rp = (4 * K4 + 15) / 16 * 16;
  }
  auto at = [&](int k) __attribute__((always_inline)) { return in_registers(vec(k)); };
  v16 acc[4];
  {
    const v16 p = at(0);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[c] = p * bcast4(St + c * Rp);
  }
#pragma GCC unroll 16
  for (int k = 1; k < k4; ++k) {
    const v16 p = at(k);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[c] = fma16(p, bcast4(St + c * Rp + 4 * k), acc[c]);
  }
  // block a of acc[c] holds the four partial sums over s of out[a][c]
  const v16 u0 = shuffle_in_blocks<0x44>(acc[0], acc[1]) + shuffle_in_blocks<0xEE>(acc[0], acc[1]);
  const v16 u1 = shuffle_in_blocks<0x44>(acc[2], acc[3]) + shuffle_in_blocks<0xEE>(acc[2], acc[3]);
  return shuffle_in_blocks<0x88>(u0, u1) + shuffle_in_blocks<0xDD>(u0, u1);
}

// row44's vectors from a prefix's P in its three layouts:
//  - P44Rows<4>: P as the chain GEMM leaves it, 4 rows ld apart (ld >= 4 ceil(R / 4), zero past R):
//    vector k gathered from four 16-byte pieces (per row: on a forward's plan path a prefix has
//    few rows, and packing each prefix's vectors first took longer);
//  - P44Rows<1>, P44Rows<2>: P from a chain GEMM on a G_2 slice with permuted columns (permute44),
//    q_1 = 1: vector k is the 16 floats at p + 16 k; q_1 = 2: lanes 0-7 (a = 0, 1) at p + 8 k,
//    lanes 8-15 (a = 2, 3) at p + ld + 8 k (P's second row).
template <int Rows>
struct P44Rows {
  const float* p;
  int64_t ld;
  v16 operator()(int k) const {
    if constexpr (Rows == 1) return load16(p + 16 * k);
    else if constexpr (Rows == 2) return load_halves(p + 8 * k, p + ld + 8 * k);
    else return load_blocks(p + 4 * k, p + ld + 4 * k, p + 2 * ld + 4 * k, p + 3 * ld + 4 * k);
  }
};

// row44's vectors already in registers (a prefix's, held across its rows)
struct HeldRows {
  const v16* v;
  v16 operator()(int k) const { return v[k]; }
};

// f(std::integral_constant<int, K4>{}): K4 = k4 for the widths unrolled (R = 8, 16, 32, 64), else 0
template <class F>
inline void with_k4(int k4, F&& f) {
  switch (k4) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// The G_2 slice S (R_1 x q_2 R_2, rows ld apart; R_2 % 4 == 0) with each row's columns reordered for
// row44: column j2 R_2 + 4k + s moves to k (4 q_2) + 4 j2 + s (out: rows q_2 R_2 apart). A chain GEMM
// on it (P = G_1[i1] @ out) leaves P in row44's vectors (P44Rows<q_1> with ld = q_2 R_2, for q_1 = 1
// or 2). Its entries are those of the GEMM on S, moved (the same sums).
inline void permute44(const float* S, int64_t ld, int R1, int q2, int R2, float* out) {
  const int64_t N = (int64_t)q2 * R2;
  for (int r = 0; r < R1; ++r)
    for (int j2 = 0; j2 < q2; ++j2)
      for (int k = 0; k < R2 / 4; ++k)
        _mm_storeu_ps(out + r * N + 4 * (k * q2 + j2), _mm_loadu_ps(S + r * ld + j2 * R2 + 4 * k));
}

// C (M x N) (+)= A (M x K, lda) @ B^T, B is (N x K, ldb): dot-product form, K contiguous.
void gemm_nt(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
             bool accumulate) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const float v = dot(A + m * lda, B + n * ldb, K);
      C[m * ldc + n] = accumulate ? C[m * ldc + n] + v : v;
    }
}

// C (K x N, ldc) += A^T @ B with A (M x K, lda), B (M x N, ldb). Tiles of KR rows x NV vectors of C
// stay in registers while all M rank-1 contributions are added (every element summed over m in order).
template <int NV, int KR>
TILE_ATTR void tn_tile(int M, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int V = vectors(NV);
  v16 acc[KR][V];
#pragma GCC unroll 16
  for (int kk = 0; kk < KR; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[kk][v] = load_cols<NV>(C + kk * ldc + 16 * v);
  for (int m = 0; m < M; ++m) {
    v16 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = load_cols<NV>(B + m * ldb + 16 * v);
    const float* a = A + m * lda;
#pragma GCC unroll 16
    for (int kk = 0; kk < KR; ++kk) {
      const v16 x = splat16(a[kk]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[kk][v] = fma_cols<NV>(x, b[v], acc[kk][v]);
    }
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < KR; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) store_cols<NV>(C + kk * ldc + 16 * v, acc[kk][v]);
}

template <int NV>
inline void tn_block(int M, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int KR = tile_rows(NV);
  int k = 0;
  for (; k + KR <= K; k += KR) tn_tile<NV, KR>(M, A + k, lda, B, ldb, C + k * ldc, ldc);
  if constexpr (KR > 4)
    for (; k + 4 <= K; k += 4) tn_tile<NV, 4>(M, A + k, lda, B, ldb, C + k * ldc, ldc);
  for (; k + 2 <= K; k += 2) tn_tile<NV, 2>(M, A + k, lda, B, ldb, C + k * ldc, ldc);
  for (; k < K; ++k) tn_tile<NV, 1>(M, A + k, lda, B, ldb, C + k * ldc, ldc);
}

void gemm_tn_acc(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  by_column_blocks(
      N, [&](auto nv, int n) { tn_block<decltype(nv)::value>(M, K, A, lda, B + n, ldb, C + n, ldc); },
      [&](int n0) {
        for (int n = n0; n < N; ++n)
          for (int k = 0; k < K; ++k) {
            float acc = C[k * ldc + n];
            for (int m = 0; m < M; ++m) acc += A[m * lda + k] * B[m * ldb + n];
            C[k * ldc + n] = acc;
          }
      });
}

// A bucket's dP_1 and its SGD step on G_2's slice in one pass over the slice, for buckets of a few
// prefixes: dP1 (M x R1) = dP (M x 16 NV) @ S^T with S the slice as it was (R1 rows, lds apart), then
// S += A^T @ dP, A (M x R1) being -lr times the stacked G_1 rows. The transposed copy of the slice
// and two GEMMs of a few rows become dot products of whole rows, summed 16 rows at a time by a
// transpose-add tree, and one update per row. The slice's sums run in the order gemm_tn_acc's do
// (the row, then m = 0, 1, ...), as fused multiply-adds written out (fma16), as the tiles' are, so the
// two paths give a slice the same bits whatever GCC contracts (tests: the few-prefix slice update has the
// GEMM path's bits). R1: a multiple of 16. At 512 lookups on Kaggle's largest table
// (R = 32; buckets of 2-3 prefixes) the backward's bucket phase took 0.79x as long, the fused step
// 0.93x (Zen 4 VM, alternating rounds); at 2,048 lookups (90% of the buckets this small) 0.95x and
// 1.00x; at 8,192 (1% of them) 0.99x; at 65,536 none is.
template <int NV>
void slice_sgd_dp1(int M, int R1, const float* A, const float* dP, float* S, int64_t lds, float* dP1) {
  constexpr int N = 16 * NV;
  for (int s0 = 0; s0 < R1; s0 += 16)
    for (int m = 0; m < M; ++m) {
      v16 p[NV], acc[16];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) p[v] = load16(dP + m * N + 16 * v);
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {  // acc[k]: row s0 + bitrev4(k), so lane k of the sum is row s0 + k
        const float* row = S + (s0 + kBitrev4[k]) * lds;
        acc[k] = p[0] * load16(row);
#pragma GCC unroll 4
        for (int v = 1; v < NV; ++v) acc[k] = fma16(p[v], load16(row + 16 * v), acc[k]);
      }
      store16(dP1 + m * R1 + s0, hsum16_bitrev(acc));
    }
  for (int r = 0; r < R1; ++r) {
    float* const row = S + r * lds;
    v16 c[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[v] = load16(row + 16 * v);
    for (int m = 0; m < M; ++m) {
      const v16 a = splat16(A[m * R1 + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[v] = fma16(a, load16(dP + m * N + 16 * v), c[v]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(row + 16 * v, c[v]);
  }
}

}  // namespace
