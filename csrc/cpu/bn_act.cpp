// CPU binding of bn_act: checks, allocation, dtype dispatch, registration for the CPU key.
#include <torch/library.h>

#include "../common/bn_act_checks.h"
#include "../common/bn_act_entries.h"
#include "../common/running_stats.h"
#include "bn_act_kernel.h"

namespace fastres::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// bn_act_forward, or with residual_after_activation bn_act_add_forward's computation (no ReLU
// mask: its backward recomputes the activation's input).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& x_in, const OptTensor& weight_in, const OptTensor& bias_in,
    const OptTensor& residual_in, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view activation_name,
    bool residual_after_activation) {
  check_x_device_type(x_in, at::kCPU);
  const Activation activation = parse_activation(activation_name);
  const bool relu = activation == Activation::kRelu && !residual_after_activation;
  check_forward_args(x_in, weight_in, bias_in, residual_in, running_mean, running_var, training,
                     eps);
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const OptTensor residual = residual_in ? OptTensor(dense_in(*residual_in, format)) : std::nullopt;
  const OptTensor weight = dense_vector(weight_in), bias = dense_vector(bias_in);
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(param_dtype_for(x));

  Tensor out = at::empty_like(x, format);
  Tensor relu_mask =
      at::empty({relu ? relu_mask_bytes(layout.numel()) : 0}, x.options().dtype(at::kByte));
  // Outputs never alias inputs (a custom-op rule), hence the copies of the running statistics.
  Tensor save_mean =
      training ? at::empty({layout.c}, param_options) : running_mean->contiguous().clone();
  Tensor save_var =
      training ? at::empty({layout.c}, param_options) : running_var->contiguous().clone();
  // What rounding the batch mean to save_mean's dtype left out (zero for given statistics).
  Tensor mean_low = at::zeros({layout.c}, param_options);
  Tensor scale = at::empty({layout.c}, param_options);
  Tensor shift = at::empty({layout.c}, param_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_forward_cpu", [&] {
        using P = opmath<scalar_t>;
        if (training && layout.numel() > 0) {
          FASTRES_CPU_DISPATCH(bn_batch_stats<scalar_t>, x.data_ptr<scalar_t>(), layout,
                               save_mean.data_ptr<P>(), save_var.data_ptr<P>(),
                               mean_low.data_ptr<P>());
        } else if (training) {
          // An empty batch has no statistics; PyTorch reports NaN for them.
          save_mean.fill_(NAN);
          save_var.fill_(NAN);
        }
        FASTRES_CPU_DISPATCH(bn_scale_shift<scalar_t>, save_mean.data_ptr<P>(),
                             save_var.data_ptr<P>(), ptr_or_null<P>(weight), ptr_or_null<P>(bias),
                             eps, layout.c, scale.data_ptr<P>(), shift.data_ptr<P>());
        FASTRES_CPU_DISPATCH(bn_act_apply<scalar_t>, x.data_ptr<scalar_t>(),
                             residual ? residual->data_ptr<scalar_t>() : nullptr,
                             save_mean.data_ptr<P>(), mean_low.data_ptr<P>(), scale.data_ptr<P>(),
                             shift.data_ptr<P>(), layout, activation, residual_after_activation,
                             out.data_ptr<scalar_t>(),
                             relu ? relu_mask.data_ptr<uint8_t>() : nullptr);
      });
  if (training) {
    update_running_stats(running_mean, running_var, save_mean, save_var, momentum,
                         layout.reduce_size());
  }
  return {out, save_mean, save_var, relu_mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& grad_out_in, const Tensor& x_in, const OptTensor& weight_in,
    const Tensor& save_mean_in, const Tensor& save_var_in, const Tensor& relu_mask, bool training,
    double eps, bool relu, bool residual_grad) {
  check_x_device_type(x_in, at::kCPU);
  check_backward_args(grad_out_in, x_in, weight_in, save_mean_in, save_var_in, relu_mask, relu);
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const OptTensor weight = dense_vector(weight_in);
  const Tensor save_mean = save_mean_in.contiguous(), save_var = save_var_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(param_dtype_for(x));

  Tensor grad_x = at::empty_like(x, format);
  Tensor grad_residual = residual_grad ? at::empty_like(x, format) : at::empty({0}, x.options());
  Tensor grad_bias = at::empty({layout.c}, param_options);  // = sum of the masked gradient
  Tensor sum_gx = at::empty({layout.c}, param_options);
  Tensor grad_weight = at::empty({layout.c}, param_options);
  Tensor coefficients = at::empty({3, layout.c}, param_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_cpu", [&] {
        using P = opmath<scalar_t>;
        const uint8_t* mask = relu ? relu_mask.data_ptr<uint8_t>() : nullptr;
        P* k = coefficients.data_ptr<P>();
        FASTRES_CPU_DISPATCH(bn_act_backward_reduce<scalar_t>, grad_out.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), mask, save_mean.data_ptr<P>(), layout,
                             grad_bias.data_ptr<P>(), sum_gx.data_ptr<P>());
        FASTRES_CPU_DISPATCH(bn_backward_coefficients<scalar_t>, save_mean.data_ptr<P>(),
                             save_var.data_ptr<P>(), ptr_or_null<P>(weight),
                             grad_bias.data_ptr<P>(), sum_gx.data_ptr<P>(), eps,
                             layout.reduce_size(), layout.c, training, k, k + layout.c,
                             k + 2 * layout.c, grad_weight.data_ptr<P>());
        FASTRES_CPU_DISPATCH(bn_act_backward_apply<scalar_t>, grad_out.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), mask, save_mean.data_ptr<P>(), k, k + layout.c,
                             k + 2 * layout.c, layout, grad_x.data_ptr<scalar_t>(),
                             residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr);
      });
  return {grad_x, grad_weight, grad_bias, grad_residual};
}

std::tuple<Tensor, Tensor> bn_stats(const Tensor& x_in) {
  check_x_device_type(x_in, at::kCPU);
  check_activation(x_in, "x");
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(param_dtype_for(x));
  Tensor mean = at::empty({layout.c}, param_options);
  Tensor var = at::empty({layout.c}, param_options);
  if (layout.numel() == 0) {  // an empty batch has no statistics; PyTorch reports NaN for them
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using P = opmath<scalar_t>;
    FASTRES_CPU_DISPATCH(bn_batch_stats<scalar_t>, x.data_ptr<scalar_t>(), layout,
                         mean.data_ptr<P>(), var.data_ptr<P>(), /*mean_low=*/nullptr);
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> bn_act_backward_reduce(const Tensor& grad_out_in, const Tensor& x_in,
                                                  const Tensor& save_mean_in,
                                                  const Tensor& relu_mask, bool relu) {
  check_x_device_type(x_in, at::kCPU);
  check_backward_reduce_args(grad_out_in, x_in, save_mean_in, relu_mask, relu);
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const Tensor save_mean = save_mean_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(param_dtype_for(x));
  Tensor sum_grad = at::empty({layout.c}, param_options);
  Tensor sum_grad_centred = at::empty({layout.c}, param_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
        using P = opmath<scalar_t>;
        FASTRES_CPU_DISPATCH(bn_act_backward_reduce<scalar_t>, grad_out.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), relu ? relu_mask.data_ptr<uint8_t>() : nullptr,
                             save_mean.data_ptr<P>(), layout, sum_grad.data_ptr<P>(),
                             sum_grad_centred.data_ptr<P>());
      });
  return {sum_grad, sum_grad_centred};
}

std::tuple<Tensor, Tensor> bn_act_backward_apply(const Tensor& grad_out_in, const Tensor& x_in,
                                                 const OptTensor& weight_in,
                                                 const Tensor& save_mean_in,
                                                 const Tensor& save_var_in, const Tensor& relu_mask,
                                                 const Tensor& sum_grad_in,
                                                 const Tensor& sum_grad_centred_in, int64_t count,
                                                 double eps, bool relu, bool residual_grad) {
  check_x_device_type(x_in, at::kCPU);
  check_backward_apply_args(grad_out_in, x_in, weight_in, save_mean_in, save_var_in, relu_mask,
                            sum_grad_in, sum_grad_centred_in, count, eps, relu);
  const auto format = memory_format_of(x_in);
  const Tensor x = dense_in(x_in, format);
  const Tensor grad_out = dense_in(grad_out_in, format);
  const OptTensor weight = dense_vector(weight_in);
  const Tensor save_mean = save_mean_in.contiguous(), save_var = save_var_in.contiguous();
  const Tensor sum_grad = sum_grad_in.contiguous();
  const Tensor sum_grad_centred = sum_grad_centred_in.contiguous();
  const BnActLayout layout = layout_of(x, format);
  const auto param_options = x.options().dtype(param_dtype_for(x));

  Tensor grad_x = at::empty_like(x, format);
  Tensor grad_residual = residual_grad ? at::empty_like(x, format) : at::empty({0}, x.options());
  Tensor coefficients = at::empty({4, layout.c}, param_options);  // k_grad, k_x, k_const, unused

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_backward_apply_cpu", [&] {
        using P = opmath<scalar_t>;
        P* k = coefficients.data_ptr<P>();
        const int64_t C = layout.c;
        FASTRES_CPU_DISPATCH(bn_backward_coefficients<scalar_t>, save_mean.data_ptr<P>(),
                             save_var.data_ptr<P>(), ptr_or_null<P>(weight), sum_grad.data_ptr<P>(),
                             sum_grad_centred.data_ptr<P>(), eps, count, C, /*training=*/true, k,
                             k + C, k + 2 * C, k + 3 * C);
        FASTRES_CPU_DISPATCH(bn_act_backward_apply<scalar_t>, grad_out.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), relu ? relu_mask.data_ptr<uint8_t>() : nullptr,
                             save_mean.data_ptr<P>(), k, k + C, k + 2 * C, layout,
                             grad_x.data_ptr<scalar_t>(),
                             residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr);
      });
  return {grad_x, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_on<forward>);
  m.impl("bn_act_add_forward", &bn_act_add_forward_on<forward>);
  m.impl("bn_act_backward", &bn_act_backward);
  m.impl("bn_stats", &bn_stats);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce);
  m.impl("bn_act_backward_apply", &bn_act_backward_apply);
}

}  // namespace fastres::cpu
