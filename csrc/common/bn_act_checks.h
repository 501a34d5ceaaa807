// Argument checks and layout preparation shared by the CPU and CUDA bindings of bn_act.
//
// Every check names the argument and what was expected, so that a user calling
// torch.ops.fastres.* directly gets an error they can act on. The Python op layer runs the same
// checks first for every backend (fastres/ops/bn_act.py); these keep the C++ ops safe on their own.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "bn_act_layout.h"

namespace fastres {

// The binding registered for a dispatch key runs whenever any argument has that key's device, so
// x itself may be elsewhere (a CUDA mask next to a CPU x reaches the CUDA binding).
inline void check_x_device_type(const at::Tensor& x, c10::DeviceType expected) {
  TORCH_CHECK_VALUE(x.device().type() == expected, "bn_act: x must be a ",
                    c10::DeviceTypeName(expected, /*lower_case=*/true),
                    " tensor for this kernel (every tensor argument on one device), got x on ",
                    x.device());
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, "bn_act: ", name, " must be a 4-D (N, C, H, W) tensor, got ",
                    t.dim(), "-D with shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "bn_act: ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// The activation named by an op's `activation` argument.
inline Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(name == "identity",
                    "bn_act: activation must be 'identity', 'relu' or 'silu', got '",
                    std::string(name), "'");
  return Activation::kIdentity;
}

// Statistics and affine parameters are float32 for float32/float16/bfloat16 activations (what
// autocast produces) and float64 for float64 activations.
inline at::ScalarType param_dtype_for(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_vector(const std::optional<at::Tensor>& t, const char* name,
                                 const at::Tensor& x) {
  if (!t.has_value()) return;
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, "bn_act: ", name, " must have shape [",
                    channels, "] to match the channels of x, got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == param_dtype_for(x), "bn_act: ", name, " must be ",
                   param_dtype_for(x), " for ", x.scalar_type(), " activations, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "bn_act: ", name, " must be on ", x.device(),
                    " like x, got ", t->device());
}

inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "bn_act: ", name, " must have the shape of x ",
                    x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "bn_act: ", name,
                   " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "bn_act: ", name, " must be on ", x.device(),
                    " like x, got ", t.device());
}

inline at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline BnActLayout layout_of(const at::Tensor& x, at::MemoryFormat format) {
  BnActLayout layout;
  layout.n = x.size(0);
  layout.c = x.size(1);
  layout.hw = x.size(2) * x.size(3);
  layout.channels_last = format == at::MemoryFormat::ChannelsLast;
  return layout;
}

// Dense in `format`: a no-op for NCHW-contiguous and channels_last inputs, one copy otherwise.
inline at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat format) {
  return t.contiguous(format);
}

template <typename P>
const P* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<P>() : nullptr;
}

// 1-D parameters may arrive as strided views; the kernels index them densely.
inline std::optional<at::Tensor> dense_vector(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Validates bn_act_forward's arguments (shared by every device).
inline void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training,
                               double eps) {
  check_activation(x, "x");
  check_channel_vector(weight, "weight", x);
  check_channel_vector(bias, "bias", x);
  check_channel_vector(running_mean, "running_mean", x);
  check_channel_vector(running_var, "running_var", x);
  if (residual.has_value()) check_like_x(*residual, "residual", x);
  TORCH_CHECK_VALUE(eps > 0, "bn_act: eps must be positive, got ", eps);
  if (training) {
    // Same condition and message as torch.nn.functional.batch_norm.
    TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) != 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      x.sizes());
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                      "bn_act: running_mean and running_var are required when training=False");
  }
}

// Validates bn_act_backward's arguments against the saved forward values.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight,
                                const at::Tensor& save_mean, const at::Tensor& save_var,
                                const at::Tensor& relu_mask, bool relu) {
  check_activation(x, "x");
  check_like_x(grad_out, "grad_out", x);
  check_channel_vector(weight, "weight", x);
  check_channel_vector(save_mean, "save_mean", x);
  check_channel_vector(save_var, "save_var", x);
  if (relu) {
    TORCH_CHECK_VALUE(relu_mask.scalar_type() == at::kByte && relu_mask.dim() == 1 &&
                          relu_mask.numel() == relu_mask_bytes(x.numel()) &&
                          relu_mask.device() == x.device(),
                      "bn_act: relu_mask must be the uint8 tensor of ", relu_mask_bytes(x.numel()),
                      " bytes returned by bn_act_forward for this x, got ", relu_mask.scalar_type(),
                      " of shape ", relu_mask.sizes(), " on ", relu_mask.device());
    // The kernels read the mask as dense bytes; a strided view would be misread.
    TORCH_CHECK_VALUE(relu_mask.is_contiguous(),
                      "bn_act: relu_mask must be contiguous (the dense "
                      "tensor bn_act_forward returned), got strides ",
                      relu_mask.strides());
  }
}

// Validates bn_act_backward_reduce's arguments.
inline void check_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& save_mean, const at::Tensor& relu_mask,
                                       bool relu) {
  check_backward_args(grad_out, x, std::nullopt, save_mean, save_mean, relu_mask, relu);
}

// Validates bn_act_backward_apply's arguments.
inline void check_backward_apply_args(const at::Tensor& grad_out, const at::Tensor& x,
                                      const std::optional<at::Tensor>& weight,
                                      const at::Tensor& save_mean, const at::Tensor& save_var,
                                      const at::Tensor& relu_mask, const at::Tensor& sum_grad,
                                      const at::Tensor& sum_grad_centred, int64_t count, double eps,
                                      bool relu) {
  check_backward_args(grad_out, x, weight, save_mean, save_var, relu_mask, relu);
  check_channel_vector(sum_grad, "sum_grad", x);
  check_channel_vector(sum_grad_centred, "sum_grad_centred", x);
  TORCH_CHECK_VALUE(count >= x.size(0) * x.size(2) * x.size(3) && count > 1,
                    "bn_act: count must be the number of values per channel over every process "
                    "(at least this process's ",
                    x.size(0) * x.size(2) * x.size(3), " and more than 1), got ", count);
  TORCH_CHECK_VALUE(eps > 0, "bn_act: eps must be positive, got ", eps);
}

}  // namespace fastres
