// The schemas of the compiled fastres ops (C++ kernels on the CPU and CUDA keys), in one place,
// and the fastres._C module.
//
// Kernels are registered beside their bindings (csrc/cpu/*.cpp, csrc/cuda/*.cpp); their
// autograd is in csrc/bn_act_autograd.cpp; fake kernels are registered from Python
// (fastres/ops/bn_act.py, fastres/ops/bn_act_pieces.py). The ops defined in Python, with their
// schema beside their code, are the Triton family (fastres/ops/bn_act.py,
// fastres/ops/bn_act_pieces.py, fastres/ops/fused_conv2d.py), and on either family's kernels
// bn_act_conv2d (fastres/ops/bn_act_conv.py) and the ops from given batch statistics
// (fastres/ops/bn_act_from_stats.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/bn_act_kernel.h"

TORCH_LIBRARY(fastres, m) {
  // out = activation(batch_norm(x) + residual), activation "identity", "relu" or "silu".
  // Returns (out, save_mean, save_var, relu_mask): save_mean/save_var are the batch mean and
  // biased variance in training, copies of the running statistics in eval; relu_mask packs one
  // bit per element of out (out > 0) for "relu", and is empty otherwise. In training the op
  // updates running_mean/running_var in place (when given) with factor momentum and the unbiased
  // batch variance, as ATen's native_batch_norm does: inside the op, so that a recomputation
  // (torch.utils.checkpoint) that stops at the op's saved tensors still updates them.
  m.def(
      "bn_act_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  // out = activation(batch_norm(x)) + residual: the residual added after the activation
  // (Ultralytics' YOLO Bottleneck), with bn_act_forward's other arguments and its results but the
  // mask: (out, save_mean, save_var). Its backward is bn_act_backward after recomputing the
  // activation's input (fastres/ops/bn_act_add.py); the residual's gradient is grad_out itself.
  m.def(
      "bn_act_add_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor residual, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_residual); grad_residual is empty unless
  // residual_grad. Recomputes the normalised input from x and the saved statistics. grad_out is
  // the gradient at the activation's output for relu (masked here) and at its input otherwise:
  // for silu the autograd formulas apply SiLU's derivative first, at the recomputed input
  // (csrc/bn_act_autograd.cpp, fastres/ops/bn_act.py).
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor save_mean, "
      "Tensor save_var, Tensor relu_mask, bool training, float eps, bool relu, "
      "bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)");

  // The same computation split where synchronized BatchNorm (fastres/ops/sync_bn_act.py)
  // all-reduces across processes: per-process statistics and per-channel gradient sums in, the
  // elementwise passes with the global values out. The forward's elementwise pass is
  // bn_act_forward with training=false and the global statistics.
  //
  // Per-channel batch mean and biased variance of x (NaN for an empty batch).
  m.def("bn_stats(Tensor x) -> (Tensor, Tensor)");
  // Returns (sum_grad, sum_grad_centred): per channel, the sums of gm = grad_out * relu_mask and
  // of gm * (x - save_mean).
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor x, Tensor save_mean, Tensor relu_mask, "
      "bool relu) -> (Tensor, Tensor)");
  // Training backward from global values: sum_grad and sum_grad_centred summed over every
  // process, count the number of elements per channel over every process. Returns (grad_x,
  // grad_residual); grad_residual is empty unless residual_grad.
  m.def(
      "bn_act_backward_apply(Tensor grad_out, Tensor x, Tensor? weight, Tensor save_mean, "
      "Tensor save_var, Tensor relu_mask, Tensor sum_grad, Tensor sum_grad_centred, int count, "
      "float eps, bool relu, bool residual_grad) -> (Tensor, Tensor)");
}

#ifndef FASTRES_CUDA_ARCHS
#define FASTRES_CUDA_ARCHS ""
#endif

namespace {

PyObject* cpu_kernel_isa(PyObject* /*module*/, PyObject* /*args*/) {
  return PyUnicode_FromString(fastres::cpu::cpu_kernel_isa_name());
}

PyMethodDef module_methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The instruction set the C++ CPU kernels run: 'AVX512', 'AVX2' or 'DEFAULT' (the "
     "baseline build), following ATen's choice for its own CPU kernels (ATEN_CPU_CAPABILITY "
     "lowers it)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing fastres._C loads the library above; the constants say how it was built.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "fastres compiled operators (torch.ops.fastres)", -1,
                                   module_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTRES_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(module, "cuda_archs", FASTRES_CUDA_ARCHS);
  return module;
}
