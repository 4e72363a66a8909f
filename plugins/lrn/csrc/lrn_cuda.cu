// The paper's local response normalisation across channels, hand-written for CUDA.
//
// One thread per (image, pixel): neighbouring threads take neighbouring pixels, so every load
// and store of a channel row is coalesced. Each thread walks the channels once. For the
// paper's size (5) the window of squares, inputs and gradient terms lives in registers: the
// channel loop is unrolled by the window span so every ring slot is a compile-time index,
// each input element is read once and each output written once. Other sizes take a generic
// path that re-reads the window (from L1/L2) and, in backward, goes through a scratch buffer.
// Accumulation is in float (double for double inputs). Forward saves scale = d^-beta with
// d = k + alpha * window sum; backward reuses it and needs no power.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "lrn_common.h"

namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_power(acc_t d, acc_t beta, convnet_lrn::PowerKind kind) {
  using convnet_lrn::PowerKind;
  switch (kind) {
    case PowerKind::Zero: return acc_t(1);
    case PowerKind::Half: return acc_t(1) / sqrt(d);
    case PowerKind::ThreeQuarters: {
      const acc_t r = acc_t(1) / sqrt(d);
      return r * sqrt(r);
    }
    case PowerKind::One: return acc_t(1) / d;
    default: return pow(d, -beta);
  }
}

struct Geometry {
  int64_t pixels;    // N * H * W, one thread each
  int64_t hw;        // H * W, the stride between channels
  int64_t channels;  // C
};

__device__ __forceinline__ int64_t column_base(int64_t idx, const Geometry& g) {
  return (idx / g.hw) * g.channels * g.hw + idx % g.hw;
}

// ---- span known at compile time: everything in registers -------------------------------------

template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__global__ void forward_registers(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  acc_t* __restrict__ scale, Geometry g, acc_t alpha, acc_t beta, acc_t k,
                                  convnet_lrn::PowerKind kind) {
  constexpr int SPAN = BELOW + ABOVE + 1;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g.pixels;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = column_base(idx, g);
    acc_t xs[SPAN], sq[SPAN];
#pragma unroll
    for (int r = 0; r < SPAN; ++r) xs[r] = sq[r] = acc_t(0);
    for (int64_t m0 = 0; m0 < g.channels + ABOVE; m0 += SPAN) {
#pragma unroll
      for (int r = 0; r < SPAN; ++r) {
        const int64_t m = m0 + r;  // row m goes to ring slot r (m0 is a multiple of SPAN)
        const acc_t v = m < g.channels ? static_cast<acc_t>(x[base + m * g.hw]) : acc_t(0);
        xs[r] = v;
        sq[r] = v * v;
        const int64_t c = m - ABOVE;  // its window, rows c - BELOW .. m, is the whole ring
        if (c >= 0 && c < g.channels) {
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < SPAN; ++j) s += sq[j];
          const acc_t p = inverse_power(k + alpha * s, beta, kind);
          y[base + c * g.hw] = static_cast<scalar_t>(xs[(r - ABOVE + SPAN) % SPAN] * p);
          if (scale != nullptr) scale[base + c * g.hw] = p;
        }
      }
    }
  }
}

// dx[i] = g[i] s[i] - 2 alpha beta x[i] * sum over the c whose window holds i of g[c] x[c] s[c] / d[c].
template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__global__ void backward_registers(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ scale, scalar_t* __restrict__ dx, Geometry g,
                                   acc_t alpha, acc_t k, acc_t coef) {
  constexpr int SPAN = BELOW + ABOVE + 1;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g.pixels;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = column_base(idx, g);
    acc_t xs[SPAN], gs[SPAN], ps[SPAN], sq[SPAN], ts[SPAN];
#pragma unroll
    for (int r = 0; r < SPAN; ++r) xs[r] = gs[r] = ps[r] = sq[r] = ts[r] = acc_t(0);
    for (int64_t m0 = 0; m0 < g.channels + SPAN - 1; m0 += SPAN) {
#pragma unroll
      for (int r = 0; r < SPAN; ++r) {
        const int64_t m = m0 + r;
        const bool in = m < g.channels;
        const int64_t off = base + m * g.hw;
        xs[r] = in ? static_cast<acc_t>(x[off]) : acc_t(0);
        gs[r] = in ? static_cast<acc_t>(grad[off]) : acc_t(0);
        ps[r] = in ? scale[off] : acc_t(0);
        sq[r] = xs[r] * xs[r];
        // row c = m - ABOVE has its whole window in the ring: its term g x s / d joins the second ring
        const int64_t c = m - ABOVE;
        const int cs = (r - ABOVE + SPAN) % SPAN;
        acc_t t = acc_t(0);
        if (c >= 0 && c < g.channels) {
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < SPAN; ++j) s += sq[j];
          t = gs[cs] * xs[cs] * ps[cs] / (k + alpha * s);
        }
        ts[cs] = t;
        // row i = m - SPAN + 1 (slot r + 1, the oldest) now has every term it needs
        const int64_t i = m - SPAN + 1;
        if (i >= 0 && i < g.channels) {
          acc_t sum = acc_t(0);
#pragma unroll
          for (int j = 0; j < SPAN; ++j) sum += ts[j];
          const int is = (r + 1) % SPAN;
          dx[base + i * g.hw] = static_cast<scalar_t>(gs[is] * ps[is] - coef * xs[is] * sum);
        }
      }
    }
  }
}

// ---- any span: re-read the window ------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t window_sum_of_squares(const scalar_t* x, int64_t base, int64_t c, const Geometry& g,
                                                       int below, int above) {
  const int64_t lo = c - below < 0 ? 0 : c - below;
  const int64_t hi = c + above >= g.channels ? g.channels - 1 : c + above;
  acc_t s = acc_t(0);
  for (int64_t j = lo; j <= hi; ++j) {
    const acc_t v = static_cast<acc_t>(x[base + j * g.hw]);
    s += v * v;
  }
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_generic(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, acc_t* __restrict__ scale,
                                Geometry g, int below, int above, acc_t alpha, acc_t beta, acc_t k,
                                convnet_lrn::PowerKind kind) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g.pixels;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = column_base(idx, g);
    for (int64_t c = 0; c < g.channels; ++c) {
      const acc_t s = window_sum_of_squares<scalar_t, acc_t>(x, base, c, g, below, above);
      const acc_t p = inverse_power(k + alpha * s, beta, kind);
      const int64_t off = base + c * g.hw;
      y[off] = static_cast<scalar_t>(static_cast<acc_t>(x[off]) * p);
      if (scale != nullptr) scale[off] = p;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_terms_generic(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ scale, acc_t* __restrict__ terms, Geometry g,
                                       int below, int above, acc_t alpha, acc_t k) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g.pixels;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = column_base(idx, g);
    for (int64_t c = 0; c < g.channels; ++c) {
      const acc_t s = window_sum_of_squares<scalar_t, acc_t>(x, base, c, g, below, above);
      const int64_t off = base + c * g.hw;
      terms[off] = static_cast<acc_t>(grad[off]) * static_cast<acc_t>(x[off]) * scale[off] / (k + alpha * s);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_generic(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ terms,
                                 scalar_t* __restrict__ dx, Geometry g, int below, int above, acc_t coef) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < g.pixels;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = column_base(idx, g);
    for (int64_t i = 0; i < g.channels; ++i) {
      // the outputs whose window holds i: c in [i - above, i + below]
      const int64_t lo = i - above < 0 ? 0 : i - above;
      const int64_t hi = i + below >= g.channels ? g.channels - 1 : i + below;
      acc_t sum = acc_t(0);
      for (int64_t c = lo; c <= hi; ++c) sum += terms[base + c * g.hw];
      const int64_t off = base + i * g.hw;
      dx[off] = static_cast<scalar_t>(static_cast<acc_t>(grad[off]) * scale[off] -
                                      coef * static_cast<acc_t>(x[off]) * sum);
    }
  }
}

// ---- host side -------------------------------------------------------------------------------

// The paper's size 5 (also any size on 3 channels) clips to 2 below and 2 above: it runs in
// registers; other windows take the generic path.
bool paper_window(const convnet_lrn::Window& w) { return w.below == 2 && w.above == 2; }

int blocks_for(int64_t pixels) {
  const int64_t wanted = (pixels + kThreads - 1) / kThreads;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = int64_t(sms) * 32;
  return static_cast<int>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

Geometry geometry(const at::Tensor& x) {
  return {x.size(0) * x.size(2) * x.size(3), x.size(2) * x.size(3), x.size(1)};
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4, "LRN (cuda kernel): ", what, " must be NCHW, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.is_cuda(), "LRN (cuda kernel): ", what, " must be on a CUDA device, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> lrn_forward(const at::Tensor& input, int64_t size, double alpha, double beta,
                                               double k, bool save_scale) {
  check_input(input, "input");
  TORCH_CHECK(size > 0, "LRN: size must be positive, got ", size);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor scale;
  if (save_scale) scale = at::empty(x.sizes(), x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (x.numel() == 0) return {y, scale};
  const auto w = convnet_lrn::clipped_window(size, x.size(1));
  const Geometry g = geometry(x);
  const auto kind = convnet_lrn::power_kind(beta);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sp = save_scale ? scale.mutable_data_ptr<acc_t>() : nullptr;
    if (paper_window(w)) {
      forward_registers<scalar_t, acc_t, 2, 2><<<blocks_for(g.pixels), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sp, g, acc_t(alpha), acc_t(beta),
          acc_t(k), kind);
    } else {
      forward_generic<scalar_t, acc_t><<<blocks_for(g.pixels), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sp, g, int(w.below), int(w.above),
          acc_t(alpha), acc_t(beta), acc_t(k), kind);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, scale};
}

at::Tensor lrn_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale, int64_t size,
                        double alpha, double beta, double k) {
  check_input(grad, "grad");
  check_input(input, "input");
  TORCH_CHECK(grad.sizes() == input.sizes() && scale.sizes() == input.sizes(),
              "LRN backward: grad, input and scale shapes differ");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "LRN backward: grad and input dtypes differ");
  TORCH_CHECK(scale.scalar_type() == at::toOpMathType(input.scalar_type()), "LRN backward: scale dtype");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor gr = grad.contiguous(), x = input.contiguous(), s = scale.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return dx;
  const auto w = convnet_lrn::clipped_window(size, x.size(1));
  const Geometry g = geometry(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t coef = acc_t(2) * acc_t(alpha) * acc_t(beta);
    if (paper_window(w)) {
      backward_registers<scalar_t, acc_t, 2, 2><<<blocks_for(g.pixels), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), g, acc_t(alpha), acc_t(k), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor terms = at::empty_like(s, at::MemoryFormat::Contiguous);
      backward_terms_generic<scalar_t, acc_t><<<blocks_for(g.pixels), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          terms.mutable_data_ptr<acc_t>(), g, int(w.below), int(w.above), acc_t(alpha), acc_t(k));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_generic<scalar_t, acc_t><<<blocks_for(g.pixels), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          terms.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), g, int(w.below), int(w.above), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY(convnet_lrn_cuda, m) {
  m.def("forward(Tensor x, int size, float alpha, float beta, float k, bool save_scale) -> (Tensor, Tensor)",
        &lrn_forward);
  m.def("backward(Tensor grad, Tensor x, Tensor scale, int size, float alpha, float beta, float k) -> Tensor",
        &lrn_backward);
}
