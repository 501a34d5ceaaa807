// fastres._onednn's FoldedConvolution: one folded convolution whose residual is added after its
// activation, `activation(conv(x) + bias) + residual`, as one oneDNN primitive.
//
// Ultralytics' YOLO Bottleneck adds its shortcut after the last SiLU. ATen's fused oneDNN ops
// (mkldnn::_convolution_pointwise.binary and its in-place twin) apply the add first and an
// activation after it, so that form needs the convolution, then a separate pass for the add.
// Here the post-ops run in the block's order: eltwise (SiLU, ReLU or none), then a binary add
// reading the residual. A binary post-op rather than oneDNN's in-place sum: the residual is
// the block's input, which the caller (C2f's concatenation) still reads afterwards, so it must
// not be overwritten.
//
// The weight is given once (BatchNorm already folded in by Python, fastres/folding.py) and
// reordered once per input shape and dtype to the layout the primitive asks for; the last
// kMaxShapes (shape, dtype) keep their primitive. The residual must be dense channels_last: with
// any other strides (a channel slice, say) oneDNN 3.2 gives the binary post-op only its
// reference implementation, many times slower.

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <dnnl.hpp>
#include <list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "onednn_helpers.h"

namespace fastres {
namespace {

using dnnl::memory;
using onednn::Dims;

constexpr size_t kMaxShapes = 4;

memory::data_type onednn_type_of(at::ScalarType type) {
  if (type == at::kFloat) return memory::data_type::f32;
  if (type == at::kBFloat16) return memory::data_type::bf16;
  TORCH_CHECK(false, "FoldedConvolution: x must be float32 or bfloat16, got ", type);
}

Dims dims_of(const at::Tensor& t) { return Dims(t.sizes().begin(), t.sizes().end()); }

}  // namespace

class FoldedConvolution : public torch::CustomClassHolder {
 public:
  // weight: float32 (C_out, C_in / groups, kH, kW); bias: float32 (C_out).
  FoldedConvolution(at::Tensor weight, at::Tensor bias, std::vector<int64_t> stride,
                    std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                    std::string activation)
      : engine_(dnnl::engine::kind::cpu, 0),
        stream_(engine_),
        stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)),
        groups_(groups),
        activation_(std::move(activation)) {
    TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat && weight.is_cpu(),
                "FoldedConvolution: weight must be a 4-D float32 CPU tensor");
    TORCH_CHECK(
        bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.size(0) == weight.size(0),
        "FoldedConvolution: bias must be float32 with one value per output channel");
    TORCH_CHECK(bias.is_cpu(), "FoldedConvolution: bias must be a CPU tensor");
    TORCH_CHECK(stride_.size() == 2 && padding_.size() == 2 && dilation_.size() == 2 &&
                    groups_ >= 1 && weight.size(0) % groups_ == 0,
                "FoldedConvolution: stride, padding and dilation must have two values, groups "
                "must divide the output channels");
    for (int i = 0; i < 2; ++i) {
      TORCH_CHECK(stride_[i] >= 1 && dilation_[i] >= 1 && padding_[i] >= 0,
                  "FoldedConvolution: stride and dilation must be at least 1 and padding at "
                  "least 0, got stride ",
                  at::IntArrayRef(stride_), ", dilation ", at::IntArrayRef(dilation_), ", padding ",
                  at::IntArrayRef(padding_));
    }
    dnnl::post_ops probe;
    onednn::append_activation(probe, activation_, "FoldedConvolution");  // checks the name
    weight_ = weight.contiguous();
    bias_ = bias.contiguous();
  }

  // activation(conv(x) + bias) + residual. x: channels_last (N, C_in, H, W) in float32 or
  // bfloat16; residual: channels_last, x's dtype, the output's shape. Returns a new
  // channels_last tensor.
  at::Tensor conv_bias_act_add(at::Tensor x, at::Tensor residual) {
    TORCH_CHECK(x.is_cpu() && x.dim() == 4 && x.size(1) == weight_.size(1) * groups_ &&
                    x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "FoldedConvolution: x must be a channels_last CPU tensor (N, ",
                weight_.size(1) * groups_, ", H, W), got ", x.sizes());
    Dims out_dims = output_dims(x);
    TORCH_CHECK(
        residual.is_cpu() && residual.scalar_type() == x.scalar_type() &&
            dims_of(residual) == out_dims && residual.is_contiguous(at::MemoryFormat::ChannelsLast),
        "FoldedConvolution: residual must be a channels_last ", x.scalar_type(),
        " CPU tensor of the output's shape ", at::IntArrayRef(out_dims), ", got ",
        residual.scalar_type(), " ", residual.sizes(), " with strides ", residual.strides());
    auto out = at::empty(out_dims, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    std::lock_guard<std::mutex> lock(mutex_);
    Prepared& p = prepared(x);
    memory src(p.src_md, engine_, x.data_ptr());
    memory dst(p.dst_md, engine_, out.data_ptr());
    memory res(p.dst_md, engine_, residual.data_ptr());  // laid out as the output
    p.primitive.execute(stream_, {{DNNL_ARG_SRC, src},
                                  {DNNL_ARG_WEIGHTS, p.weights},
                                  {DNNL_ARG_BIAS, p.bias},
                                  {DNNL_ARG_DST, dst},
                                  {residual_arg(), res}});
    stream_.wait();
    return out;
  }

  // The oneDNN implementation of the most recent primitive, e.g. "brgconv:avx512_core".
  std::string implementation() {
    std::lock_guard<std::mutex> lock(mutex_);
    return impl_;
  }

 private:
  struct Prepared {
    std::string key;
    dnnl::primitive primitive;
    memory::desc src_md, dst_md;
    memory weights, bias;
  };

  // The binary add's residual is the second post-op's (after the eltwise, when there is one).
  int residual_arg() const {
    int index = activation_ == "identity" ? 0 : 1;
    return DNNL_ARG_ATTR_MULTIPLE_POST_OP(index) | DNNL_ARG_SRC_1;
  }

  Dims output_dims(const at::Tensor& x) const {
    Dims out{x.size(0), weight_.size(0), 0, 0};
    for (int i = 0; i < 2; ++i) {
      int64_t span = dilation_[i] * (weight_.size(2 + i) - 1) + 1;
      TORCH_CHECK(x.size(2 + i) + 2 * padding_[i] >= span, "FoldedConvolution: the input ",
                  x.sizes(), " (padded) is smaller than the kernel");
      out[2 + i] = (x.size(2 + i) + 2 * padding_[i] - span) / stride_[i] + 1;
    }
    return out;
  }

  Prepared& prepared(const at::Tensor& x) {
    std::string key = at::toString(x.scalar_type());
    for (auto d : x.sizes()) key += "," + std::to_string(d);
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
      if (it->key == key) {
        cache_.splice(cache_.begin(), cache_, it);  // most recently used first
        return cache_.front();
      }
    }
    cache_.push_front(prepare(x, key));
    if (cache_.size() > kMaxShapes) cache_.pop_back();
    return cache_.front();
  }

  Prepared prepare(const at::Tensor& x, std::string key) {
    auto type = onednn_type_of(x.scalar_type());
    auto nhwc = memory::format_tag::nhwc;
    Dims out_dims = output_dims(x);
    Prepared p;
    p.key = std::move(key);
    p.src_md = memory::desc(dims_of(x), type, nhwc);
    p.dst_md = memory::desc(out_dims, type, nhwc);
    auto [weight_dims, weight_tag] = onednn::weight_layout(weight_, groups_);
    memory::desc weight_any(weight_dims, type, memory::format_tag::any);
    memory::desc bias_md({weight_.size(0)}, memory::data_type::f32, memory::format_tag::a);
    dnnl::post_ops ops;
    onednn::append_activation(ops, activation_, "FoldedConvolution");
    ops.append_binary(dnnl::algorithm::binary_add, p.dst_md);
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    Dims pad_r = onednn::right_padding(dims_of(x), out_dims, {weight_.size(2), weight_.size(3)},
                                       stride_, padding_, dilation_);
    auto pd = dnnl::convolution_forward::primitive_desc(
        engine_, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, p.src_md,
        weight_any, bias_md, p.dst_md, Dims{stride_[0], stride_[1]},
        Dims{dilation_[0] - 1, dilation_[1] - 1}, Dims{padding_[0], padding_[1]}, pad_r, attr);
    p.primitive = dnnl::convolution_forward(pd);
    p.weights = onednn::reorder_weight(engine_, stream_, weight_, weight_dims, weight_tag,
                                       pd.weights_desc());
    p.bias = memory(bias_md, engine_);
    std::memcpy(p.bias.get_data_handle(), bias_.data_ptr<float>(), bias_.numel() * 4);
    stream_.wait();
    impl_ = pd.impl_info_str();
    return p;
  }

  dnnl::engine engine_;
  dnnl::stream stream_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_;
  std::string activation_;
  at::Tensor weight_, bias_;
  std::list<Prepared> cache_;
  std::string impl_;
  std::mutex mutex_;
};

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.class_<FoldedConvolution>("FoldedConvolution")
      .def(torch::init<at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, int64_t, std::string>())
      .def("conv_bias_act_add", &FoldedConvolution::conv_bias_act_add)
      .def("implementation", &FoldedConvolution::implementation);
}

}  // namespace fastres
