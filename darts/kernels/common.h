// What both compiled kernels use: the vector type and its helpers for the ISA being compiled
// for, the register-tile sizes, per-thread scratch buffers, the output dtype.
//
// One source, three builds.  The compiler's ISA macros pick the vector:
//   __AVX512F__                      16 floats (__m512), 32 registers: bigger tiles
//   __AVX2__ and __FMA__             8 floats (__m256), 16 registers (the default on AVX2 hosts)
//   otherwise, or DARTS_SCALAR       1 float (plain float arithmetic: any CPU, any compiler)
// The loader (kernels/__init__.py) chooses the flags, so the macros follow DARTS_KERNEL_ISA.
// The kernels use only the helpers below, never an intrinsic of their own.
#pragma once

#include <cstdint>
#include <vector>

#if !defined(DARTS_SCALAR) && defined(__AVX512F__)
#define DARTS_AVX512 1
#elif !defined(DARTS_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define DARTS_AVX2 1
#endif
#if defined(DARTS_AVX512) || defined(DARTS_AVX2)
#include <immintrin.h>
#endif

#include "paddle/extension.h"

namespace darts {

#if defined(DARTS_AVX512)
#define DARTS_ISA_NAME "avx512"
constexpr int W = 16;
typedef __m512 vec;
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec set1(float a) { return _mm512_set1_ps(a); }
inline vec zero() { return _mm512_setzero_ps(); }
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
// the first n (0 <= n <= W) lanes; the others read as 0 / are left alone
inline vec load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void store_part(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }

#elif defined(DARTS_AVX2)
#define DARTS_ISA_NAME "avx2"
constexpr int W = 8;
typedef __m256 vec;
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec set1(float a) { return _mm256_set1_ps(a); }
inline vec zero() { return _mm256_setzero_ps(); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline __m256i first(int n) {   // lanes i < n all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec load_part(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
inline void store_part(float* p, vec v, int n) { _mm256_maskstore_ps(p, first(n), v); }

#else
#define DARTS_ISA_NAME "scalar"
constexpr int W = 1;
typedef float vec;
inline vec load(const float* p) { return *p; }
inline void store(float* p, vec v) { *p = v; }
inline vec set1(float a) { return a; }
inline vec zero() { return 0.0f; }
inline vec fma(vec a, vec b, vec c) { return a * b + c; }
inline vec add(vec a, vec b) { return a + b; }
inline vec load_part(const float* p, int n) { return n > 0 ? *p : 0.0f; }
inline void store_part(float* p, vec v, int n) { if (n > 0) *p = v; }
#endif

#ifdef DARTS_EXPECT_WIDTH   // the loader says which width its flags give; a mismatch is a build error
static_assert(W == DARTS_EXPECT_WIDTH, "the compiler flags do not give the vector width the loader expects");
#endif

// The lanes of v summed in double, lane 0 first.
inline double hsum(vec v) {
  float lanes[W];
  store(lanes, v);
  double s = 0;
  for (int i = 0; i < W; ++i) s += lanes[i];
  return s;
}

inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }   // to a whole number of vectors

// Register tiles, per ISA; -D flags override them (benchmarks/kernel_tiles.py measures candidates).
// Pointwise: a block of PW_MR rows x PW_NV vectors of C stays in PW_MR * PW_NV registers, with
// PW_NV more for a row of B and one for a broadcast element of A.  Depthwise: DW_ROWS output
// rows x one vector of columns, summed over every tap.
#if defined(DARTS_AVX512)
#ifndef DARTS_PW_MR
#define DARTS_PW_MR 12   // 12 x 2 = 24 of the 32 zmm registers
#endif
#ifndef DARTS_PW_NV
#define DARTS_PW_NV 2
#endif
#ifndef DARTS_DW_ROWS
#define DARTS_DW_ROWS 8
#endif
#elif defined(DARTS_AVX2)
#ifndef DARTS_PW_MR
#define DARTS_PW_MR 6    // 6 x 2 = 12 of the 16 ymm registers
#endif
#ifndef DARTS_PW_NV
#define DARTS_PW_NV 2
#endif
#ifndef DARTS_DW_ROWS
#define DARTS_DW_ROWS 4
#endif
#else
#ifndef DARTS_PW_MR
#define DARTS_PW_MR 4    // 4 x 4 scalars
#endif
#ifndef DARTS_PW_NV
#define DARTS_PW_NV 4
#endif
#ifndef DARTS_DW_ROWS
#define DARTS_DW_ROWS 4
#endif
#endif
constexpr int PW_MR = DARTS_PW_MR, PW_NV = DARTS_PW_NV, DW_ROWS = DARTS_DW_ROWS;
static_assert(PW_MR >= 1 && PW_MR <= 16 && PW_NV >= 1 && PW_NV <= 8 && DW_ROWS >= 1 && DW_ROWS <= 16,
              "register tile out of range");

// A per-thread scratch buffer of at least n floats; slots 0-2 are independent buffers.  A
// pointer is valid until the next call for its slot in the same thread (within one kernel call).
inline float* scratch(int slot, int64_t n) {
  static thread_local std::vector<float> buffers[3];
  if (static_cast<int64_t>(buffers[slot].size()) < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

// Both ops return the dtype of their input X.
inline std::vector<paddle::DataType> input_dtype(const paddle::DataType& x, const paddle::DataType& w) {
  return {x};
}

}  // namespace darts
