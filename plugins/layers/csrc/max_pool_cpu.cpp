// Max-pooling of contiguous NCHW tensors on the CPU, with the argmax indices that ATen's
// max_pool2d_with_indices_backward reads: the values and indices ATen's own kernel gives, bit for
// bit, three times faster at AlexNet's shapes (benchmarks/max_pool.py).
//
// ATen's NCHW kernel scans each window element by element, which does not vectorise. This one
// pools each output row in two passes that do: down the k input rows, column by column (the
// column maxima and the row each came from), then across the k columns of each window, with the
// column maxima first split by phase (column c = i * s + q into slot i of phase q) so that the
// window's j-th column is phase j % s, slot ow + j / s: contiguous in ow.
//
// The index chosen is ATen's: it scans a window in row-major order and takes an element when
// `value > best || isnan(value)`, so without a NaN it keeps the first maximum (the least row, then
// the least column), and with one the last NaN (the greatest row, then the greatest column). The
// column pass keeps, per column, the first maximum or the last NaN down the rows; the row pass
// ranks the columns' candidates by the same order.
//
// The schema is defined once, in Python (plugins/layers/max_pool_kernel.py); this file only
// supplies the CPU implementation.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

template <typename T>
void pool_planes(const T* x, T* y, int64_t* indices, int64_t planes, int64_t H, int64_t W, int64_t k, int64_t s) {
  const int64_t OH = (H - k) / s + 1, OW = (W - k) / s + 1;
  // Phase q holds columns q, q + s, ...: at most min(s, W) phases of span slots (sized by W, not
  // by the stride, which may be huge).
  const int64_t span = (W - 1) / s + 1, phases = std::min(s, W);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> col(W), phase_max(phases * span), best(OW);
    std::vector<int32_t> col_row(W), phase_row(phases * span), best_row(OW), best_j(OW);
    for (int64_t p = begin; p < end; ++p) {
      const T* plane = x + p * H * W;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const int32_t r0 = static_cast<int32_t>(oh * s);
        const T* top = plane + r0 * W;
        for (int64_t w = 0; w < W; ++w) {
          col[w] = top[w];
          col_row[w] = r0;
        }
        for (int32_t i = 1; i < k; ++i) {
          const T* row = top + i * W;
          const int32_t r = r0 + i;
          for (int64_t w = 0; w < W; ++w) {
            const T v = row[w];
            const bool take = (v > col[w]) | (v != v);
            col[w] = take ? v : col[w];
            col_row[w] = take ? r : col_row[w];
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          phase_max[(w % s) * span + w / s] = col[w];
          phase_row[(w % s) * span + w / s] = col_row[w];
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          best[ow] = phase_max[ow];
          best_row[ow] = phase_row[ow];
          best_j[ow] = 0;
        }
        for (int32_t j = 1; j < k; ++j) {
          const T* m_j = phase_max.data() + (j % s) * span + j / s;
          const int32_t* r_j = phase_row.data() + (j % s) * span + j / s;
          for (int64_t ow = 0; ow < OW; ++ow) {
            const T m = m_j[ow], b = best[ow];
            const int32_t r = r_j[ow], q = best_row[ow];
            const bool m_nan = m != m, b_nan = b != b;
            const bool take = (m_nan & (!b_nan | (r >= q))) | (!m_nan & !b_nan & ((m > b) | ((m == b) & (r < q))));
            best[ow] = take ? m : b;
            best_row[ow] = take ? r : q;
            best_j[ow] = take ? j : best_j[ow];
          }
        }
        T* y_row = y + (p * OH + oh) * OW;
        int64_t* i_row = indices + (p * OH + oh) * OW;
        for (int64_t ow = 0; ow < OW; ++ow) {
          y_row[ow] = best[ow];
          i_row[ow] = static_cast<int64_t>(best_row[ow]) * W + ow * s + best_j[ow];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_nchw(const at::Tensor& x, int64_t kernel, int64_t stride) {
  TORCH_CHECK(x.device().is_cpu(), "max_pool2d_nchw: a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "max_pool2d_nchw: a contiguous NCHW tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "max_pool2d_nchw: ",
              x.scalar_type(), "; float32 and float64 only");
  TORCH_CHECK(kernel > 0 && stride > 0, "max_pool2d_nchw: kernel ", kernel, " and stride ", stride,
              " must be positive");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H >= kernel && W >= kernel, "max_pool2d_nchw: a ", kernel, "x", kernel, " window on a ", H, "x",
              W, " input");
  TORCH_CHECK(H * W <= INT32_MAX, "max_pool2d_nchw: planes of over 2^31 elements");
  const int64_t OH = (H - kernel) / stride + 1, OW = (W - kernel) / stride + 1;
  auto y = at::empty({N, C, OH, OW}, x.options());
  auto indices = at::empty({N, C, OH, OW}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convnet_max_pool2d_nchw", [&] {
    pool_planes<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), N * C, H,
                          W, kernel, stride);
  });
  return {y, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnet, CPU, m) { m.impl("max_pool2d_nchw", &max_pool2d_nchw); }
