// What both compiled kernels use: 8-float vectors, per-thread scratch buffers, the output dtype.
#pragma once

#include <vector>

#include "paddle/extension.h"

namespace darts {

typedef float v8 __attribute__((vector_size(32)));   // GCC/Clang vectors: AVX where -march=native has it
inline v8 load8(const float* p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

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
