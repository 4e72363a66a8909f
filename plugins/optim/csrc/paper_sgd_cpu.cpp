// The paper's SGD step in one pass over each parameter, on the CPU:
//
//   v <- momentum * v + weight_step * w + grad_step * g      (weight_step = -wd lr, grad_step = -lr)
//   w <- w + v
//
// The multi-tensor form in paper_sgd.py makes four passes (v *= m; v += a w; v += b g; w += v),
// reading and writing the velocity four times; on AlexNet's 61 M parameters the step is memory
// bound, so one pass takes under half the time. Each element is computed as those four ATen ops
// compute it, in the same order and rounding: ATen's vectorised add with alpha is a fused
// multiply-add (its AVX2 and AVX-512 kernels), so this uses std::fma where the build has FMA and a
// separately rounded multiply and add where it has not (built with -ffp-contract=off, so the
// compiler fuses nothing on its own). The two forms then give the same bits.
//
// The schema is defined once, in Python (plugins/optim/fused_step.py); this file only supplies
// the CPU implementation.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline T multiply_add(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// One tensor; `decay` is a template argument so the loop has no branch and vectorises.
template <typename T, bool decay>
void step_one(T* w, const T* g, T* v, int64_t n, T momentum, T weight_step, T grad_step) {
  constexpr int64_t grain = 1 << 15;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T vi = v[i] * momentum;
      if constexpr (decay) vi = multiply_add(w[i], weight_step, vi);
      vi = multiply_add(g[i], grad_step, vi);
      v[i] = vi;
      w[i] = w[i] + vi;
    }
  });
}

// The strides that fix a dense tensor's memory order: a size-1 dimension's stride fixes nothing.
std::vector<int64_t> order(const at::Tensor& t) {
  std::vector<int64_t> out;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) out.push_back(t.stride(d));
  }
  return out;
}

void check_triple(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, size_t i) {
  TORCH_CHECK(w.device().is_cpu() && g.device().is_cpu() && v.device().is_cpu(),
              "paper_sgd_: tensor ", i, " is not on the CPU");
  TORCH_CHECK(w.layout() == at::kStrided && g.layout() == at::kStrided && v.layout() == at::kStrided,
              "paper_sgd_: tensor ", i, " is not strided (sparse gradients are not supported)");
  TORCH_CHECK(w.scalar_type() == g.scalar_type() && w.scalar_type() == v.scalar_type(),
              "paper_sgd_: parameter, gradient and velocity ", i, " differ in dtype");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "paper_sgd_: tensor ", i, " is ", w.scalar_type(), "; float32 and float64 only");
  TORCH_CHECK(w.sizes() == g.sizes() && w.sizes() == v.sizes(),
              "paper_sgd_: parameter, gradient and velocity ", i, " differ in shape");
  TORCH_CHECK(w.is_non_overlapping_and_dense() && g.is_non_overlapping_and_dense() &&
                  v.is_non_overlapping_and_dense(),
              "paper_sgd_: parameter, gradient or velocity ", i, " is not dense");
  TORCH_CHECK(order(w) == order(g) && order(w) == order(v),
              "paper_sgd_: parameter, gradient and velocity ", i, " are laid out in different orders");
}

void paper_sgd_(at::TensorList params, at::TensorList grads, at::TensorList velocities, double momentum,
                std::optional<double> weight_step, double grad_step) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == velocities.size(),
              "paper_sgd_: ", params.size(), " parameters, ", grads.size(), " gradients, ", velocities.size(),
              " velocities");
  for (size_t i = 0; i < params.size(); ++i) check_triple(params[i], grads[i], velocities[i], i);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor &w = params[i], &g = grads[i], &v = velocities[i];
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "convnet_paper_sgd_cpu", [&] {
      // data_ptr() is the lowest address of a dense tensor whatever its strides, and the three
      // share a memory order: element i of one is element i of the others.
      auto* wp = w.data_ptr<scalar_t>();
      const auto* gp = g.data_ptr<scalar_t>();
      auto* vp = v.data_ptr<scalar_t>();
      const auto m = static_cast<scalar_t>(momentum), b = static_cast<scalar_t>(grad_step);
      if (weight_step.has_value()) {
        step_one<scalar_t, true>(wp, gp, vp, w.numel(), m, static_cast<scalar_t>(*weight_step), b);
      } else {
        step_one<scalar_t, false>(wp, gp, vp, w.numel(), m, scalar_t(0), b);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(convnet, CPU, m) { m.impl("paper_sgd_", &paper_sgd_); }
