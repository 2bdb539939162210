// Depthwise 2-D convolution (one filter per channel), float32 NCHW on the CPU, as a Paddle
// custom operator with its gradient: forward, grad input and grad weight.
//
//   out[n, c, oh, ow] = sum_{kh, kw} w[c, 0, kh, kw] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d]
//   dx[n, c, ih, iw]  = sum over the (oh, ow, kh, kw) that read x[n, c, ih, iw] of w * dout
//   dw[c, 0, kh, kw]  = sum_{n, oh, ow} dout[n, c, oh, ow] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d]
// (zero padding p, stride s, dilation d; the same in both spatial directions).
//
// Direct convolution, no im2col; one (n, c) plane per OpenMP iteration for the forward and
// grad input, one channel per iteration (summed over the batch inside it, no atomics) for
// the grad weight.
//
// Stride 1 with a 3x3 or 5x5 filter (every depthwise convolution of the DARTS cells) takes
// the register path: the plane is first copied into a zero-padded buffer, so no tap needs a
// bounds check, and each block of DW_ROWS output rows x one vector of columns (common.h: 4 x 8
// with AVX2, 8 x 16 with AVX-512, 4 x 1 scalar) is summed over all k*k taps in registers
// before it is stored once, its last columns by a masked store.  At stride 1 the grad input is the same correlation:
// dout padded by d*(k-1) - p, with the filter rotated by 180 degrees.  The grad weight keeps
// k accumulators per filter row over the whole plane.  Stride 2 with those filters (but the 3x3
// forward) takes the register path at stride 1 and keeps every second output (its backward: dout
// spread onto the stride-1 grid).  Other filter sizes take the plain path: for each tap, the valid output
// columns of each row, accumulated in memory.
#include <algorithm>
#include <vector>

#include "common.h"
#include "paddle/extension.h"

namespace {

struct Geometry {
  int64_t n, c, h, w, k, ho, wo;
  int s, p, d;
};

Geometry geometry(const std::vector<int64_t>& x, const std::vector<int64_t>& wt, int s, int p, int d) {
  Geometry g;
  g.n = x[0]; g.c = x[1]; g.h = x[2]; g.w = x[3]; g.k = wt[2];
  g.s = s; g.p = p; g.d = d;
  g.ho = (g.h + 2 * p - d * (g.k - 1) - 1) / s + 1;
  g.wo = (g.w + 2 * p - d * (g.k - 1) - 1) / s + 1;
  return g;
}

// The output columns [lo, hi) whose input column ow*s - p + kw*d lies in [0, w).
inline void valid_columns(const Geometry& g, int64_t kw, int64_t* lo, int64_t* hi) {
  int64_t off = kw * g.d - g.p;             // input column = ow * s + off
  *lo = off >= 0 ? 0 : (-off + g.s - 1) / g.s;
  int64_t last = g.w - 1 - off;              // ow * s <= last
  *hi = last < 0 ? 0 : std::min<int64_t>(g.wo, last / g.s + 1);
  if (*hi < *lo) *hi = *lo;
}

// For filter tap (kh, kw): f(oh, in, lo, hi) for every output row oh whose input row lies in
// the image; output column ow in [lo, hi) reads input element in + ow * s of the plane.
template <class F>
inline void for_each_row(const Geometry& g, int64_t kh, int64_t kw, F f) {
  int64_t lo, hi;
  valid_columns(g, kw, &lo, &hi);
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    const int64_t ih = oh * g.s - g.p + kh * g.d;
    if (ih >= 0 && ih < g.h) f(oh, ih * g.w + kw * g.d - g.p, lo, hi);
  }
}

void check(const paddle::Tensor& x, const paddle::Tensor& w) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "depthwise_conv2d: CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "depthwise_conv2d: float32 only");
  PD_CHECK(x.shape().size() == 4 && w.shape().size() == 4, "depthwise_conv2d: NCHW input, [C, 1, k, k] weight");
  PD_CHECK(w.shape()[0] == x.shape()[1] && w.shape()[1] == 1 && w.shape()[2] == w.shape()[3],
           "depthwise_conv2d: weight must be [C, 1, k, k]");
}

// ---- the register path (stride 1, k = 3 or 5) ----

using darts::vec;
using darts::scratch;
using darts::W;
using darts::round_up;
constexpr int ROWS = darts::DW_ROWS;   // output rows per register block

// dst[r, col] (rows x cols, row stride cols) = src[r - off, col - off] inside the h x w source, else 0.
// A negative offset crops.
void place(const float* src, int64_t h, int64_t w, int64_t off, float* dst, int64_t rows, int64_t cols) {
  std::fill(dst, dst + rows * cols, 0.0f);
  const int64_t c0 = std::max<int64_t>(0, off), c1 = std::min<int64_t>(cols, w + off);
  if (c1 <= c0) return;
  for (int64_t r = std::max<int64_t>(0, off); r < std::min<int64_t>(rows, h + off); ++r)
    std::copy(src + (r - off) * w + c0 - off, src + (r - off) * w + c1 - off, dst + r * cols + c0);
}

// The padded buffer a correlation of an (ho, wo) output with a k x k filter at dilation d reads:
// rows ho + (k-1)d, columns round_up(wo) + (k-1)d, so the last W-wide block stays inside.
struct PaddedShape {
  int64_t rows, cols;
  PaddedShape(int64_t ho, int64_t wo, int k, int d) : rows(ho + (k - 1) * d), cols(round_up(wo) + (k - 1) * d) {}
};

// Rows [oh, oh + R) x columns [ow, ow + W) of the correlation, summed over all K*K taps in R
// registers (R independent sums hide the latency of the multiply-adds), then stored.
template <int K, int R>
inline void correlate_block(const float* base, int64_t wp, const float* f, int d, float* out, int64_t wo,
                            int rows, int cols) {
  vec acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = darts::zero();
  for (int kh = 0; kh < K; ++kh)
    for (int kw = 0; kw < K; ++kw) {
      const vec wv = darts::set1(f[kh * K + kw]);
      const float* q = base + kh * d * wp + kw * d;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = darts::fma(wv, darts::load(q + r * wp), acc[r]);
    }
  for (int r = 0; r < rows; ++r) {
    if (cols == W) darts::store(out + r * wo, acc[r]); else darts::store_part(out + r * wo, acc[r], cols);
  }
}

// out[oh, ow] = sum_{kh, kw} f[kh, kw] * P[oh + kh*d, ow + kw*d] for an (ho, wo) output.
template <int K>
void correlate(const float* P, int64_t wp, const float* f, int d, float* out, int64_t ho, int64_t wo) {
  for (int64_t oh = 0; oh < ho; oh += ROWS) {
    const int rows = static_cast<int>(std::min<int64_t>(ROWS, ho - oh));
    for (int64_t ow = 0; ow < wo; ow += W) {
      const int cols = static_cast<int>(std::min<int64_t>(W, wo - ow));
      const float* base = P + oh * wp + ow;
      float* o = out + oh * wo + ow;
      if (rows == ROWS) {
        correlate_block<K, ROWS>(base, wp, f, d, o, wo, rows, cols);
      } else {   // the last rows: one register each (fewer rows than the padded buffer holds)
        for (int r = 0; r < rows; ++r) correlate_block<K, 1>(base + r * wp, wp, f, d, o + r * wo, wo, 1, cols);
      }
    }
  }
}

// dw[kh, kw] += sum_{oh, ow} G[oh, ow] * P[oh + kh*d, ow + kw*d]; G has row stride round_up(wo), zero beyond wo.
template <int K>
void weight_grad(const float* P, int64_t wp, const float* G, int d, int64_t ho, int64_t wo, double* dw) {
  const int64_t wg = round_up(wo);
  for (int kh = 0; kh < K; ++kh) {
    vec acc[K];
    for (int kw = 0; kw < K; ++kw) acc[kw] = darts::zero();
    for (int64_t oh = 0; oh < ho; ++oh) {
      const float* q = P + (oh + kh * d) * wp;
      for (int64_t ow = 0; ow < wg; ow += W) {
        const vec g = darts::load(G + oh * wg + ow);
        for (int kw = 0; kw < K; ++kw) acc[kw] = darts::fma(g, darts::load(q + ow + kw * d), acc[kw]);
      }
    }
    for (int kw = 0; kw < K; ++kw) dw[kh * K + kw] += darts::hsum(acc[kw]);
  }
}

template <int K>
void forward_registers(const Geometry& g, const float* xp, const float* wp, float* op) {
  const PaddedShape ps(g.ho, g.wo, K, g.d);
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < g.n * g.c; ++plane) {
    float* P = scratch(0, ps.rows * ps.cols);
    place(xp + plane * g.h * g.w, g.h, g.w, g.p, P, ps.rows, ps.cols);
    correlate<K>(P, ps.cols, wp + (plane % g.c) * K * K, g.d, op + plane * g.ho * g.wo, g.ho, g.wo);
  }
}

template <int K>
void backward_registers(const Geometry& g, const float* xp, const float* wp, const float* gp, float* dxp,
                        float* dwp) {
  const int64_t q = g.d * (K - 1) - g.p;   // stride 1: dx is dout padded by q, correlated with the rotated filter
  const PaddedShape dx_shape(g.h, g.w, K, g.d);
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < g.n * g.c; ++plane) {
    float rotated[K * K];
    const float* f = wp + (plane % g.c) * K * K;
    for (int t = 0; t < K * K; ++t) rotated[t] = f[K * K - 1 - t];
    float* P = scratch(0, dx_shape.rows * dx_shape.cols);
    place(gp + plane * g.ho * g.wo, g.ho, g.wo, q, P, dx_shape.rows, dx_shape.cols);
    correlate<K>(P, dx_shape.cols, rotated, g.d, dxp + plane * g.h * g.w, g.h, g.w);
  }
  const PaddedShape x_shape(g.ho, g.wo, K, g.d);
  const int64_t wg = round_up(g.wo);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < g.c; ++c) {
    double acc[K * K] = {};
    float* P = scratch(0, x_shape.rows * x_shape.cols);
    float* G = scratch(1, g.ho * wg);
    for (int64_t n = 0; n < g.n; ++n) {
      const int64_t plane = n * g.c + c;
      place(xp + plane * g.h * g.w, g.h, g.w, g.p, P, x_shape.rows, x_shape.cols);
      place(gp + plane * g.ho * g.wo, g.ho, g.wo, 0, G, g.ho, wg);
      weight_grad<K>(P, x_shape.cols, G, g.d, g.ho, g.wo, acc);
    }
    for (int t = 0; t < K * K; ++t) dwp[c * K * K + t] = static_cast<float>(acc[t]);
  }
}

bool register_path(const Geometry& g) { return g.s == 1 && (g.k == 3 || g.k == 5); }

// Stride s > 1 with a 3x3 or 5x5 filter (the reduction cells' first depthwise convolutions): the
// stride-1 convolution's outputs at every s-th row and column, so the register path does it at
// s*s times the work and is still faster than the per-tap loop (1.3-2.6x at stride 2, measured),
// except for the 3x3 forward, which stays on the plain loop.  The backward is the stride-1
// backward of dout spread onto the stride-1 grid (zeros between).
bool strided_register_path(const Geometry& g) { return g.s > 1 && (g.k == 3 || g.k == 5); }

Geometry stride_one(const Geometry& g) {
  Geometry g1 = g;
  g1.s = 1;
  g1.ho = g.h + 2 * g.p - g.d * (g.k - 1);
  g1.wo = g.w + 2 * g.p - g.d * (g.k - 1);
  return g1;
}

}  // namespace

std::vector<paddle::Tensor> DepthwiseForward(const paddle::Tensor& x, const paddle::Tensor& w, int stride,
                                             int padding, int dilation) {
  check(x, w);
  Geometry g = geometry(x.shape(), w.shape(), stride, padding, dilation);
  auto out = paddle::empty({g.n, g.c, g.ho, g.wo}, paddle::DataType::FLOAT32, x.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  float* op = out.data<float>();
  if (register_path(g)) {
    if (g.k == 3) forward_registers<3>(g, xp, wp, op); else forward_registers<5>(g, xp, wp, op);
    return {out};
  }
  if (strided_register_path(g) && g.k == 5) {   // 3x3: the plain loop is as fast (measured)
    const Geometry g1 = stride_one(g);
    std::vector<float> full(static_cast<size_t>(g.n * g.c * g1.ho * g1.wo));
    if (g.k == 3) forward_registers<3>(g1, xp, wp, full.data()); else forward_registers<5>(g1, xp, wp, full.data());
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < g.n * g.c; ++plane)
      for (int64_t oh = 0; oh < g.ho; ++oh)
        for (int64_t ow = 0; ow < g.wo; ++ow)
          op[(plane * g.ho + oh) * g.wo + ow] = full[(plane * g1.ho + oh * g.s) * g1.wo + ow * g.s];
    return {out};
  }
  const int64_t planes = g.n * g.c;
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t c = plane % g.c;
    const float* xin = xp + plane * g.h * g.w;
    const float* filt = wp + c * g.k * g.k;
    float* o = op + plane * g.ho * g.wo;
    std::fill(o, o + g.ho * g.wo, 0.0f);
    for (int64_t kh = 0; kh < g.k; ++kh) {
      for (int64_t kw = 0; kw < g.k; ++kw) {
        const float wv = filt[kh * g.k + kw];
        for_each_row(g, kh, kw, [&](int64_t oh, int64_t in, int64_t lo, int64_t hi) {
          const float* row = xin + in;
          float* orow = o + oh * g.wo;
          if (g.s == 1) {
#pragma omp simd
            for (int64_t ow = lo; ow < hi; ++ow) orow[ow] += wv * row[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) orow[ow] += wv * row[ow * g.s];
          }
        });
      }
    }
  }
  return {out};
}

std::vector<paddle::Tensor> DepthwiseBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& dout, int stride, int padding, int dilation) {
  check(x, w);
  Geometry g = geometry(x.shape(), w.shape(), stride, padding, dilation);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, w.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* gp = dout.data<float>();
  float* dxp = dx.data<float>();
  float* dwp = dw.data<float>();
  if (register_path(g)) {
    if (g.k == 3) backward_registers<3>(g, xp, wp, gp, dxp, dwp); else backward_registers<5>(g, xp, wp, gp, dxp, dwp);
    return {dx, dw};
  }
  if (strided_register_path(g)) {
    const Geometry g1 = stride_one(g);
    std::vector<float> spread(static_cast<size_t>(g.n * g.c * g1.ho * g1.wo), 0.0f);
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < g.n * g.c; ++plane)
      for (int64_t oh = 0; oh < g.ho; ++oh)
        for (int64_t ow = 0; ow < g.wo; ++ow)
          spread[(plane * g1.ho + oh * g.s) * g1.wo + ow * g.s] = gp[(plane * g.ho + oh) * g.wo + ow];
    if (g.k == 3) backward_registers<3>(g1, xp, wp, spread.data(), dxp, dwp);
    else backward_registers<5>(g1, xp, wp, spread.data(), dxp, dwp);
    return {dx, dw};
  }
  const int64_t planes = g.n * g.c, in_plane = g.h * g.w, out_plane = g.ho * g.wo;
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {   // dx: scatter each tap's products back
    const int64_t c = plane % g.c;
    const float* filt = wp + c * g.k * g.k;
    const float* go = gp + plane * out_plane;
    float* d = dxp + plane * in_plane;
    std::fill(d, d + in_plane, 0.0f);
    for (int64_t kh = 0; kh < g.k; ++kh) {
      for (int64_t kw = 0; kw < g.k; ++kw) {
        const float wv = filt[kh * g.k + kw];
        for_each_row(g, kh, kw, [&](int64_t oh, int64_t in, int64_t lo, int64_t hi) {
          float* drow = d + in;
          const float* grow = go + oh * g.wo;
          if (g.s == 1) {
#pragma omp simd
            for (int64_t ow = lo; ow < hi; ++ow) drow[ow] += wv * grow[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) drow[ow * g.s] += wv * grow[ow];
          }
        });
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < g.c; ++c) {   // dw: one channel per iteration, summed over the batch
    for (int64_t kh = 0; kh < g.k; ++kh) {
      for (int64_t kw = 0; kw < g.k; ++kw) {
        double acc = 0.0;
        for (int64_t n = 0; n < g.n; ++n) {
          const float* xin = xp + (n * g.c + c) * in_plane;
          const float* go = gp + (n * g.c + c) * out_plane;
          for_each_row(g, kh, kw, [&](int64_t oh, int64_t in, int64_t lo, int64_t hi) {
            const float* row = xin + in;
            const float* grow = go + oh * g.wo;
            float part = 0.0f;
            if (g.s == 1) {
#pragma omp simd reduction(+ : part)
              for (int64_t ow = lo; ow < hi; ++ow) part += grow[ow] * row[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) part += grow[ow] * row[ow * g.s];
            }
            acc += part;
          });
        }
        dwp[(c * g.k + kh) * g.k + kw] = static_cast<float>(acc);
      }
    }
  }
  return {dx, dw};
}

std::vector<std::vector<int64_t>> DepthwiseInferShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                      int stride, int padding, int dilation) {
  auto size = [&](int64_t n) { return n < 0 ? n : (n + 2 * padding - dilation * (w[2] - 1) - 1) / stride + 1; };
  return {{x[0], x[1], size(x[2]), size(x[3])}};
}

PD_BUILD_OP(darts_depthwise_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int", "dilation: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(darts::input_dtype));

PD_BUILD_GRAD_OP(darts_depthwise_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"stride: int", "padding: int", "dilation: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseBackward));
