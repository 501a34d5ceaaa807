// CUDA binding of bn_act: checks, allocation, launch on the current stream, registration for the
// CUDA key.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/bn_act_checks.h"
#include "../common/bn_act_entries.h"
#include "../common/running_stats.h"
#include "bn_act_kernel.h"

namespace fastres::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

ActivationType activation_type(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ActivationType::kFloat;
    case at::kHalf:
      return ActivationType::kHalf;
    case at::kBFloat16:
      return ActivationType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "bn_act: the cuda backend takes float32, float16 or bfloat16 x, got ",
                       x.scalar_type(), " (float64 runs on the cpu and torch backends)");
  }
}

Tensor workspace_for(const BnActLayout& layout, const Tensor& x) {
  const auto bytes = static_cast<int64_t>(bn_act_workspace_bytes(layout, x.get_device()));
  return at::empty({bytes}, x.options().dtype(at::kByte));
}

// bn_act_forward, or with residual_after_activation bn_act_add_forward's computation (no ReLU
// mask: its backward recomputes the activation's input).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& x_in, const OptTensor& weight_in, const OptTensor& bias_in,
    const OptTensor& residual_in, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view activation_name,
    bool residual_after_activation) {
  check_x_device_type(x_in, at::kCUDA);
  const Activation activation = parse_activation(activation_name);
  const bool relu = activation == Activation::kRelu && !residual_after_activation;
  check_forward_args(x_in, weight_in, bias_in, residual_in, running_mean, running_var, training,
                     eps);
  const ActivationType dtype = activation_type(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const OptTensor residual = residual_in ? OptTensor(dense_in(*residual_in, format)) : std::nullopt;
  const OptTensor weight = dense_vector(weight_in), bias = dense_vector(bias_in);
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(at::kFloat);

  Tensor out = at::empty_like(x, format);
  Tensor relu_mask =
      at::empty({relu ? relu_mask_bytes(layout.numel()) : 0}, x.options().dtype(at::kByte));
  // Outputs never alias inputs (a custom-op rule), hence the copies of the running statistics.
  Tensor save_mean =
      training ? at::empty({layout.c}, param_options) : running_mean->contiguous().clone();
  Tensor save_var =
      training ? at::empty({layout.c}, param_options) : running_var->contiguous().clone();
  if (layout.numel() == 0) {
    if (training) {  // an empty batch has no statistics; PyTorch reports NaN for them
      save_mean.fill_(NAN);
      save_var.fill_(NAN);
    }
    return {out, save_mean, save_var, relu_mask};
  }
  Tensor workspace = workspace_for(layout, x);

  BnActForwardParams params;
  params.x = x.data_ptr();
  params.residual = residual ? residual->data_ptr() : nullptr;
  params.weight = ptr_or_null<float>(weight);
  params.bias = ptr_or_null<float>(bias);
  params.mean = save_mean.data_ptr<float>();
  params.var = save_var.data_ptr<float>();
  params.out = out.data_ptr();
  params.relu_mask = relu ? relu_mask.data_ptr<uint8_t>() : nullptr;
  params.workspace = workspace.data_ptr();
  params.layout = layout;
  params.dtype = dtype;
  params.training = training;
  params.activation = activation;
  params.residual_after_activation = residual_after_activation;
  params.eps = static_cast<float>(eps);
  launch_bn_act_forward(params, x.get_device(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (training) {
    update_running_stats(running_mean, running_var, save_mean, save_var, momentum,
                         layout.reduce_size());
  }
  return {out, save_mean, save_var, relu_mask};
}

// The inputs of every backward launch (whole or split); the caller fills in the outputs.
BnActBackwardParams backward_params(const Tensor& grad_out, const Tensor& x,
                                    const OptTensor& weight, const Tensor& save_mean,
                                    const Tensor& save_var, const Tensor& relu_mask,
                                    const Tensor& workspace, const BnActLayout& layout,
                                    bool training, double eps, bool relu) {
  BnActBackwardParams params;
  params.grad_out = grad_out.data_ptr();
  params.x = x.data_ptr();
  params.relu_mask = relu ? relu_mask.data_ptr<uint8_t>() : nullptr;
  params.weight = ptr_or_null<float>(weight);
  params.mean = save_mean.data_ptr<float>();
  params.var = save_var.data_ptr<float>();
  params.workspace = workspace.data_ptr();
  params.layout = layout;
  params.dtype = activation_type(x);
  params.training = training;
  params.relu = relu;
  params.eps = static_cast<float>(eps);
  return params;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& grad_out_in, const Tensor& x_in, const OptTensor& weight_in,
    const Tensor& save_mean_in, const Tensor& save_var_in, const Tensor& relu_mask, bool training,
    double eps, bool relu, bool residual_grad) {
  check_x_device_type(x_in, at::kCUDA);
  check_backward_args(grad_out_in, x_in, weight_in, save_mean_in, save_var_in, relu_mask, relu);
  (void)activation_type(x_in);  // float64 gets the clear error here
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const OptTensor weight = dense_vector(weight_in);
  const Tensor save_mean = save_mean_in.contiguous(), save_var = save_var_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(at::kFloat);

  Tensor grad_x = at::empty_like(x, format);
  Tensor grad_residual = residual_grad ? at::empty_like(x, format) : at::empty({0}, x.options());
  Tensor grad_weight = at::empty({layout.c}, param_options);
  Tensor grad_bias = at::empty({layout.c}, param_options);
  if (layout.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias, grad_residual};
  }
  Tensor workspace = workspace_for(layout, x);

  BnActBackwardParams params = backward_params(grad_out, x, weight, save_mean, save_var, relu_mask,
                                               workspace, layout, training, eps, relu);
  params.grad_x = grad_x.data_ptr();
  params.grad_residual = residual_grad ? grad_residual.data_ptr() : nullptr;
  params.grad_weight = grad_weight.data_ptr<float>();
  params.grad_bias = grad_bias.data_ptr<float>();
  launch_bn_act_backward(params, x.get_device(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight, grad_bias, grad_residual};
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x_in) {
  check_x_device_type(x_in, at::kCUDA);
  check_activation(x_in, "x");
  const ActivationType dtype = activation_type(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const BnActLayout layout = layout_of(x, format);
  Tensor mean = at::empty({layout.c}, x.options().dtype(at::kFloat));
  Tensor var = at::empty({layout.c}, x.options().dtype(at::kFloat));
  if (layout.numel() == 0) {  // an empty batch has no statistics; PyTorch reports NaN for them
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  Tensor workspace = workspace_for(layout, x);
  BnActForwardParams params;
  params.x = x.data_ptr();
  params.mean = mean.data_ptr<float>();
  params.var = var.data_ptr<float>();
  params.workspace = workspace.data_ptr();
  params.layout = layout;
  params.dtype = dtype;
  launch_bn_stats(params, x.get_device(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, var};
}

std::tuple<Tensor, Tensor> bn_act_backward_reduce(const Tensor& grad_out_in, const Tensor& x_in,
                                                  const Tensor& save_mean_in,
                                                  const Tensor& relu_mask, bool relu) {
  check_x_device_type(x_in, at::kCUDA);
  check_backward_reduce_args(grad_out_in, x_in, save_mean_in, relu_mask, relu);
  (void)activation_type(x_in);  // float64 gets the clear error here
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const Tensor save_mean = save_mean_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  Tensor sum_grad = at::zeros({layout.c}, x.options().dtype(at::kFloat));
  Tensor sum_grad_centred = at::zeros({layout.c}, x.options().dtype(at::kFloat));
  if (layout.numel() == 0) return {sum_grad, sum_grad_centred};
  Tensor workspace = workspace_for(layout, x);
  const BnActBackwardParams params =
      backward_params(grad_out, x, std::nullopt, save_mean, save_mean, relu_mask, workspace, layout,
                      /*training=*/true, 1.0, relu);
  launch_bn_act_backward_reduce(params, sum_grad.data_ptr<float>(),
                                sum_grad_centred.data_ptr<float>(), x.get_device(),
                                at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sum_grad, sum_grad_centred};
}

std::tuple<Tensor, Tensor> bn_act_backward_apply(const Tensor& grad_out_in, const Tensor& x_in,
                                                 const OptTensor& weight_in,
                                                 const Tensor& save_mean_in,
                                                 const Tensor& save_var_in, const Tensor& relu_mask,
                                                 const Tensor& sum_grad_in,
                                                 const Tensor& sum_grad_centred_in, int64_t count,
                                                 double eps, bool relu, bool residual_grad) {
  check_x_device_type(x_in, at::kCUDA);
  check_backward_apply_args(grad_out_in, x_in, weight_in, save_mean_in, save_var_in, relu_mask,
                            sum_grad_in, sum_grad_centred_in, count, eps, relu);
  (void)activation_type(x_in);  // float64 gets the clear error here
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const OptTensor weight = dense_vector(weight_in);
  const Tensor save_mean = save_mean_in.contiguous(), save_var = save_var_in.contiguous();
  const Tensor sum_grad = sum_grad_in.contiguous();
  const Tensor sum_grad_centred = sum_grad_centred_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  Tensor grad_x = at::empty_like(x, format);
  Tensor grad_residual = residual_grad ? at::empty_like(x, format) : at::empty({0}, x.options());
  if (layout.numel() == 0) return {grad_x, grad_residual};
  Tensor workspace = workspace_for(layout, x);
  BnActBackwardParams params = backward_params(grad_out, x, weight, save_mean, save_var, relu_mask,
                                               workspace, layout, /*training=*/true, eps, relu);
  params.grad_x = grad_x.data_ptr();
  params.grad_residual = residual_grad ? grad_residual.data_ptr() : nullptr;
  launch_bn_act_backward_apply(params, sum_grad.data_ptr<float>(),
                               sum_grad_centred.data_ptr<float>(), count, x.get_device(),
                               at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward_on<forward>);
  m.impl("bn_act_add_forward", &bn_act_add_forward_on<forward>);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply);
}

}  // namespace fastres::cuda
