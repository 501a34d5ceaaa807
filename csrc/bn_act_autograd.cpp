// Autograd for the compiled bn_act ops, for every device.
//
// Registered in C++ rather than with torch.library.register_autograd: the Python autograd path
// costs about 40 us per forward + backward, as much as the whole kernel at ResNet-50's 7x7
// layers. The Triton op family keeps its Python autograd (fastres/ops/bn_act.py); both compute
// the same gradients through the same backward op schema.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/bn_act_checks.h"

namespace fastres {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

ForwardResult call_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& residual, const OptTensor& running_mean,
                           const OptTensor& running_var, bool training, double momentum, double eps,
                           c10::string_view activation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastres::bn_act_forward", "")
                       .typed<ForwardResult(const Tensor&, const OptTensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, const OptTensor&,
                                            bool, double, double, c10::string_view)>();
  return op.call(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                 activation);
}

ForwardResult call_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& weight,
                            const Tensor& mean, const Tensor& var, const Tensor& mask,
                            bool training, double eps, bool relu, bool residual_grad) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastres::bn_act_backward", "")
          .typed<ForwardResult(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                               const Tensor&, const Tensor&, bool, double, bool, bool)>();
  return op.call(grad_out, x, weight, mean, var, mask, training, eps, relu, residual_grad);
}

// needs_input_grad() counts only the tensor arguments that were given: the edge of an optional
// argument is its position among the present ones, or -1 when absent.
std::vector<int64_t> edge_indices(std::initializer_list<bool> present) {
  std::vector<int64_t> edges;
  int64_t next = 0;
  for (bool p : present) edges.push_back(p ? next++ : -1);
  return edges;
}

bool needs_grad(AutogradContext* ctx, int64_t edge) {
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

OptTensor present(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The forward op below autograd. In training it updates the running statistics in place, which
// autograd's in-place bookkeeping (the ADInplaceOrView key this skips) would have recorded:
// their version counters are bumped here, as for nn.BatchNorm2d's buffers, so that anything
// keyed on them (folded eval's cache) sees the change.
ForwardResult forward_below_autograd(const Tensor& x, const OptTensor& weight,
                                     const OptTensor& bias, const OptTensor& residual,
                                     const OptTensor& running_mean, const OptTensor& running_var,
                                     bool training, double momentum, double eps,
                                     c10::string_view activation) {
  ForwardResult result;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    result = call_forward(x, weight, bias, residual, running_mean, running_var, training, momentum,
                          eps, activation);
  }
  if (training) {
    for (const OptTensor& running : {running_mean, running_var}) {
      if (running.has_value()) torch::autograd::impl::bump_version(*running);
    }
  }
  return result;
}

// SiLU's gradient at its input z = batch_norm(x) + residual. z is recomputed by the forward's
// elementwise pass with the saved statistics (training=false normalises with the given values,
// the training forward's arithmetic but for its correction of the saved mean's rounding on CPU),
// so no per-element tensor is kept for SiLU.
Tensor silu_input_grad(const Tensor& grad_out, const Tensor& x, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& residual, const Tensor& mean,
                       const Tensor& var, double eps) {
  const Tensor z = std::get<0>(
      call_forward(x, weight, bias, residual, mean, var, false, /*momentum=*/0.0, eps, "identity"));
  return at::silu_backward(grad_out, z);
}

class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps,
                               c10::string_view activation) {
    auto [out, mean, var, mask] = forward_below_autograd(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation);
    // Saved: the input, the per-channel statistics and the 1-bit ReLU mask; never the output.
    // SiLU also keeps references to bias and residual (tensors that exist anyway) to recompute
    // its input.
    const bool silu = parse_activation(activation) == Activation::kSilu;
    ctx->save_for_backward({x, weight.value_or(Tensor()), mean, var, mask,
                            silu ? bias.value_or(Tensor()) : Tensor(),
                            silu ? residual.value_or(Tensor()) : Tensor()});
    const auto edges =
        edge_indices({true, weight.has_value(), bias.has_value(), residual.has_value()});
    ctx->saved_data["weight_edge"] = edges[1];
    ctx->saved_data["bias_edge"] = edges[2];
    ctx->saved_data["residual_edge"] = edges[3];
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, var, mask});
    // The statistics and the mask never receive gradients: do not fill zeros for them.
    ctx->set_materialize_grads(false);
    return {out, mean, var, mask};
  }

  // One gradient per forward argument, undefined where none is needed or possible.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(10);  // out did not reach the loss
    const auto saved = ctx->get_saved_variables();
    const OptTensor weight = present(saved[1]);
    const bool weight_grad = needs_grad(ctx, ctx->saved_data["weight_edge"].toInt());
    const bool bias_grad = needs_grad(ctx, ctx->saved_data["bias_edge"].toInt());
    const bool residual_grad = needs_grad(ctx, ctx->saved_data["residual_edge"].toInt());
    const double eps = ctx->saved_data["eps"].toDouble();
    const Activation activation = parse_activation(ctx->saved_data["activation"].toStringRef());
    const Tensor grad = activation == Activation::kSilu
                            ? silu_input_grad(grads[0], saved[0], weight, present(saved[5]),
                                              present(saved[6]), saved[2], saved[3], eps)
                            : grads[0];
    auto [grad_x, grad_weight, grad_bias, grad_residual] = call_backward(
        grad, saved[0], weight, saved[2], saved[3], saved[4], ctx->saved_data["training"].toBool(),
        eps, activation == Activation::kRelu, residual_grad);
    return {ctx->needs_input_grad(0) ? grad_x : Tensor(),
            weight_grad ? grad_weight : Tensor(),
            bias_grad ? grad_bias : Tensor(),
            residual_grad ? grad_residual : Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

ForwardResult bn_act_forward_autograd(const Tensor& x, const OptTensor& weight,
                                      const OptTensor& bias, const OptTensor& residual,
                                      const OptTensor& running_mean, const OptTensor& running_var,
                                      bool training, double momentum, double eps,
                                      c10::string_view activation) {
  auto out = BnActFunction::apply(x, weight, bias, residual, running_mean, running_var, training,
                                  momentum, eps, activation);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, Autograd, m) { m.impl("bn_act_forward", &bn_act_forward_autograd); }

}  // namespace fastres
