// The two forward ops on one device's forward, shared by the CPU and CUDA bindings: bn_act_forward
// adds the residual before the activation, bn_act_add_forward after it (and returns no mask).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace fastres {

using ForwardResults = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// A device's forward: bn_act_forward's arguments, then residual_after_activation.
using DeviceForward = ForwardResults (*)(const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, bool, double, double,
                                         c10::string_view, bool);

template <DeviceForward Forward>
ForwardResults bn_act_forward_on(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, bool training,
                                 double momentum, double eps, c10::string_view activation) {
  return Forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                 activation, /*residual_after_activation=*/false);
}

template <DeviceForward Forward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_add_forward_on(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, c10::string_view activation) {
  auto [out, save_mean, save_var, unused_mask] =
      Forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
              activation, /*residual_after_activation=*/true);
  return {out, save_mean, save_var};
}

}  // namespace fastres
