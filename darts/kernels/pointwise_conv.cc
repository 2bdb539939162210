// Pointwise (1x1) convolution with groups and a stride, float32 NCHW on the CPU, as a Paddle
// custom operator with its gradient.  With Ci = C_in / G input and Co = C_out / G output
// channels per group g, and P = Ho * Wo output positions p = (oh, ow) reading x at (oh*s, ow*s):
//
//   out[n, g*Co + o, p] = sum_i w[g*Co + o, i] * x[n, g*Ci + i, p]
//   dx[n, g*Ci + i, p]  = sum_o w[g*Co + o, i] * dout[n, g*Co + o, p]   (0 at positions no p reads)
//   dw[g*Co + o, i]     = sum_{n, p} dout[n, g*Co + o, p] * x[n, g*Ci + i, p]
//
// All three are products of row-major matrices, done by one register-blocked kernel: a block of
// MR rows x NV vectors of C (common.h: 6 x 2 x 8 floats = 6 x 16 with AVX2, 12 x 2 x 16 with
// AVX-512, 4 x 4 scalars otherwise) is summed over the whole inner dimension in MR * NV vector
// registers (each NR-wide row of B's packed strip is loaded once per MR rows of A), then stored
// once, the block's last columns by a masked store.  Per sample:
// out_g = W_g X_g, dx_g = W_g^T dout_g and dw_g += dout_g X_g^T, the last with B = X_g^T
// transposed while it is packed.  Samples are split over the OpenMP threads; dw is summed
// over up to 16 fixed slices of the batch, each in its own buffer, and the slices are added
// in order.  A stride > 1 first gathers the read positions into a scratch buffer.
#include <algorithm>
#include <vector>

#include "common.h"
#include "paddle/extension.h"

namespace {

using darts::vec;
using darts::scratch;
using darts::W;

constexpr int MR = darts::PW_MR;        // rows of C per block
constexpr int NV = darts::PW_NV;        // vectors of C per block row
constexpr int NR = NV * W;              // columns of C per block

struct Geometry {
  int64_t n, groups, ci, co, h, w, ho, wo, s;
  int64_t in_plane() const { return h * w; }
  int64_t out_plane() const { return ho * wo; }
};

Geometry geometry(const std::vector<int64_t>& x, const std::vector<int64_t>& wt, int stride, int groups) {
  Geometry g;
  g.n = x[0]; g.groups = groups; g.ci = x[1] / groups; g.co = wt[0] / groups;
  g.h = x[2]; g.w = x[3]; g.s = stride;
  g.ho = (g.h - 1) / stride + 1;
  g.wo = (g.w - 1) / stride + 1;
  return g;
}

// C[r, 0:cols] (= or +=) sum_k A[r*lda + k] * B[k*NR + 0:NR] for r < R; B is a packed strip, NR readable columns.
template <int R>
inline void block(const float* A, int64_t lda, const float* B, int64_t K, float* C, int64_t ldc, int cols,
                  bool add) {
  vec acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = darts::zero();
  for (int64_t k = 0; k < K; ++k) {
    vec b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = darts::load(B + k * NR + j * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vec a = darts::set1(A[r * lda + k]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] = darts::fma(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    for (int j = 0; j < NV; ++j) {
      const int n = std::min(W, cols - j * W);
      if (n == W) {
        darts::store(c + j * W, add ? darts::add(acc[r][j], darts::load(c + j * W)) : acc[r][j]);
      } else if (n > 0) {   // the block's last columns: masked
        darts::store_part(c + j * W, add ? darts::add(acc[r][j], darts::load_part(c + j * W, n)) : acc[r][j], n);
      }
    }
  }
}

// block<rows> for 1 <= rows <= R.
template <int R>
inline void block_rows(int rows, const float* A, int64_t lda, const float* B, int64_t K, float* C, int64_t ldc,
                       int cols, bool add) {
  if (rows == R) {
    block<R>(A, lda, B, K, C, ldc, cols, add);
  } else if constexpr (R > 1) {
    block_rows<R - 1>(rows, A, lda, B, K, C, ldc, cols, add);
  }
}

// C[M x P] (= or +=) A[M x K] B[K x P]; row strides lda, ldb, ldc; with b_transposed, B is
// given as its transpose (P x K, row stride ldb).  B is taken a panel of up to 256 columns at
// a time (fewer when K is large, so the panel stays within ~96 KB of cache), copied into
// NR-column strips, each a contiguous zero-padded K x NR block.  Wide panels matter: at a
// 32 x 32 plane B's and C's rows lie 4 KB apart, and NR columns at a time touch a new page
// per row.
void gemm(int64_t M, int64_t P, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool add, bool b_transposed = false) {
  const int64_t width = std::max<int64_t>(NR, std::min<int64_t>(256 / NR * NR, 96 * 1024 / (4 * K) / NR * NR));
  float* panel = scratch(2, K * width);
  for (int64_t j0 = 0; j0 < P; j0 += width) {
    const int64_t cols = std::min<int64_t>(width, P - j0), strips = (cols + NR - 1) / NR;
    for (int64_t t = 0; t < strips; ++t) {
      const int64_t n = std::min<int64_t>(NR, cols - t * NR);
      float* strip = panel + t * K * NR;
      if (b_transposed) {   // strip[k, j] = B^T[j0 + NR*t + j, k]: one row of B^T per column
        if (n < NR) std::fill(strip, strip + K * NR, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float* row = B + (j0 + t * NR + j) * ldb;
          for (int64_t k = 0; k < K; ++k) strip[k * NR + j] = row[k];
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const float* row = B + k * ldb + j0 + t * NR;
          std::copy(row, row + n, strip + k * NR);
          std::fill(strip + k * NR + n, strip + (k + 1) * NR, 0.0f);
        }
      }
    }
    for (int64_t i = 0; i < M; i += MR) {
      const float* Ai = A + i * lda;
      const int64_t rows = std::min<int64_t>(MR, M - i);
      for (int64_t t = 0; t < strips; ++t) {
        const float* Bt = panel + t * K * NR;
        float* Ct = C + i * ldc + j0 + t * NR;
        const int n = static_cast<int>(std::min<int64_t>(NR, cols - t * NR));
        block_rows<MR>(static_cast<int>(rows), Ai, lda, Bt, K, Ct, ldc, n, add);
      }
    }
  }
}

// The c planes at src (h x w each) read at stride s: dst[c, oh*wo + ow] = src[c, oh*s, ow*s].
void gather(const Geometry& g, const float* src, int64_t c, float* dst) {
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t oh = 0; oh < g.ho; ++oh)
      for (int64_t ow = 0; ow < g.wo; ++ow)
        dst[(ch * g.ho + oh) * g.wo + ow] = src[(ch * g.h + oh * g.s) * g.w + ow * g.s];
}

// The planes of one sample's group at stride 1, or their gathered copy.
const float* read_positions(const Geometry& g, const float* planes, int slot) {
  if (g.s == 1) return planes;
  float* dst = scratch(slot, g.ci * g.out_plane());
  gather(g, planes, g.ci, dst);
  return dst;
}

void check(const paddle::Tensor& x, const paddle::Tensor& w, int stride, int groups) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "pointwise_conv2d: CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, "pointwise_conv2d: float32 only");
  PD_CHECK(x.shape().size() == 4 && w.shape().size() == 4, "pointwise_conv2d: NCHW input, [C_out, C_in / G, 1, 1] weight");
  PD_CHECK(stride >= 1 && groups >= 1 && x.shape()[1] % groups == 0 && w.shape()[0] % groups == 0,
           "pointwise_conv2d: bad stride or groups");
  PD_CHECK(w.shape()[1] * groups == x.shape()[1] && w.shape()[2] == 1 && w.shape()[3] == 1,
           "pointwise_conv2d: weight must be [C_out, C_in / groups, 1, 1]");
}

}  // namespace

std::vector<paddle::Tensor> PointwiseForward(const paddle::Tensor& x, const paddle::Tensor& w, int stride, int groups) {
  check(x, w, stride, groups);
  const Geometry g = geometry(x.shape(), w.shape(), stride, groups);
  auto out = paddle::empty({g.n, g.groups * g.co, g.ho, g.wo}, paddle::DataType::FLOAT32, x.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  float* op = out.data<float>();
  const int64_t P = g.out_plane();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t gr = 0; gr < g.groups; ++gr) {
      const float* X = read_positions(g, xp + (n * g.groups + gr) * g.ci * g.in_plane(), 0);
      gemm(g.co, P, g.ci, wp + gr * g.co * g.ci, g.ci, X, P, op + (n * g.groups + gr) * g.co * P, P, false);
    }
  }
  return {out};
}

std::vector<paddle::Tensor> PointwiseBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& dout, int stride, int groups) {
  check(x, w, stride, groups);
  const Geometry g = geometry(x.shape(), w.shape(), stride, groups);
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, w.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* gp = dout.data<float>();
  float* dxp = dx.data<float>();
  float* dwp = dw.data<float>();
  const int64_t P = g.out_plane(), per_group = g.co * g.ci, wsize = g.groups * per_group;

  std::vector<float> wt(wsize);   // W_g^T: [Ci x Co] per group
  for (int64_t gr = 0; gr < g.groups; ++gr)
    for (int64_t o = 0; o < g.co; ++o)
      for (int64_t i = 0; i < g.ci; ++i) wt[gr * per_group + i * g.co + o] = wp[gr * per_group + o * g.ci + i];

  // dw: a partial sum per fixed slice of the batch, the slices then added in order: the same
  // bits whatever the thread count (a resumed run on another machine computes the same steps)
  const int64_t slices = std::min<int64_t>(g.n, 16);
  std::vector<float> partial(static_cast<size_t>(slices) * wsize, 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < slices; ++t) {
    float* mine = partial.data() + t * wsize;
    const int64_t first = g.n * t / slices, last = g.n * (t + 1) / slices;
    for (int64_t n = first; n < last; ++n) {
      for (int64_t gr = 0; gr < g.groups; ++gr) {
        const float* G = gp + (n * g.groups + gr) * g.co * P;
        const float* xin = xp + (n * g.groups + gr) * g.ci * g.in_plane();
        float* dxin = dxp + (n * g.groups + gr) * g.ci * g.in_plane();
        // dx_g = W_g^T dout_g, written in place at stride 1, else scattered into a zeroed plane
        if (g.s == 1) {
          gemm(g.ci, P, g.co, wt.data() + gr * per_group, g.co, G, P, dxin, P, false);
        } else {
          float* part = scratch(0, g.ci * P);
          gemm(g.ci, P, g.co, wt.data() + gr * per_group, g.co, G, P, part, P, false);
          std::fill(dxin, dxin + g.ci * g.in_plane(), 0.0f);
          for (int64_t ch = 0; ch < g.ci; ++ch)
            for (int64_t oh = 0; oh < g.ho; ++oh)
              for (int64_t ow = 0; ow < g.wo; ++ow)
                dxin[(ch * g.h + oh * g.s) * g.w + ow * g.s] = part[(ch * g.ho + oh) * g.wo + ow];
        }
        // dw_g += dout_g X_g^T over the read positions
        const float* X = read_positions(g, xin, 1);
        gemm(g.co, g.ci, P, G, P, X, P, mine + gr * per_group, g.ci, true, true);
      }
    }
  }
  std::copy(partial.begin(), partial.begin() + wsize, dwp);
  for (int64_t t = 1; t < slices; ++t)
    for (int64_t k = 0; k < wsize; ++k) dwp[k] += partial[t * wsize + k];
  return {dx, dw};
}

std::vector<std::vector<int64_t>> PointwiseInferShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                      int stride, int groups) {
  auto size = [&](int64_t n) { return n < 0 ? n : (n - 1) / stride + 1; };
  return {{x[0], w[0], size(x[2]), size(x[3])}};
}

PD_BUILD_OP(darts_pointwise_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "groups: int"})
    .SetKernelFn(PD_KERNEL(PointwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PointwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(darts::input_dtype));

PD_BUILD_GRAD_OP(darts_pointwise_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"stride: int", "groups: int"})
    .SetKernelFn(PD_KERNEL(PointwiseBackward));
