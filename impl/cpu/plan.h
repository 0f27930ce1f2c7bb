// Per-call context (used last-core slices), bag helpers, and the d = 3 plan: prefixes in i2 buckets cut into GEMM pieces.
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

#include "gemm.h"
#include "sort.h"

namespace {

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
  fvec last_t;                // their slices of G_d transposed to (q_d, Rp), zero-padded: dot-friendly
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
// (In blocks of 256 offsets without a branch per offset, which the compiler vectorizes: at 65,536
// bags the scalar loop with its early exit took 0.04 ms of a 2.9 ms forward.)
inline bool one_unweighted_lookup_per_bag(const int64_t* offsets, int64_t n_bags, const float* weights) {
  if (weights || offsets[n_bags] != n_bags) return false;
  for (int64_t b0 = 0; b0 <= n_bags; b0 += 256) {
    const int64_t b1 = std::min(n_bags + 1, b0 + 256);
    int64_t diff = 0;
    for (int64_t b = b0; b < b1; ++b) diff |= offsets[b] ^ b;
    if (diff) return false;
  }
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
  fvec P;                        // partial products, M x R per prefix (see Pa)
  bool has_P = false;
  double sort_seconds = 0;  // plan_chunk's radix sort (the forward's phase timers)
  // (kept by a forward for its backward, with P) the forward's used last digits and their
  // transposed slices (Ctx::prepare_last), and whether every bag held one unweighted lookup
  UsedDigits last;
  fvec last_t;
  bool one_per_bag = false;
  void resize_P(size_t n) { P.resize(n); }
  float* Pa() { return P.data(); }  // on a 64-byte boundary (fvec): the forward streams P here (stream_floats)
};
// The plan-less forward (tt_forward_impl, bucketed) keeps a table of p_1 list heads per thread: up to
// this many front digits (256 KB)
constexpr int64_t kMaxFront = (int64_t)1 << 16;
constexpr int64_t kGroupedRows = 3;  // lookups per prefix from which a bucket is grouped by prefix (see by_prefix)
constexpr int64_t kPiece = 192;  // prefixes per GEMM piece (bounds per-thread scratch; 192: forward 0.96x of 96 on an Intel Xeon VM)
// Chunks of fewer lookups than this take one segment: they run on one thread (MIN_LOOKUPS_PER_THREAD
// in ops.py, the same number; a test checks).
constexpr int64_t kSmallBackward = 2048;
// The segments of the backward's bucket phase: fixed pieces of its dG_1 and dG_3 sums, each summed by
// one thread in order, so the results do not depend on the thread count: their number depends on the
// chunk alone. One below kSmallBackward lookups, then 2, from 16,384 lookups 4 and from 32,768 8,
// cut at equal shares of the cost, so the threads' shares (bucket_share) fall on segment cuts for 2, 4
// and 8 threads. Each segment more is one more set of accumulators to zero and to sum: against the
// ten segments of before (Zen 4 VM, Kaggle's largest table, fused SGD step, alternating rounds) two
// took 0.973x at 2,048 lookups, 0.961x at 8,192 with the vCPUs near and 0.891x far, and eight 1.005x
// at 65,536; at 2,048 lookups on one thread one segment took 0.80x of ten (first-core phase 0.58x).
// (With more than 2 threads below 16,384 lookups the bucket phase runs on two of them.)
inline int64_t bucket_segments(int64_t cn) {
  return cn < kSmallBackward ? 1 : cn < 16384 ? 2 : cn < 32768 ? 4 : 8;
}
// The whole-key sort of a plan in two levels from this many lookups (entries and scratch 512 KB). Kaggle's
// largest table, fused SGD step, Zen 2 VM, alternating rounds: 0.986x at 65,536 lookups (sort 0.67 -> 0.56
// ms), 0.991x at 32,768, 1.005x at 16,384; the CI gate's training point (16,384 lookups, 1 thread) 1.033x.
constexpr int64_t kTwoLevelFrom = 32768;
constexpr int64_t kFewPrefixes = 8;  // an SGD bucket of at most this many prefixes: slice_sgd_dp1

bool same_shape(const tt_shape_t& a, const tt_shape_t& b) {
  if (a.d != b.d) return false;
  for (int k = 0; k < a.d; ++k)
    if (a.p[k] != b.p[k] || a.q[k] != b.q[k] || a.r[k + 1] != b.r[k + 1]) return false;
  return true;
}

void plan_chunk(const tt_shape_t* s, const int64_t* idx, int64_t cn, int threads, Plan& pl, std::vector<uint8_t>& marks,
                bool by_prefix = false) {
  const double t0 = omp_get_wtime();
  // The whole key in two levels (SortKey kTwoLevel: one pass on i2, then each i2 bucket on i1 and i3 while
  // it is in cache; packed key, prefix = i2 2^fb + i1) where i2 takes at most 12 bits, the rest at most 24,
  // and the chunk at least kTwoLevelFrom lookups: below, the two global passes run in L2 anyway.
  const int fb = last_bits(s->p[0]), lb = last_bits(s->p[2]);
  const bool two = !by_prefix && cn >= kTwoLevelFrom && key_bits(s, true) <= 40 && last_bits(s->p[1]) <= 12 &&
                   fb + lb <= 24;
  sort_lookups(s, idx, cn, pl.sorted, pl.tmp, marks, threads, by_prefix ? kPrefix : two ? kTwoLevel : kWholeKey);
  pl.sort_seconds = omp_get_wtime() - t0;
  const int64_t U = find_runs(pl.sorted, cn, lb, pl.runs, nullptr, threads);
  const int64_t p0 = s->p[0];
  const FastDiv by_p0(p0);
  pl.digits.resize(2 * U);
  int64_t* const dig = pl.digits.data();
  const uint64_t* const e = pl.sorted.data();
  const int64_t* const runs = pl.runs.data();
  // the prefixes' digits, and where each bucket of equal i2 starts (ascending in t: each thread
  // lists the starts in its slice, appended in slice order), cut into pieces. (A serial galloping
  // search for the bucket ends took 0.06 ms of a 65,536-lookup forward on an Intel Xeon VM.)
  const int T = U > 8192 ? threads : 1;
  std::vector<std::vector<int64_t>> starts(T);
#pragma omp parallel num_threads(T)
  {
    const int th = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = U * th / nt, hi = U * (th + 1) / nt;
    std::vector<int64_t>& mine = starts[th];
    auto middle = [&](int64_t key) { return two ? key >> fb : by_p0(key); };
    int64_t before = lo > 0 ? middle(entry_prefix(e[runs[lo - 1]], lb)) : -1;  // i2 of the prefix before the slice
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t key = entry_prefix(e[runs[t]], lb), i2 = middle(key);
      dig[2 * t] = two ? key & (((int64_t)1 << fb) - 1) : key - i2 * p0;
      dig[2 * t + 1] = i2;
      if (i2 != before) mine.push_back(t);
      before = i2;
    }
  }
  pl.buckets.clear();
  pl.pieces.clear();
  for (const std::vector<int64_t>& mine : starts) pl.buckets.insert(pl.buckets.end(), mine.begin(), mine.end());
  for (size_t b = 0; b < pl.buckets.size(); ++b) {
    const int64_t end = b + 1 < pl.buckets.size() ? pl.buckets[b + 1] : U;
    for (int64_t a = pl.buckets[b]; a < end; a += kPiece) pl.pieces.push_back(a);
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

// P of np prefixes of one bucket, whose first digits are i1[0], i1[step], ...: stacked G_1[i1] rows
// (q1 x R1 each) @ the G_2 slice (R1 x q2 R2, rows ldb apart); both read in place, the G_1 rows
// through pointers (Gathered; a copy into a stacked matrix made the forward 1.05x as long on an Intel
// Xeon VM).
void chain_rows(const tt_shape_t* s, const float* const* cores, const int64_t* i1, int64_t step, int64_t np,
                std::vector<const float*>& Ap, const float* B, int64_t ldb, float* P) {
  const int q1 = s->q[0], R1 = s->r[1], N = s->q[1] * s->r[2];
  const int64_t w1 = (int64_t)q1 * R1;
  Ap.resize((size_t)np * q1);
  for (int64_t t = 0; t < np; ++t)
    for (int a = 0; a < q1; ++a) Ap[t * q1 + a] = cores[0] + i1[t * step] * w1 + a * R1;
  gemm_nn_impl<false>((int)(np * q1), N, R1, Gathered{Ap.data()}, B, ldb, P, N);
}
// P of a plan's prefixes [t0, t1) of one bucket (its digits: i1, i2 per prefix)
void piece_chain(const tt_shape_t* s, const float* const* cores, const Plan& pl, int64_t t0, int64_t t1,
                 std::vector<const float*>& Ap, const float* B, int64_t ldb, float* P) {
  chain_rows(s, cores, pl.digits.data() + 2 * t0, 2, t1 - t0, Ap, B, ldb, P);
}

// Which thread works on which i2 buckets: thread t of nt takes the buckets from bucket_share(t) to
// bucket_share(t + 1), cut where the running cost (8 per prefix, its two backward GEMMs of
// 16 q1 R1 q2 R2 FLOPs dominating, + 1 per lookup) crosses t / nt of the total; the forward's pieces,
// the backward's chains and its segments (segment k of S starts at bucket_share(k, S)) all follow
// it. So the thread that updates G_2's slice i2 in place (fused SGD) is the one that reads it in the
// next forward and backward, and the partial products it streams out in the forward are read back
// by itself: no cache line of them passes between the threads' caches. (With
// pieces and segments taken dynamically, a line passed back and forth whenever the two threads swapped
// buckets between calls, and with the VM's two vCPUs far apart such a pass costs 0.3-1.4 us: Zen 4 VM,
// Kaggle's largest table, fused SGD step, alternating rounds, far: 0.70x at 2,048 lookups, 0.88x at
// 65,536.) The cut depends on the plan alone, so the results stay those of any thread count.
inline int64_t bucket_share(const Plan& pl, int64_t t, int64_t nt) {
  const int64_t nb = (int64_t)pl.buckets.size() - 1;
  if (t <= 0) return 0;
  if (t >= nt) return nb;
  auto cost = [&](int64_t b) { return 8 * pl.buckets[b] + pl.runs[pl.buckets[b]]; };  // of the buckets before b
  const int64_t total = cost(nb);
  int64_t lo = 0, hi = nb;  // the first b with cost(b) nt >= total t (cost increases with b)
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cost(mid) * nt >= total * t) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// The pieces [*pc0, *pc1) of the calling thread's buckets (see bucket_share), in an OpenMP region.
inline void my_pieces(const Plan& pl, int64_t* pc0, int64_t* pc1) {
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  const auto first_piece = [&](int64_t b) {  // every bucket starts a piece
    return std::lower_bound(pl.pieces.begin(), pl.pieces.end(), pl.buckets[b]) - pl.pieces.begin();
  };
  *pc0 = first_piece(bucket_share(pl, t, nt));
  *pc1 = first_piece(bucket_share(pl, t + 1, nt));
}

// All prefixes' P into pl.P (the backward's recomputation when no forward state is at hand).
void plan_chains(const tt_shape_t* s, const float* const* cores, Plan& pl, int threads) {
  const int64_t MR2 = (int64_t)s->q[0] * s->q[1] * s->r[2];
  pl.resize_P((size_t)pl.U * MR2);
#pragma omp parallel num_threads(threads)
  {
    std::vector<const float*> Ap;  // the piece's G_1 rows
    int64_t pc0, pc1;
    my_pieces(pl, &pc0, &pc1);
    for (int64_t pc = pc0; pc < pc1; ++pc) {
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

}  // namespace
