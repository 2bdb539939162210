// Depthwise 2-D convolution (one filter per channel), float32 NCHW on the CPU, as a Paddle
// custom operator with its gradient: forward, grad input and grad weight.
//
//   out[n, c, oh, ow] = sum_{kh, kw} w[c, 0, kh, kw] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d]
//   dx[n, c, ih, iw]  = sum over the (oh, ow, kh, kw) that read x[n, c, ih, iw] of w * dout
//   dw[c, 0, kh, kw]  = sum_{n, oh, ow} dout[n, c, oh, ow] * x[n, c, oh*s - p + kh*d, ow*s - p + kw*d]
// (zero padding p, stride s, dilation d; the same in both spatial directions).
//
// Direct convolution, no im2col.  The forward and grad input run one (n, c) plane per
// OpenMP iteration; for each filter tap the inner loop runs over a row's valid output
// columns, contiguous in memory at stride 1, so the compiler vectorises it.  The weight
// gradient runs one channel per iteration and sums over the batch inside it: no atomics.
#include <algorithm>
#include <vector>

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

}  // namespace

std::vector<paddle::Tensor> DepthwiseForward(const paddle::Tensor& x, const paddle::Tensor& w, int stride,
                                             int padding, int dilation) {
  check(x, w);
  Geometry g = geometry(x.shape(), w.shape(), stride, padding, dilation);
  auto out = paddle::empty({g.n, g.c, g.ho, g.wo}, paddle::DataType::FLOAT32, x.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  float* op = out.data<float>();
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

std::vector<paddle::DataType> DepthwiseInferDtype(const paddle::DataType& x, const paddle::DataType& w) {
  return {x};
}

PD_BUILD_OP(darts_depthwise_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int", "dilation: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DepthwiseInferDtype));

PD_BUILD_GRAD_OP(darts_depthwise_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"stride: int", "padding: int", "dilation: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseBackward));
