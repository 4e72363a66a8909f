// Argument checks shared by the CPU and CUDA LRN kernels (ATen; lrn_common.h stays torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace convnet_lrn {

// The backward pass's grad, input and saved scale must describe the same forward call. A kernel
// that can recompute the scale (the CPU one) also takes the empty tensor of an unsaved scale.
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& scale,
                                bool scale_may_be_unsaved = false) {
  const bool unsaved = scale.numel() == 0;
  TORCH_CHECK(!unsaved || scale_may_be_unsaved || input.numel() == 0,
              "LRN backward: this kernel needs the scale saved by its forward (save_scale=True)");
  TORCH_CHECK(grad.sizes() == input.sizes() && (unsaved || scale.sizes() == input.sizes()),
              "LRN backward: grad, input and scale shapes differ");
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "LRN backward: grad and input dtypes differ");
  TORCH_CHECK(scale.scalar_type() == at::toOpMathType(input.scalar_type()), "LRN backward: scale dtype");
}

// A kernel that computes on NCHW-contiguous buffers returns its results in the layout
// torch.empty_like(input) would give (a channels_last input gets a channels_last y), which is what
// the fake implementation (plugins/lrn/ops.py) promises torch.compile and torch.export; the CPU
// kernel returns its scale so too, the CUDA kernel keeps its scale NCHW. An unsaved scale (an
// empty tensor) is returned as it is.
inline at::Tensor in_layout_of(const at::Tensor& out, const at::Tensor& input) {
  if (input.is_contiguous() || out.sizes() != input.sizes()) return out;
  at::Tensor shaped = at::empty_like(input, out.options());
  shaped.copy_(out);
  return shaped;
}

// Channels-last memory (NHWC) that is not also NCHW-contiguous: the layout the CPU kernel reads
// and writes in place of NCHW, with each pixel's channels adjacent.
inline bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The saved scale, or an empty tensor when the caller needs no backward (the schema returns a Tensor).
inline at::Tensor scale_buffer(const at::Tensor& x, bool save_scale) {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  return save_scale ? at::empty(x.sizes(), options) : at::empty({0}, options);
}

}  // namespace convnet_lrn
