// What fastres._onednn's classes (FoldedProgram, FoldedConvolution) share: a convolution's
// activation as a oneDNN post-op, its right/bottom padding, and its float32 weight in the layout
// a primitive asks for.

#pragma once

#include <ATen/ATen.h>

#include <dnnl.hpp>
#include <string>
#include <utility>
#include <vector>

namespace fastres::onednn {

using dnnl::memory;
using Dims = memory::dims;

// Appends `activation` ("identity", "relu" or "silu") to `ops` as an eltwise post-op: ReLU's
// alpha is its negative slope (0), swish's the factor inside its sigmoid (1: x * sigmoid(x),
// SiLU). `who` names the caller in the error for any other name.
inline void append_activation(dnnl::post_ops& ops, const std::string& activation, const char* who) {
  if (activation == "relu") {
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
  } else if (activation == "silu") {
    ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.0f, 0.0f);
  } else {
    TORCH_CHECK(activation == "identity", who, ": activation must be identity, relu or silu, ",
                "got \"", activation, "\"");
  }
}

// The padding on the right/bottom that gives dst_dims (it can differ from the left's, and be
// negative down to 1 - stride). kernel: (kH, kW); dilation as PyTorch counts it (1: none).
inline Dims right_padding(const Dims& src_dims, const Dims& dst_dims, const Dims& kernel,
                          const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                          const std::vector<int64_t>& dilation = {1, 1}) {
  Dims pad(2);
  for (int i = 0; i < 2; ++i) {
    int64_t span = dilation[i] * (kernel[i] - 1) + 1;
    pad[i] = (dst_dims[2 + i] - 1) * stride[i] + span - src_dims[2 + i] - padding[i];
  }
  return pad;
}

// A PyTorch convolution weight (C_out, C_in / groups, kH, kW) as oneDNN describes it: those dims
// with oihw, or grouped (G, O / G, I / G, kH, kW) with goihw.
inline std::pair<Dims, memory::format_tag> weight_layout(const at::Tensor& weight, int64_t groups) {
  if (groups == 1) {
    return {Dims(weight.sizes().begin(), weight.sizes().end()), memory::format_tag::oihw};
  }
  return {{groups, weight.size(0) / groups, weight.size(1), weight.size(2), weight.size(3)},
          memory::format_tag::goihw};
}

// `weight` (contiguous float32, laid out as dims and tag say) reordered to `wanted`, the layout
// (and data type) a primitive asks for.
inline memory reorder_weight(const dnnl::engine& engine, dnnl::stream& stream,
                             const at::Tensor& weight, const Dims& dims, memory::format_tag tag,
                             const memory::desc& wanted) {
  memory plain({dims, memory::data_type::f32, tag}, engine, weight.data_ptr());
  memory packed(wanted, engine);
  dnnl::reorder(plain, packed).execute(stream, plain, packed);
  stream.wait();
  return packed;
}

}  // namespace fastres::onednn
