// The paper's local response normalisation across channels, fused, on the CPU.
//
// Work item = (image, block of kBlock pixels). For one item the kernel walks the channels once,
// keeping the squares of the last `span` channel rows in a ring (span = the window, clipped to
// the channel count) so each input row is read from memory once; the window sum is re-added
// from the ring at every step instead of kept as a running add/subtract, which would lose
// precision when large and small channels alternate. Inner loops run over contiguous pixels
// (they vectorise). Both passes rebuild the denominators d = k + alpha * sum from the window sums;
// the scale s = d^-beta is either saved by the forward for the backward, or (save_scale = false,
// what training on the CPU uses) recomputed by the backward: a power per element there costs less
// than writing a second tensor as big as the input in the forward and reading it back.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "lrn_common.h"
#include "lrn_checks.h"

namespace {

constexpr int64_t kBlock = 256;

template <typename acc_t>
void inverse_power(acc_t* v, int64_t len, acc_t beta, convnet_lrn::PowerKind kind) {
  using convnet_lrn::PowerKind;
  switch (kind) {
    case PowerKind::Zero:
      for (int64_t q = 0; q < len; ++q) v[q] = acc_t(1);
      break;
    case PowerKind::Half:
      for (int64_t q = 0; q < len; ++q) v[q] = acc_t(1) / std::sqrt(v[q]);
      break;
    case PowerKind::ThreeQuarters:
      for (int64_t q = 0; q < len; ++q) {
        acc_t r = acc_t(1) / std::sqrt(v[q]);
        v[q] = r * std::sqrt(r);
      }
      break;
    case PowerKind::One:
      for (int64_t q = 0; q < len; ++q) v[q] = acc_t(1) / v[q];
      break;
    default:
      for (int64_t q = 0; q < len; ++q) v[q] = std::pow(v[q], -beta);
  }
}

template <typename acc_t>
void window_sum(const acc_t* ring, int64_t span, acc_t* out, int64_t len) {
  std::copy(ring, ring + len, out);
  for (int64_t r = 1; r < span; ++r) {
    const acc_t* row = ring + r * kBlock;
    for (int64_t q = 0; q < len; ++q) out[q] += row[q];
  }
}

template <typename scalar_t, typename acc_t>
void load_squares(const scalar_t* src, acc_t* dst, int64_t len) {
  for (int64_t q = 0; q < len; ++q) {
    acc_t v = static_cast<acc_t>(src[q]);
    dst[q] = v * v;
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, at::Tensor& y, at::Tensor& scale, const convnet_lrn::Window& w,
                    double alpha_d, double beta_d, double k_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t blocks = (HW + kBlock - 1) / kBlock;
  const acc_t alpha = alpha_d, beta = beta_d, k = k_d;
  const auto kind = convnet_lrn::power_kind(beta_d);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* sp = scale.numel() != 0 ? scale.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ring(w.span * kBlock), tmp(kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, q0 = (item % blocks) * kBlock;
      const int64_t len = std::min(kBlock, HW - q0);
      const int64_t base = n * C * HW + q0;
      std::fill(ring.begin(), ring.end(), acc_t(0));
      for (int64_t m = 0; m < C + w.above; ++m) {
        acc_t* slot = ring.data() + (m % w.span) * kBlock;
        if (m < C) load_squares(xp + base + m * HW, slot, len);
        else std::fill(slot, slot + len, acc_t(0));
        const int64_t c = m - w.above;
        if (c < 0) continue;
        window_sum(ring.data(), w.span, tmp.data(), len);
        for (int64_t q = 0; q < len; ++q) tmp[q] = k + alpha * tmp[q];
        inverse_power(tmp.data(), len, beta, kind);
        const scalar_t* xc = xp + base + c * HW;
        scalar_t* yc = yp + base + c * HW;
        for (int64_t q = 0; q < len; ++q) yc[q] = static_cast<scalar_t>(static_cast<acc_t>(xc[q]) * tmp[q]);
        if (sp != nullptr) std::copy(tmp.data(), tmp.data() + len, sp + base + c * HW);
      }
    }
  });
}

// dx[i] = g[i] s[i] - 2 alpha beta x[i] * sum over the c whose window holds i of g[c] x[c] s[c] / d[c],
// with s = d^-beta. Step m loads row m; c = m - above gets its t = g x s / d; i = m - span + 1 is done.
// An unsaved scale is recomputed into a ring of span rows: row i is read below = c - i steps after
// row c was written, so it is still there. The sums and powers are the forward's, in its order: the
// gradient is the same bit for bit whether the scale was saved or not.
template <typename scalar_t>
void backward_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                     const convnet_lrn::Window& w, double alpha_d, double beta_d, double k_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const int64_t blocks = (HW + kBlock - 1) / kBlock;
  const acc_t alpha = alpha_d, k = k_d, coef = acc_t(2) * alpha_d * beta_d;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t beta = beta_d;
  const auto kind = convnet_lrn::power_kind(beta_d);
  const acc_t* sp = scale.numel() != 0 ? scale.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> squares(w.span * kBlock), terms(w.span * kBlock), tmp(kBlock), denom(kBlock);
    std::vector<acc_t> scales(sp == nullptr ? w.span * kBlock : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, q0 = (item % blocks) * kBlock;
      const int64_t len = std::min(kBlock, HW - q0);
      const int64_t base = n * C * HW + q0;
      std::fill(squares.begin(), squares.end(), acc_t(0));
      std::fill(terms.begin(), terms.end(), acc_t(0));
      for (int64_t m = 0; m < C + w.span - 1; ++m) {
        acc_t* slot = squares.data() + (m % w.span) * kBlock;
        if (m < C) load_squares(xp + base + m * HW, slot, len);
        else std::fill(slot, slot + len, acc_t(0));
        const int64_t c = m - w.above;
        if (c >= 0) {
          acc_t* t = terms.data() + (c % w.span) * kBlock;
          if (c < C) {
            window_sum(squares.data(), w.span, tmp.data(), len);
            const int64_t off = base + c * HW;
            for (int64_t q = 0; q < len; ++q) denom[q] = k + alpha * tmp[q];
            const acc_t* sc;
            if (sp != nullptr) {
              sc = sp + off;
            } else {
              acc_t* ring_row = scales.data() + (c % w.span) * kBlock;
              std::copy(denom.data(), denom.data() + len, ring_row);
              inverse_power(ring_row, len, beta, kind);
              sc = ring_row;
            }
            for (int64_t q = 0; q < len; ++q) {
              t[q] = static_cast<acc_t>(gp[off + q]) * static_cast<acc_t>(xp[off + q]) * sc[q] / denom[q];
            }
          } else {
            std::fill(t, t + len, acc_t(0));
          }
        }
        const int64_t i = m - w.span + 1;
        if (i < 0) continue;
        window_sum(terms.data(), w.span, tmp.data(), len);
        const int64_t off = base + i * HW;
        const acc_t* si = sp != nullptr ? sp + off : scales.data() + (i % w.span) * kBlock;
        for (int64_t q = 0; q < len; ++q) {
          dp[off + q] = static_cast<scalar_t>(static_cast<acc_t>(gp[off + q]) * si[q] -
                                              coef * static_cast<acc_t>(xp[off + q]) * tmp[q]);
        }
      }
    }
  });
}

// Channels-last (NHWC) memory: work item = one pixel, whose channels are adjacent. The squares go
// into a buffer padded with `below` zeros in front and `above` behind, so channel c's window sum is
// span consecutive entries from index c; the inner loops run over the channels (they vectorise).
// The window is summed in channel order (the NCHW kernel sums in ring order): the results agree
// with the NCHW kernel's to float32 rounding, not bit for bit.
template <typename scalar_t>
void forward_nhwc_kernel(const at::Tensor& x, at::Tensor& y, at::Tensor& scale, const convnet_lrn::Window& w,
                         double alpha_d, double beta_d, double k_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), pixels = x.numel() / C;
  const acc_t alpha = alpha_d, beta = beta_d, k = k_d;
  const auto kind = convnet_lrn::power_kind(beta_d);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* sp = scale.numel() != 0 ? scale.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / C);
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> squares(C + w.span - 1, acc_t(0)), tmp(C);
    acc_t* sq = squares.data();
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xr = xp + p * C;
      load_squares(xr, sq + w.below, C);
      std::copy(sq, sq + C, tmp.data());
      for (int64_t r = 1; r < w.span; ++r) {
        for (int64_t c = 0; c < C; ++c) tmp[c] += sq[c + r];
      }
      for (int64_t c = 0; c < C; ++c) tmp[c] = k + alpha * tmp[c];
      inverse_power(tmp.data(), C, beta, kind);
      scalar_t* yr = yp + p * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) * tmp[c]);
      if (sp != nullptr) std::copy(tmp.data(), tmp.data() + C, sp + p * C);
    }
  });
}

// The NHWC backward, per pixel: d[c] = k + alpha * window sum, s = d^-beta (saved, or recomputed as
// the forward computed it), t[c] = g x s / d (padded with `above` zeros in front and `below` behind,
// so input channel i's sum over the windows that hold it, c in [i - above, i + below], is span
// consecutive entries from index i), dx = g s - 2 alpha beta x sum.
template <typename scalar_t>
void backward_nhwc_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, at::Tensor& dx,
                          const convnet_lrn::Window& w, double alpha_d, double beta_d, double k_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), pixels = x.numel() / C;
  const acc_t alpha = alpha_d, k = k_d, coef = acc_t(2) * alpha_d * beta_d;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t beta = beta_d;
  const auto kind = convnet_lrn::power_kind(beta_d);
  const acc_t* spp = scale.numel() != 0 ? scale.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / C);
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> squares(C + w.span - 1, acc_t(0)), terms(C + w.span - 1, acc_t(0)), tmp(C), denom(C);
    std::vector<acc_t> scales(spp == nullptr ? C : 0);
    acc_t* sq = squares.data();
    acc_t* t = terms.data() + w.above;
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* xr = xp + p * C;
      const scalar_t* gr = gp + p * C;
      load_squares(xr, sq + w.below, C);
      std::copy(sq, sq + C, tmp.data());
      for (int64_t r = 1; r < w.span; ++r) {
        for (int64_t c = 0; c < C; ++c) tmp[c] += sq[c + r];
      }
      for (int64_t c = 0; c < C; ++c) denom[c] = k + alpha * tmp[c];
      const acc_t* sr;
      if (spp != nullptr) {
        sr = spp + p * C;
      } else {
        std::copy(denom.data(), denom.data() + C, scales.data());
        inverse_power(scales.data(), C, beta, kind);
        sr = scales.data();
      }
      for (int64_t c = 0; c < C; ++c) {
        t[c] = static_cast<acc_t>(gr[c]) * static_cast<acc_t>(xr[c]) * sr[c] / denom[c];
      }
      std::copy(terms.data(), terms.data() + C, tmp.data());
      for (int64_t r = 1; r < w.span; ++r) {
        for (int64_t c = 0; c < C; ++c) tmp[c] += terms[c + r];
      }
      scalar_t* dr = dp + p * C;
      for (int64_t c = 0; c < C; ++c) {
        dr[c] = static_cast<scalar_t>(static_cast<acc_t>(gr[c]) * sr[c] - coef * static_cast<acc_t>(xr[c]) * tmp[c]);
      }
    }
  });
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4, "LRN (cpu kernel): ", what, " must be NCHW, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.device().is_cpu(), "LRN (cpu kernel): ", what, " must be on the CPU, got ", x.device());
}

// Returns (y, scale); scale is saved for backward only when asked (an undefined tensor otherwise).
std::tuple<at::Tensor, at::Tensor> lrn_forward(const at::Tensor& input, int64_t size, double alpha, double beta,
                                               double k, bool save_scale) {
  check_input(input, "input");
  TORCH_CHECK(size > 0, "LRN: size must be positive, got ", size);
  const auto w = convnet_lrn::clipped_window(size, input.size(1));
  if (convnet_lrn::is_nhwc(input)) {
    at::Tensor y = at::empty_like(input);
    at::Tensor scale = save_scale ? at::empty_like(input, input.options().dtype(at::toOpMathType(input.scalar_type())))
                                  : convnet_lrn::scale_buffer(input, false);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "convnet_lrn_cpu_forward", [&] {
      forward_nhwc_kernel<scalar_t>(input, y, scale, w, alpha, beta, k);
    });
    return {y, scale};
  }
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor scale = convnet_lrn::scale_buffer(x, save_scale);
  if (x.numel() != 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cpu_forward", [&] {
      forward_kernel<scalar_t>(x, y, scale, w, alpha, beta, k);
    });
  }
  return {convnet_lrn::in_layout_of(y, input), convnet_lrn::in_layout_of(scale, input)};
}

at::Tensor lrn_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale, int64_t size,
                        double alpha, double beta, double k) {
  check_input(grad, "grad");
  check_input(input, "input");
  convnet_lrn::check_backward_args(grad, input, scale, /*scale_may_be_unsaved=*/true);
  const auto w = convnet_lrn::clipped_window(size, input.size(1));
  if (convnet_lrn::is_nhwc(input)) {
    constexpr auto nhwc = at::MemoryFormat::ChannelsLast;
    const at::Tensor g = grad.contiguous(nhwc), s = scale.numel() != 0 ? scale.contiguous(nhwc) : scale;
    at::Tensor dx = at::empty_like(input);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "convnet_lrn_cpu_backward", [&] {
      backward_nhwc_kernel<scalar_t>(g, input, s, dx, w, alpha, beta, k);
    });
    return dx;
  }
  const at::Tensor g = grad.contiguous(), x = input.contiguous(), s = scale.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return convnet_lrn::in_layout_of(dx, input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convnet_lrn_cpu_backward", [&] {
    backward_kernel<scalar_t>(g, x, s, dx, w, alpha, beta, k);
  });
  return convnet_lrn::in_layout_of(dx, input);
}

}  // namespace

// The schemas are defined once, in Python (plugins/lrn/ops.py), with their fake and autograd rules;
// this file only supplies the CPU implementations.
TORCH_LIBRARY_IMPL(convnet, CPU, m) {
  m.impl("lrn_forward", &lrn_forward);
  m.impl("lrn_backward", &lrn_backward);
}
