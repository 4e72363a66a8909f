// Shared by the CPU and CUDA LRN kernels: the channel window and the choice of power routine.
#pragma once

#include <algorithm>
#include <cstdint>

namespace convnet_lrn {

// Output channel c sums the squares of channels c - below .. c + above (clipped at the edges):
// below = size / 2, above = (size - 1) / 2, as torch.nn.functional.local_response_norm does for
// even sizes. A window wider than the channels is clipped to them: the result is the same.
struct Window {
  int64_t below, above, span;
};

inline Window clipped_window(int64_t size, int64_t channels) {
  const int64_t reach = std::max<int64_t>(channels - 1, 0);
  const int64_t below = std::min(size / 2, reach), above = std::min((size - 1) / 2, reach);
  return {below, above, below + above + 1};
}

// (k + alpha * sum)^-beta with sqrt instead of pow for the common betas (the paper's is 0.75).
enum class PowerKind { General, Zero, Half, ThreeQuarters, One };

inline PowerKind power_kind(double beta) {
  if (beta == 0.0) return PowerKind::Zero;
  if (beta == 0.5) return PowerKind::Half;
  if (beta == 0.75) return PowerKind::ThreeQuarters;
  if (beta == 1.0) return PowerKind::One;
  return PowerKind::General;
}

}  // namespace convnet_lrn
