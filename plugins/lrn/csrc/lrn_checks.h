// Argument checks shared by the CPU and CUDA LRN kernels (ATen; lrn_common.h stays torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

namespace convnet_lrn {

// The backward pass's grad, input and saved scale must describe the same forward call.
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale) {
  TORCH_CHECK(grad.sizes() == input.sizes() && scale.sizes() == input.sizes(),
              "LRN backward: grad, input and scale shapes differ");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "LRN backward: grad and input dtypes differ");
  TORCH_CHECK(scale.scalar_type() == at::toOpMathType(input.scalar_type()), "LRN backward: scale dtype");
}

}  // namespace convnet_lrn
