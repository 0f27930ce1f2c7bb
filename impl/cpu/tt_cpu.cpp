// Native CPU TT-EmbeddingBag: forward, core gradients and fused sparse SGD/Adagrad.
//
// Inputs are validated in Python (ttrec.bags, ttrec.cpu.ops) before any call lands here.
//
// Per chunk of lookups:
//   1. the lookups are radix-sorted by row index with the digit i_{d-1} moved to the front, so
//      lookups sharing a prefix (i_1..i_{d-1}) form runs and runs sharing G_{d-1}'s slice are
//      adjacent; repeats of a row are adjacent too (d = 3 forward that keeps no plan for a
//      backward: sorted on i_2 alone, and each i_2 bucket's prefixes numbered in one pass);
//   2. forward, threads over prefixes: the prefix's partial product G_1[i_1] ... G_{d-1}[i_{d-1}]
//      once, in a thread-local scratch (the reuse of EL-Rec/EcoRec), then each distinct row of
//      the run with the last core into a row buffer at its lookup's position, or straight into the
//      output for bags of one unweighted lookup: no per-lookup gathered cores. For D = 16 with
//      q_1..q_{d-1} = q_d = 4 the last step broadcasts blocks of the last-core slice (row44), else
//      16 dot products and a transpose-add tree (last_stage16);
//   3. forward: bags pooled from the row buffer in lookup order (sequential reads; deterministic);
//   4. backward: the upstream gradient summed per row and per prefix (for D = 16, per prefix in
//      registers, piece_grads16); each core's gradient reduced per digit value by one thread (or
//      over fixed segments of the work): no atomics, and results that do not depend on the
//      thread count.
// Per-call copies of core slices are made only for the digit values a chunk uses, so scratch
// memory follows the batch, not the table. Layout: core k is (R_{k-1}, p_k, q_k, R_k) row-major
// fp32, as in ttrec.reference.
//
// Files, one translation unit (each header is included once, in this order): simd.h, 16-float
// vectors per vector ISA; gemm.h, the GEMM register tiles and the last chain step; sort.h, the
// sort of a chunk's lookups (step 1) and its prefix runs; plan.h, the per-call context and the
// d = 3 plan (prefixes in i2 buckets, GEMM pieces); this file, the backward's per-piece gradient
// sums, the optimizer step, and the C entry points (forward, backward, fused update).

#include <immintrin.h>
#include <omp.h>

#include <mutex>
#include <new>
#include <type_traits>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../include/tt_row.h"
#include "simd.h"  // 16-float vectors
#include "gemm.h"  // GEMM tiles, the last chain step
#include "sort.h"  // sorted lookups and their prefix runs
#include "plan.h"  // per-call context, the d = 3 plan and its pieces

namespace {

std::atomic<bool> g_profile{false};  // see tt_set_profile

// The prefixes [t0, t1) of a piece when D = 16 = M q_d and R in {8, 16, 32, 64} (the common DLRM
// cases; R = 8 in the low 8 lanes of one vector), prefix t with partial product
// P = P0 + (t - t0) M R and rows runs[t] .. runs[t + 1] - 1 (sorted lookups).
// For each distinct row, g = the upstream gradient summed over the row's repeats (a register), then
// dp (M x R) = sum of g (M x q_d) @ St (q_d x R) and c3 (q_d x R) += g^T @ P (M x R). dp stays in registers
// across the prefix's rows (M x RV vectors: spilled when M = 16, still correct) and each entry of g is
// broadcast once for both products. gather(y) is the weighted upstream gradient row of sorted lookup y;
// slice(e, &S) the c3 accumulator of sorted entry e (and S its last-core slice); ahead(y) prefetches
// lookup y's. dp (dp0 + (t - t0) M R) is written, not added to: these rows are all of the prefix's.
// One call per piece: the setup (lane-broadcast indices, captures) is not repeated per prefix.
// The last-core slices St are rows of Rp = max(R, 16) floats, zero-padded (Ctx::last_t): with R = 8
// their high lanes are zero, so dp's are too, and P, c3 and dp are read and written 8 lanes at a
// time (with the general per-row GEMMs instead, the backward's bucket phase took 4-6x as long at
// R = 8 as at 16: 100,000-row table, batch 4,096, pooling 1 and 10, Intel Xeon VM).
template <int QD, int R, class Gather, class Slice, class Ahead>
void piece_grads16(int64_t t0, int64_t t1, int64_t t_end, const int64_t* runs, const uint64_t* sorted,
                   Gather&& gather, Slice&& slice, Ahead&& ahead, const float* P0, float* dp0) {
  static_assert(R == 8 || R % 16 == 0, "R: 8 or a multiple of 16");
  constexpr int M = 16 / QD, RV = R < 16 ? 1 : R / 16, SR = 16 * RV;  // SR: St's row length
  constexpr int NV = R == 8 ? 0 : 1;  // rows of P, c3 and dp: load_cols / store_cols (0: 8 columns)
  // columns per pass over the rows: all with AVX-512; with AVX2 (16 registers, two per v16) as many
  // as keep dp's M x CV vectors in 8 registers, the rows visited once per pass (their gradient rows
  // are already gathered, contiguous)
  constexpr int CV = kWidestNV > 1 ? RV : std::max(1, std::min(RV, 4 / M));
  for (int64_t t = t0; t < t1; ++t) {
    const float* const P = P0 + (t - t0) * M * R;
    float* const dp = dp0 + (t - t0) * M * R;
    const int64_t x0 = runs[t], x1 = runs[t + 1];
    // the partial product 4 prefixes on into L1 (the forward wrote it past the cache, so it is in
    // memory), non-temporal: read once, its 10 MB (65,536 lookups on Kaggle's largest table) should
    // not push the cores, the accumulators and the caller's Python out of the caches on their way
    // out (Zen 4 VM, fused SGD step at 65,536 lookups, 20 alternating rounds: 0.980x near, 0.985x far)
    if (t + 4 < t_end)
      for (int64_t bb = 0; bb < (int64_t)sizeof(float) * M * R; bb += 64)
        _mm_prefetch((const char*)(P + 4 * M * R) + bb, _MM_HINT_NTA);
    for (int col = 0; col < SR; col += 16 * CV) {
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
          for (int v = 0; v < CV; ++v) { sc[v] = load16(S + c * SR + 16 * v); cc[v] = load_cols<NV>(c3 + c * R + 16 * v); }
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const v16 b = lane_bcast(gv, m * QD + c);
#pragma GCC unroll 4
            for (int v = 0; v < CV; ++v) {
              acc[m][v] = fma16(b, sc[v], acc[m][v]);  // (fused as written, not left to GCC: see fma_cols)
              cc[v] = fma_cols<NV>(b, load_cols<NV>(P + m * R + col + 16 * v), cc[v]);
            }
          }
#pragma GCC unroll 4
          for (int v = 0; v < CV; ++v) store_cols<NV>(c3 + c * R + 16 * v, cc[v]);
        }
        x = y;
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) store_cols<NV>(dp + m * R + col + 16 * v, acc[m][v]);
    }
  }
}

// f(QD, R) with compile-time q_d (a divisor of 16) and R in {8, 16, 32, 64}; false for other shapes.
template <class F>
inline bool with_row16_shape(int qd, int R, F&& f) {
  using std::integral_constant;
  if (R != 8 && R != 16 && R != 32 && R != 64) return false;
  auto with_r = [&](auto QD) {
    if (R == 8) f(QD, integral_constant<int, 8>{});
    else if (R == 16) f(QD, integral_constant<int, 16>{});
    else if (R == 32) f(QD, integral_constant<int, 32>{});
    else f(QD, integral_constant<int, 64>{});
  };
  switch (qd) {
    case 1: with_r(integral_constant<int, 1>{}); return true;
    case 2: with_r(integral_constant<int, 2>{}); return true;
    case 4: with_r(integral_constant<int, 4>{}); return true;
    case 8: with_r(integral_constant<int, 8>{}); return true;
    case 16: with_r(integral_constant<int, 16>{}); return true;
    default: return false;
  }
}

// Random reads ahead of their use: the backward's gather (prefetch_ahead) fetches the bag numbers
// of lookups 2 kGatherAhead on and the gradient rows and weights of those kGatherAhead on. The
// gather is a tight loop of nothing but such reads, so it runs far ahead (on the Zen 5 VM, 48
// against 16: backward bucket phase 0.93x [0.90-0.96], 14 alternating rounds; 32: 0.96x).
// Bags of one unweighted lookup (the gradient row's address known from the sorted entry alone):
// the row kGatherAheadL2 lookups on into L2 and kGatherAheadL1 on into L1. The L1 alone holds too
// few misses in flight for rows that come from memory (Zen 4 VM, Kaggle's largest table, fused SGD
// step at 65,536 lookups, 14 alternating rounds: bucket phase 2.65 against 2.77 ms, step 0.97x
// with the vCPUs near, 0.98x far; L2 alone 0.97x / 0.99x; 96/12, 128/32 and 192/24 within 1%).
constexpr int64_t kGatherAhead = 48, kGatherAheadL2 = 128, kGatherAheadL1 = 16;
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*(const char*)p)); }
inline void prefetch_line_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*(const char*)p)); }
// Bags of one unweighted lookup each (bag_of == nullptr): lookup j's gradient row is row j.
__attribute__((always_inline)) inline void prefetch_ahead(int64_t y, int64_t cn, int64_t s0, const uint64_t* sorted,
                                                          const int32_t* bag_of, const float* lookup_w,
                                                          const float* grad_out, int D) {
  if (!bag_of) {
    auto row = [&](int64_t x) { return grad_out + (s0 + (int64_t)(sorted[x] & (kMaxChunk - 1))) * D; };
    if (y + kGatherAheadL2 < cn) prefetch_line_l2(row(y + kGatherAheadL2));
    if (y + kGatherAheadL1 < cn) prefetch_line(row(y + kGatherAheadL1));
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
  // 1 chains + last core, 2 pooling; and parts of them: 3 the chain GEMMs and 4 the last core
  // (d = 3 with tt_set_profile(1): per thread, the mean over the threads, within 1), 5 the radix
  // sort (within 0).
  // Backward: 0 setup, 1 sort+runs, 2 gradient gather, 3 chains + dP, 4 last core, 5 middle
  // cores, 6 first core; d = 3: 7 the i2 buckets and, with tt_set_profile(1), parts of them (per
  // thread, the mean over the threads, within 7): 8 the upstream gradient rows' gather, 9 the
  // per-row products (dP and dG_d), 10 the chain GEMMs (dG_2 and dP_1).
  double seconds[11];
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
  static fvec rows;
  static std::vector<uint64_t> sorted_g, tmp;
  static std::vector<int64_t> runs_g;
  static Plan plan_g;
  static std::vector<int64_t> middle_start, middle_digit;
  std::lock_guard<std::mutex> lock(mutex);
  // d == 3 and no plan kept: lookups bucketed by i2 (one radix pass on Kaggle's largest table, with
  // a packed key: SortKey kMiddle), each bucket's prefixes found by a table of i1 (see below).
  // Otherwise (a plan kept for the backward; a packed key over 40 bits; p_1 over kMaxFront) the plan's
  // sort on the prefix or the whole key and its runs.
  const int fb = d == 3 ? last_bits(s->p[0]) : 0;
  const bool bucketed = d == 3 && !keep && key_bits(s, true) <= 40 && s->p[0] <= kMaxFront;
  for (int rep = 0; rep < std::max(1, repeat); ++rep) {  // repeat > 1 only for the CI gate's planted slowdown
    // one chunk: the pooling pass visits every bag once and writes it whole; otherwise bags may
    // span chunks and accumulate into a zeroed output
    const bool whole = n > 0 && C >= n;
    // each row written straight into its bag's output row, no pooling pass; 16-float rows (one
    // aligned line each) as non-temporal stores
    const bool direct = whole && one_unweighted_lookup_per_bag(offsets, n_bags, weights);
    const bool stream_out = direct && D == 16 && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
    constexpr int64_t kStreamRows = 512 << 10;  // see rbuf
    if (!whole) std::memset(out, 0, sizeof(float) * n_bags * D);
    for (int64_t s0 = 0; s0 < n; s0 += C) {
      const int64_t e0 = std::min(n, s0 + C), cn = e0 - s0;
      const double t0 = omp_get_wtime();
      // 1. sort lookups so equal prefixes form runs (see sort_lookups); find the runs
      Plan* pl = keep ? keep : &plan_g;
      // (a kept plan is sorted on the whole key: its backward sums the gradients of a row's repeats
      // as one run)
      const bool planned = d == 3 && !bucketed;
      // (a forward that keeps no plan uses its marks only to copy the slices of the last digits in use: from
      // 16 lookups per last digit on, all of them, and the sort marks none: the marks' stores took as long as
      // the histogram's; forward 0.984x at 65,536 lookups, Zen 2 VM)
      if (bucketed) sort_lookups(s, idx + s0, cn, sorted_g, tmp, ctx.marks, threads, kMiddle, cn < 16 * s->p[2]);
      else if (planned) plan_chunk(s, idx + s0, cn, threads, *pl, ctx.marks, !keep);
      else sort_lookups(s, idx + s0, cn, sorted_g, tmp, ctx.marks, threads, kPrefix);
      const double sort_seconds = planned ? pl->sort_seconds : omp_get_wtime() - t0;  // the radix sort alone
      const std::vector<uint64_t>& sorted = planned ? pl->sorted : sorted_g;
      const std::vector<int64_t>& runs = planned ? pl->runs : runs_g;
      if (bucketed) {  // the non-empty i2 buckets and where each starts, then cn: each end found by a
        // galloping search from its start (work per non-empty bucket, whatever p_2 is)
        const uint64_t* const e = sorted_g.data();
        const int sh = kJBits + lb + fb;
        middle_start.clear();
        middle_digit.clear();
        for (int64_t x = 0; x < cn;) {
          const uint64_t v = e[x] >> sh;
          int64_t lo = x, step = 1;  // e[lo] is in the bucket; find the first entry past it
          while (lo + step < cn && (e[lo + step] >> sh) == v) {
            lo += step;
            step *= 2;
          }
          const int64_t hi = std::min(cn, lo + step);
          middle_start.push_back(x);
          middle_digit.push_back((int64_t)v);
          x = std::upper_bound(e + lo, e + hi, v, [&](uint64_t w, uint64_t y) { return w < (y >> sh); }) - e;
        }
        middle_start.push_back(cn);
      }
      ctx.prepare_last(cn, threads);
      // (bucketed: its prefixes are counted per bucket, in the loop below)
      const int64_t U = bucketed ? 0 : planned ? pl->U : find_runs(sorted_g, cn, lb, runs_g, nullptr, threads);
      if (stats && rep == 0) { stats->unique_prefixes += U; stats->chunks++; }
      // rows land at their lookup's position: in the output (direct) or in rbuf, 64-byte aligned, which
      // the pooling pass then reads in lookup order, sequentially. (Rows in sorted order, pooled through
      // a position array, made that pass random reads: at 65,536 lookups, pooling 10, the forward
      // took 1.15-1.21x as long on an Intel Xeon VM, the pooling pass 2.4-2.7x, in two A/B runs of
      // alternating rounds.) A 16-float row goes out as one streamed line once the chunk's rows pass
      // kStreamRows bytes; below that they stay in cache (at 4,096 lookups streaming took 1.04x as
      // long, at 8,192 0.92x).
      rows.resize((size_t)cn * D);
      float* const rbuf = rows.data();
      float* const base = direct ? out : rbuf;
      const bool stream_rows = direct ? stream_out : D == 16 && cn * D * (int64_t)sizeof(float) >= kStreamRows;
      if (keep) keep->resize_P((size_t)U * M * R);
      const double t1 = omp_get_wtime();
      // 2. per prefix: chain (d == 3: per piece of an i2 bucket), then the rows of its lookups
#pragma omp parallel num_threads(threads)
      {
        std::vector<float> scratch[TT_MAX_D];
        for (int k = 1; k < d - 1; ++k) scratch[k].resize((size_t)ctx.width[k] * s->r[k + 1]);
        const int Rp = ctx.Rp;
        const bool fast = D % 16 == 0;
        const bool quad = M == 4 && qd == 4;  // see row44
        const int k4 = (R + 3) / 4;
        const int64_t st_bytes = (int64_t)sizeof(float) * qd * ctx.Rp;
        std::vector<float> padded(fast && Rp != R ? (size_t)M * Rp : 0, 0.f);
        std::vector<int32_t> arow(D), brow(D);
        for (int o = 0; o < D; ++o) {
          const int oo = (o & ~15) + kBitrev4[o & 15];
          arow[o] = (int32_t)((oo / qd) * Rp);  // P's rows are padded to Rp below when R != Rp
          brow[o] = (oo % qd) * Rp;
        }
        alignas(64) float lead_row[16];  // (stream_rows) the last distinct row, for its repeats
        const uint64_t* const srt = sorted.data();
        const int64_t* const run_start = runs.data();
        const float* const last_t = ctx.last_t.data();  // ctx.last_slice(i) = last_t + slot[i] * st_floats
        const int32_t* const last_slot = ctx.last.slot.data();
        const int64_t st_floats = (int64_t)qd * ctx.Rp;
        // The rows of prefixes [t0, t1) from their partial products P0 (M x R each, one after the
        // other). Prefix t's lookups are either a run of sorted entries, start[t] .. start[t + 1] - 1
        // (the plan's; entries up to i_end have their last-core slices fetched into L1 one row ahead),
        // or, with next, a list: entries x0 + y for y = first[t], next[y], ... until -1 (bucketed).
        // Each row is written at its lookup's position (see rbuf); a repeat of a row next to it
        // copies its first copy. One function, not inlined, for both, with one loop, so both compute
        // a row with the same machine code: a forward that keeps a plan and one that does not give
        // the same bits (with a loop of its own for each, GCC contracted the products of
        // last_stage16 differently in the two).
        // keep_out (a kept plan): where prefix t0's P goes, each prefix's streamed out after its rows.
        // (bounds and arrays in locals: the non-temporal stores below may alias anything, so the
        // compiler would reload captured vectors' pointers after each one)
        auto finish_piece = [&](const float* P0, int64_t t0, int64_t t1, const int64_t* start, int64_t i_end,
                                const int32_t* first, const int32_t* next, int64_t x0,
                                float* keep_out) __attribute__((noinline)) {
          const bool list = next != nullptr;
          auto rows = [&](int64_t t, auto&& compute) {
            int64_t lead = -1;
            uint64_t before = 0;
            const int64_t c_end = list ? -1 : start[t + 1];
            for (int64_t c = list ? first[t] : start[t], c0 = c; c != c_end;) {
              const int64_t c_next = list ? next[c] : c + 1;
              const uint64_t e = srt[list ? x0 + c : c];
              const int64_t j = (int64_t)(e & (kMaxChunk - 1));
              const bool again = c != c0 && (e >> kJBits) == (before >> kJBits);  // the same row again
              before = e;
              if (again) {
                if (stream_rows) stream16(base + j * D, load16(lead_row));
                else copy_floats(base + j * D, base + lead * D, D);
                c = c_next;
                continue;
              }
              lead = j;
              float* const row = base + j * D;
              const float* St = last_t + last_slot[entry_last(e, lb)] * st_floats;
              // the next lookup's slice into L1 while this row is computed
              const int64_t ahead = list ? (c_next >= 0 ? x0 + c_next : t + 1 < t1 ? x0 + first[t + 1] : -1)
                                         : (c_next < i_end ? c_next : -1);
              if (ahead >= 0) {
                const char* nx = (const char*)(last_t + last_slot[entry_last(srt[ahead], lb)] * st_floats);
                for (int64_t bb = 0; bb < st_bytes; bb += 64) _mm_prefetch(nx + bb, _MM_HINT_T0);
              }
              if (stream_rows) {  // one aligned 64-byte line, written past the cache (no read for ownership)
                compute(St, lead_row);
                stream16(row, load16(lead_row));
              } else {
                compute(St, row);
              }
              c = c_next;
            }
          };
          // per prefix: P (M rows ldp apart), zero-padded to Rp where the dots or row44's vectors
          // would run past R, then its rows. row44 is dispatched once per piece (per prefix, the call
          // and its spilled captures took longer than a row)
          const bool pad = fast && Rp != R && !(quad && R % 4 == 0);
          auto each_prefix = [&](auto&& compute_rows) {
            const int64_t MR = (int64_t)M * R;
            for (int64_t t = t0; t < t1; ++t) {
              const int64_t at = (t - t0) * MR;  // prefix t's P in P0 (and in keep_out)
              const float* P = P0 + at;
              int64_t ldp = R;
              if (pad) {
                for (int m = 0; m < M; ++m)
                  std::memcpy(padded.data() + (size_t)m * Rp, P + (size_t)m * R, sizeof(float) * R);
                P = padded.data();
                ldp = Rp;
              }
              compute_rows(t, P, ldp);
              if (keep_out) stream_floats(keep_out + at, P0 + at, MR);  // (P0's, not the padded copy)
            }
          };
          if (quad)
            with_k4(k4, [&](auto kc) {
              each_prefix([&](int64_t t, const float* P, int64_t ldp) {
                const P44Rows<4> vec{P, ldp};
                rows(t, [&](const float* St, float* dst) { store16(dst, row44<decltype(kc)::value>(vec, St, Rp, k4)); });
              });
            });
          else if (fast)
            each_prefix([&](int64_t t, const float* P, int64_t) {
              rows(t, [&](const float* St, float* dst) { last_stage16(D, Rp, P, St, arow.data(), brow.data(), dst); });
            });
          else
            each_prefix([&](int64_t t, const float* P, int64_t ldp) {
              rows(t, [&](const float* St, float* dst) { gemm_nt(M, qd, R, P, ldp, St, Rp, dst, qd, false); });
            });
        };
        if (bucketed) {
          // Thread th takes the i2 buckets whose lookups start in [cn th / nt, cn (th + 1) / nt). Per
          // bucket, with row44 on permuted P (flat, below): each lookup's prefix numbered; otherwise a
          // list per i1 (head[i1], then nxt; entries in reverse lookup order, found in one pass
          // without a branch on "first seen", which would be a coin flip through most of a bucket).
          // Either way the i1 in order of first sight (front); then per piece of kPiece of them their
          // P = G_1[i1] @ G_2[:, i2] (one GEMM) and each one's rows. (On Kaggle's largest table, 65,536
          // uniform lookups, 2 threads, Zen 2 VM: forward 0.91x of the plan's two-pass sort and runs,
          // 16 alternating rounds; sort phase 0.68 -> 0.33 ms, the lists 0.07 ms; 0.90x at 4,096.)
          const int64_t nb = (int64_t)middle_digit.size();
          const int64_t MR = (int64_t)M * R;
          const int th = omp_get_thread_num(), nt = omp_get_num_threads();
          auto first_bucket = [&](int u) {  // the first bucket starting at or after cn u / nt
            return (int64_t)(std::lower_bound(middle_start.begin(), middle_start.end() - 1, cn * u / nt) -
                             middle_start.begin());
          };
          const int64_t b0 = th == 0 ? 0 : first_bucket(th), b1 = th + 1 == nt ? nb : first_bucket(th + 1);
          // head[i1]: -1 between buckets (each bucket sets back what it used), kept by each pool thread
          // across calls, so no call fills p_1 entries
          static thread_local std::vector<int32_t> head;
          if ((int64_t)head.size() < s->p[0]) head.resize(s->p[0], -1);
          std::vector<int32_t> nxt, heads;
          std::vector<int64_t> front;
          std::vector<const float*> Ap;
          std::vector<float> Pl((size_t)kPiece * MR);
          // flat (row44 with q_1 <= 2 and R % 4 == 0, e.g. Kaggle's largest table): no lists. Each lookup
          // gets its prefix's number u (i1's in order of first sight in the bucket) in one pass, the chain
          // GEMMs run on the G_2 slice with permuted columns (permute44), so P is already in row44's
          // vectors, and the rows are computed in one loop over the bucket's lookups in sorted order
          // (grouped by piece of kPiece prefixes when there are more): no branch on a prefix's end, no
          // per-prefix repacking. (Kaggle's largest table, 65,536 uniform lookups, 2 threads, Zen 2 VM:
          // last-core part 1.05 -> 0.77 ms per thread, forward 0.92x over 12 alternating rounds; the
          // lists' walk had cost about as much as the FMAs, the repacking of each prefix in a pass of
          // its own 0.17-0.19 ms.)
          const bool flat = quad && R % 4 == 0 && s->q[0] <= 2;
          const bool last_in_l1 = (int64_t)ctx.last.digit.size() * st_bytes <= (48 << 10);
          const int64_t N2 = (int64_t)s->q[1] * R;  // P's row length (q_2 R_2)
          std::vector<float> S44(flat ? (size_t)s->r[1] * N2 : 0);
          std::vector<int32_t> prefix_of, order, group_start;
          // the rows of lookups eb[y], y = ord[i] (or i) for i in [i0, i1), whose prefixes' P are in
          // P0 (prefix u at (u - u0) MR): row44 straight from P; a repeat of the row before copies it
          auto flat_rows = [&](const float* P0, int64_t u0, const uint64_t* eb, const int32_t* ord, int64_t i0,
                               int64_t i1, bool grouped) {
            const int32_t* const uy = prefix_of.data();
            with_k4(k4, [&](auto kc) {
              constexpr int K4 = decltype(kc)::value;
              // (grouped: the rows come by prefix) with AVX-512, P's vectors stay in registers across a
              // prefix's rows instead of being read again for each
              constexpr bool kCanHold = kWidestNV > 1 && K4 > 0 && K4 <= 8;
              auto run = [&](auto rows_c, auto hold_c) {  // P44Rows<q_1>; P held (kCanHold and grouped)
                // (everything the loop reads in locals: the streamed stores may alias anything, so values
                // read through the captures were loaded again after each one)
                float* const out_rows = base;
                float* const lead = lead_row;
                const float* const slices = last_t;
                const int32_t* const slot = last_slot;
                const int64_t slice_floats = st_floats, p_floats = MR, ldp = N2, first = u0;
                // (the prefetch only where the slices in use overflow L1: on the CI gate's forward point, 80
                // slices of 512 bytes, it made the forward 1.04x as long, on Kaggle's largest table 0.97x)
                const int64_t slice_bytes = last_in_l1 ? 0 : st_bytes;
                const int last_b = lb;
                const bool streamed = stream_rows;
                const int32_t* const prefix = uy;
                const int32_t* const order_of = ord;
                const uint64_t* const entries = eb;
                uint64_t before = ~(uint64_t)0;
                int64_t lead_j = 0;
                if (i0 >= i1) return;
                // a row's entry and the addresses of its vectors are found one row ahead, and its last-core
                // slice is fetched into L1 then (unless they all fit there): the three dependent loads behind
                // the addresses issue before the row before's FMAs, not after them (which had left them in
                // the way of each row's start)
                auto at = [&](int64_t i, uint64_t* e, const float** St, const float** Pp) __attribute__((always_inline)) {
                  const int64_t y = order_of ? order_of[i] : i;
                  *e = entries[y];
                  *St = slices + slot[entry_last(*e, last_b)] * slice_floats;
                  *Pp = P0 + (prefix[y] - first) * p_floats;
                };
                constexpr bool kHold = decltype(hold_c)::value;
                v16 held[kHold ? K4 : 1] = {};  // (zeroed: GCC cannot see that the first row loads it)
                const float* held_p = nullptr;
                uint64_t e;
                const float *St, *Pp;
                at(i0, &e, &St, &Pp);
                for (int64_t i = i0; i < i1; ++i) {
                  uint64_t e_next;
                  const float *St_next, *Pp_next;
                  at(i + 1 < i1 ? i + 1 : i, &e_next, &St_next, &Pp_next);
                  for (int64_t bb = 0; bb < slice_bytes; bb += 64) _mm_prefetch((const char*)St_next + bb, _MM_HINT_T0);
                  const int64_t j = (int64_t)(e & (kMaxChunk - 1));
                  float* const row = out_rows + j * 16;
                  if ((e >> kJBits) == before) {  // the same row again
                    if (streamed) stream16(row, load16(lead));
                    else copy_floats(row, out_rows + lead_j * 16, 16);
                  } else {
                    before = e >> kJBits;
                    lead_j = j;
                    const P44Rows<decltype(rows_c)::value> vec{Pp, ldp};
                    v16 v;
                    if constexpr (kHold) {
                      if (Pp != held_p) {
                        held_p = Pp;
#pragma GCC unroll 8
                        for (int k = 0; k < K4; ++k) held[k] = vec(k);
                      }
                      v = row44<K4>(HeldRows{held}, St, Rp, k4);
                    } else {
                      v = row44<K4>(vec, St, Rp, k4);
                    }
                    if (streamed) {
                      stream16(row, v);
                      store16(lead, v);
                    } else {
                      store16(row, v);
                    }
                  }
                  e = e_next;
                  St = St_next;
                  Pp = Pp_next;
                }
              };
              using std::integral_constant;
              auto by_rows = [&](auto hold_c) {
                if (s->q[0] == 1) run(integral_constant<int, 1>{}, hold_c);
                else run(integral_constant<int, 2>{}, hold_c);
              };
              if (kCanHold && grouped) by_rows(integral_constant<bool, kCanHold>{});
              else by_rows(integral_constant<bool, false>{});
            });
          };
          const uint64_t fmask = ((uint64_t)1 << fb) - 1;
          const int fsh = kJBits + lb;
          int64_t found = 0;  // prefixes
          const bool profile = stats && rep == 0 && g_profile.load(std::memory_order_relaxed);
          double in_chains = 0, in_last = 0;
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t x0 = middle_start[b], bn = middle_start[b + 1] - x0;
            if (bn == 0) continue;
            front.resize(std::min<int64_t>(s->p[0], bn) + 1);
            int64_t nu = 0;
            if (flat) {
              prefix_of.resize(bn);
              {  // head[i1] = i1's u while in this bucket: u = nu when first seen (head -1), without a branch
                int32_t* const hd = head.data();
                int32_t* const uy = prefix_of.data();
                int64_t* const fr = front.data();
                const uint64_t* const eb = srt + x0;
                group_start.resize(front.size() + 1);
                // lookups per prefix, for the grouping below (set to 1 when first seen; counted here and
                // not in a pass of its own: the CI gate's forward point 0.96x)
                int32_t* const cnt = group_start.data() + 1;
                for (int64_t y = 0; y < bn; ++y) {
                  const int64_t i1 = (int64_t)((eb[y] >> fsh) & fmask);
                  const int32_t h = hd[i1];
                  const int32_t u = h + (((int32_t)nu - h) & (h >> 31));  // h < 0: nu, else h
                  hd[i1] = u;
                  uy[y] = u;
                  cnt[u] = (cnt[u] & ~(h >> 31)) + 1;
                  fr[nu] = i1;  // kept only when first seen (nu moves on)
                  nu += h < 0;
                }
              }
              found += nu;
              for (int64_t u = 0; u < nu; ++u) head[front[u]] = -1;
              int64_t ld;
              const float* S = tt_slice(s, cores[1], 1, middle_digit[b], &ld);
              permute44(S, ld, s->r[1], s->q[1], R, S44.data());
              const int64_t np = (nu + kPiece - 1) / kPiece;
              // With kGroupedRows or more lookups per prefix, the bucket's lookups are grouped by prefix, so
              // a prefix's rows come together (its P in L1, with AVX-512 in registers; see flat_rows); the
              // rows in lookup order had fetched a different P for almost every row. CI gate's forward
              // point (200,000 x 16, p = 50 x 50 x 80, 16,384 Zipf lookups, 7.2 per prefix, one thread),
              // Zen 4 VM, alternating rounds in one process: 0.96x grouped, 0.93x with P held; Kaggle's
              // largest table, 4,096 Zipf lookups 0.90x, 65,536 (3.4 per prefix) 0.99-1.00x, uniform
              // (2.0 per prefix: not grouped) unchanged; grouping from 2 per prefix made the uniform
              // forward 1.06x as long. Else, with more than one piece, they are grouped by piece.
              const bool by_prefix = bn >= kGroupedRows * nu;
              auto group = [&](int64_t nk, auto div_c) {  // counting sort (stable) on prefix / div: order
                constexpr int32_t div = decltype(div_c)::value;
                if constexpr (div != 1) {  // (by prefix: counted above)
                  group_start.assign(nk + 1, 0);
                  for (int64_t y = 0; y < bn; ++y) group_start[prefix_of[y] / div + 1]++;
                }
                group_start[0] = 0;
                for (int64_t k = 0; k < nk; ++k) group_start[k + 1] += group_start[k];
                order.resize(bn);
                for (int64_t y = 0; y < bn; ++y) order[group_start[prefix_of[y] / div]++] = (int32_t)y;
                for (int64_t k = nk; k > 0; --k) group_start[k] = group_start[k - 1];  // (back to starts)
                group_start[0] = 0;
              };
              if (by_prefix) group(nu, std::integral_constant<int32_t, 1>{});
              else if (np > 1) group(np, std::integral_constant<int32_t, (int32_t)kPiece>{});
              // where piece q's lookups start in order (a group's start: grouped by prefix, the piece's first)
              auto piece_begin = [&](int64_t q) { return group_start[by_prefix ? std::min(nu, q * kPiece) : q]; };
              for (int64_t q = 0; q < np; ++q) {
                const int64_t u0 = q * kPiece, u1 = std::min(nu, u0 + kPiece);
                const double g0 = profile ? omp_get_wtime() : 0;
                chain_rows(s, cores, front.data() + u0, 1, u1 - u0, Ap, S44.data(), N2, Pl.data());
                const double g1 = profile ? omp_get_wtime() : 0;
                if (np > 1 || by_prefix)
                  flat_rows(Pl.data(), u0, srt + x0, order.data(), piece_begin(q), piece_begin(q + 1), by_prefix);
                else
                  flat_rows(Pl.data(), u0, srt + x0, nullptr, 0, bn, false);
                if (profile) {
                  in_chains += g1 - g0;
                  in_last += omp_get_wtime() - g1;
                }
              }
              continue;
            }
            nxt.resize(bn);
            heads.resize(front.size());
            {
              int32_t* const hd = head.data();
              int32_t* const nx = nxt.data();
              int64_t* const fr = front.data();
              const uint64_t* const eb = srt + x0;
              for (int64_t y = 0; y < bn; ++y) {
                const int64_t i1 = (int64_t)((eb[y] >> fsh) & fmask);
                const int32_t h = hd[i1];
                nx[y] = h;
                hd[i1] = (int32_t)y;
                fr[nu] = i1;  // kept only when first seen (nu moves on)
                nu += h < 0;
              }
            }
            found += nu;
            for (int64_t u = 0; u < nu; ++u) {  // the lists' first entries, and the table clean again
              heads[u] = head[front[u]];
              head[front[u]] = -1;
            }
            int64_t ld;
            const float* S = tt_slice(s, cores[1], 1, middle_digit[b], &ld);
            for (int64_t u0 = 0; u0 < nu; u0 += kPiece) {
              const int64_t u1 = std::min(nu, u0 + kPiece);
              const double g0 = profile ? omp_get_wtime() : 0;
              chain_rows(s, cores, front.data() + u0, 1, u1 - u0, Ap, S, ld, Pl.data());
              const double g1 = profile ? omp_get_wtime() : 0;
              finish_piece(Pl.data(), u0, u1, nullptr, 0, heads.data(), nxt.data(), x0, nullptr);
              if (profile) {  // (the lists above lie in the phase, outside both of its parts)
                in_chains += g1 - g0;
                in_last += omp_get_wtime() - g1;
              }
            }
          }
          if (stats && rep == 0) {
#pragma omp atomic
            stats->unique_prefixes += found;
          }
          if (profile) {
#pragma omp critical(tt_forward_stats)
            {
              stats->seconds[3] += in_chains / omp_get_num_threads();
              stats->seconds[4] += in_last / omp_get_num_threads();
            }
          }
        } else if (d == 3) {
          std::vector<const float*> Ap;
          std::vector<float> Pl((size_t)kPiece * M * R);
          // this thread's seconds in the chains and the last core (with tt_set_profile(1) only)
          const bool profile = stats && rep == 0 && g_profile.load(std::memory_order_relaxed);
          double in_chains = 0, in_last = 0;
          int64_t pc0, pc1;  // this thread's buckets (see bucket_share)
          my_pieces(*pl, &pc0, &pc1);
          for (int64_t pc = pc0; pc < pc1; ++pc) {
            const int64_t ta = pl->pieces[pc], tb = pl->pieces[pc + 1];
            int64_t ld;
            const float* S = tt_slice(s, cores[1], 1, pl->digits[2 * ta + 1], &ld);
            // P in a cache-resident scratch; kept for the backward by streaming stores (written
            // past the cache: no read of the megabytes of plan it lands in), each prefix's right after
            // its rows (finish_piece's keep_out). Streamed as one burst after the piece's rows, its 10 MB
            // cost the forward 0.2 ms of 1.42 (Kaggle's largest table, 65,536 Zipf lookups, 2 threads,
            // Zen 4 VM: 1.22 without it); spread out so, the forward 0.94x and the fused step 0.977x and
            // 0.972x (alternating rounds). Spread further, a few lines after each tile of the next
            // piece's chain GEMM: 1.006x of this.
            float* const P = Pl.data();
            const double c0 = profile ? omp_get_wtime() : 0;
            piece_chain(s, cores, *pl, ta, tb, Ap, S, ld, P);
            const double c1 = profile ? omp_get_wtime() : 0;
            float* const kept = keep ? keep->Pa() + ta * (int64_t)M * R : nullptr;
            finish_piece(P, ta, tb, run_start, cn, nullptr, nullptr, 0, kept);
            if (profile) {
              in_chains += c1 - c0;
              in_last += omp_get_wtime() - c1;
            }
          }
          if (profile) {
#pragma omp critical(tt_forward_stats)
            {
              stats->seconds[3] += in_chains / omp_get_num_threads();
              stats->seconds[4] += in_last / omp_get_num_threads();
            }
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
            finish_piece(P, t, t + 1, run_start, cn, nullptr, nullptr, 0, nullptr);
          }
        }
        if (stream_rows || keep) _mm_sfence();  // this thread's streamed rows (and kept P) are out before the barrier
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
          const float w = weights ? weights[j] : 1.0f;
          const float* r = rbuf + (j - s0) * D;
          for (int c = 0; c < D; ++c) o[c] += w * r[c];
        }
      }
      if (stats && rep == 0) {
        stats->seconds[0] += t1 - t0;
        stats->seconds[5] += sort_seconds;
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
//   2. threads over fixed segments of whole buckets (bucket_segments), each thread those in its share
//      of the buckets (bucket_share: the same buckets as in the forward); per bucket piece: the
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
  static fvec acc1, acc3;
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
    // segments (bucket_segments): whole buckets, cut where the running cost crosses k / S of the total,
    // as the threads' shares are (bucket_share)
    const int64_t S = std::min(bucket_segments(cn), (int64_t)pl->buckets.size() - 1);
    seg.clear();
    for (int64_t k = 0; k <= S; ++k) seg.push_back(bucket_share(*pl, k, S));
    const int64_t nseg = (int64_t)seg.size() - 1;
    acc1.resize((size_t)nseg * n1 * w1);
    acc3.resize((size_t)nseg * n3 * w3);
    used1.assign((size_t)nseg * n1, 0);
    used3.assign((size_t)nseg * n3, 0);
    float* const g1 = grad_cores[1];
    const bool fast16 = D == 16 && with_row16_shape(qd, R2, [](auto, auto) {});
    const bool fused = up.optimizer != 0;  // (one chunk: the caller checks)
    const bool profile = stats && g_profile.load(std::memory_order_relaxed);
#pragma omp parallel num_threads(threads)
    {
      // (profile) this thread's seconds in the gather, the per-row products and the chain GEMMs
      double in_gather = 0, in_rows = 0, in_gemms = 0, mark = 0;
      auto clock_in = [&]() { if (profile) mark = omp_get_wtime(); };
      auto clock_out = [&](double& into) { if (profile) into += omp_get_wtime() - mark; };
      fvec Ap, BT((size_t)N * R1), dPb((size_t)kPiece * MR2),
          dP1((size_t)kPiece * w1), g(D), dg2(fused ? (size_t)R1 * N : 0);
      // a segment's gathered gradient rows (up to megabytes): kept by each pool thread across calls,
      // so it is not mapped and faulted in afresh every backward
      static thread_local fvec gs;
      // this thread's segments: those starting in its buckets (see bucket_share; its cut is one of
      // the segments' when the thread count divides their number)
      const int64_t b0 = bucket_share(*pl, omp_get_thread_num(), omp_get_num_threads()),
                    b1 = bucket_share(*pl, omp_get_thread_num() + 1, omp_get_num_threads());
      for (int64_t sg = 0; sg < nseg; ++sg) {
        if (seg[sg] < b0 || seg[sg] >= b1) continue;
        float* const a1 = acc1.data() + (size_t)sg * n1 * w1;
        float* const a3 = acc3.data() + (size_t)sg * n3 * w3;
        uint8_t* const u1 = used1.data() + (size_t)sg * n1;
        uint8_t* const u3 = used3.data() + (size_t)sg * n3;
        // (fast16) the segment's upstream gradient rows, weighted, in sorted order: one tight loop
        // of random reads (many in flight) instead of one read per step of the row loop
        const int64_t xs = runs[pl->buckets[seg[sg]]], xe = runs[pl->buckets[seg[sg + 1]]];
        if (fast16) {
          clock_in();
          gs.resize((size_t)(xe - xs) * 16);
          for (int64_t y = xs; y < xe; ++y) {
            prefetch_ahead(y, cn, s0, sorted.data(), bag_of, lookup_w, grad_out, D);
            const int64_t j = s0 + (int64_t)(sorted[y] & (kMaxChunk - 1));
            store16(gs.data() + (y - xs) * 16, bag_of ? splat16(lookup_w[j]) * load16(grad_out + (int64_t)bag_of[j] * D)
                                                      : load16(grad_out + j * D));
          }
          clock_out(in_gather);
        }
        for (int64_t b = seg[sg]; b < seg[sg + 1]; ++b) {
          const int64_t tb0 = pl->buckets[b], tb1 = pl->buckets[b + 1], i2 = digits[2 * tb0 + 1];
          int64_t ld;
          const float* S2 = tt_slice(s, cores[1], 1, i2, &ld);
          if (touched) touched[1][i2] = 1;
          // dG_2[:, i2]: into the gradient scratch; or with SGD, -lr dG_2 added straight into G_2[:, i2]
          // (the stacked G_1 rows below scaled by -lr; no other bucket reads that slice, and this one's
          // dP_1 uses its copy BT); or with Adagrad, into a bucket-local tile applied to G_2[:, i2] once
          // the bucket is done (it needs the whole gradient). Without the tile, its zeroing and the
          // update pass, the bucket phase took 0.89x as long at 512 lookups, 0.88x at 2,048 and
          // 0.99x at 65,536 (Kaggle's largest table, R = 32; Zen 4 VM, alternating rounds).
          const bool sgd = up.optimizer == 1;
          const bool tile = fused && !sgd;
          // (SGD, a bucket of at most kFewPrefixes prefixes: dP_1 and the update in one pass over the
          // slice, see slice_sgd_dp1; no transposed copy)
          const bool few = sgd && tb1 - tb0 <= kFewPrefixes && R1 % 16 == 0 && N % 16 == 0 && N <= 64;
          if (!few) transpose_to(S2, ld, R1, N, BT.data());  // G_2[:, i2]^T (q2 R2 x R1)
          float* const dg2_out = sgd ? up.cores[1] + i2 * N : tile ? dg2.data() : g1 + i2 * N;
          const int64_t dg2_ld = tile ? N : p1 * N;
          if (tile) std::fill(dg2.begin(), dg2.end(), 0.f);
          for (int64_t ta = tb0; ta < tb1; ta += kPiece) {
            const int64_t tb = std::min(tb1, ta + kPiece), np = tb - ta;
            clock_in();
            if (fast16) {  // D = 16, R_2 in {8, 16, 32, 64}: see piece_grads16 (it writes all of dP)
              const float* const gsp = gs.data();
              const int32_t* const slot = ctx.last.slot.data();
              const float* const last_t = ctx.last_t.data();
              with_row16_shape(qd, R2, [&](auto QD, auto Rc) {
                // a row's c3 accumulator (W3 floats) and last-core slice (ST floats, see Ctx::last_slice) by
                // compile-time strides: with q_d, R_2 and Rp read at run time, the address arithmetic and the
                // prefetch loops of unknown length took about a fifth of the row loop's time (a
                // microbenchmark of this loop on 64-byte-aligned arrays: 38 -> 31 ns per distinct row)
                constexpr int64_t W3 = QD.value * Rc.value, ST = QD.value * (Rc.value < 16 ? 16 : Rc.value);
                auto gather = [&](int64_t y) __attribute__((always_inline)) { return load16(gsp + (y - xs) * 16); };
                auto slice = [&](uint64_t e, const float** S) __attribute__((always_inline)) {
                  const int32_t v = slot[entry_last(e, lb)];
                  float* c3 = a3 + (size_t)v * W3;
                  if (!u3[v]) { std::fill(c3, c3 + W3, 0.f); u3[v] = 1; }
                  *S = last_t + (size_t)v * ST;
                  return c3;
                };
                // the next row's last-core slice and c3 accumulator into L1 (both are random reads in L2)
                auto ahead = [&](int64_t y) __attribute__((always_inline)) {
                  if (y >= xe) return;
                  const int32_t v = slot[entry_last(sorted[y], lb)];
                  const char* sn = (const char*)(last_t + (size_t)v * ST);
                  const char* cn3 = (const char*)(a3 + (size_t)v * W3);
#pragma GCC unroll 16
                  for (int64_t bb = 0; bb < 4 * W3; bb += 64) { _mm_prefetch(sn + bb, _MM_HINT_T0); _mm_prefetch(cn3 + bb, _MM_HINT_T0); }
#pragma GCC unroll 16
                  for (int64_t bb = 4 * W3; bb < 4 * ST; bb += 64) _mm_prefetch(sn + bb, _MM_HINT_T0);  // (R_2 = 8)
                };
                piece_grads16<QD.value, Rc.value>(ta, tb, U, runs.data(), sorted.data(), gather, slice, ahead,
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
            clock_out(in_rows);
            // stacked G_1 rows of the piece (np q1 x R1); dP viewed as (np q1 x q2 R2)
            Ap.resize((size_t)np * w1);
            for (int64_t t = ta; t < tb; ++t) {
              float* const dst = Ap.data() + (t - ta) * w1;
              const float* const src = cores[0] + digits[2 * t] * w1;
              if (sgd) scale_floats(dst, src, -up.lr, w1);
              else copy_floats(dst, src, w1);
            }
            clock_in();
            if (few) {  // (dg2_out: G_2's slice itself, rows dg2_ld apart)
              auto pass = [&](auto nv) {
                slice_sgd_dp1<decltype(nv)::value>((int)(np * q1), R1, Ap.data(), dPb.data(), dg2_out, dg2_ld, dP1.data());
              };
              using std::integral_constant;
              if (N == 16) pass(integral_constant<int, 1>{});
              else if (N == 32) pass(integral_constant<int, 2>{});
              else if (N == 48) pass(integral_constant<int, 3>{});
              else pass(integral_constant<int, 4>{});
            } else {
              gemm_tn_acc((int)(np * q1), N, R1, Ap.data(), R1, dPb.data(), N, dg2_out, dg2_ld);
              gemm_nn((int)(np * q1), R1, N, dPb.data(), N, BT.data(), R1, dP1.data(), R1);
            }
            clock_out(in_gemms);
            for (int64_t t = ta; t < tb; ++t) {
              const int32_t v = first.slot[digits[2 * t]];
              float* c1 = a1 + (size_t)v * w1;
              const float* src = dP1.data() + (t - ta) * w1;
              if (!u1[v]) { copy_floats(c1, src, w1); u1[v] = 1; }
              else add_floats(c1, src, w1);
            }
          }
          if (tile)
            for (int r = 0; r < R1; ++r) up.row(1, ((int64_t)r * p1 + i2) * N, dg2.data() + (size_t)r * N, N);
        }
      }
      if (profile) {
#pragma omp critical(tt_backward_stats)
        {
          stats->seconds[8] += in_gather / omp_get_num_threads();
          stats->seconds[9] += in_rows / omp_get_num_threads();
          stats->seconds[10] += in_gemms / omp_get_num_threads();
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
        int r = 0;
        // q_d = 4: four rows at a time, transposed in registers, each written to row whole. Written a float at
        // a time, row was read back as one 16-byte load, which cannot take its value from four pending
        // stores and waited for them (fused SGD step, Kaggle's largest table, Zen 2 VM, alternating rounds:
        // this phase 0.065 -> 0.034 ms and the step 0.970x at 512 lookups, 0.944x at 2,048, 0.990x at 8,192,
        // 1.003x at 65,536; the CI gate's training point 0.982x)
        if (fused && qd == 4)
          for (; r + 4 <= R2; r += 4) {
            __m128 a0 = _mm_loadu_ps(sum.data() + r), a1 = _mm_loadu_ps(sum.data() + R2 + r),
                   a2 = _mm_loadu_ps(sum.data() + 2 * R2 + r), a3 = _mm_loadu_ps(sum.data() + 3 * R2 + r);
            _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
            const __m128 rows4[4] = {a0, a1, a2, a3};
            for (int k = 0; k < 4; ++k) {
              _mm_storeu_ps(row.data(), rows4[k]);
              up.row(2, ((int64_t)(r + k) * pd + i) * qd, row.data(), qd);
            }
          }
        for (; r < R2; ++r) {
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

// The round trip of a cache line between two threads of this process, in ns (the mean over the
// trips made): one thread writes, the other answers with a write, and so on. On a VM it follows
// where the hypervisor has placed the two vCPUs (Zen 4 VM: 50-70 ns near, 300-1,400 ns far apart),
// and so do the kernel's sort and barriers and nn.EmbeddingBag's step: benches.cpu_kernel tags
// its interleaved rounds with it. At most max_trips trips and about budget_s seconds (the clock is
// read every 32 trips: two threads sharing one CPU pass the line once per time slice); -1 when
// OpenMP grants one thread.
double tt_thread_round_trip_ns(int64_t max_trips, double budget_s) {
  struct alignas(64) Line {
    std::atomic<int64_t> v{0};
  };
  Line ball, stop;  // one cache line each
  double ns = -1;
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 2) {
      if (omp_get_thread_num() == 0) {
        const double t0 = omp_get_wtime();
        int64_t trips = 0;
        while (trips < max_trips) {
          ball.v.store(2 * trips + 1, std::memory_order_release);
          while (ball.v.load(std::memory_order_acquire) != 2 * trips + 2) {
          }
          if (++trips % 32 == 0 && omp_get_wtime() - t0 > budget_s) break;
        }
        ns = trips ? (omp_get_wtime() - t0) * 1e9 / (double)trips : -1;
        stop.v.store(1, std::memory_order_release);
      } else {
        int64_t next = 1;
        while (!stop.v.load(std::memory_order_acquire)) {
          if (ball.v.load(std::memory_order_acquire) == next) {
            ball.v.store(next + 1, std::memory_order_release);
            next += 2;
          }
        }
      }
    }
  }
  return ns;
}

// The cores' peak rate of fused multiply-adds, the ceiling under any GEMM (the sgemm's rate is not
// one: the chain GEMMs have run at 102% of it): each of `threads` threads (in one parallel region, so
// the cores run together, as the sgemm's) updates kFmaChains independent accumulators of the kernel's
// own 16-float vector, a = a x + y, in registers, with no memory traffic, for max_iters iterations or
// about budget_s seconds. kFmaChains covers the FMA latency times the FMAs in flight per cycle within
// the registers: 12 zmm with AVX-512 (Zen 4 needs 4 x 2 ymm halves, Skylake-SP and later Xeons 4 x 2
// zmm), 6 pairs of ymm with AVX2 (Zen 2 needs 5 x 2 ymm, Haswell 5 x 2, Skylake client 4 x 2). Returns
// the sum of the threads' rates in GFLOP/s, each over its own time (2 FLOPs per lane and FMA; callers
// time the call: benches.environment.fma_peak); *flops = the FLOPs done, *checksum = the sum of every
// accumulator's lanes at the end (each starts at its chain number k: with x = y = 1 and n <= 2^24 -
// kFmaChains + 1 iterations, exactly threads x 16 x sum over k of (k + n)); -1 when OpenMP grants fewer
// threads, or for threads < 1 (then *flops = *checksum = 0).
#ifdef __AVX512F__
constexpr int kFmaChains = 12;
#else
constexpr int kFmaChains = 6;
#endif
double tt_fma_peak_gflops(int threads, int64_t max_iters, double budget_s, float x, float y, double* flops,
                          double* checksum) {
  if (threads < 1) {
    *flops = *checksum = 0;
    return -1;
  }
  double rate = 0, done = 0, sum = 0;
  bool short_of_threads = false;
#pragma omp parallel num_threads(threads) reduction(+ : rate, done, sum)
  {
    if (omp_get_num_threads() != threads) {
#pragma omp atomic write
      short_of_threads = true;
    }
    v16 a[kFmaChains];
    for (int k = 0; k < kFmaChains; ++k) a[k] = splat16((float)k);
    const v16 vx = splat16(x), vy = splat16(y);
    const double t0 = omp_get_wtime();
    int64_t it = 0;
    double t = 0;
    while (it < max_iters) {
      const int64_t block = std::min<int64_t>(4096, max_iters - it);
      for (int64_t i = 0; i < block; ++i) {
#pragma GCC unroll 12
        for (int k = 0; k < kFmaChains; ++k) a[k] = fma16(a[k], vx, vy);
      }
      it += block;
      t = omp_get_wtime() - t0;
      if (t > budget_s) break;
    }
    float lanes[16];
    for (int k = 0; k < kFmaChains; ++k) {
      store16(lanes, a[k]);
      for (float v : lanes) sum += v;
    }
    const double f = 2.0 * 16 * kFmaChains * (double)it;
    done += f;
    rate += t > 0 ? f / t / 1e9 : 0;
  }
  *flops = done;
  *checksum = sum;
  return short_of_threads ? -1 : rate;
}

int tt_abi_version(void) { return 10; }

// Whether forwards time their chain GEMMs and last core per thread (stats seconds[3], [4]), and d = 3
// backwards the parts of their i2 buckets (seconds[8] to [10]): a clock read per GEMM piece and part,
// about 3% of the chains-and-last-core phase of a 16,384-lookup forward on one thread of an Intel Xeon
// VM, so off unless a profile is asked for (benches.cpu_kernel).
void tt_set_profile(int on) { g_profile.store(on != 0, std::memory_order_relaxed); }

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
