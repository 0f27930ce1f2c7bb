// 16-float vectors per vector ISA (AVX-512 registers or AVX2 register pairs) and their lane permutations.
// Part of the native CPU kernel: included once, in order, by tt_cpu.cpp (one translation unit).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>


namespace {

// Scratch arrays on 64-byte boundaries: a 16-float vector at a 64-byte offset of one is one cache
// line (at malloc's 16-byte alignment most of them straddle two, and each load or store touches both).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using fvec = std::vector<float, Aligned64<float>>;

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
inline v16 fma16(v16 a, v16 b, v16 c) { return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }  // a b + c
inline void stream16(float* p, v16 v) { _mm512_stream_ps(p, (__m512)v); }  // p: 64-byte aligned
inline v16 lane_bcast(v16 v, int i) { return __builtin_shuffle(v, v16i{} + i); }  // every lane = lane i
// the 8 floats at p in the low lanes, zeros above; the low 8 lanes of v to p (8-float rows). 32-byte
// accesses: a masked 64-byte one would span the next line whenever p is 32 bytes into one
// (vector extensions: GCC 12's 256 <-> 512-bit cast intrinsics trip -Wmaybe-uninitialized)
typedef float v8h __attribute__((vector_size(32), aligned(4)));
inline v16 load8z(const float* p) {
  return __builtin_shufflevector(*reinterpret_cast<const v8h*>(p), v8h{}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline void store8(float* p, v16 v) { *reinterpret_cast<v8h*>(p) = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }

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

// row44's operations. The block broadcast is written without _mm512_undefined_ps (GCC 12 reports the
// intrinsic's undefined pass-through operand as maybe-uninitialized; the full mask never reads it).
inline v16 bcast4(const float* p) {  // the 4 floats at p in every block
  return (v16)__builtin_ia32_broadcastf32x4_512((__v4sf)_mm_loadu_ps(p), (__v16sf)_mm512_setzero_ps(),
                                                (__mmask16)-1);
}
inline v16 load_halves(const float* lo, const float* hi) {  // lanes 0-7 from lo, 8-15 from hi
  return __builtin_shufflevector(*reinterpret_cast<const v8h*>(lo), *reinterpret_cast<const v8h*>(hi), 0, 1, 2, 3, 4,
                                 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline v16 load_blocks(const float* a, const float* b, const float* c, const float* d) {  // 4 floats each
  return __builtin_shufflevector((v8h)_mm256_loadu2_m128(b, a), (v8h)_mm256_loadu2_m128(d, c), 0, 1, 2, 3, 4, 5, 6, 7,
                                 8, 9, 10, 11, 12, 13, 14, 15);
}
// v in a register: its uses do not load it again (an empty asm that may change it)
inline v16 in_registers(v16 v) {
  asm("" : "+v"(v));
  return v;
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
inline v8 fma8(v8 a, v8 b, v8 c) {  // a b + c, rounded once
#ifdef __FMA__
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline v16 fma16(v16 a, v16 b, v16 c) { return {fma8(a.lo, b.lo, c.lo), fma8(a.hi, b.hi, c.hi)}; }
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
inline v16 load8z(const float* p) { return {*reinterpret_cast<const v8*>(p), v8{}}; }
inline void store8(float* p, v16 v) { *reinterpret_cast<v8*>(p) = v.lo; }

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
inline v16 load_halves(const float* lo, const float* hi) {  // lanes 0-7 from lo, 8-15 from hi
  return {*reinterpret_cast<const v8*>(lo), *reinterpret_cast<const v8*>(hi)};
}
inline v16 load_blocks(const float* a, const float* b, const float* c, const float* d) {  // 4 floats each
  return {(v8)_mm256_loadu2_m128(b, a), (v8)_mm256_loadu2_m128(d, c)};
}
inline v16 in_registers(v16 v) {  // (see the AVX-512 one; on the halves as values: through the pair, GCC
  v8 lo = v.lo, hi = v.hi;          // stored both to the stack at every use)
  asm("" : "+x"(lo), "+x"(hi));
  return {lo, hi};
}
template <int IMM>
inline v16 shuffle_in_blocks(v16 a, v16 b) {
  return {(v8)_mm256_shuffle_ps((__m256)a.lo, (__m256)b.lo, IMM), (v8)_mm256_shuffle_ps((__m256)a.hi, (__m256)b.hi, IMM)};
}
#endif

}  // namespace
