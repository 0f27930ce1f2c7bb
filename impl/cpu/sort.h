// Sorting a chunk's lookups by prefix: the sort keys, the two radix-sort ways and their tuner, the runs of equal prefixes.
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

#include "../include/tt_row.h"

namespace {

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

// 1/d rounded up by an ulp: for integers 0 <= x < 2^40 and 1 <= d <= 2^40, floor(x * up_inverse(d))
// is floor(x / d) exactly. With x = k d + r (0 <= r < d): x * inv >= x / d >= k, and rounding keeps
// it >= k; x * inv <= (x / d)(1 + 2^-51) <= k + 1 - 1/d + (k + 1) 2^-51, which, as (k + 1) d <= x + d
// < 2^41, stays below k + 1 by far more than the half ulp rounding may add. (Checked on 82 million
// dividends at k d - 1, k d, k d + 1 and k d + d - 1 for divisors up to 2^40.)
inline double up_inverse(int64_t d) { return std::nextafter(1.0 / (double)d, 2.0); }

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
// value is an integer below 2^40 (keys have at most 40 bits, checked in Python), so doubles hold
// them, and every product and sum below, exactly; int64 <-> double by the 2^52 bias (AVX2 has no
// such conversion). Each quotient is floor(x * up_inverse(d)), exact without a correction (see
// up_inverse): 21 instructions per 4 lookups in the loop where the corrected form took 38 (0.73 ns per
// lookup against 1.9 on the Zen 2 VM; forward 0.993x). Returns the first lookup not done.
typedef double v4d __attribute__((vector_size(32), aligned(8)));
typedef int64_t v4q __attribute__((vector_size(32), aligned(8)));
typedef uint64_t v4u __attribute__((vector_size(32), aligned(8)));
inline v4d exact_double(v4q x) { return (v4d)(x | 0x4330000000000000) - 4503599627370496.0; }
inline v4q exact_int(v4d x) { return (v4q)(x + 4503599627370496.0) ^ 0x4330000000000000; }
inline v4d floor4(v4d x) { return (v4d)_mm256_floor_pd((__m256d)x); }
int64_t sort_keys4(const int64_t* idx, int64_t lo, int64_t hi, int64_t pd, int64_t plast, int64_t pfront, int lb,
                   uint64_t* A) {
  const double dpd = (double)pd, dplast = (double)plast, dpfront = (double)pfront, scale = (double)((int64_t)1 << lb);
  const double inv_pd = up_inverse(pd), inv_plast = up_inverse(plast);
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    const v4d x = exact_double(*reinterpret_cast<const v4q*>(idx + j));
    const v4d pre = floor4(x * inv_pd), front = floor4(pre * inv_plast);
    const v4d key = ((pre - front * dplast) * dpfront + front) * scale + (x - pre * dpd);
    *reinterpret_cast<v4u*>(A + j) = (v4u)exact_int(key) << kJBits | (v4u)(v4q{0, 1, 2, 3} + j);  // unsigned: keys reach bit 63
  }
  return j;
}
#endif

#ifdef __AVX512DQ__
// The same with AVX-512, 8 at a time, all in doubles too (every value is below 2^52, so exact):
// one int64 -> double conversion in and one out; each quotient is floor(x * up_inverse(d)), exact
// without a correction as in the AVX2 loop. The int64 form of this loop (vpmullq, conversions per
// digit) took 5.4-5.6 ns per lookup on an Intel Xeon VM, the corrected double form 1.2. The maskz
// forms of the intrinsics: GCC 12's plain ones trip -Wmaybe-uninitialized.
typedef int64_t v8q __attribute__((vector_size(64), aligned(8)));
typedef uint64_t v8u __attribute__((vector_size(64), aligned(8)));
inline __m512d floor_div8(__m512d x, __m512d inv) {
  return _mm512_maskz_roundscale_pd(0xff, _mm512_mul_pd(x, inv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
int64_t sort_keys8(const int64_t* idx, int64_t lo, int64_t hi, int64_t pd, int64_t plast, int64_t pfront, int lb,
                   uint64_t* A) {
  const __m512d vpd = _mm512_set1_pd((double)pd), vplast = _mm512_set1_pd((double)plast);
  const __m512d vpfront = _mm512_set1_pd((double)pfront), vlb = _mm512_set1_pd((double)((int64_t)1 << lb));
  const __m512d inv_pd = _mm512_set1_pd(up_inverse(pd)), inv_plast = _mm512_set1_pd(up_inverse(plast));
  const v8q lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  int64_t j = lo;
  for (; j + 8 <= hi; j += 8) {
    const __m512d x = _mm512_maskz_cvtepi64_pd(0xff, _mm512_loadu_si512(idx + j));
    const __m512d pre = floor_div8(x, inv_pd), front = floor_div8(pre, inv_plast);
    const __m512d mid = _mm512_fnmadd_pd(front, vplast, pre);  // i_{d-1}
    const __m512d key = _mm512_fmadd_pd(_mm512_fmadd_pd(mid, vpfront, front), vlb, _mm512_fnmadd_pd(pre, vpd, x));
    const v8u e = (v8u)_mm512_maskz_cvtpd_epi64(0xff, key) << kJBits;  // unsigned: keys reach bit 63
    *reinterpret_cast<v8u*>(A + j) = e | (v8u)(lanes + j);
  }
  return j;
}
#endif

// Entries [lo, hi) of src to dst by their digit (e >> shift) & mask, digit v's from dst + off[v] on,
// through a pointer per digit (ptr: mask + 1 of them, scratch): the store address then depends on one
// load, not a load and an add through memory (Zen 2 VM, 8-bit digits: 0.94 ns per entry in L1 where
// dst[off[v]++] took 2.3; 65,536 entries, 1.7 against 2.1; in the kernel, where the scatter waits on
// memory: forward 1.001x, fused SGD step 0.994x). off is left as it was.
inline void scatter_by_digit(const uint64_t* src, int64_t lo, int64_t hi, uint64_t* dst, const int64_t* off, int shift,
                             uint64_t mask, uint64_t** ptr) {
  for (uint64_t v = 0; v <= mask; ++v) ptr[v] = dst + off[v];
  for (int64_t x = lo; x < hi; ++x) {
    const uint64_t e = src[x];
    *ptr[(e >> shift) & mask]++ = e;
  }
}

// One stable counting pass: entries [lo, hi) of src to dst[lo, hi) in the order of their digit
// (e >> shift) & mask (count and ptr: mask + 1 of each, scratch).
inline void counting_pass(const uint64_t* src, int64_t lo, int64_t hi, uint64_t* dst, int shift, uint64_t mask,
                          int64_t* count, uint64_t** ptr) {
  std::fill(count, count + mask + 1, 0);
  for (int64_t x = lo; x < hi; ++x) count[(src[x] >> shift) & mask]++;
  int64_t sum = lo;
  for (uint64_t v = 0; v <= mask; ++v) {
    const int64_t c = count[v];
    count[v] = sum;
    sum += c;
  }
  scatter_by_digit(src, lo, hi, dst, count, shift, mask, ptr);
}

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
// Widths up to kOnePass bits are not timed but sorted kShared: one pass over at most 256 buckets,
// where kSplit moves the data twice (on the Zen 2 VM a forced kSplit made the plan-less forward at
// 65,536 lookups, 8 bits of i_2, take 3.43 and 3.56 ms against kShared's 3.01 and 3.36 in the
// same minutes, and timing had picked it in one process of two).
struct SortTuner {
  static constexpr int kTrials = 4;
  static constexpr int kOnePass = 8;
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
      choice[w] = w <= kOnePass ? kShared : -1;
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

// Bits of the sort key (<= 40: checked in Python before the call). Packed (SortKey kMiddle): the
// front digits i_1..i_{d-2} and i_{d-1} each in a bit field of its own (at most 2 bits more).
int key_bits(const tt_shape_t* s, bool packed = false) {
  int64_t front = 1;
  for (int k = 0; k < s->d - 2; ++k) front *= s->p[k];
  const int64_t plast = s->p[s->d - 2], pd = s->p[s->d - 1];
  return (packed ? last_bits(front) + last_bits(plast) : last_bits(front * plast)) + last_bits(pd);
}
int sort_threads(int64_t n, int threads) {  // slices of at least 4,096 lookups
  return (int)std::max<int64_t>(1, std::min<int64_t>(threads, n / 4096 + 1));
}

void sort_with(SortWay way, const tt_shape_t* s, const int64_t* idx, int64_t n, std::vector<uint64_t>& a,
               std::vector<uint64_t>& tmp, std::vector<uint8_t>& marks, int threads, int low, bool packed,
               bool then_low = false, bool mark_last = true) {
  const int d = s->d;
  const int64_t pd = s->p[d - 1], plast = s->p[d - 2];
  int64_t pfront = 1;
  for (int k = 0; k < d - 2; ++k) pfront *= s->p[k];
  if (packed) pfront = (int64_t)1 << last_bits(pfront);  // i_{d-1} a bit field above the front digits'
  const int lb = last_bits(pd);
  a.resize(n);
  tmp.resize(n);
  uint64_t* const A = a.data();
  uint64_t* const B = tmp.data();
  const FastDiv by_pd(pd), by_plast(plast);
  const int bits = key_bits(s, packed) - low;  // the key bits sorted on, above the low ones
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
  std::vector<uint64_t*> digit_ptr((size_t)T * nbk);  // scatter_by_digit's, per thread
  int64_t* const cnt = count.data();
  // row t: the last digits in thread t's slice (see Ctx::prepare_last); without mark_last one row, all set
  if (mark_last) marks.assign((size_t)T * pd, 0);
  else marks.assign(pd, 1);
  const uint64_t last_mask = ((uint64_t)1 << lb) - 1;
  int scatters = 0;  // how many times the entries moved (odd: they end in tmp)
  // then_low (one kShared pass on the top field): each top-digit bucket then sorted on the low bits in place
  // (see SortKey kTwoLevel); the buckets' starts from the pass's offsets
  const bool local = then_low && way == kShared && passes == 1 && low > 0;
  std::vector<int64_t> bstart(local ? nbk + 1 : 0);
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
    uint8_t* const m = mark_last ? marks.data() + (size_t)t * pd : nullptr;
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
      if (m)
        for (int64_t x = b0; x < b1; ++x) {
          c[(A[x] >> first_shift) & mask]++;
          m[(A[x] >> kJBits) & last_mask] = 1;
        }
      else
        for (int64_t x = b0; x < b1; ++x) c[(A[x] >> first_shift) & mask]++;
    }
    uint64_t* bufs[2] = {A, B};
    uint64_t** const dp = digit_ptr.data() + (size_t)t * nbk;
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
          for (int64_t bucket = 0; bucket < nbk; ++bucket) {
            if (local) bstart[bucket] = sum;
            for (int u = 0; u < nt; ++u) {
              const int64_t v = cnt[(size_t)u * nbk + bucket];
              cnt[(size_t)u * nbk + bucket] = sum;
              sum += v;
            }
          }
          if (local) bstart[nbk] = n;
        }  // implicit barrier
        scatter_by_digit(src, lo, hi, dst, c, shift, mask, dp);
        cur ^= 1;
        if (pass + 1 < passes) {  // the next pass reads all of dst (the region's end waits for the last)
#pragma omp barrier
        }
      }
      if (t == 0) scatters = passes;
      if (local) {  // the pass's result is in bufs[1]; each thread its buckets (by start, balanced by count)
#pragma omp barrier
        const int64_t* const bs = bstart.data();
        const int64_t k0 = std::lower_bound(bs, bs + nbk, lo) - bs, k1 = std::lower_bound(bs, bs + nbk, hi) - bs;
        const int lpasses = (low + 7) / 8, lwidth = (low + lpasses - 1) / lpasses;
        const uint64_t lmask = ((uint64_t)1 << lwidth) - 1;
        int64_t lc[256];
        uint64_t* lp_ptr[256];
        for (int64_t k = t == 0 ? 0 : k0; k < (t + 1 == nt ? nbk : k1); ++k) {
          const int64_t b0 = bs[k], b1 = bs[k + 1], m = b1 - b0;
          uint64_t* x = bufs[1] + b0;
          uint64_t* y = bufs[0] + b0;
          if (m < 2) continue;
          if (m <= 32) {  // insertion sort on the key (stable: an entry passes only greater keys)
            for (int64_t i = 1; i < m; ++i) {
              const uint64_t v = x[i], kv = v >> kJBits;
              int64_t j = i;
              for (; j > 0 && (x[j - 1] >> kJBits) > kv; --j) x[j] = x[j - 1];
              x[j] = v;
            }
            continue;
          }
          for (int lp = 0; lp < lpasses; ++lp) {  // LSD passes, x -> y, then swapped
            counting_pass(x, 0, m, y, kJBits + lp * lwidth, lmask, lc, lp_ptr);
            std::swap(x, y);
          }
          if (lpasses % 2 == 1) std::memcpy(bufs[1] + b0, x, sizeof(uint64_t) * m);
        }
      }
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
        counting_pass(src, p0, p1, dst, shift, mask, c, dp);
        cur ^= 1;
      }
    }
  }
  if (scatters % 2 == 1) a.swap(tmp);  // an odd number of scatters ended in tmp
}

// What a chunk's lookups are sorted on. kWholeKey: the whole key (a backward's plan: the
// gradients of a row's repeats are summed as one run). kPrefix: the prefix bits only (the key
// without i_d): equal prefixes still form runs, in lookup order, but equal rows need not be
// adjacent - enough for a forward that keeps no plan (a repeat not next to its first copy is
// computed again, to the same bits); on Kaggle's largest table 16 bits instead of 24. kMiddle
// (d >= 3): i_{d-1} alone, in a packed key (key_bits): e >> (kJBits + lb + fb) is i_{d-1} and
// (e >> (kJBits + lb)) & (2^fb - 1) the front digits, fb = last_bits(p_1 ... p_{d-2}); each i_{d-1}
// bucket in lookup order, its prefixes found afterwards (the d = 3 forward without a plan): on
// Kaggle's largest table one pass of 8 bits instead of two. kTwoLevel (d >= 3, a plan's sort, see
// plan_chunk): kMiddle's pass, always kShared, then each i_{d-1} bucket sorted on the rest of the packed key
// by its owner thread while the bucket is in cache (insertion sort up to 32 entries, else LSD passes of up
// to 8 bits between the two buffers): kWholeKey's order, in packed keys.
enum SortKey { kWholeKey, kPrefix, kMiddle, kTwoLevel };
// Sorted entries of a chunk (see above) in a, tmp as scratch: by the way SortTuner picks.
// mark_last false: marks left as one row with every last digit set, none recorded (see tt_forward).
void sort_lookups(const tt_shape_t* s, const int64_t* idx, int64_t n, std::vector<uint64_t>& a,
                  std::vector<uint64_t>& tmp, std::vector<uint8_t>& marks, int threads, SortKey on = kWholeKey,
                  bool mark_last = true) {
  const bool packed = on == kMiddle || on == kTwoLevel;
  const int lb = last_bits(s->p[s->d - 1]);
  // (at least one bit sorted: a shape whose prefix takes no bits sorts on i_d's)
  const int kb = key_bits(s, packed);
  const int low = std::max(0, on == kPrefix   ? std::min(lb, kb - 1)
                              : packed ? std::min(kb - 1, kb - last_bits(s->p[s->d - 2]))
                                              : 0);
  const int bits = kb - low;
  SortWay first = kShared;
  // (kTwoLevel: always kShared, its one pass on the top field being what the buckets' local sorts need)
  const int way = on == kTwoLevel ? kShared : g_sort_tuner.pick(bits, n, sort_threads(n, threads), &first);
  if (way >= 0) {
    sort_with((SortWay)way, s, idx, n, a, tmp, marks, threads, low, packed, on == kTwoLevel, mark_last);
  } else {  // timing: both ways on this input (same result), the second left in a
    const bool valid = a.capacity() >= (size_t)n && tmp.capacity() >= (size_t)n;  // no fresh pages
    double per_lookup[2];
    for (SortWay w : {first, (SortWay)(1 - first)}) {
      const double t0 = omp_get_wtime();
      sort_with(w, s, idx, n, a, tmp, marks, threads, low, packed, on == kTwoLevel, mark_last);
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

}  // namespace
