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

#include <algorithm>
#include <tuple>

#include "lrn_cuda_columns.h"
#include "lrn_checks.h"

namespace {

constexpr int kThreads = 256;

using convnet_lrn::Geometry;
using convnet_lrn::PowerKind;

// Grid-stride over the columns; neighbouring threads take neighbouring pixels (coalesced).
__device__ __forceinline__ int64_t first_column() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t column_stride() { return int64_t(gridDim.x) * blockDim.x; }

template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__global__ void forward_registers(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  acc_t* __restrict__ scale, Geometry g, acc_t alpha, acc_t beta, acc_t k,
                                  PowerKind kind) {
  for (int64_t idx = first_column(); idx < g.pixels * g.segments; idx += column_stride()) {
    const convnet_lrn::Column col = convnet_lrn::column_of(idx, g);
    convnet_lrn::forward_column_registers<scalar_t, acc_t, BELOW, ABOVE>(x, y, scale, col, g, alpha, beta, k,
                                                                         kind);
  }
}

template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__global__ void backward_registers(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ scale, scalar_t* __restrict__ dx, Geometry g,
                                   acc_t alpha, acc_t k, acc_t coef) {
  for (int64_t idx = first_column(); idx < g.pixels * g.segments; idx += column_stride()) {
    const convnet_lrn::Column col = convnet_lrn::column_of(idx, g);
    convnet_lrn::backward_column_registers<scalar_t, acc_t, BELOW, ABOVE>(grad, x, scale, dx, col, g, alpha, k,
                                                                          coef);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_generic(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, acc_t* __restrict__ scale,
                                Geometry g, int below, int above, acc_t alpha, acc_t beta, acc_t k,
                                PowerKind kind) {
  for (int64_t idx = first_column(); idx < g.pixels * g.segments; idx += column_stride()) {
    const convnet_lrn::Column col = convnet_lrn::column_of(idx, g);
    convnet_lrn::forward_column_generic<scalar_t, acc_t>(x, y, scale, col, g, below, above, alpha, beta, k, kind);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_terms_generic(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                       const acc_t* __restrict__ scale, acc_t* __restrict__ terms, Geometry g,
                                       int below, int above, acc_t alpha, acc_t k) {
  for (int64_t idx = first_column(); idx < g.pixels * g.segments; idx += column_stride()) {
    const convnet_lrn::Column col = convnet_lrn::column_of(idx, g);
    convnet_lrn::backward_terms_column_generic<scalar_t, acc_t>(grad, x, scale, terms, col, g, below, above,
                                                                alpha, k);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_generic(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ scale, const acc_t* __restrict__ terms,
                                 scalar_t* __restrict__ dx, Geometry g, int below, int above, acc_t coef) {
  for (int64_t idx = first_column(); idx < g.pixels * g.segments; idx += column_stride()) {
    const convnet_lrn::Column col = convnet_lrn::column_of(idx, g);
    convnet_lrn::backward_column_generic<scalar_t, acc_t>(grad, x, scale, terms, dx, col, g, below, above, coef);
  }
}

// ---- host side -------------------------------------------------------------------------------

// The paper's size 5 (also any size on 3 channels) clips to 2 below and 2 above: it runs in
// registers; other windows take the generic path.
bool paper_window(const convnet_lrn::Window& w) { return w.below == 2 && w.above == 2; }

int multiprocessors() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

int blocks_for(const Geometry& g) {
  const int64_t items = g.pixels * g.segments;
  const int64_t wanted = (items + kThreads - 1) / kThreads, cap = int64_t(multiprocessors()) * 32;
  return static_cast<int>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

// One thread per pixel walks all the channels when there are enough pixels to fill the GPU
// (about 2048 resident threads per multiprocessor); with fewer (small batches, conv2's 27x27)
// the channels are cut into runs of at least 8 windows each, so the rows re-read at the cuts
// stay a small fraction.
Geometry geometry(const at::Tensor& x, int64_t span) {
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3), channels = x.size(1);
  const int64_t resident = int64_t(multiprocessors()) * 2048;
  const int64_t wanted = (resident + pixels - 1) / std::max<int64_t>(pixels, 1);
  const int64_t most = std::max<int64_t>(channels / (8 * span), 1);
  const int64_t segments = std::min(std::max<int64_t>(wanted, 1), most);
  const int64_t length = (channels + segments - 1) / segments;
  return {pixels, x.size(2) * x.size(3), channels, (channels + length - 1) / length, length};
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
  at::Tensor scale = convnet_lrn::scale_buffer(x, save_scale);
  if (x.numel() == 0) return {convnet_lrn::in_layout_of(y, input), scale};
  const auto w = convnet_lrn::clipped_window(size, x.size(1));
  const Geometry g = geometry(x, w.span);
  const auto kind = convnet_lrn::power_kind(beta);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sp = save_scale ? scale.mutable_data_ptr<acc_t>() : nullptr;
    if (paper_window(w)) {
      forward_registers<scalar_t, acc_t, 2, 2><<<blocks_for(g), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sp, g, acc_t(alpha), acc_t(beta),
          acc_t(k), kind);
    } else {
      forward_generic<scalar_t, acc_t><<<blocks_for(g), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), sp, g, int(w.below), int(w.above),
          acc_t(alpha), acc_t(beta), acc_t(k), kind);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {convnet_lrn::in_layout_of(y, input), scale};  // scale stays NCHW: only this kernel reads it
}

at::Tensor lrn_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale, int64_t size,
                        double alpha, double beta, double k) {
  check_input(grad, "grad");
  check_input(input, "input");
  convnet_lrn::check_backward_args(grad, input, scale);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor gr = grad.contiguous(), x = input.contiguous(), s = scale.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return convnet_lrn::in_layout_of(dx, input);
  const auto w = convnet_lrn::clipped_window(size, x.size(1));
  const Geometry g = geometry(x, w.span);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t coef = acc_t(2) * acc_t(alpha) * acc_t(beta);
    if (paper_window(w)) {
      backward_registers<scalar_t, acc_t, 2, 2><<<blocks_for(g), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), g, acc_t(alpha), acc_t(k), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor terms = at::empty_like(s, at::MemoryFormat::Contiguous);
      backward_terms_generic<scalar_t, acc_t><<<blocks_for(g), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          terms.mutable_data_ptr<acc_t>(), g, int(w.below), int(w.above), acc_t(alpha), acc_t(k));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_generic<scalar_t, acc_t><<<blocks_for(g), kThreads, 0, stream>>>(
          gr.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(),
          terms.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), g, int(w.below), int(w.above), coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return convnet_lrn::in_layout_of(dx, input);
}

}  // namespace

// The schemas are defined once, in Python (plugins/lrn/ops.py), with their fake and autograd rules;
// this file only supplies the CUDA implementations.
TORCH_LIBRARY_IMPL(convnet, CUDA, m) {
  m.impl("lrn_forward", &lrn_forward);
  m.impl("lrn_backward", &lrn_backward);
}
