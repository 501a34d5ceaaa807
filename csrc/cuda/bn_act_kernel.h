// CUDA launchers of the fused BatchNorm (+ residual) (+ activation) op.
//
// No torch here: the binding (bn_act.cpp) checks tensors, allocates outputs and workspace, and
// passes raw pointers. Activations are float32, float16 or bfloat16 (`dtype`); per-channel values
// are float32. All pointers are device pointers to dense buffers laid out as `layout` says.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/bn_act_layout.h"

namespace fastres::cuda {

// The dtype of the activation tensors (x, residual, out, gradients).
enum class ActivationType { kFloat, kHalf, kBFloat16 };

struct BnActForwardParams {
  const void* x = nullptr;
  const void* residual = nullptr;  // optional
  const float* weight = nullptr;   // optional (affine=False)
  const float* bias = nullptr;     // optional
  // Training: written with the batch mean and biased variance. Eval: read (running statistics).
  float* mean = nullptr;
  float* var = nullptr;
  void* out = nullptr;
  // relu_mask_bytes(numel) bytes: out > 0, for Activation::kRelu with the residual before it;
  // null otherwise.
  uint8_t* relu_mask = nullptr;
  void* workspace = nullptr;  // bn_act_workspace_bytes(layout, device) bytes
  BnActLayout layout;
  ActivationType dtype = ActivationType::kFloat;
  bool training = true;
  Activation activation = Activation::kRelu;
  // false: out = act(bn(x) + residual); true: out = act(bn(x)) + residual.
  bool residual_after_activation = false;
  float eps = 1e-5f;
};

struct BnActBackwardParams {
  const void* grad_out = nullptr;
  const void* x = nullptr;
  const uint8_t* relu_mask = nullptr;  // only when relu
  const float* weight = nullptr;       // optional
  const float* mean = nullptr;         // saved by the forward
  const float* var = nullptr;
  void* grad_x = nullptr;
  void* grad_residual = nullptr;  // optional
  float* grad_weight = nullptr;
  float* grad_bias = nullptr;
  void* workspace = nullptr;  // bn_act_workspace_bytes(layout, device) bytes
  BnActLayout layout;
  ActivationType dtype = ActivationType::kFloat;
  bool training = true;
  bool relu = true;
  float eps = 1e-5f;
};

// Scratch space (partial per-channel reductions and per-channel coefficients) for either launch.
size_t bn_act_workspace_bytes(const BnActLayout& layout, int device);

// Training: batch statistics (split reduction + finalize), then the fused elementwise pass.
// Eval: the elementwise pass with the given statistics. Enqueued on `stream`.
void launch_bn_act_forward(const BnActForwardParams& params, int device, cudaStream_t stream);

// One fused reduction pass (sum of masked grad, and of masked grad * centred x), a per-channel
// finalize, and one elementwise pass writing grad_x and grad_residual.
void launch_bn_act_backward(const BnActBackwardParams& params, int device, cudaStream_t stream);

// Synchronized BatchNorm's pieces, the computation above split where per-channel values are
// all-reduced across processes:
// - the batch statistics alone, into params.mean / params.var (only x, mean, var, workspace,
//   layout and dtype are read);
void launch_bn_stats(const BnActForwardParams& params, int device, cudaStream_t stream);
// - the backward reduction alone: per-channel sum of gm and of gm * (x - mean), C floats each
//   (grad_x, grad_residual, grad_weight, grad_bias, weight and var are not used);
void launch_bn_act_backward_reduce(const BnActBackwardParams& params, float* sum_grad,
                                   float* sum_grad_centred, int device, cudaStream_t stream);
// - the training backward's elementwise pass from sums over every process, `count` elements per
//   channel in all (grad_weight and grad_bias are not written).
void launch_bn_act_backward_apply(const BnActBackwardParams& params, const float* sum_grad,
                                  const float* sum_grad_centred, int64_t count, int device,
                                  cudaStream_t stream);

}  // namespace fastres::cuda
