// Native CPU TT-EmbeddingBag: forward, core gradients and fused sparse SGD/Adagrad.
//
// Inputs are validated in Python (ttrec.bags, ttrec.cpu.ops) before any call lands here.
//
// Per chunk of lookups:
//   1. the lookups are radix-sorted by row index with the digit i_{d-1} moved to the front, so
//      lookups sharing a prefix (i_1..i_{d-1}) form runs and runs sharing G_{d-1}'s slice are
//      adjacent; repeats of a row are adjacent too;
//   2. forward, threads over prefixes: the prefix's partial product G_1[i_1] ... G_{d-1}[i_{d-1}]
//      once, in a thread-local scratch (the reuse of EL-Rec/EcoRec), then each distinct row of
//      the run with the last core into a row buffer, or straight into the output for bags of one
//      unweighted lookup: no per-lookup gathered cores. For D = 16 with q_1..q_{d-1} = q_d = 4
//      the last step broadcasts blocks of the last-core slice (Last44), else 16 dot products
//      and a transpose-add tree (last_stage16);
//   3. forward: bags pooled from the row buffer in lookup order (deterministic);
//   4. backward: the upstream gradient summed per row and per prefix (for D = 16, per prefix in
//      registers, piece_grads16); each core's gradient reduced per digit value by one thread (or
//      over fixed segments of the work): no atomics, and results that do not depend on the
//      thread count.
// Per-call copies of core slices are made only for the digit values a chunk uses, so scratch
// memory follows the batch, not the table. Layout: core k is (R_{k-1}, p_k, q_k, R_k) row-major
// fp32, as in ttrec.reference.

#include <immintrin.h>
#include <omp.h>

#include <mutex>
#include <new>
#include <type_traits>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../include/tt_row.h"

namespace {

// ---- 16-float vectors, per vector ISA ----
// The kernel computes in 16-float vectors (one embedding row of D = 16, one output line). With
// AVX-512 a v16 is one register. Without it (AVX2 machines, e.g. Zen 2) GCC would keep a 64-byte
// generic vector in memory and split every operation (measured: 10x slower GEMMs), so there a v16
// is a pair of 8-float register vectors with the same operators; the code below this section is
// written once for both. Lane permutations (block broadcasts and shuffles, the transpose-add tree,
// lane broadcasts) are single instructions with AVX-512 and pairs of 256-bit ones with AVX2.
#ifdef __AVX512F__
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }
inline v16 splat16(float x) { return (v16)_mm512_set1_ps(x); }  // a broadcast (0 + x would be an add)
inline void stream16(float* p, v16 v) { _mm512_stream_ps(p, (__m512)v); }  // p: 64-byte aligned
inline v16 lane_bcast(v16 v, int i) { return __builtin_shuffle(v, v16i{} + i); }  // every lane = lane i

// Sums of 16 vectors as one vector: lane k = sum of acc[bitrev4(k)] (a transpose-add tree).
inline v16 hsum16_bitrev(const v16* acc) {
  v16 w[8], x[4], y[2];
  const v16i l1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i l1b = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  for (int i = 0; i < 8; ++i)
    w[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], l1a) + __builtin_shuffle(acc[2 * i], acc[2 * i + 1], l1b);
  const v16i l2a = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const v16i l2b = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], l2a) + __builtin_shuffle(w[2 * i], w[2 * i + 1], l2b);
  const v16i l3a = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const v16i l3b = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  for (int i = 0; i < 2; ++i)
    y[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], l3a) + __builtin_shuffle(x[2 * i], x[2 * i + 1], l3b);
  const v16i l4a = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const v16i l4b = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  return __builtin_shuffle(y[0], y[1], l4a) + __builtin_shuffle(y[0], y[1], l4b);
}

// Last44's block (128-bit) operations, written without _mm512_undefined_ps (GCC 12 reports the
// intrinsics' undefined pass-through operand as maybe-uninitialized; the full mask never reads it).
inline v16 bcast4(const float* p) {  // the 4 floats at p in every block
  return (v16)__builtin_ia32_broadcastf32x4_512((__v4sf)_mm_loadu_ps(p), (__v16sf)_mm512_setzero_ps(),
                                                (__mmask16)-1);
}
// blocks [a[IMM & 3], a[IMM >> 2 & 3], b[IMM >> 4 & 3], b[IMM >> 6 & 3]] (vshuff32x4)
template <int IMM>
inline v16 shuffle_blocks(v16 a, v16 b) {
  return (v16)__builtin_ia32_shuf_f32x4_mask((__v16sf)a, (__v16sf)b, IMM, (__v16sf)_mm512_setzero_ps(),
                                             (__mmask16)-1);
}
// within every block: [a[IMM & 3], a[IMM >> 2 & 3], b[IMM >> 4 & 3], b[IMM >> 6 & 3]] (vshufps)
template <int IMM>
inline v16 shuffle_in_blocks(v16 a, v16 b) {
  return (v16)_mm512_shuffle_ps((__m512)a, (__m512)b, IMM);
}
#else
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
struct v16 {
  v8 lo, hi;  // lanes 0-7, 8-15
  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
  v16& operator+=(v16 b) { lo += b.lo; hi += b.hi; return *this; }
};
inline v16 operator+(v16 a, v16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline v16 operator*(v16 a, v16 b) { return {a.lo * b.lo, a.hi * b.hi}; }

inline v16 load16(const float* p) { return {*reinterpret_cast<const v8*>(p), *reinterpret_cast<const v8*>(p + 8)}; }
inline void store16(float* p, v16 v) {
  *reinterpret_cast<v8*>(p) = v.lo;
  *reinterpret_cast<v8*>(p + 8) = v.hi;
}
inline v16 splat16(float x) {
  const v8 h = (v8)_mm256_set1_ps(x);
  return {h, h};
}
inline void stream16(float* p, v16 v) {  // p: 64-byte aligned
#ifdef __AVX__
  _mm256_stream_ps(p, (__m256)v.lo);
  _mm256_stream_ps(p + 8, (__m256)v.hi);
#else
  store16(p, v);
#endif
}
inline v16 lane_bcast(v16 v, int i) {
  const v8 h = __builtin_shuffle(i < 8 ? v.lo : v.hi, v8i{} + (i & 7));
  return {h, h};
}

// hsum16_bitrev as above, on halves: its first level adds halves, the others permute within halves
template <int... I>
inline v16 halves_shuffle(v16 a, v16 b) {
  return {__builtin_shufflevector(a.lo, b.lo, I...), __builtin_shufflevector(a.hi, b.hi, I...)};
}
inline v16 hsum16_bitrev(const v16* acc) {
  v16 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) w[i] = {acc[2 * i].lo + acc[2 * i].hi, acc[2 * i + 1].lo + acc[2 * i + 1].hi};
  for (int i = 0; i < 4; ++i)
    x[i] = halves_shuffle<0, 1, 2, 3, 8, 9, 10, 11>(w[2 * i], w[2 * i + 1]) +
           halves_shuffle<4, 5, 6, 7, 12, 13, 14, 15>(w[2 * i], w[2 * i + 1]);
  for (int i = 0; i < 2; ++i)
    y[i] = halves_shuffle<0, 1, 8, 9, 4, 5, 12, 13>(x[2 * i], x[2 * i + 1]) +
           halves_shuffle<2, 3, 10, 11, 6, 7, 14, 15>(x[2 * i], x[2 * i + 1]);
  return halves_shuffle<0, 8, 2, 10, 4, 12, 6, 14>(y[0], y[1]) + halves_shuffle<1, 9, 3, 11, 5, 13, 7, 15>(y[0], y[1]);
}

inline v16 bcast4(const float* p) {  // vbroadcastf128 from memory: a load, no shuffle
  const v8 h = (v8)_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p));
  return {h, h};
}
// block j (0..3) of a: half j / 2, lanes 4 (j % 2) ..
template <int J0, int J1>
inline v8 two_blocks(v16 a) {
  return __builtin_shufflevector(J0 < 2 ? a.lo : a.hi, J1 < 2 ? a.lo : a.hi, 4 * (J0 & 1), 4 * (J0 & 1) + 1,
                                 4 * (J0 & 1) + 2, 4 * (J0 & 1) + 3, 8 + 4 * (J1 & 1), 9 + 4 * (J1 & 1),
                                 10 + 4 * (J1 & 1), 11 + 4 * (J1 & 1));
}
template <int IMM>
inline v16 shuffle_blocks(v16 a, v16 b) {
  return {two_blocks<(IMM & 3), (IMM >> 2 & 3)>(a), two_blocks<(IMM >> 4 & 3), (IMM >> 6 & 3)>(b)};
}
template <int IMM>
inline v16 shuffle_in_blocks(v16 a, v16 b) {
  return {(v8)_mm256_shuffle_ps((__m256)a.lo, (__m256)b.lo, IMM), (v8)_mm256_shuffle_ps((__m256)a.hi, (__m256)b.hi, IMM)};
}
#endif

// Register tiles of the small GEMMs: MR rows x NV 16-float vectors of C stay in registers.
// AVX-512 has 32 vector registers of 16 floats: tiles of up to 24 accumulators (6 x 64, 12 x 32,
// 16 x 16). AVX2 has 16 registers of 8 floats, so a 16-float vector takes two: 6 x 16 (12
// registers, 2 for B and 1 for the broadcast of A), the classic AVX2 sgemm tile.
// With AVX2 a tile is its own function: inlined into the loops around it, GCC ran out of general
// registers and reloaded the rows' offsets from the stack before every broadcast (one load per FMA
// pair more).
#ifdef __AVX512F__
constexpr int kWidestNV = 4;
constexpr int tile_rows(int nv) { return nv >= 4 ? 6 : nv == 2 ? 12 : 16; }
#define TILE_ATTR inline
#else
constexpr int kWidestNV = 1;
constexpr int tile_rows(int) { return 6; }
#define TILE_ATTR __attribute__((noinline))
#endif

// Calls block(std::integral_constant<int, NV>{}, n) over the columns [0, N) in blocks of 64, 32
// and 16 floats (NV vectors, at most kWidestNV), and tail(n) for the columns left over.
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
  if (n < N) tail(n);
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
  v16 c[MR][NV];
  const float* a[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) a[m] = A.at(m);
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = ACC ? load16(C + m * ldc + 16 * v) : splat16(0.f);
  for (int k = 0; k < K; ++k) {
    v16 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load16(B + k * ldb + 16 * v);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const v16 am = splat16(a[m][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] += am * b[v];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(C + m * ldc + 16 * v, c[m][v]);
}

// Rows of C for one block of NV vectors: tiles of tile_rows(NV) rows, then smaller tiles. Every
// element is the same k-ordered sum whatever tile computes it (results do not depend on M).
template <int NV, bool ACC, class Rows>
inline void nn_block(int M, int K, Rows A, const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int MR = tile_rows(NV);
  int m = 0;
  for (; m + MR <= M; m += MR) nn_tile<NV, MR, ACC>(K, A.from(m), B, ldb, C + m * ldc, ldc);
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

// The last chain step when M = q_1 ... q_{d-1} = 4 and q_d = 4 (D = 16, e.g. q = (2, 2, 4)), for the
// rows of one prefix: out[a q_d + c] = sum_r P[a][r] St[c][r]. Lane (a, s) of vector k holds
// P[a][4k + s] (built once per prefix by two levels of 128-bit block shuffles; kept in registers
// with AVX-512, reloaded from L1 per row with AVX2),
// and St[c][4k .. 4k + 3] is broadcast to the four blocks by the load itself, so each row is
// Rp FMAs (4 outputs c x Rp / 4 steps k; every lane useful) and two levels of in-block shuffles
// that sum over s.
template <int RV>  // Rp = 16 RV
struct Last44 {
  v16 pk[4 * RV];
  Last44(const float* P, int64_t ldp) {  // P: 4 rows ldp apart, Rp floats each (zero-padded)
    for (int h = 0; h < RV; ++h) {
      const v16 p0 = load16(P + 16 * h), p1 = load16(P + ldp + 16 * h),
                   p2 = load16(P + 2 * ldp + 16 * h), p3 = load16(P + 3 * ldp + 16 * h);
      const v16 t0 = shuffle_blocks<0x44>(p0, p1), t1 = shuffle_blocks<0xEE>(p0, p1),
                   t2 = shuffle_blocks<0x44>(p2, p3), t3 = shuffle_blocks<0xEE>(p2, p3);
      pk[4 * h + 0] = shuffle_blocks<0x88>(t0, t2);  // blocks: P[0..3][16h + 4j ..], j = 0..3
      pk[4 * h + 1] = shuffle_blocks<0xDD>(t0, t2);
      pk[4 * h + 2] = shuffle_blocks<0x88>(t1, t3);
      pk[4 * h + 3] = shuffle_blocks<0xDD>(t1, t3);
    }
  }
  // one row from the transposed last-core slice St (4 x Rp, rows Rp apart)
  v16 row(const float* St) const {
    constexpr int Rp = 16 * RV;
    v16 acc[4];
#ifdef __AVX512F__
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      acc[c] = pk[0] * bcast4(St + c * Rp);
#pragma GCC unroll 16
      for (int k = 1; k < 4 * RV; ++k) acc[c] += pk[k] * bcast4(St + c * Rp + 4 * k);
    }
#else  // 16 registers: k outer, so only pk[k] (2), the four broadcasts and the accumulators (8) are live
    for (int c = 0; c < 4; ++c) acc[c] = pk[0] * bcast4(St + c * Rp);
#pragma GCC unroll 16
    for (int k = 1; k < 4 * RV; ++k)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[c] += pk[k] * bcast4(St + c * Rp + 4 * k);
#endif
    // block a of acc[c] holds the four partial sums over s of out[a][c]
    const v16 u0 = shuffle_in_blocks<0x44>(acc[0], acc[1]) + shuffle_in_blocks<0xEE>(acc[0], acc[1]);
    const v16 u1 = shuffle_in_blocks<0x44>(acc[2], acc[3]) + shuffle_in_blocks<0xEE>(acc[2], acc[3]);
    return shuffle_in_blocks<0x88>(u0, u1) + shuffle_in_blocks<0xDD>(u0, u1);
  }
};

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
  v16 acc[KR][NV];
#pragma GCC unroll 16
  for (int kk = 0; kk < KR; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[kk][v] = load16(C + kk * ldc + 16 * v);
  for (int m = 0; m < M; ++m) {
    v16 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load16(B + m * ldb + 16 * v);
    const float* a = A + m * lda;
#pragma GCC unroll 16
    for (int kk = 0; kk < KR; ++kk) {
      const v16 x = splat16(a[kk]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[kk][v] += x * b[v];
    }
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < KR; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store16(C + kk * ldc + 16 * v, acc[kk][v]);
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

// Group items 0..n-1 by key in [0, nkeys): CSR start[nkeys+1], order[n] (stable: ascending item).
void group_by(const std::vector<int64_t>& key, int64_t nkeys, std::vector<int64_t>& start, std::vector<int32_t>& order) {
  start.assign(nkeys + 1, 0);
  for (int64_t k : key) start[k + 1]++;
  for (int64_t k = 0; k < nkeys; ++k) start[k + 1] += start[k];
  order.resize(key.size());
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (size_t i = 0; i < key.size(); ++i) order[fill[key[i]]++] = (int32_t)i;
}

// Lookups of a chunk sorted by their row index with the digit i_{d-1} moved to the front:
// entries (key << 24 | j), key = ((i_{d-1} * Pfront + (i_1..i_{d-2})) << lb) | i_d with
// lb = bits of p_d. Equal prefixes form runs, runs sharing i_{d-1} are adjacent (so they share
// G_{d-1}'s slice in L1), and prefix and i_d are read off the key by shifts and masks (no
// divisions in the per-lookup loops). Radix sort over the key bits (see SortWay), stable: equal
// keys keep lookup order, whichever way sorted them.
constexpr int kJBits = 24;
constexpr int64_t kSegments = 8;  // fixed pieces of the last-core gradient sum (thread-count independent)
constexpr int64_t kMaxChunk = (int64_t)1 << kJBits;

// x / d for 0 <= x < 2^52 by a floating-point reciprocal, corrected to the exact quotient
// (an integer division costs tens of cycles; this sits in the per-lookup key loop).
struct FastDiv {
  int64_t d;
  double inv;
  explicit FastDiv(int64_t divisor) : d(divisor), inv(1.0 / (double)divisor) {}
  int64_t operator()(int64_t x) const {
    int64_t q = (int64_t)((double)x * inv);
    if (q * d > x) --q;
    else if ((q + 1) * d <= x) ++q;
    return q;
  }
};

inline int last_bits(int64_t pd) {
  int lb = 0;
  while (((int64_t)1 << lb) < pd) ++lb;
  return lb;
}
// rotated prefix and last digit of a sorted entry
inline int64_t entry_prefix(uint64_t e, int lb) { return (int64_t)(e >> (kJBits + lb)); }
inline int64_t entry_last(uint64_t e, int lb) { return (int64_t)(e >> kJBits) & (((int64_t)1 << lb) - 1); }

#if !defined(__AVX512F__) && defined(__AVX2__)
// The sort entries of lookups [lo, hi) but the last (hi - lo) % 4, 4 at a time in doubles: every
// value is an integer below 2^52 (keys have at most 40 bits, checked in Python), so doubles hold
// them exactly; int64 <-> double by the 2^52 bias (AVX2 has no such conversion), each quotient
// floor(x / d) from a reciprocal and corrected by its remainder, as FastDiv. Returns the first
// lookup not done.
typedef double v4d __attribute__((vector_size(32), aligned(8)));
typedef int64_t v4q __attribute__((vector_size(32), aligned(8)));
typedef uint64_t v4u __attribute__((vector_size(32), aligned(8)));
inline v4d exact_double(v4q x) { return (v4d)(x | 0x4330000000000000) - 4503599627370496.0; }
inline v4q exact_int(v4d x) { return (v4q)(x + 4503599627370496.0) ^ 0x4330000000000000; }
inline v4d floor_div(v4d x, double d, double inv) {
  v4d q = (v4d)_mm256_floor_pd((__m256d)(x * inv));
  const v4d r = x - q * d;
  q += (v4d)((v4q)(r >= d) & (v4q)(v4d{} + 1.0));  // comparisons give all-ones lanes: masks of 1.0
  q -= (v4d)((v4q)(r < 0.0) & (v4q)(v4d{} + 1.0));
  return q;
}
int64_t sort_keys4(const int64_t* idx, int64_t lo, int64_t hi, int64_t pd, int64_t plast, int64_t pfront, int lb,
                   uint64_t* A) {
  const double dpd = (double)pd, dplast = (double)plast, dpfront = (double)pfront;
  const double inv_pd = 1.0 / dpd, inv_plast = 1.0 / dplast;
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    const v4d x = exact_double(*reinterpret_cast<const v4q*>(idx + j));
    const v4d pre = floor_div(x, dpd, inv_pd), front = floor_div(pre, dplast, inv_plast);
    const v4u key = (v4u)exact_int((pre - front * dplast) * dpfront + front) << lb | (v4u)exact_int(x - pre * dpd);
    *reinterpret_cast<v4u*>(A + j) = key << kJBits | (v4u)(v4q{0, 1, 2, 3} + j);  // unsigned: keys reach bit 63
  }
  return j;
}
#endif

#ifdef __AVX512DQ__
// The same with AVX-512, 8 at a time: AVX-512DQ converts int64 <-> double and multiplies int64s,
// so each quotient is the truncated product with the reciprocal (x >= 0), corrected in integers.
typedef double v8d __attribute__((vector_size(64), aligned(8)));
typedef int64_t v8q __attribute__((vector_size(64), aligned(8)));
typedef uint64_t v8u __attribute__((vector_size(64), aligned(8)));
inline v8q floor_div8(v8q x, int64_t d, double inv) {
  v8q q = __builtin_convertvector(__builtin_convertvector(x, v8d) * inv, v8q);
  const v8q r = x - q * d;
  q -= r >= d;  // comparisons give -1 lanes
  q += r < 0;
  return q;
}
int64_t sort_keys8(const int64_t* idx, int64_t lo, int64_t hi, int64_t pd, int64_t plast, int64_t pfront, int lb,
                   uint64_t* A) {
  const double inv_pd = 1.0 / (double)pd, inv_plast = 1.0 / (double)plast;
  int64_t j = lo;
  for (; j + 8 <= hi; j += 8) {
    const v8q x = *reinterpret_cast<const v8q*>(idx + j);
    const v8q pre = floor_div8(x, pd, inv_pd), front = floor_div8(pre, plast, inv_plast);
    const v8q key = ((pre - front * plast) * pfront + front) << lb | (x - pre * pd);
    *reinterpret_cast<v8u*>(A + j) = (v8u)key << kJBits | (v8u)(v8q{0, 1, 2, 3, 4, 5, 6, 7} + j);  // unsigned: keys reach bit 63
  }
  return j;
}
#endif

// Two ways to sort with two or more threads. Both are stable over the key bits and fill every
// bucket (or part) in ascending lookup position, so they give the same order. kShared: LSD passes
// of up to 12 bits over the whole array, each thread scattering its slice (per-thread histograms,
// bucket-major offsets). kSplit: the entries are first split by their top digit into one contiguous
// part per thread (parts end at top-digit boundaries, balanced by count, thread-major within a
// part), then each thread sorts its own part with private LSD passes of up to 8 bits. kShared moves
// the data ceil(bits / 12) times, kSplit 1 + ceil(bits / 8) times, but with 12-bit digits a bucket
// holds a few entries and both threads write into the same cache lines, whose transfers between
// cores are cheap on some machines and dear on others: on an Intel Xeon VM kShared's sort phase
// took 1.3x kSplit's at 24 key bits (yet the tuner chose kShared at the 16 prefix bits of an
// inference forward), while on a Zen 5 VM the whole sort phase took 0.21-0.27 ms with kShared. So
// the first sorts of each key width time both (SortTuner). (kSplit with one OpenMP thread granted
// runs kShared's loop with 8-bit digits.)
enum SortWay { kShared = 0, kSplit = 1 };

// The faster way per key width, measured: the first kTrials eligible sorts (two or more threads,
// at least kMinTuned lookups) of a width run both ways back to back, in turns first, and record
// each one's time per lookup unless the call had to grow its buffers (page faults); then the way
// with the lower minimum is kept for that width. tt_force_sort_way fixes a way for every width.
struct SortTuner {
  static constexpr int kTrials = 4;
  static constexpr int64_t kMinTuned = 16384;
  static constexpr int kWidths = 41;  // key bits 0..40
  std::mutex m;
  int forced = -1, last_width = -1, last_way = kShared;
  int trials[kWidths] = {}, choice[kWidths];
  double best[kWidths][2];
  SortTuner() { reset(); }
  void reset() {
    last_width = -1;
    for (int w = 0; w < kWidths; ++w) {
      trials[w] = 0;
      choice[w] = -1;
      best[w][0] = best[w][1] = 1e30;
    }
  }
  static bool eligible(int64_t n, int threads) { return threads >= 2 && n >= kMinTuned; }
  // the way to use (0 or 1), or -1: time both (the first to run is returned in *first)
  int pick(int bits, int64_t n, int threads, SortWay* first) {
    if (!eligible(n, threads)) return kShared;
    std::lock_guard<std::mutex> lock(m);
    last_width = bits;
    if (forced >= 0) return forced;
    if (choice[bits] >= 0) return choice[bits];
    *first = (SortWay)(trials[bits] % 2);
    return -1;
  }
  void record(int bits, const double seconds_per_lookup[2], bool valid) {
    std::lock_guard<std::mutex> lock(m);
    if (forced >= 0 || choice[bits] >= 0) return;
    if (valid)
      for (int w = 0; w < 2; ++w) best[bits][w] = std::min(best[bits][w], seconds_per_lookup[w]);
    if (++trials[bits] >= kTrials && best[bits][0] < 1e30)
      choice[bits] = best[bits][kSplit] < best[bits][kShared] ? kSplit : kShared;
  }
};
SortTuner g_sort_tuner;

int key_bits(const tt_shape_t* s) {  // bits of the sort key (<= 40: checked in Python before the call)
  int64_t front = 1;
  for (int k = 0; k < s->d - 1; ++k) front *= s->p[k];
  return last_bits(front) + last_bits(s->p[s->d - 1]);
}
int sort_threads(int64_t n, int threads) {  // slices of at least 4,096 lookups
  return (int)std::max<int64_t>(1, std::min<int64_t>(threads, n / 4096 + 1));
}

void sort_with(SortWay way, const tt_shape_t* s, const int64_t* idx, int64_t n, std::vector<uint64_t>& a,
               std::vector<uint64_t>& tmp, std::vector<uint8_t>& marks, int threads, int low) {
  const int d = s->d;
  const int64_t pd = s->p[d - 1], plast = s->p[d - 2];
  int64_t pfront = 1;
  for (int k = 0; k < d - 2; ++k) pfront *= s->p[k];
  const int lb = last_bits(pd);
  a.resize(n);
  tmp.resize(n);
  uint64_t* const A = a.data();
  uint64_t* const B = tmp.data();
  const FastDiv by_pd(pd), by_plast(plast);
  const int bits = key_bits(s) - low;  // the key bits sorted on, above the low ones
  const int T = sort_threads(n, threads);
  // kShared: passes of at most 12 bits (24-bit keys, e.g. Kaggle's largest table, take two);
  // kSplit: at most 8 bits (a part holds n / T entries: 4,096 buckets would hold a few each)
  const int max_width = way == kSplit ? 8 : 12;
  const int passes = std::max(1, (bits + max_width - 1) / max_width), width = std::max(1, (bits + passes - 1) / passes);
  const int64_t nbk = (int64_t)1 << width, mask = nbk - 1;
  const int top_shift = kJBits + low + (passes - 1) * width;
  // (allocated here: an allocation failure inside the parallel region could not reach tt_forward's catch)
  std::vector<int64_t> count((size_t)T * nbk), part_off((size_t)T * T), part_start(T + 1), fill(T);
  std::vector<int32_t> part_of(way == kSplit ? nbk : 0);
  int64_t* const cnt = count.data();
  marks.assign((size_t)T * pd, 0);  // row t: the last digits in thread t's slice (see Ctx::prepare_last)
  const uint64_t last_mask = ((uint64_t)1 << lb) - 1;
  int scatters = 0;  // how many times the entries moved (odd: they end in tmp)
  // one parallel region for keys and every pass (fewer fork/joins); the same order for any thread count
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    // keys in blocks of 512, each block's digits counted while it is in L1 (the first pass's
    // histogram: the lowest digit for kShared, the top one for kSplit; the same slice of entries)
    int64_t* const c = cnt + (size_t)t * nbk;  // this thread's own histogram
    const bool shared = way == kShared || nt == 1;
    const int first_shift = shared ? kJBits + low : top_shift;
    uint8_t* const m = marks.data() + (size_t)t * pd;
    std::fill(c, c + nbk, 0);
    for (int64_t b0 = lo; b0 < hi; b0 += 512) {
      const int64_t b1 = std::min(hi, b0 + 512);
      int64_t j = b0;
#if defined(__AVX512DQ__)
      j = sort_keys8(idx, b0, b1, pd, plast, pfront, lb, A);
#elif !defined(__AVX512F__) && defined(__AVX2__)
      j = sort_keys4(idx, b0, b1, pd, plast, pfront, lb, A);  // 4 at a time (AVX2 has no int64 <-> double)
#endif
      for (; j < b1; ++j) {
        const int64_t i = idx[j], pre = by_pd(i), front = by_plast(pre);
        const uint64_t key = ((uint64_t)((pre - front * plast) * pfront + front) << lb) | (uint64_t)(i - pre * pd);
        A[j] = key << kJBits | (uint64_t)j;
      }
      for (int64_t x = b0; x < b1; ++x) {
        c[(A[x] >> first_shift) & mask]++;
        m[(A[x] >> kJBits) & last_mask] = 1;
      }
    }
    uint64_t* bufs[2] = {A, B};
    int cur = 0;
    if (shared) {
      for (int pass = 0; pass < passes; ++pass) {
        const int shift = kJBits + low + pass * width;
        const uint64_t* src = bufs[cur];
        uint64_t* dst = bufs[cur ^ 1];
        if (pass > 0) {  // (pass 0's was counted with the keys) no barrier needed before filling it
          std::fill(c, c + nbk, 0);
          for (int64_t x = lo; x < hi; ++x) c[(src[x] >> shift) & mask]++;
        }
#pragma omp barrier
#pragma omp single
        {
          int64_t sum = 0;
          for (int64_t bucket = 0; bucket < nbk; ++bucket)
            for (int u = 0; u < nt; ++u) {
              const int64_t v = cnt[(size_t)u * nbk + bucket];
              cnt[(size_t)u * nbk + bucket] = sum;
              sum += v;
            }
        }  // implicit barrier
        for (int64_t x = lo; x < hi; ++x) dst[c[(src[x] >> shift) & mask]++] = src[x];
        cur ^= 1;
        if (pass + 1 < passes) {  // the next pass reads all of dst (the region's end waits for the last)
#pragma omp barrier
        }
      }
      if (t == 0) scatters = passes;
    } else {  // (the top digit's histogram was counted with the keys)
#pragma omp barrier
#pragma omp single
      {  // part k: the top-digit buckets up to where the running count reaches n (k + 1) / nt
        int64_t sum = 0;
        int k = 0;
        for (int64_t bucket = 0; bucket < nbk; ++bucket) {
          part_of[bucket] = k;
          for (int u = 0; u < nt; ++u) sum += cnt[(size_t)u * nbk + bucket];
          while (k + 1 < nt && sum >= n * (k + 1) / nt) part_start[++k] = sum;
        }
        while (k + 1 < nt) part_start[++k] = n;
        part_start[0] = 0;
        part_start[nt] = n;
        std::copy(part_start.begin(), part_start.begin() + nt, fill.begin());
        for (int u = 0; u < nt; ++u) {  // thread u's entries of part k go at fill[k], after threads < u
          for (int k2 = 0; k2 < nt; ++k2) part_off[(size_t)u * nt + k2] = 0;
          for (int64_t bucket = 0; bucket < nbk; ++bucket)
            part_off[(size_t)u * nt + part_of[bucket]] += cnt[(size_t)u * nbk + bucket];
          for (int k2 = 0; k2 < nt; ++k2) {
            const int64_t v = part_off[(size_t)u * nt + k2];
            part_off[(size_t)u * nt + k2] = fill[k2];
            fill[k2] += v;
          }
        }
        scatters = 1 + passes;
      }  // implicit barrier
      int64_t* const off = part_off.data() + (size_t)t * nt;
      const int32_t* const po = part_of.data();
      for (int64_t x = lo; x < hi; ++x) {
        const uint64_t e = A[x];
        B[off[po[(e >> top_shift) & mask]]++] = e;
      }
#pragma omp barrier
      const int64_t p0 = part_start[t], p1 = part_start[t + 1];
      cur = 1;
      for (int pass = 0; pass < passes; ++pass) {  // this thread's part only: nothing shared
        const int shift = kJBits + low + pass * width;
        const uint64_t* src = bufs[cur];
        uint64_t* dst = bufs[cur ^ 1];
        std::fill(c, c + nbk, 0);
        for (int64_t x = p0; x < p1; ++x) c[(src[x] >> shift) & mask]++;
        int64_t sum = p0;
        for (int64_t bucket = 0; bucket < nbk; ++bucket) {
          const int64_t v = c[bucket];
          c[bucket] = sum;
          sum += v;
        }
        for (int64_t x = p0; x < p1; ++x) dst[c[(src[x] >> shift) & mask]++] = src[x];
        cur ^= 1;
      }
    }
  }
  if (scatters % 2 == 1) a.swap(tmp);  // an odd number of scatters ended in tmp
}

// Sorted entries of a chunk (see above) in a, tmp as scratch: by the way SortTuner picks. With
// by_prefix, sorted on the prefix bits only (the key without i_d): equal prefixes still form runs,
// in lookup order, but equal rows need not be adjacent - enough for a forward that keeps no plan
// (a repeat not next to its first copy is computed again, to the same bits), and on Kaggle's
// largest table 16 bits instead of 24: two passes of 8-bit digits instead of 12-bit ones.
void sort_lookups(const tt_shape_t* s, const int64_t* idx, int64_t n, std::vector<uint64_t>& a,
                  std::vector<uint64_t>& tmp, std::vector<uint8_t>& marks, int threads, bool by_prefix = false) {
  // (at least one bit sorted: a shape whose prefix takes no bits sorts on i_d's)
  const int low = by_prefix ? std::max(0, std::min(last_bits(s->p[s->d - 1]), key_bits(s) - 1)) : 0;
  const int bits = key_bits(s) - low;
  SortWay first = kShared;
  const int way = g_sort_tuner.pick(bits, n, sort_threads(n, threads), &first);
  if (way >= 0) {
    sort_with((SortWay)way, s, idx, n, a, tmp, marks, threads, low);
  } else {  // timing: both ways on this input (same result), the second left in a
    const bool valid = a.capacity() >= (size_t)n && tmp.capacity() >= (size_t)n;  // no fresh pages
    double per_lookup[2];
    for (SortWay w : {first, (SortWay)(1 - first)}) {
      const double t0 = omp_get_wtime();
      sort_with(w, s, idx, n, a, tmp, marks, threads, low);
      per_lookup[w] = (omp_get_wtime() - t0) / (double)n;
    }
    g_sort_tuner.record(bits, per_lookup, valid);
  }
  std::lock_guard<std::mutex> lock(g_sort_tuner.m);
  g_sort_tuner.last_way = way >= 0 ? way : 1 - first;
}

// Start of every run of equal prefixes in a sorted chunk, then cn; run_of[x] (optional) = run of x.
// Two passes over fixed slices (count the starts, then write them at the slice's offset), with no
// data-dependent branch: runs of one or two lookups make a branch on "new run" a coin flip.
int64_t find_runs(const std::vector<uint64_t>& sorted, int64_t cn, int lb, std::vector<int64_t>& runs,
                  std::vector<int32_t>* run_of, int threads) {
  const int T = (int)std::max<int64_t>(1, std::min<int64_t>(std::min(threads, 64), cn / 8192 + 1));
  // slot cn + 1 + 8 t: where slice t writes lookups that start no run (a cache line apart, so the
  // slices never write one line; a small effect next to the store addresses below)
  runs.resize(cn + 1 + 8 * T);
  if (run_of) run_of->resize(cn);
  const uint64_t* const e = sorted.data();
  int64_t* const out = runs.data();
  int32_t* const of = run_of ? run_of->data() : nullptr;
  auto starts_run = [&](int64_t x) -> int64_t {
    return x == 0 || entry_prefix(e[x], lb) != entry_prefix(e[x - 1], lb);
  };
  int64_t first[65] = {0};  // runs before each slice, then the total
  int slices = 1;
  // kLanes lookups a step (8 with AVX-512, 4 with AVX2): a mask of the run starts among
  // e[x .. x + kLanes) (prefixes compared with those of e[x - 1 ..)), counted; with AVX-512 the
  // second pass compresses the starts' positions into the free slots by a masked store (only their
  // lanes are written). On the Zen 5 VM the scalar passes took about 40 us each per thread on a
  // 65,536-lookup batch; forward sort phase 0.82x [0.75-0.93] so (14 alternating rounds), and
  // with the AVX2 build on the same VM (the first pass only) 0.91x [0.83-1.00].
  // (shifts as vector extensions: GCC 12's _mm512_srli_epi64 trips -Wmaybe-uninitialized)
  const int sh = kJBits + lb;
#ifdef __AVX512F__
  constexpr int kLanes = 8;
  typedef uint64_t vu __attribute__((vector_size(64), aligned(8)));
  auto start_mask = [&](int64_t x) -> unsigned {  // x >= 1, x + 8 <= cn
    const vu a = *reinterpret_cast<const vu*>(e + x) >> sh, b = *reinterpret_cast<const vu*>(e + x - 1) >> sh;
    return _mm512_cmpneq_epu64_mask((__m512i)a, (__m512i)b);
  };
#else
  constexpr int kLanes = 4;
  typedef uint64_t vu __attribute__((vector_size(32), aligned(8)));
  auto start_mask = [&](int64_t x) -> unsigned {  // x >= 1, x + 4 <= cn; lanes where a != b
    const vu a = *reinterpret_cast<const vu*>(e + x) >> sh, b = *reinterpret_cast<const vu*>(e + x - 1) >> sh;
    return ~(unsigned)_mm256_movemask_pd((__m256d)(a == b)) & 15u;
  };
#endif
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = cn * t / nt, hi = cn * (t + 1) / nt;
    int64_t starts = 0, y = lo;
    if (y == 0 && y < hi) starts += starts_run(y++);
    for (; y + kLanes <= hi; y += kLanes) starts += __builtin_popcount(start_mask(y));
    for (; y < hi; ++y) starts += starts_run(y);
    first[t + 1] = starts;
#pragma omp barrier
#pragma omp single
    {
      slices = nt;
      for (int u = 0; u < nt; ++u) first[u + 1] += first[u];
    }  // implicit barrier
    int64_t u = first[t], x = lo;
#ifdef __AVX512F__
    if (!of) {
      if (x == 0 && x < hi) out[u++] = x++;  // lookup 0 starts the first run
      const __m512i step = _mm512_set1_epi64(8);
      __m512i xs = _mm512_add_epi64(_mm512_set1_epi64(x), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
      for (; x + 8 <= hi; x += 8, xs = _mm512_add_epi64(xs, step)) {
        const unsigned m = start_mask(x);
        const int c = __builtin_popcount(m);
        _mm512_mask_storeu_epi64(out + u, (__mmask8)((1u << c) - 1), _mm512_maskz_compress_epi64((__mmask8)m, xs));
        u += c;
      }
    }
#endif
    // (without AVX-512, and for run_of) every lookup is written to the next free slot of the slice,
    // where the next start overwrites it (or, once the slice's starts are all written, to its junk
    // slot): the store address depends on u alone, not on the comparison (on the Zen 5 VM 0.04 ms
    // against 0.10 with the address chosen by the comparison).
    const int64_t end = first[t + 1], junk = cn + 1 + 8 * t;
    for (; x < hi; ++x) {
      out[u < end ? u : junk] = x;
      const int64_t start = starts_run(x);
      u += start;
      if (of) of[x] = (int32_t)(u - 1);
    }
  }
  const int64_t U = first[slices];
  runs.resize(U + 1);
  runs[U] = cn;
  return U;
}

// Digits i_1..i_{d-1} of a rotated prefix key (i_{d-1} * Pfront + front, see sort_lookups).
inline void decode_prefix(const tt_shape_t* s, int64_t key, int64_t pfront, int64_t* dig) {
  const int d = s->d;
  int64_t front = key % pfront;
  dig[d - 2] = key / pfront;
  for (int k = d - 3; k >= 0; --k) {
    dig[k] = k ? front % s->p[k] : front;
    front /= s->p[k];
  }
}

// The distinct digit values a chunk uses for one core, numbered in the order added: per-call
// copies of core slices are made for these only, so scratch memory follows the batch, not p_k.
struct UsedDigits {
  std::vector<int32_t> slot;   // p_k entries, -1 where unused
  std::vector<int64_t> digit;  // used digit values, by slot
  void reset(int64_t p) {
    slot.assign(p, -1);
    digit.clear();
  }
  void add(int64_t i) {
    if (slot[i] < 0) {
      slot[i] = (int32_t)digit.size();
      digit.push_back(i);
    }
  }
};

struct Ctx {
  const tt_shape_t* s;
  const float* const* cores;
  int d;
  int32_t width[TT_MAX_D];   // columns of the partial product after core k (q_1..q_k)
  int Rp;                     // R_{d-1} rounded up to a multiple of 16
  UsedDigits last;            // last-core digits of the current chunk
  std::vector<float> last_t;  // their slices of G_d transposed to (q_d, Rp), zero-padded: dot-friendly
  std::vector<uint8_t> marks;  // per sorting thread: which last digits its slice of lookups uses (sort_with)

  Ctx(const tt_shape_t* shape, const float* const* c) : s(shape), cores(c), d(shape->d) {
    for (int k = 0; k < d; ++k) width[k] = tt_cols_through(s, k);
    Rp = (s->r[d - 1] + 15) / 16 * 16;
  }

  // The last digits of a chunk, from the marks its sort left (rows of p_d flags, one per sorting
  // thread, set while the keys were in L1: no pass over the sorted chunk here); slots in ascending
  // digit order; and their transposed slices.
  void prepare_last(int64_t cn, int threads) {
    const int64_t pd = s->p[d - 1];
    const int qd = s->q[d - 1], R = s->r[d - 1];
    const int T = (int)std::max<int64_t>(1, std::min<int64_t>(threads, cn / 8192 + 1));
    const int rows = (int)(marks.size() / pd);
    const uint8_t* const mk = marks.data();
    const float* g = cores[d - 1];  // (R, p_d, q_d, 1)
#pragma omp parallel num_threads(T)
    {
#pragma omp single
      {
        last.reset(pd);
        for (int64_t i = 0; i < pd; ++i) {
          uint8_t used = 0;
          for (int u = 0; u < rows; ++u) used |= mk[(size_t)u * pd + i];
          if (used) last.add(i);
        }
        last_t.assign(last.digit.size() * qd * Rp, 0.f);
      }  // implicit barrier
#pragma omp for schedule(static)
      for (int64_t u = 0; u < (int64_t)last.digit.size(); ++u) {
        const int64_t i = last.digit[u];
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < qd; ++c) last_t[(u * qd + c) * Rp + r] = g[((size_t)r * pd + i) * qd + c];
      }
    }
  }

  const float* last_slice(int64_t i) const { return last_t.data() + (size_t)last.slot[i] * s->q[d - 1] * Rp; }
};

// lookups of bag b inside [s, e)
inline void bag_range(const int64_t* offsets, int64_t b, int64_t s, int64_t e, int64_t* lo, int64_t* hi) {
  *lo = std::max(offsets[b], s);
  *hi = std::min(offsets[b + 1], e);
}

// Every bag holds exactly one lookup and there are no weights (pooling 1, as for many DLRM tables):
// the forward writes rows straight to the output, the backward reads gradient rows by lookup.
inline bool one_unweighted_lookup_per_bag(const int64_t* offsets, int64_t n_bags, const float* weights) {
  if (weights || offsets[n_bags] != n_bags) return false;
  for (int64_t b = 0; b <= n_bags; ++b)
    if (offsets[b] != b) return false;
  return true;
}

inline float bag_scale(const int64_t* offsets, int64_t b, int mean) {
  const int64_t n = offsets[b + 1] - offsets[b];
  return (mean && n > 0) ? 1.0f / (float)n : 1.0f;
}


// ---- d == 3: prefixes (i1, i2) grouped by their middle digit i2 ----
// The sort puts i2 first, so the prefixes sharing G_2's slice are adjacent: a bucket. Per bucket,
// the partial products P = G_1[i1] @ G_2[:, i2] of all its prefixes are one GEMM (stacked G_1 rows
// times the slice, read in place), and in the backward dG_2[:, i2] and dP_1 = dP @ G_2[:, i2]^T are one
// GEMM each, all on the thread that owns the bucket.

// A chunk's lookups sorted, their prefix runs, the prefixes' digits and i2 buckets, and (when
// has_P) the prefixes' partial products P (U x q1 q2 R2). A forward that will be differentiated
// keeps its plan for the backward (see tt_forward's state), which then skips the sort and chains.
struct Plan {
  tt_shape_t shape{};
  int64_t n = 0, U = 0;
  std::vector<uint64_t> sorted, tmp;
  std::vector<int64_t> runs;     // U + 1
  std::vector<int64_t> digits;   // U x 2: i1, i2
  std::vector<int64_t> buckets;  // first prefix of each i2 bucket, then U
  std::vector<int64_t> pieces;   // buckets cut into pieces of at most kPiece prefixes: starts, then U
  std::vector<float> P;           // see Pa()
  bool has_P = false;
  // (kept by a forward for its backward, with P) the forward's used last digits and their
  // transposed slices (Ctx::prepare_last), and whether every bag held one unweighted lookup
  UsedDigits last;
  std::vector<float> last_t;
  bool one_per_bag = false;
  void resize_P(size_t n) { P.resize(n + 16); }
  float* Pa() {  // P's first 64-byte boundary: the forward streams P here (stream_floats)
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(P.data()) + 63) & ~(uintptr_t)63);
  }
};
constexpr int64_t kPiece = 192;  // prefixes per GEMM piece (bounds per-thread scratch; 192: forward 0.96x of 96 on an Intel Xeon VM)
constexpr int64_t kBucketSegments = 10;  // fixed pieces of the dG_1/dG_3 sums (thread-count independent)

bool same_shape(const tt_shape_t& a, const tt_shape_t& b) {
  if (a.d != b.d) return false;
  for (int k = 0; k < a.d; ++k)
    if (a.p[k] != b.p[k] || a.q[k] != b.q[k] || a.r[k + 1] != b.r[k + 1]) return false;
  return true;
}

void plan_chunk(const tt_shape_t* s, const int64_t* idx, int64_t cn, int threads, Plan& pl, std::vector<uint8_t>& marks,
                bool by_prefix = false) {
  sort_lookups(s, idx, cn, pl.sorted, pl.tmp, marks, threads, by_prefix);
  const int lb = last_bits(s->p[2]);
  const int64_t U = find_runs(pl.sorted, cn, lb, pl.runs, nullptr, threads);
  const int64_t p0 = s->p[0];
  const FastDiv by_p0(p0);
  pl.digits.resize(2 * U);
  int64_t* const dig = pl.digits.data();
  const uint64_t* const e = pl.sorted.data();
  const int64_t* const runs = pl.runs.data();
#pragma omp parallel for schedule(static) num_threads(threads) if (U > 8192)
  for (int64_t t = 0; t < U; ++t) {
    const int64_t key = entry_prefix(e[runs[t]], lb), i2 = by_p0(key);
    dig[2 * t] = key - i2 * p0;
    dig[2 * t + 1] = i2;
  }
  // buckets of equal i2 (ascending in t), each found by a galloping search for its end (a few
  // dozen probes instead of a visit to each of its ~150 prefixes), cut into pieces
  pl.buckets.clear();
  pl.pieces.clear();
  for (int64_t t = 0; t < U;) {
    const int64_t i2 = dig[2 * t + 1];
    int64_t lo = t, step = 1;  // dig[2 lo + 1] == i2; find the first t' > lo with a larger i2
    while (lo + step < U && dig[2 * (lo + step) + 1] == i2) {
      lo += step;
      step *= 2;
    }
    int64_t hi = std::min(U, lo + step);  // dig[2 hi + 1] > i2 (or hi == U)
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      (dig[2 * mid + 1] == i2 ? lo : hi) = mid;
    }
    pl.buckets.push_back(t);
    for (int64_t a = t; a < hi; a += kPiece) pl.pieces.push_back(a);
    t = hi;
  }
  pl.buckets.push_back(U);
  pl.pieces.push_back(U);
  pl.shape = *s;
  pl.n = cn;
  pl.U = U;
  pl.has_P = false;
}

// T (cols x rows, contiguous) = S^T, S (rows x cols) with rows ld apart: 8 x 8 blocks through
// registers (the scalar loop of strided stores it replaces took about 5% of a batch-4,096 training
// step by perf, once per i2 bucket)
void transpose_to(const float* S, int64_t ld, int rows, int cols, float* T) {
  int r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      __m256 x[8], y[8];
      for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(S + (r0 + i) * ld + c0);
      for (int i = 0; i < 8; i += 2) {
        y[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        y[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        x[i] = _mm256_shuffle_ps(y[i], y[i + 2], 0x44);
        x[i + 1] = _mm256_shuffle_ps(y[i], y[i + 2], 0xEE);
        x[i + 2] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0x44);
        x[i + 3] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0xEE);
      }
      // x[0..3]: columns c0 + {0, 1, 2, 3} of rows 0-3 (low half) and c0 + {4..7} (high half); x[4..7]: rows 4-7
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(T + (int64_t)(c0 + i) * rows + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
        _mm256_storeu_ps(T + (int64_t)(c0 + i + 4) * rows + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
      }
    }
    for (; c0 < cols; ++c0)
      for (int i = 0; i < 8; ++i) T[(int64_t)c0 * rows + r0 + i] = S[(r0 + i) * ld + c0];
  }
  for (; r0 < rows; ++r0)
    for (int c = 0; c < cols; ++c) T[(int64_t)c * rows + r0] = S[r0 * ld + c];
}

// P of prefixes [t0, t1) of one bucket: stacked G_1[i1] rows (q1 x R1 each) @ the G_2 slice
// (R1 x q2 R2, rows ldb apart); both read in place, the G_1 rows through pointers (Gathered; a copy
// into a stacked matrix made the forward 1.05x as long on an Intel Xeon VM).
void piece_chain(const tt_shape_t* s, const float* const* cores, const Plan& pl, int64_t t0, int64_t t1,
                 std::vector<const float*>& Ap, const float* B, int64_t ldb, float* P) {
  const int q1 = s->q[0], R1 = s->r[1], N = s->q[1] * s->r[2];
  const int64_t w1 = (int64_t)q1 * R1;
  Ap.resize((size_t)(t1 - t0) * q1);
  for (int64_t t = t0; t < t1; ++t)
    for (int a = 0; a < q1; ++a) Ap[(t - t0) * q1 + a] = cores[0] + pl.digits[2 * t] * w1 + a * R1;
  gemm_nn_impl<false>((int)((t1 - t0) * q1), N, R1, Gathered{Ap.data()}, B, ldb, P, N);
}

// All prefixes' P into pl.P (the backward's recomputation when no forward state is at hand).
void plan_chains(const tt_shape_t* s, const float* const* cores, Plan& pl, int threads) {
  const int64_t MR2 = (int64_t)s->q[0] * s->q[1] * s->r[2];
  pl.resize_P((size_t)pl.U * MR2);
  const int64_t npieces = (int64_t)pl.pieces.size() - 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<const float*> Ap;  // the piece's G_1 rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t pc = 0; pc < npieces; ++pc) {
      const int64_t t0 = pl.pieces[pc], t1 = pl.pieces[pc + 1];
      int64_t ld;
      const float* S = tt_slice(s, cores[1], 1, pl.digits[2 * t0 + 1], &ld);
      piece_chain(s, cores, pl, t0, t1, Ap, S, ld, pl.Pa() + t0 * MR2);
    }
  }
  pl.has_P = true;
}

// Plans kept by forwards for their backward: a small pool, so their buffers (megabytes) are reused
// instead of faulting in fresh pages every step.
std::mutex g_plan_mutex;
std::vector<Plan*> g_plan_pool;
int64_t g_plans_live = 0;

Plan* acquire_plan() {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  Plan* p;
  if (!g_plan_pool.empty()) {
    p = g_plan_pool.back();
    g_plan_pool.pop_back();
  } else {
    p = new Plan();
  }
  ++g_plans_live;
  return p;
}

void release_plan(Plan* p) {
  if (!p) return;
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  --g_plans_live;
  p->has_P = false;
  if (g_plan_pool.size() < 2) g_plan_pool.push_back(p);
  else delete p;
}

// The prefixes [t0, t1) of a piece when D = 16 = M q_d and R = 16 RV (the common DLRM case), prefix t
// with partial product P = P0 + (t - t0) M R and rows runs[t] .. runs[t + 1] - 1 (sorted lookups).
// For each distinct row, g = the upstream gradient summed over the row's repeats (a register), then
// dp (M x R) = sum of g (M x q_d) @ St (q_d x R) and c3 (q_d x R) += g^T @ P (M x R). dp stays in registers
// across the prefix's rows (M x RV vectors: spilled when M = 16, still correct) and each entry of g is
// broadcast once for both products. gather(y) is the weighted upstream gradient row of sorted lookup y;
// slice(e, &S) the c3 accumulator of sorted entry e (and S its last-core slice); ahead(y) prefetches
// lookup y's. dp (dp0 + (t - t0) M R) is written, not added to: these rows are all of the prefix's.
// One call per piece: the setup (lane-broadcast indices, captures) is not repeated per prefix.
template <int QD, int RV, class Gather, class Slice, class Ahead>
void piece_grads16(int64_t t0, int64_t t1, int64_t t_end, const int64_t* runs, const uint64_t* sorted,
                   Gather&& gather, Slice&& slice, Ahead&& ahead, const float* P0, float* dp0) {
  constexpr int M = 16 / QD, R = 16 * RV;
  // columns per pass over the rows: all with AVX-512; with AVX2 (16 registers, two per v16) as many
  // as keep dp's M x CV vectors in 8 registers, the rows visited once per pass (their gradient rows
  // are already gathered, contiguous)
  constexpr int CV = kWidestNV > 1 ? RV : std::max(1, std::min(RV, 4 / M));
  for (int64_t t = t0; t < t1; ++t) {
    const float* const P = P0 + (t - t0) * M * R;
    float* const dp = dp0 + (t - t0) * M * R;
    const int64_t x0 = runs[t], x1 = runs[t + 1];
    // the partial product 4 prefixes on into L1 (the forward wrote it past the cache, so it is in memory)
    if (t + 4 < t_end)
      for (int64_t bb = 0; bb < (int64_t)sizeof(float) * M * R; bb += 64)
        _mm_prefetch((const char*)(P + 4 * M * R) + bb, _MM_HINT_T0);
    for (int col = 0; col < R; col += 16 * CV) {
      v16 acc[M][CV] = {};
      for (int64_t x = x0; x < x1;) {
        const uint64_t row = sorted[x] >> kJBits;
        v16 gv = {};
        int64_t y = x;
        for (; y < x1 && (sorted[y] >> kJBits) == row; ++y) gv += gather(y);
        if (col == 0) ahead(y);
        const float* S;
        float* const c3 = slice(sorted[x], &S) + col;  // the row's c3 accumulator; S = its last-core slice (q_d x R)
        S += col;
#pragma GCC unroll 16
        for (int c = 0; c < QD; ++c) {
          v16 sc[CV], cc[CV];
#pragma GCC unroll 4
          for (int v = 0; v < CV; ++v) { sc[v] = load16(S + c * R + 16 * v); cc[v] = load16(c3 + c * R + 16 * v); }
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const v16 b = lane_bcast(gv, m * QD + c);
#pragma GCC unroll 4
            for (int v = 0; v < CV; ++v) {
              acc[m][v] += b * sc[v];
              cc[v] += b * load16(P + m * R + col + 16 * v);
            }
          }
#pragma GCC unroll 4
          for (int v = 0; v < CV; ++v) store16(c3 + c * R + 16 * v, cc[v]);
        }
        x = y;
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) store16(dp + m * R + col + 16 * v, acc[m][v]);
    }
  }
}

// f(QD, RV) with compile-time q_d (a divisor of 16) and R / 16 in {1, 2, 4}; false for other shapes.
template <class F>
inline bool with_row16_shape(int qd, int R, F&& f) {
  using std::integral_constant;
  const int rv = R % 16 ? 0 : R / 16;
  if (rv != 1 && rv != 2 && rv != 4) return false;
  auto with_rv = [&](auto QD) {
    if (rv == 1) f(QD, integral_constant<int, 1>{});
    else if (rv == 2) f(QD, integral_constant<int, 2>{});
    else f(QD, integral_constant<int, 4>{});
  };
  switch (qd) {
    case 1: with_rv(integral_constant<int, 1>{}); return true;
    case 2: with_rv(integral_constant<int, 2>{}); return true;
    case 4: with_rv(integral_constant<int, 4>{}); return true;
    case 8: with_rv(integral_constant<int, 8>{}); return true;
    case 16: with_rv(integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// Random reads ahead of their use: the pooling pass fetches the row kAhead lookups on; the
// backward's gather (prefetch_ahead) fetches the bag numbers of lookups 2 kGatherAhead on and the
// gradient rows and weights of those kGatherAhead on. The gather is a tight loop of nothing but
// such reads, so it runs further ahead (on the Zen 5 VM, 48 against 16: backward bucket phase 0.93x
// [0.90-0.96], 14 alternating rounds; 32: 0.96x).
constexpr int64_t kAhead = 16;
constexpr int64_t kGatherAhead = 48;
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*(const char*)p)); }
// Bags of one unweighted lookup each (bag_of == nullptr): lookup j's gradient row is row j.
inline void prefetch_ahead(int64_t y, int64_t cn, int64_t s0, const uint64_t* sorted, const int32_t* bag_of,
                           const float* lookup_w, const float* grad_out, int D) {
  if (!bag_of) {
    if (y + kGatherAhead < cn) prefetch_line(grad_out + (s0 + (int64_t)(sorted[y + kGatherAhead] & (kMaxChunk - 1))) * D);
    return;
  }
  if (y + 2 * kGatherAhead < cn) prefetch_line(bag_of + s0 + (int64_t)(sorted[y + 2 * kGatherAhead] & (kMaxChunk - 1)));
  if (y + kGatherAhead < cn) {
    const int64_t ja = s0 + (int64_t)(sorted[y + kGatherAhead] & (kMaxChunk - 1));
    prefetch_line(grad_out + (int64_t)bag_of[ja] * D);
    prefetch_line(lookup_w + ja);
  }
}

// The optimizer step of one slice row (W floats): SGD G -= lr g, or Adagrad h += g^2,
// G -= lr g / (sqrt(h) + eps). One definition for both routes: the update inside the backward and
// the pass over the gradient scratch (sparse_update_pass).
struct Update {
  int optimizer = 0;  // 0 none (gradients into the scratch), 1 SGD, 2 Adagrad
  float lr = 0.f, eps = 0.f;
  float* const* cores = nullptr;  // updated in place
  float* const* state = nullptr;  // Adagrad accumulators, shaped like the cores
  void row(int k, int64_t base, const float* g, int64_t W) const {
    float* const G = cores[k] + base;
    if (optimizer == 2) {
      float* const h = state[k] + base;
      for (int64_t c = 0; c < W; ++c) {
        h[c] += g[c] * g[c];
        G[c] -= lr * g[c] / (std::sqrt(h[c]) + eps);
      }
    } else {
      for (int64_t c = 0; c < W; ++c) G[c] -= lr * g[c];
    }
  }
};

}  // namespace

extern "C" {

typedef struct {
  int64_t lookups;
  int64_t unique_prefixes;  // summed over chunks
  int64_t chunks;
  // seconds per phase, summed over chunks (forward: first repeat only). Forward: 0 sort+runs,
  // 1 chains + last core, 2 pooling. Backward: 0 setup, 1 sort+runs, 2 gradient gather,
  // 3 chains + dP, 4 last core, 5 middle cores, 6 first core.
  double seconds[8];
} tt_stats_t;

// out (n_bags x D) = pooled rows. Returns 0.
//
// Per chunk: lookups are grouped by prefix and prefixes ordered by their last prefix digit
// i_{d-1}, so consecutive prefixes share the slice G_{d-1}[:, i_{d-1}] (kept in L1) and every
// prefix's partial product lives only in a thread-local scratch while the rows of all lookups
// sharing it are finished. Rows land in a chunk-sized buffer; bags are then pooled in lookup
// order (deterministic for any thread count).
// Lookups per backward chunk (its scratch per prefix bounded by chunk_bytes).
static int64_t backward_chunk(const tt_shape_t* s, int64_t chunk_bytes) {
  const int d = s->d;
  int64_t per_prefix = 2 * (int64_t)tt_cols_through(s, d - 2) * s->r[d - 1];
  for (int k = 1; k < d - 2; ++k) per_prefix += (int64_t)tt_cols_through(s, k) * s->r[k + 1];
  return std::min(kMaxChunk, std::max<int64_t>(1024, chunk_bytes / (4 * per_prefix + 48)));
}

static int tt_forward_impl(const tt_shape_t* s, const float* const* cores, const int64_t* idx, const int64_t* offsets,
               int64_t n_bags, const float* weights, int mean, float* out, int threads, int64_t chunk_bytes,
               int repeat, tt_stats_t* stats, void** state_out) {
  Ctx ctx(s, cores);
  const int d = s->d;
  const int64_t n = offsets[n_bags];
  const int D = ctx.width[d - 1];
  const int qd = s->q[d - 1], R = s->r[d - 1], M = ctx.width[d - 2];
  const int64_t pd = s->p[d - 1];
  int64_t pfront = 1;
  for (int k = 0; k < d - 2; ++k) pfront *= s->p[k];
  const int lb = last_bits(pd);
  const int64_t C = std::min(kMaxChunk, std::max<int64_t>(1024, chunk_bytes / (4 * (int64_t)D + 24)));
  if (stats) *stats = tt_stats_t{n, 0, 0, {0.0}};
  // d == 3, one chunk for the forward and its backward: the plan (sort, runs, P) can be kept
  Plan* keep = nullptr;
  if (state_out) *state_out = nullptr;
  if (state_out && d == 3 && n > 0 && n <= C && n <= backward_chunk(s, chunk_bytes)) keep = acquire_plan();
  struct Release {  // hands the kept plan to the caller on success only
    Plan*& p;
    ~Release() { release_plan(p); }
  } release{keep};
  // buffers persist across calls (no fresh pages each call); one call at a time uses them
  static std::mutex mutex;
  static std::vector<float> rows;
  static std::vector<int32_t> row_pos;
  static std::vector<uint64_t> sorted_g, tmp;
  static std::vector<int64_t> runs_g;
  static Plan plan_g;
  std::lock_guard<std::mutex> lock(mutex);
  for (int rep = 0; rep < std::max(1, repeat); ++rep) {  // repeat > 1 only for the CI gate's planted slowdown
    // one chunk: the pooling pass visits every bag once and writes it whole; otherwise bags may
    // span chunks and accumulate into a zeroed output
    const bool whole = n > 0 && C >= n;
    // each row written straight into its bag's output row, no pooling pass; 16-float rows (one
    // aligned line each) as non-temporal stores
    const bool direct = whole && one_unweighted_lookup_per_bag(offsets, n_bags, weights);
    const bool stream_out = direct && D == 16 && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
    if (!whole) std::memset(out, 0, sizeof(float) * n_bags * D);
    for (int64_t s0 = 0; s0 < n; s0 += C) {
      const int64_t e0 = std::min(n, s0 + C), cn = e0 - s0;
      const double t0 = omp_get_wtime();
      // 1. sort lookups so equal prefixes form runs (see sort_lookups); find the runs
      Plan* pl = keep ? keep : &plan_g;
      // (a kept plan is sorted on the whole key: its backward sums the gradients of a row's repeats
      // as one run)
      if (d == 3) plan_chunk(s, idx + s0, cn, threads, *pl, ctx.marks, !keep);
      else sort_lookups(s, idx + s0, cn, sorted_g, tmp, ctx.marks, threads, true);
      const std::vector<uint64_t>& sorted = d == 3 ? pl->sorted : sorted_g;
      const std::vector<int64_t>& runs = d == 3 ? pl->runs : runs_g;
      ctx.prepare_last(cn, threads);
      const int64_t U = d == 3 ? pl->U : find_runs(sorted_g, cn, lb, runs_g, nullptr, threads);
      if (stats && rep == 0) { stats->unique_prefixes += U; stats->chunks++; }
      rows.resize((size_t)cn * D);
      float* const rbuf = rows.data();  // rows in sorted order
      row_pos.resize(cn);
      int32_t* const pos = row_pos.data();  // lookup j's row: rbuf + pos[j] * D
      if (keep) keep->resize_P((size_t)U * M * R);
      const double t1 = omp_get_wtime();
      // 2. per prefix: chain (d == 3: per piece of an i2 bucket), then the rows of its lookups
#pragma omp parallel num_threads(threads)
      {
        std::vector<float> scratch[TT_MAX_D];
        for (int k = 1; k < d - 1; ++k) scratch[k].resize((size_t)ctx.width[k] * s->r[k + 1]);
        const int Rp = ctx.Rp;
        const bool fast = D % 16 == 0;
        const bool quad = M == 4 && qd == 4;  // see Last44
        const int64_t st_bytes = (int64_t)sizeof(float) * qd * ctx.Rp;
        std::vector<float> padded(fast ? (size_t)M * Rp : 0, 0.f);
        std::vector<int32_t> arow(D), brow(D);
        for (int o = 0; o < D; ++o) {
          const int oo = (o & ~15) + kBitrev4[o & 15];
          arow[o] = (int32_t)((oo / qd) * Rp);  // P's rows are padded to Rp below when R != Rp
          brow[o] = (oo % qd) * Rp;
        }
        alignas(64) float lead_row[16];  // (stream_out) the last distinct row, for its repeats
        // the rows of prefix t's lookups; compute(St, dst) writes one row from the last-core slice St.
        // Rows land in sorted order (sequential writes), or (direct) in their bags' output rows; a
        // repeat of a row points at (direct: copies) its first copy
        // (bounds and arrays in locals: the non-temporal stores below may alias anything, so the
        // compiler would reload captured vectors' pointers after each one)
        const uint64_t* const srt = sorted.data();
        const int64_t* const run_start = runs.data();
        const float* const last_t = ctx.last_t.data();  // ctx.last_slice(i) = last_t + slot[i] * st_floats
        const int32_t* const last_slot = ctx.last.slot.data();
        const int64_t st_floats = (int64_t)qd * ctx.Rp;
        auto rows_of = [&](int64_t t, auto&& compute) {
          int64_t lead = -1;
          const int64_t x0 = run_start[t], x1 = run_start[t + 1];
          for (int64_t x = x0; x < x1; ++x) {
            const uint64_t e = srt[x];
            const int64_t j = (int64_t)(e & (kMaxChunk - 1));
            if (x > x0 && (e >> kJBits) == (srt[x - 1] >> kJBits)) {  // the same row again
              if (stream_out) stream16(out + j * D, load16(lead_row));
              else if (direct) copy_floats(out + j * D, out + lead * D, D);
              else pos[j] = (int32_t)lead;
              continue;
            }
            lead = direct ? j : x;
            if (!direct) pos[j] = (int32_t)x;
            float* const row = direct ? out + j * D : rbuf + x * D;
            const float* St = last_t + last_slot[entry_last(e, lb)] * st_floats;
            if (x + 1 < cn) {  // the next lookup's slice into L1 while this row is computed
              const char* nx = (const char*)(last_t + last_slot[entry_last(srt[x + 1], lb)] * st_floats);
              for (int64_t bb = 0; bb < st_bytes; bb += 64) _mm_prefetch(nx + bb, _MM_HINT_T0);
            }
            if (stream_out) {  // one aligned 64-byte line, written past the cache (no read for ownership)
              compute(St, lead_row);
              stream16(row, load16(lead_row));
            } else {
              compute(St, row);
            }
          }
        };
        // the rows of prefix t from its partial product P (M x R)
        auto finish = [&](int64_t t, const float* P) {
          int64_t ldp = R;
          if (fast && Rp != R) {  // zero-pad P's rows to Rp so the dots run on whole vectors
            for (int m = 0; m < M; ++m)
              std::memcpy(padded.data() + (size_t)m * Rp, P + (size_t)m * R, sizeof(float) * R);
            P = padded.data();
            ldp = Rp;
          }
          auto by44 = [&](auto stage) {
            rows_of(t, [&](const float* St, float* dst) { store16(dst, stage.row(St)); });
          };
          if (quad && Rp == 16) by44(Last44<1>(P, ldp));
          else if (quad && Rp == 32) by44(Last44<2>(P, ldp));
          else if (quad && Rp == 64) by44(Last44<4>(P, ldp));
          else if (fast)
            rows_of(t, [&](const float* St, float* dst) { last_stage16(D, Rp, P, St, arow.data(), brow.data(), dst); });
          else
            rows_of(t, [&](const float* St, float* dst) { gemm_nt(M, qd, R, P, ldp, St, Rp, dst, qd, false); });
        };
        if (d == 3) {
          std::vector<const float*> Ap;
          std::vector<float> Pl((size_t)kPiece * M * R);
          const int64_t npieces = (int64_t)pl->pieces.size() - 1;
#pragma omp for schedule(dynamic, 1)
          for (int64_t pc = 0; pc < npieces; ++pc) {
            const int64_t ta = pl->pieces[pc], tb = pl->pieces[pc + 1];
            int64_t ld;
            const float* S = tt_slice(s, cores[1], 1, pl->digits[2 * ta + 1], &ld);
            // P in a cache-resident scratch; kept for the backward by streaming stores (written
            // past the cache: no read of the megabytes of plan it lands in)
            float* const P = Pl.data();
            piece_chain(s, cores, *pl, ta, tb, Ap, S, ld, P);
            for (int64_t t = ta; t < tb; ++t) finish(t, P + (t - ta) * (int64_t)M * R);
            if (keep) stream_floats(keep->Pa() + ta * (int64_t)M * R, P, (tb - ta) * (int64_t)M * R);
          }
        } else {
          int64_t dig[TT_MAX_D];
#pragma omp for schedule(dynamic, 64)
          for (int64_t t = 0; t < U; ++t) {
            decode_prefix(s, entry_prefix(sorted[runs[t]], lb), pfront, dig);
            const float* P = cores[0] + dig[0] * (int64_t)s->q[0] * s->r[1];  // (q_1 x R_1)
            for (int k = 1; k < d - 1; ++k) {  // P <- P (width[k-1] x R_k) @ G_{k+1}[:, i_{k+1}]
              int64_t ld;
              const float* S = tt_slice(s, cores[k], k, dig[k], &ld);
              gemm_nn(ctx.width[k - 1], s->q[k] * s->r[k + 1], s->r[k], P, s->r[k], S, ld, scratch[k].data(),
                      (int64_t)s->q[k] * s->r[k + 1]);
              P = scratch[k].data();
            }
            finish(t, P);
          }
        }
        if (stream_out || keep) _mm_sfence();  // this thread's streamed rows (and kept P) are out before the barrier
      }
      if (keep) {  // its backward reuses the used last digits, their slices and the bag check
        keep->has_P = true;
        std::swap(keep->last, ctx.last);
        std::swap(keep->last_t, ctx.last_t);
        keep->one_per_bag = direct;
      }
      const double t2 = omp_get_wtime();
      // 3. pool: bags overlapping [s0, e0), lookups in order
      const int64_t b0 = direct ? 0 : whole ? 0 : std::upper_bound(offsets, offsets + n_bags + 1, s0) - offsets - 1;
      const int64_t b1 = direct ? 0 : whole ? n_bags : std::lower_bound(offsets, offsets + n_bags + 1, e0) - offsets;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t b = std::max<int64_t>(b0, 0); b < std::min(b1, n_bags); ++b) {
        int64_t lo, hi;
        bag_range(offsets, b, s0, e0, &lo, &hi);
        float* o = out + b * D;
        if (whole) std::memset(o, 0, sizeof(float) * D);  // empty bags included: all bags visited
        for (int64_t j = lo; j < hi; ++j) {
          if (j + kAhead < e0) prefetch_line(rbuf + (int64_t)pos[j + kAhead - s0] * D);  // random reads
          const float w = weights ? weights[j] : 1.0f;
          const float* r = rbuf + (int64_t)pos[j - s0] * D;
          for (int c = 0; c < D; ++c) o[c] += w * r[c];
        }
      }
      if (stats && rep == 0) {
        stats->seconds[0] += t1 - t0;
        stats->seconds[1] += t2 - t1;
        stats->seconds[2] += omp_get_wtime() - t2;
      }
    }
  }
  if (mean)  // (bags of one lookup keep scale 1)
    for (int64_t b = 0; b < n_bags; ++b) {
      const float sc = bag_scale(offsets, b, 1);
      for (int c = 0; c < D; ++c) out[b * D + c] *= sc;
    }
  if (keep) {
    *state_out = keep;
    keep = nullptr;
  }
  return 0;
}

// Backward for d == 3, per chunk, with prefixes grouped in i2 buckets (see Plan):
//   1. (no kept plan) sort, runs and every prefix's P = G_1[i1] @ G_2[:, i2], per bucket piece;
//   2. threads over kBucketSegments fixed segments of whole buckets; per bucket piece: the
//      upstream gradient g of each distinct row (repeats summed), dP (q1 q2 x R2) of each prefix
//      += g @ G_3[:, i3]^T and a segment-private dG_3[:, i3] += P^T g; then dG_2[:, i2] +=
//      stacked G_1[i1]^T @ stacked dP (the bucket's own slice: one writer), and dP_1 = stacked
//      dP @ G_2[:, i2]^T added into a segment-private dG_1[i1];
//   3. the segment copies of dG_1 and dG_3 added in segment order, one digit value per thread.
// No atomics; the sums do not depend on the thread count. bag_of and lookup_w null: bags of one
// unweighted lookup each (lookup j's upstream gradient is row j of grad_out).
static void backward_d3(const tt_shape_t* s, const float* const* cores, const int64_t* idx, int64_t n,
                        const int32_t* bag_of, const float* lookup_w, const float* grad_out,
                        float* const* grad_cores, uint8_t* const* touched, int threads, int64_t C, Plan* kept,
                        const Update& up, tt_stats_t* stats, double& tick) {
  auto lap = [&](int phase) {
    const double now = omp_get_wtime();
    if (stats) stats->seconds[phase] += now - tick;
    tick = now;
  };
  Ctx ctx(s, cores);
  const int q1 = s->q[0], q2 = s->q[1], qd = s->q[2], R1 = s->r[1], R2 = s->r[2], Rp = ctx.Rp;
  const int M = q1 * q2, D = M * qd, N = q2 * R2;
  const int64_t p0 = s->p[0], p1 = s->p[1], pd = s->p[2];
  const int64_t w1 = (int64_t)q1 * R1, MR2 = (int64_t)M * R2, w3 = (int64_t)qd * R2;
  const int lb = last_bits(pd);
  static Plan plan_g;
  static std::vector<float> acc1, acc3;
  static std::vector<uint8_t> used1, used3;
  static UsedDigits first;
  static std::vector<int64_t> seg;
  for (int64_t s0 = 0; s0 < n; s0 += C) {
    const int64_t cn = std::min(n, s0 + C) - s0;
    Plan* pl = kept;
    if (!pl) {
      pl = &plan_g;
      plan_chunk(s, idx + s0, cn, threads, *pl, ctx.marks);
    }
    if (kept) {  // the forward's (same cores: the plan is only passed while they are unchanged)
      std::swap(ctx.last, kept->last);
      std::swap(ctx.last_t, kept->last_t);
    } else {
      ctx.prepare_last(cn, threads);
    }
    if (stats) { stats->unique_prefixes += pl->U; stats->chunks++; }
    lap(1);
    if (!pl->has_P) plan_chains(s, cores, *pl, threads);
    lap(3);
    const int64_t U = pl->U;
    const std::vector<uint64_t>& sorted = pl->sorted;
    const std::vector<int64_t>& runs = pl->runs;
    const std::vector<int64_t>& digits = pl->digits;
    first.reset(p0);
    for (int64_t t = 0; t < U; ++t) first.add(digits[2 * t]);
    const int64_t n1 = (int64_t)first.digit.size(), n3 = (int64_t)ctx.last.digit.size();
    // segments: whole buckets, cut where the running cost crosses 1/8, 2/8, ..., 6/8, then 13/16,
    // 14/16, 15/16 of the total: the last four are half-size, so the threads taking segments in turn
    // finish close together. cost = 8 per prefix (its two GEMMs, 16 q1 R1 q2 R2 FLOPs, dominate) +
    // 1 per lookup
    const int64_t nb = (int64_t)pl->buckets.size() - 1;
    const int64_t S = std::min<int64_t>(kBucketSegments, nb);
    auto cost = [&](int64_t b) { return 8 * pl->buckets[b] + runs[pl->buckets[b]]; };
    auto cut = [](int64_t k) { return k <= 6 ? 2 * k : k + 6; };  // k-th boundary, in 16ths
    seg.assign(1, 0);
    for (int64_t b = 1; b < nb && (int64_t)seg.size() < S; ++b)
      if (cost(b) * 16 >= cost(nb) * cut((int64_t)seg.size())) seg.push_back(b);
    seg.push_back(nb);
    const int64_t nseg = (int64_t)seg.size() - 1;
    acc1.resize((size_t)nseg * n1 * w1);
    acc3.resize((size_t)nseg * n3 * w3);
    used1.assign((size_t)nseg * n1, 0);
    used3.assign((size_t)nseg * n3, 0);
    float* const g1 = grad_cores[1];
    const bool fast16 = D == 16 && with_row16_shape(qd, R2, [](auto, auto) {});
    const bool fused = up.optimizer != 0;  // (one chunk: the caller checks)
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> Ap, BT((size_t)N * R1), dPb((size_t)kPiece * MR2),
          dP1((size_t)kPiece * w1), g(D), dg2(fused ? (size_t)R1 * N : 0);
      // a segment's gathered gradient rows (up to megabytes): kept by each pool thread across calls,
      // so it is not mapped and faulted in afresh every backward
      static thread_local std::vector<float> gs;
#pragma omp for schedule(dynamic, 1)
      for (int64_t sg = 0; sg < nseg; ++sg) {
        float* const a1 = acc1.data() + (size_t)sg * n1 * w1;
        float* const a3 = acc3.data() + (size_t)sg * n3 * w3;
        uint8_t* const u1 = used1.data() + (size_t)sg * n1;
        uint8_t* const u3 = used3.data() + (size_t)sg * n3;
        // (fast16) the segment's upstream gradient rows, weighted, in sorted order: one tight loop
        // of random reads (many in flight) instead of one read per step of the row loop
        const int64_t xs = runs[pl->buckets[seg[sg]]], xe = runs[pl->buckets[seg[sg + 1]]];
        if (fast16) {
          gs.resize((size_t)(xe - xs) * 16);
          for (int64_t y = xs; y < xe; ++y) {
            prefetch_ahead(y, cn, s0, sorted.data(), bag_of, lookup_w, grad_out, D);
            const int64_t j = s0 + (int64_t)(sorted[y] & (kMaxChunk - 1));
            store16(gs.data() + (y - xs) * 16, bag_of ? splat16(lookup_w[j]) * load16(grad_out + (int64_t)bag_of[j] * D)
                                                      : load16(grad_out + j * D));
          }
        }
        for (int64_t b = seg[sg]; b < seg[sg + 1]; ++b) {
          const int64_t tb0 = pl->buckets[b], tb1 = pl->buckets[b + 1], i2 = digits[2 * tb0 + 1];
          int64_t ld;
          const float* S2 = tt_slice(s, cores[1], 1, i2, &ld);
          transpose_to(S2, ld, R1, N, BT.data());  // G_2[:, i2]^T (q2 R2 x R1)
          if (touched) touched[1][i2] = 1;
          // dG_2[:, i2]: into the gradient scratch, or (fused) into a bucket-local tile applied to
          // G_2[:, i2] once the bucket is done (no other bucket reads that slice; the tile stays in
          // L1 instead of a read, write, reread and zeroing of the scratch)
          float* const dg2_out = fused ? dg2.data() : g1 + i2 * N;
          const int64_t dg2_ld = fused ? N : p1 * N;
          if (fused) std::fill(dg2.begin(), dg2.end(), 0.f);
          for (int64_t ta = tb0; ta < tb1; ta += kPiece) {
            const int64_t tb = std::min(tb1, ta + kPiece), np = tb - ta;
            if (fast16) {  // D = 16, R_2 in {16, 32, 64}: see piece_grads16 (it writes all of dP)
              const float* const gsp = gs.data();
              auto gather = [&](int64_t y) __attribute__((always_inline)) { return load16(gsp + (y - xs) * 16); };
              auto slice = [&](uint64_t e, const float** S) __attribute__((always_inline)) {
                const int64_t i3 = entry_last(e, lb);
                const int32_t v = ctx.last.slot[i3];
                float* c3 = a3 + (size_t)v * w3;
                if (!u3[v]) { std::fill(c3, c3 + w3, 0.f); u3[v] = 1; }
                *S = ctx.last_slice(i3);
                return c3;
              };
              // the next row's last-core slice and c3 accumulator into L1 (both are random reads in L2;
              // both are w3 floats here: R_2 is a multiple of 16, so Rp = R_2)
              auto ahead = [&](int64_t y) __attribute__((always_inline)) {
                if (y >= xe) return;
                const int64_t i3 = entry_last(sorted[y], lb);
                const char* sn = (const char*)ctx.last_slice(i3);
                const char* cn3 = (const char*)(a3 + (size_t)ctx.last.slot[i3] * w3);
                for (int64_t bb = 0; bb < 4 * w3; bb += 64) { _mm_prefetch(sn + bb, _MM_HINT_T0); _mm_prefetch(cn3 + bb, _MM_HINT_T0); }
              };
              with_row16_shape(qd, R2, [&](auto QD, auto RV) {
                piece_grads16<QD.value, RV.value>(ta, tb, U, runs.data(), sorted.data(), gather, slice, ahead,
                                                  pl->Pa() + ta * MR2, dPb.data());
              });
            } else {
              std::fill(dPb.begin(), dPb.begin() + np * MR2, 0.f);
              for (int64_t t = ta; t < tb; ++t) {  // other shapes: per row, small GEMMs
                const float* P = pl->Pa() + t * MR2;
                float* dp = dPb.data() + (t - ta) * MR2;
                for (int64_t x = runs[t]; x < runs[t + 1];) {
                  // g: the upstream gradient of this row, summed over its repeats (adjacent)
                  const uint64_t row = sorted[x] >> kJBits;
                  int64_t y = x;
                  std::fill(g.begin(), g.end(), 0.f);
                  for (; y < runs[t + 1] && (sorted[y] >> kJBits) == row; ++y) {
                    prefetch_ahead(y, cn, s0, sorted.data(), bag_of, lookup_w, grad_out, D);
                    const int64_t j = s0 + (int64_t)(sorted[y] & (kMaxChunk - 1));
                    const float w = bag_of ? lookup_w[j] : 1.0f;
                    const float* go = grad_out + (bag_of ? (int64_t)bag_of[j] : j) * D;
                    for (int c = 0; c < D; ++c) g[c] += w * go[c];
                  }
                  const int64_t i3 = entry_last(sorted[x], lb);
                  // dp (M x R2) += g (M x q_d) @ St (q_d x R2)
                  gemm_nn_acc(M, R2, qd, g.data(), qd, ctx.last_slice(i3), Rp, dp, R2);
                  const int32_t v = ctx.last.slot[i3];
                  float* c3 = a3 + (size_t)v * w3;
                  if (!u3[v]) { std::fill(c3, c3 + w3, 0.f); u3[v] = 1; }
                  gemm_tn_acc(M, R2, qd, g.data(), qd, P, R2, c3, R2);  // c3 (q_d x R2) += g^T @ P
                  x = y;
                }
              }
            }
            // stacked G_1 rows of the piece (np q1 x R1); dP viewed as (np q1 x q2 R2)
            Ap.resize((size_t)np * w1);
            for (int64_t t = ta; t < tb; ++t)
              copy_floats(Ap.data() + (t - ta) * w1, cores[0] + digits[2 * t] * w1, w1);
            gemm_tn_acc((int)(np * q1), N, R1, Ap.data(), R1, dPb.data(), N, dg2_out, dg2_ld);
            gemm_nn((int)(np * q1), R1, N, dPb.data(), N, BT.data(), R1, dP1.data(), R1);
            for (int64_t t = ta; t < tb; ++t) {
              const int32_t v = first.slot[digits[2 * t]];
              float* c1 = a1 + (size_t)v * w1;
              const float* src = dP1.data() + (t - ta) * w1;
              if (!u1[v]) { copy_floats(c1, src, w1); u1[v] = 1; }
              else for (int64_t c = 0; c < w1; ++c) c1[c] += src[c];
            }
          }
          if (fused)
            for (int r = 0; r < R1; ++r) up.row(1, ((int64_t)r * p1 + i2) * N, dg2.data() + (size_t)r * N, N);
        }
      }
    }
    lap(7);
    float* const g0 = grad_cores[0];
    float* const gd = grad_cores[2];  // (R2, p_d, q_d, 1)
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> sum(std::max(w3, w1)), row(qd);
#pragma omp for schedule(static) nowait
      for (int64_t v = 0; v < n3; ++v) {
        const int64_t i = ctx.last.digit[v];
        std::fill(sum.begin(), sum.end(), 0.f);  // the segments' c3 (q_d x R2) summed in order, then
        for (int64_t sg = 0; sg < nseg; ++sg) {  // added once into G_d's strided slice
          if (!used3[(size_t)sg * n3 + v]) continue;
          const float* a = acc3.data() + ((size_t)sg * n3 + v) * w3;
          for (int64_t c = 0; c < w3; ++c) sum[c] += a[c];
        }
        for (int r = 0; r < R2; ++r) {
          if (fused) {  // (fused) applied to G_d's slice row by row, else added into the scratch
            for (int c = 0; c < qd; ++c) row[c] = sum[(size_t)c * R2 + r];
            up.row(2, ((int64_t)r * pd + i) * qd, row.data(), qd);
          } else {
            for (int c = 0; c < qd; ++c) gd[((int64_t)r * pd + i) * qd + c] += sum[(size_t)c * R2 + r];
          }
        }
        if (touched) touched[2][i] = 1;
      }
#pragma omp for schedule(static)
      for (int64_t v = 0; v < n1; ++v) {
        const int64_t i = first.digit[v];
        float* const out = fused ? sum.data() : g0 + i * w1;  // (fused: summed here, then applied)
        if (fused) std::fill(sum.begin(), sum.begin() + w1, 0.f);
        for (int64_t sg = 0; sg < nseg; ++sg) {
          if (!used1[(size_t)sg * n1 + v]) continue;
          const float* a = acc1.data() + ((size_t)sg * n1 + v) * w1;
          for (int64_t c = 0; c < w1; ++c) out[c] += a[c];
        }
        if (fused) up.row(0, i * w1, out, w1);
        if (touched) touched[0][i] = 1;
      }
    }
    lap(6);
    if (kept) break;  // a kept plan is the whole batch (one chunk)
  }
}

// The optimizer step as a pass over the gradient scratch (grads, zero on entry, from the backward)
// when it could not run inside the backward: every touched slice of every core is updated (see
// Update), then zeroed in the scratch, which is clean again for the next call.
static void sparse_update_pass(const tt_shape_t* s, const Update& up, float* const* grads, uint8_t* const* touched,
                               int threads) {
  for (int k = 0; k < s->d; ++k) {
    const int64_t pk = s->p[k];
    const int64_t W = (int64_t)s->q[k] * s->r[k + 1];
    const int Rk = s->r[k];
#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
    for (int64_t i = 0; i < pk; ++i) {
      if (!touched[k][i]) continue;
      for (int r = 0; r < Rk; ++r) {
        const int64_t base = ((int64_t)r * pk + i) * W;
        up.row(k, base, grads[k] + base, W);
        std::memset(grads[k] + base, 0, sizeof(float) * W);
      }
    }
  }
}

// grad_cores[k] (same shapes as cores) += dL/dG_k, or with up.optimizer the optimizer step applied to
// the cores (see tt_backward). touched[k] (optional, p_k bytes) marks the digit values whose slices
// received gradient. Returns 0.
//
// Per chunk, with lookups sorted as in the forward (runs = unique prefixes):
//   1. per prefix (threads over prefixes): the chain P_1..P_{d-2} (stored) and
//      dP_{d-2} = sum over its lookups of g_j @ G_d[:, i_d]^T (gradients aggregated per prefix);
//   2. last core, one thread per digit value i_d: sum of P_{d-2}^T g_j over its lookups;
//   3. middle cores d-2..1, one thread per digit value: sum of P_{k-1}^T dP_k over the prefixes
//      using it; then dP_{k-1} = dP_k @ G_k[:, i_k]^T per prefix (a transposed copy of G_k);
//   4. first core: sum of dP_0 per digit value.
// Every sum runs in a fixed order on one thread: no atomics, and results independent of threads.
static int tt_backward_impl(const tt_shape_t* s, const float* const* cores, const int64_t* idx, const int64_t* offsets,
                int64_t n_bags, const float* weights, int mean, const float* grad_out, float* const* grad_cores,
                uint8_t* const* touched, int threads, int64_t chunk_bytes, tt_stats_t* stats, void* state,
                const Update& up) {
  double tick = omp_get_wtime();
  auto lap = [&](int phase) {  // add the time since the last lap to a phase
    const double now = omp_get_wtime();
    if (stats) stats->seconds[phase] += now - tick;
    tick = now;
  };
  if (stats) *stats = tt_stats_t{offsets[n_bags], 0, 0, {0.0}};
  Ctx ctx(s, cores);
  const int d = s->d;
  const int64_t n = offsets[n_bags];
  const int D = ctx.width[d - 1];
  const int qd = s->q[d - 1], R = s->r[d - 1], M = ctx.width[d - 2], Rp = ctx.Rp;
  const int64_t pd = s->p[d - 1];
  int64_t pfront = 1;
  for (int k = 0; k < d - 2; ++k) pfront *= s->p[k];
  const int lb = last_bits(pd);
  int64_t per_prefix = 2 * (int64_t)M * R;
  for (int k = 1; k < d - 2; ++k) per_prefix += (int64_t)ctx.width[k] * s->r[k + 1];
  const int64_t C = std::min(kMaxChunk, std::max<int64_t>(1024, chunk_bytes / (4 * per_prefix + 48)));
  // buffers persist across calls (no fresh pages each call); one call at a time uses them
  static std::mutex mutex;
  static std::vector<int64_t> bag_of, runs, key, start, digits;
  static std::vector<std::vector<float>> lev;
  static std::vector<float> core_t;
  static UsedDigits mid;
  static std::vector<uint64_t> sorted, tmp;
  static std::vector<int32_t> run_of, order;
  static std::vector<float> dP, dPn, gs, seg_acc;
  static std::vector<uint8_t> repeats;
  std::lock_guard<std::mutex> lock(mutex);
  if (d == 3 && n_bags <= INT32_MAX) {  // (bags numbered in int32)
    static std::vector<float> lookup_w;  // weight x bag scale of every lookup
    static std::vector<int32_t> bag32;  // bag of every lookup (int32: half the cache footprint)
    Plan* kept = static_cast<Plan*>(state);
    if (kept && !(kept->has_P && kept->n == n && n <= C && same_shape(kept->shape, *s))) kept = nullptr;
    // no bag numbers or weights (a kept plan has the forward's answer for the same bags)
    const bool single = kept ? kept->one_per_bag : one_unweighted_lookup_per_bag(offsets, n_bags, weights);
    lookup_w.resize(single ? 0 : n);
    bag32.resize(single ? 0 : n);
    for (int64_t b = 0; b < n_bags && !single; ++b) {
      const float sc = bag_scale(offsets, b, mean);
      for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) {
        lookup_w[j] = (weights ? weights[j] : 1.0f) * sc;
        bag32[j] = (int32_t)b;
      }
    }
    lap(0);
    // the optimizer step inside the backward needs the whole batch in one chunk (a later chunk
    // must see the cores the forward saw); otherwise gradients go to the scratch and a pass follows
    const bool fuse = n <= C;
    backward_d3(s, cores, idx, n, single ? nullptr : bag32.data(), single ? nullptr : lookup_w.data(), grad_out,
                grad_cores, touched, threads, C, kept, fuse ? up : Update{}, stats, tick);
    if (up.optimizer && !fuse) sparse_update_pass(s, up, grad_cores, touched, threads);
    return 0;
  }
  bag_of.resize(n);
  for (int64_t b = 0; b < n_bags; ++b)
    for (int64_t j = offsets[b]; j < offsets[b + 1]; ++j) bag_of[j] = b;
  lev.resize(d);
  lap(0);
  for (int64_t s0 = 0; s0 < n; s0 += C) {
    const int64_t e0 = std::min(n, s0 + C), cn = e0 - s0;
    sort_lookups(s, idx + s0, cn, sorted, tmp, ctx.marks, threads);
    ctx.prepare_last(cn, threads);
    const int64_t U = find_runs(sorted, cn, lb, runs, &run_of, threads);
    digits.resize(U * (d - 1));
    for (int64_t t = 0; t < U; ++t)
      decode_prefix(s, entry_prefix(sorted[runs[t]], lb), pfront, digits.data() + t * (d - 1));
    for (int k = 1; k < d - 1; ++k) lev[k].resize((size_t)U * ctx.width[k] * s->r[k + 1]);
    auto partial = [&](int64_t t, int k) -> const float* {  // P_k of prefix t: (width[k] x r[k+1])
      if (k == 0) return cores[0] + digits[t * (d - 1)] * (int64_t)s->q[0] * s->r[1];
      return lev[k].data() + t * (int64_t)ctx.width[k] * s->r[k + 1];
    };
    if (stats) { stats->unique_prefixes += U; stats->chunks++; }
    lap(1);
    // upstream gradient of each lookup, gathered once into sorted order: gsd[x] (D floats)
    gs.resize((size_t)cn * D);
    float* const gsd = gs.data();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t x = 0; x < cn; ++x) {
      const int64_t j = s0 + (int64_t)(sorted[x] & (kMaxChunk - 1));
      const int64_t b = bag_of[j];
      const float w = (weights ? weights[j] : 1.0f) * bag_scale(offsets, b, mean);
      for (int c = 0; c < D; ++c) gsd[x * D + c] = w * grad_out[b * D + c];
    }
    lap(2);
    dP.resize((size_t)U * M * R);
    repeats.resize(cn);
    uint8_t* const repeat = repeats.data();
    // 1. chains and per-prefix dP_{d-2}
#pragma omp parallel for schedule(dynamic, 64) num_threads(threads)
      for (int64_t t = 0; t < U; ++t) {
        for (int k = 1; k < d - 1; ++k) {
          int64_t ld;
          const float* S = tt_slice(s, cores[k], k, digits[t * (d - 1) + k], &ld);
          const int N = s->q[k] * s->r[k + 1];
          gemm_nn(ctx.width[k - 1], N, s->r[k], partial(t, k - 1), s->r[k], S, ld,
                  lev[k].data() + t * (int64_t)ctx.width[k] * s->r[k + 1], N);
        }
        float* dp = dP.data() + t * (int64_t)M * R;
        std::fill(dp, dp + (int64_t)M * R, 0.f);
        // Repeats of a row are adjacent: their gradients are summed into the first (``lead``) and
        // the rest are marked, so the row's last-core work is done once.
        for (int64_t x = runs[t]; x < runs[t + 1];) {
          const uint64_t row = sorted[x] >> kJBits;
          float* g = gsd + x * D;
          int64_t y = x + 1;
          for (; y < runs[t + 1] && (sorted[y] >> kJBits) == row; ++y) {
            const float* gy = gsd + y * D;
            for (int c = 0; c < D; ++c) g[c] += gy[c];
            repeat[y] = 1;
          }
          repeat[x] = 0;
          const float* St = ctx.last_slice(entry_last(sorted[x], lb));
          gemm_nn_acc(M, R, qd, g, qd, St, Rp, dp, R);  // dp (M x R) += g (M x q_d) @ St (q_d x R)
          x = y;
        }
      }
    lap(3);
    // 2. last core: dG_d[:, i] (R x q_d) += sum_j P_{d-2}(run of j)^T (R x M) @ g_j (M x q_d).
    // The sorted lookups are cut into kSegments fixed pieces (not one per thread, so the sums do
    // not depend on the thread count); each piece is walked in order (its P and g are read
    // sequentially) into a private copy of dG_d kept transposed as (p_d, q_d, R); the copies are
    // then added in piece order.
    {
      const int64_t nseg = std::min<int64_t>(kSegments, cn);
      const int64_t nused = (int64_t)ctx.last.digit.size();
      const size_t slab = (size_t)nused * qd * R;  // one copy of the used slices of dG_d
      seg_acc.assign(nseg * slab, 0.f);
      std::vector<uint8_t> used(nseg * nused, 0);
      float* const acc_all = seg_acc.data();
      uint8_t* const used_all = used.data();
      const int32_t* const slot = ctx.last.slot.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t sg = 0; sg < nseg; ++sg) {
        float* acc = acc_all + sg * slab;
        uint8_t* u = used_all + sg * nused;
        for (int64_t x = cn * sg / nseg; x < cn * (sg + 1) / nseg; ++x) {
          if (repeat[x]) continue;  // summed into its row's first lookup
          const int32_t v = slot[entry_last(sorted[x], lb)];
          u[v] = 1;
          // acc[v] (q_d x R) += g^T (q_d x M) @ P (M x R)
          gemm_tn_acc(M, R, qd, gsd + x * D, qd, partial(run_of[x], d - 2), R, acc + (size_t)v * qd * R, R);
        }
      }
      float* gd = grad_cores[d - 1];  // (R, p_d, q_d, 1)
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t v = 0; v < nused; ++v) {
        const int64_t i = ctx.last.digit[v];
        for (int64_t sg = 0; sg < nseg; ++sg) {
          if (!used_all[sg * nused + v]) continue;
          const float* a = acc_all + sg * slab + (size_t)v * qd * R;
          for (int r = 0; r < R; ++r)
            for (int c = 0; c < qd; ++c) gd[((int64_t)r * pd + i) * qd + c] += a[(size_t)c * R + r];
        }
        if (touched) touched[d - 1][i] = 1;
      }
    }
    lap(4);
    // 3. middle cores, last to first
    for (int k = d - 2; k >= 1; --k) {
      const int Mk = ctx.width[k - 1], Rk = s->r[k], N = s->q[k] * s->r[k + 1];
      const int64_t pk = s->p[k];
      key.resize(U);
      for (int64_t t = 0; t < U; ++t) key[t] = digits[t * (d - 1) + k];
      group_by(key, pk, start, order);  // for k = d-2 the runs are already in digit order: order[y] == y
      float* gk = grad_cores[k];
#pragma omp parallel num_threads(threads)
      {
        std::vector<float> acc((size_t)Rk * N);
        std::vector<float> a_rows;  // P_0 of a bucket's prefixes, stacked (k = 1 only)
#pragma omp for schedule(dynamic, 16)
        for (int64_t i = 0; i < pk; ++i) {
          if (start[i] == start[i + 1]) continue;
          if (touched) touched[k][i] = 1;
          std::fill(acc.begin(), acc.end(), 0.f);
          const int64_t t0 = order[start[i]], nt = start[i + 1] - start[i];
          if (k == d - 2 && order[start[i + 1] - 1] == t0 + nt - 1) {
            // runs are sorted by this digit: the bucket's prefixes are t0..t0+nt-1 and their dP_k
            // rows are contiguous, so one A^T B with M = Mk * nt covers the bucket
            const float* A = nullptr;
            if (k == 1) {
              a_rows.resize((size_t)nt * Mk * Rk);
              for (int64_t t = 0; t < nt; ++t)
                std::memcpy(a_rows.data() + t * Mk * Rk, partial(t0 + t, 0), sizeof(float) * Mk * Rk);
              A = a_rows.data();
            } else {
              A = partial(t0, k - 1);
            }
            gemm_tn_acc((int)(Mk * nt), N, Rk, A, Rk, dP.data() + t0 * (int64_t)Mk * N, N, acc.data(), N);
          } else {
            for (int64_t y = start[i]; y < start[i + 1]; ++y) {
              const int64_t t = order[y];  // acc (R_k x N) += P_{k-1}^T (R_k x Mk) @ dP_k (Mk x N)
              gemm_tn_acc(Mk, N, Rk, partial(t, k - 1), Rk, dP.data() + t * (int64_t)Mk * N, N, acc.data(), N);
            }
          }
          for (int r = 0; r < Rk; ++r) {
            float* dst = gk + ((int64_t)r * pk + i) * N;
            const float* src = acc.data() + (size_t)r * N;
            for (int c = 0; c < N; ++c) dst[c] += src[c];
          }
        }
      }
      // the used slices of G_k transposed to (q_k R_{k+1}, R_k): dP_{k-1} = dP_k @ slice^T is then a
      // plain GEMM; numbered by bucket so a prefix finds its slice through its digit
      mid.reset(pk);
      for (int64_t i = 0; i < pk; ++i)
        if (start[i] != start[i + 1]) mid.add(i);
      core_t.resize(mid.digit.size() * (size_t)N * Rk);
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t v = 0; v < (int64_t)mid.digit.size(); ++v) {
        const int64_t i = mid.digit[v];
        for (int64_t r = 0; r < Rk; ++r)
          for (int64_t c = 0; c < N; ++c) core_t[((size_t)v * N + c) * Rk + r] = cores[k][(r * pk + i) * N + c];
      }
      dPn.resize((size_t)U * Mk * Rk);
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t t = 0; t < U; ++t)  // dP_{k-1} (Mk x R_k) = dP_k (Mk x N) @ slice^T (N x R_k)
        gemm_nn(Mk, Rk, N, dP.data() + t * (int64_t)Mk * N, N,
                core_t.data() + mid.slot[digits[t * (d - 1) + k]] * (int64_t)N * Rk, Rk,
                dPn.data() + t * (int64_t)Mk * Rk, Rk);
      dP.swap(dPn);
    }
    lap(5);
    // 4. first core: dG_1[0, i] (q_1 x R_1) += dP_0 of the prefixes using i
    {
      const int64_t p0 = s->p[0], W = (int64_t)s->q[0] * s->r[1];
      key.resize(U);
      for (int64_t t = 0; t < U; ++t) key[t] = digits[t * (d - 1)];
      group_by(key, p0, start, order);
      float* g0 = grad_cores[0];
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
      for (int64_t i = 0; i < p0; ++i) {
        if (start[i] == start[i + 1]) continue;
        if (touched) touched[0][i] = 1;
        for (int64_t y = start[i]; y < start[i + 1]; ++y) {
          const float* src = dP.data() + order[y] * W;
          for (int64_t c = 0; c < W; ++c) g0[i * W + c] += src[c];
        }
      }
    }
    lap(6);
  }
  if (up.optimizer) sparse_update_pass(s, up, grad_cores, touched, threads);
  return 0;
}

// C++ exceptions must not cross into Python (they would abort the process): return codes instead.
// 0 ok, 1 out of memory, 2 any other failure.
int tt_forward(const tt_shape_t* s, const float* const* cores, const int64_t* idx, const int64_t* offsets,
               int64_t n_bags, const float* weights, int mean, float* out, int threads, int64_t chunk_bytes,
               int repeat, tt_stats_t* stats, void** state_out) {
  try {
    return tt_forward_impl(s, cores, idx, offsets, n_bags, weights, mean, out, threads, chunk_bytes, repeat, stats,
                           state_out);
  } catch (const std::bad_alloc&) {
    return 1;
  } catch (...) {
    return 2;
  }
}

// optimizer 0: grad_cores += the core gradients. optimizer 1 (SGD) or 2 (Adagrad, accumulators in
// opt_state): the fused sparse update, in place on the cores (writable memory, though passed as
// const for the no-optimizer case), of exactly the touched slices (touched required, and opt_state
// for Adagrad: code 2 without them); grad_cores is then a zero scratch, zero again on return.
int tt_backward(const tt_shape_t* s, const float* const* cores, const int64_t* idx, const int64_t* offsets,
                int64_t n_bags, const float* weights, int mean, const float* grad_out, float* const* grad_cores,
                uint8_t* const* touched, int threads, int64_t chunk_bytes, tt_stats_t* stats, void* state,
                int optimizer, float lr, float eps, float* const* opt_state) {
  if (optimizer < 0 || optimizer > 2 || (optimizer && !touched) || (optimizer == 2 && !opt_state)) return 2;
  try {
    Update up;
    if (optimizer) up = Update{optimizer, lr, eps, (float* const*)cores, opt_state};
    return tt_backward_impl(s, cores, idx, offsets, n_bags, weights, mean, grad_out, grad_cores, touched, threads,
                            chunk_bytes, stats, state, up);
  } catch (const std::bad_alloc&) {
    return 1;
  } catch (...) {
    return 2;
  }
}

// A forward's kept plan (tt_forward's state_out): released here, once, by its owner.
void tt_state_free(void* state) { release_plan(static_cast<Plan*>(state)); }

// Bytes a kept plan holds, and how many are alive (tests).
int64_t tt_state_bytes(void* state) {
  const Plan* p = static_cast<const Plan*>(state);
  if (!p) return 0;
  return (int64_t)(p->sorted.capacity() * 8 + p->tmp.capacity() * 8 + (p->runs.capacity() + p->digits.capacity() +
                   p->buckets.capacity() + p->pieces.capacity() + p->last.digit.capacity()) * 8 + p->P.capacity() * 4 +
                   p->last.slot.capacity() * 4 + p->last_t.capacity() * 4);
}

int64_t tt_states_live(void) {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  return g_plans_live;
}

// The checks ttrec.bags.make_bags needs of a CPU batch, in one pass over each array (Python
// raises the errors): *bad_index = the first position of an index outside [0, num_embeddings),
// *bad_offset = the first j with offsets[j] > offsets[j + 1], each -1 where there is none; with
// csr, offsets[0, m) are copied there on the way (make_bags appends n). Reads exactly n indices and
// m offsets, whatever their values: nothing here trusts the batch.
void tt_scan_bags(const int64_t* idx, int64_t n, int64_t num_embeddings, const int64_t* offsets, int64_t m,
                  int64_t* csr, int threads, int64_t* bad_index, int64_t* bad_offset) {
  uint64_t top = 0;  // the largest index read as unsigned: a negative one is huge
  bool down = false;
  // one region for both arrays (a batch of 65,536 lookups: 0.5 MB each)
#pragma omp parallel num_threads(threads) if (n + m >= 32768)
  {
#pragma omp for schedule(static) reduction(max : top) nowait
    for (int64_t j = 0; j < n; ++j) top = std::max(top, (uint64_t)idx[j]);
#pragma omp for schedule(static) reduction(|| : down)
    for (int64_t j = 1; j < m; ++j) {
      down |= offsets[j] < offsets[j - 1];  // (no branch: the private copies are combined by ||)
      if (csr) csr[j] = offsets[j];
    }
  }
  *bad_index = -1;
  if (top >= (uint64_t)num_embeddings)
    for (int64_t j = 0; j < n; ++j)
      if ((uint64_t)idx[j] >= (uint64_t)num_embeddings) { *bad_index = j; break; }
  if (csr && m) csr[0] = offsets[0];
  *bad_offset = -1;
  if (down)
    for (int64_t j = 0; j + 1 < m; ++j)
      if (offsets[j + 1] < offsets[j]) { *bad_offset = j; break; }
}

int tt_abi_version(void) { return 6; }

// The sort's way for two or more threads (SortWay) at the key width of the last such sort: -1
// while its first sorts still time both ways (or none has run), else 0 (kShared) or 1 (kSplit).
// tt_last_sort_way: the way whose result the last sort left (0 for sorts not eligible for kSplit).
// tt_force_sort_way(0 or 1) fixes the way for every width (tests, A/B runs); -1 times afresh.
int tt_sort_way(void) {
  std::lock_guard<std::mutex> lock(g_sort_tuner.m);
  if (g_sort_tuner.forced >= 0) return g_sort_tuner.forced;
  return g_sort_tuner.last_width < 0 ? -1 : g_sort_tuner.choice[g_sort_tuner.last_width];
}
int tt_last_sort_way(void) {
  std::lock_guard<std::mutex> lock(g_sort_tuner.m);
  return g_sort_tuner.last_way;
}
void tt_force_sort_way(int way) {
  std::lock_guard<std::mutex> lock(g_sort_tuner.m);
  g_sort_tuner.forced = way == 0 || way == 1 ? way : -1;
  g_sort_tuner.reset();
}

}  // extern "C"
