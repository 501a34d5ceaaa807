// The running-statistics update of a training bn_act_forward, shared by the CPU and CUDA
// bindings (the same formula as fastres/batch_norm.py's update_running_stats, for the Triton
// family).
//
// It runs inside the forward op, as in ATen's native_batch_norm, rather than after it: autograd
// saves the op's tensors when the op returns, and torch.utils.checkpoint's recomputation stops at
// the last saved tensor, so an update that followed the op would be skipped when a checkpointed
// segment ends with this op (nn.BatchNorm2d's update is recomputed there).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastres {

// running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance (`var`
// is the biased one over `count` values per channel). Nothing without running statistics or for
// an empty batch.
inline void update_running_stats(const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, double momentum,
                                 int64_t count) {
  if (!running_mean.has_value() || !running_var.has_value() || count == 0) return;
  const at::Tensor unbiased =
      count > 1 ? var * (static_cast<double>(count) / static_cast<double>(count - 1)) : var;
  at::_foreach_lerp_({*running_mean, *running_var}, {mean, unbiased}, at::Scalar(momentum));
}

}  // namespace fastres
