// The CUDA LRN kernel's per-column work: one (image, pixel) column walked across the channels.
// Free of torch so that the tests can also compile it as plain C++ and run it on the CPU
// against the reference (no GPU needed to check the logic; nvcc checks the CUDA side).
#pragma once

#include <cmath>
#include <cstdint>

#include "lrn_common.h"

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif

namespace convnet_lrn {

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t inverse_power(acc_t d, acc_t beta, PowerKind kind) {
  switch (kind) {
    case PowerKind::Zero: return acc_t(1);
    case PowerKind::Half: return acc_t(1) / std::sqrt(d);
    case PowerKind::ThreeQuarters: {
      const acc_t r = acc_t(1) / std::sqrt(d);
      return r * std::sqrt(r);
    }
    case PowerKind::One: return acc_t(1) / d;
    default: return std::pow(d, -beta);
  }
}

// A thread's work: the channels [begin, end) of one (image, pixel) column. Columns may be cut
// into `segments` runs of channels (when there are too few pixels to fill the GPU); each run
// re-reads the few rows of its window that reach over its edges.
struct Geometry {
  int64_t pixels;          // N * H * W
  int64_t hw;              // H * W, the stride between channels
  int64_t channels;        // C
  int64_t segments;        // runs of channels per column
  int64_t segment_length;  // channels per run (the last may be shorter)
};

struct Column {
  int64_t base, begin, end;  // offset of channel 0 of this pixel; the channels to produce
};

// Work item idx: consecutive items are consecutive pixels (coalesced), then the next segment.
__host__ __device__ __forceinline__ Column column_of(int64_t idx, const Geometry& g) {
  const int64_t pixel = idx % g.pixels, segment = idx / g.pixels;
  const int64_t begin = segment * g.segment_length;
  const int64_t end = begin + g.segment_length < g.channels ? begin + g.segment_length : g.channels;
  return {(pixel / g.hw) * g.channels * g.hw + pixel % g.hw, begin, end};
}

// ---- window known at compile time: everything in registers -----------------------------------
// The channel loop is unrolled by the span, so row m = first + j0 + r always sits in ring
// slot r, a compile-time index: the rings stay in registers. Rows outside 0..C-1 read as zero.

template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__host__ __device__ __forceinline__ void forward_column_registers(const scalar_t* __restrict__ x,
                                                                  scalar_t* __restrict__ y,
                                                                  acc_t* __restrict__ scale, const Column& col,
                                                                  const Geometry& g, acc_t alpha, acc_t beta,
                                                                  acc_t k, PowerKind kind) {
  constexpr int SPAN = BELOW + ABOVE + 1;
  const int64_t base = col.base, first = col.begin - BELOW;  // the first row any output needs
  acc_t xs[SPAN], sq[SPAN];
#pragma unroll
  for (int r = 0; r < SPAN; ++r) xs[r] = sq[r] = acc_t(0);
  for (int64_t m0 = first; m0 < col.end + ABOVE; m0 += SPAN) {
#pragma unroll
    for (int r = 0; r < SPAN; ++r) {
      const int64_t m = m0 + r;
      const acc_t v = m >= 0 && m < g.channels ? static_cast<acc_t>(x[base + m * g.hw]) : acc_t(0);
      xs[r] = v;
      sq[r] = v * v;
      const int64_t c = m - ABOVE;  // its window, rows c - BELOW .. m, is the whole ring
      if (c >= col.begin && c < col.end) {
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

// dx[i] = g[i] s[i] - 2 alpha beta x[i] * sum over the c whose window holds i of g[c] x[c] s[c] / d[c].
template <typename scalar_t, typename acc_t, int BELOW, int ABOVE>
__host__ __device__ __forceinline__ void backward_column_registers(const scalar_t* __restrict__ grad,
                                                                   const scalar_t* __restrict__ x,
                                                                   const acc_t* __restrict__ scale,
                                                                   scalar_t* __restrict__ dx, const Column& col,
                                                                   const Geometry& g, acc_t alpha, acc_t k,
                                                                   acc_t coef) {
  constexpr int SPAN = BELOW + ABOVE + 1;
  // dx[begin] needs the terms of rows from begin - ABOVE, whose windows start BELOW further down
  const int64_t base = col.base, first = col.begin - SPAN + 1;
  acc_t xs[SPAN], gs[SPAN], ps[SPAN], sq[SPAN], ts[SPAN];
#pragma unroll
  for (int r = 0; r < SPAN; ++r) xs[r] = gs[r] = ps[r] = sq[r] = ts[r] = acc_t(0);
  for (int64_t m0 = first; m0 < col.end + SPAN - 1; m0 += SPAN) {
#pragma unroll
    for (int r = 0; r < SPAN; ++r) {
      const int64_t m = m0 + r;
      const bool in = m >= 0 && m < g.channels;
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
      if (i >= col.begin && i < col.end) {
        acc_t sum = acc_t(0);
#pragma unroll
        for (int j = 0; j < SPAN; ++j) sum += ts[j];
        const int is = (r + 1) % SPAN;
        dx[base + i * g.hw] = static_cast<scalar_t>(gs[is] * ps[is] - coef * xs[is] * sum);
      }
    }
  }
}

// ---- any window: re-read it (from L1/L2), backward through a buffer of terms ------------------

template <typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ acc_t window_sum_of_squares(const scalar_t* x, int64_t base, int64_t c,
                                                                const Geometry& g, int below, int above) {
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
__host__ __device__ __forceinline__ void forward_column_generic(const scalar_t* __restrict__ x,
                                                                scalar_t* __restrict__ y, acc_t* __restrict__ scale,
                                                                const Column& col, const Geometry& g, int below,
                                                                int above, acc_t alpha, acc_t beta, acc_t k,
                                                                PowerKind kind) {
  const int64_t base = col.base;
  for (int64_t c = col.begin; c < col.end; ++c) {
    const acc_t s = window_sum_of_squares<scalar_t, acc_t>(x, base, c, g, below, above);
    const acc_t p = inverse_power(k + alpha * s, beta, kind);
    const int64_t off = base + c * g.hw;
    y[off] = static_cast<scalar_t>(static_cast<acc_t>(x[off]) * p);
    if (scale != nullptr) scale[off] = p;
  }
}

template <typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ void backward_terms_column_generic(const scalar_t* __restrict__ grad,
                                                                       const scalar_t* __restrict__ x,
                                                                       const acc_t* __restrict__ scale,
                                                                       acc_t* __restrict__ terms, const Column& col,
                                                                       const Geometry& g, int below, int above,
                                                                       acc_t alpha, acc_t k) {
  const int64_t base = col.base;
  for (int64_t c = col.begin; c < col.end; ++c) {
    const acc_t s = window_sum_of_squares<scalar_t, acc_t>(x, base, c, g, below, above);
    const int64_t off = base + c * g.hw;
    terms[off] = static_cast<acc_t>(grad[off]) * static_cast<acc_t>(x[off]) * scale[off] / (k + alpha * s);
  }
}

template <typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ void backward_column_generic(const scalar_t* __restrict__ grad,
                                                                 const scalar_t* __restrict__ x,
                                                                 const acc_t* __restrict__ scale,
                                                                 const acc_t* __restrict__ terms,
                                                                 scalar_t* __restrict__ dx, const Column& col,
                                                                 const Geometry& g, int below, int above,
                                                                 acc_t coef) {
  const int64_t base = col.base;
  for (int64_t i = col.begin; i < col.end; ++i) {
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

}  // namespace convnet_lrn
