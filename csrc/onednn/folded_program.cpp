// fastres._onednn: folded inference as one call into oneDNN, with no per-convolution dispatch.
//
// A FoldedProgram is a ResNet's stem convolution, max-pool, every block's folded convolutions
// (BatchNorm already folded in by Python, fastres/folding.py) and, where the model has them, its
// global average pooling and linear classifier, built for one input shape and dtype (float32 or
// bfloat16): each convolution and the classifier is a oneDNN primitive created once, its weight
// reordered once to the layout the primitive asks for, its bias, residual sum and activation as
// post-ops. Activations live in buffers the program owns, reused from call to
// call (Python assigns them by liveness: fastres/plans/folded_program.py), so a call allocates
// nothing but its output and pays no page faults on fresh memory. The ATen path
// (mkldnn::_convolution_pointwise) instead re-creates each call's memory descriptors and
// allocates each output.
//
// oneDNN here is the onednn-cpu-gomp package's (built with GNU OpenMP). Its libdnnl.so needs
// libgomp.so.1, the soname torch's own libgomp already holds in the process, so oneDNN runs on
// torch's OpenMP runtime and its thread count (torch.set_num_threads).
//
// Buffer 0 is the program's input, read only; run() returns a new tensor holding the last
// step's output. Calls are serialised by a mutex: the buffers are shared state.

#include <ATen/ATen.h>
#include <Python.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <dnnl.hpp>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "onednn_helpers.h"

namespace fastres {
namespace {

using dnnl::memory;
using onednn::Dims;

memory::data_type data_type_of(const std::string& dtype) {
  if (dtype == "float32") return memory::data_type::f32;
  if (dtype == "bfloat16") return memory::data_type::bf16;
  TORCH_CHECK(false, "FoldedProgram: dtype must be \"float32\" or \"bfloat16\", got \"", dtype,
              "\"");
}

Dims dims_of(const std::vector<int64_t>& sizes, const char* what) {
  TORCH_CHECK(sizes.size() == 4, "FoldedProgram: ", what, " must be (N, C, H, W), got ",
              sizes.size(), " sizes");
  return Dims(sizes.begin(), sizes.end());
}

int64_t bytes_of(const Dims& dims, memory::data_type type) {
  int64_t n = 1;
  for (auto d : dims) n *= d;
  return n * static_cast<int64_t>(memory::data_type_size(type));
}

// One step: a primitive, the buffers it reads and writes, and what it was created for.
struct Step {
  Step(dnnl::primitive primitive, int64_t src, int64_t dst, memory::desc src_desc,
       memory::desc dst_desc)
      : primitive(std::move(primitive)),
        src(src),
        dst(dst),
        src_desc(src_desc),
        dst_desc(dst_desc) {}

  dnnl::primitive primitive;
  int64_t src = 0, dst = 0;
  memory::desc src_desc, dst_desc;
  memory weights, bias;  // convolutions only
  bool has_weights = false;
};

}  // namespace

class FoldedProgram : public torch::CustomClassHolder {
 public:
  explicit FoldedProgram(std::string dtype)
      : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_), dtype_name_(std::move(dtype)) {
    type_ = data_type_of(dtype_name_);
  }

  // dst = activation(conv(src) + bias [+ dst]) with sum_into_dst; activation one of
  // "identity", "relu", "silu". weight: float32 (C_out, C_in / groups, kH, kW), bias float32.
  void add_convolution(int64_t src, int64_t dst, bool sum_into_dst, at::Tensor weight,
                       at::Tensor bias, std::vector<int64_t> src_sizes,
                       std::vector<int64_t> dst_sizes, std::vector<int64_t> stride,
                       std::vector<int64_t> padding, int64_t groups, std::string activation) {
    TORCH_CHECK(dst != 0, "FoldedProgram: buffer 0 is the input, never written");
    TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat && weight.is_cpu(),
                "FoldedProgram: weight must be a 4-D float32 CPU tensor");
    TORCH_CHECK(
        bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.size(0) == weight.size(0),
        "FoldedProgram: bias must be float32 with one value per output channel");
    TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && groups >= 1,
                "FoldedProgram: stride and padding must have two values, groups >= 1");
    Dims src_dims = dims_of(src_sizes, "src_sizes"), dst_dims = dims_of(dst_sizes, "dst_sizes");
    weight = weight.contiguous();
    bias = bias.contiguous();
    auto [weight_dims, weight_tag] = onednn::weight_layout(weight, groups);
    auto nhwc = memory::format_tag::nhwc;
    memory::desc src_md(src_dims, type_, nhwc), dst_md(dst_dims, type_, nhwc);
    memory::desc weight_any(weight_dims, type_, memory::format_tag::any);
    memory::desc bias_md({weight.size(0)}, memory::data_type::f32, memory::format_tag::a);
    Dims pad_l{padding[0], padding[1]};
    Dims pad_r = onednn::right_padding(src_dims, dst_dims, {weight.size(2), weight.size(3)}, stride,
                                       padding);
    dnnl::post_ops ops;
    if (sum_into_dst) ops.append_sum(1.0f);
    onednn::append_activation(ops, activation, "FoldedProgram");
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    auto pd = dnnl::convolution_forward::primitive_desc(
        engine_, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src_md,
        weight_any, bias_md, dst_md, Dims{stride[0], stride[1]}, pad_l, pad_r, attr);
    Step step(dnnl::convolution_forward(pd), src, dst, src_md, dst_md);
    step.weights = onednn::reorder_weight(engine_, stream_, weight, weight_dims, weight_tag,
                                          pd.weights_desc());
    step.bias = memory(bias_md, engine_);
    std::memcpy(step.bias.get_data_handle(), bias.data_ptr<float>(), bias.numel() * 4);
    step.has_weights = true;
    impl_ = pd.impl_info_str();
    add(std::move(step));
  }

  // dst = max_pool2d(src) (no dilation, floor mode).
  void add_max_pool(int64_t src, int64_t dst, std::vector<int64_t> src_sizes,
                    std::vector<int64_t> dst_sizes, std::vector<int64_t> kernel,
                    std::vector<int64_t> stride, std::vector<int64_t> padding) {
    TORCH_CHECK(dst != 0, "FoldedProgram: buffer 0 is the input, never written");
    TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
                "FoldedProgram: kernel, stride and padding must have two values");
    Dims src_dims = dims_of(src_sizes, "src_sizes"), dst_dims = dims_of(dst_sizes, "dst_sizes");
    auto nhwc = memory::format_tag::nhwc;
    memory::desc src_md(src_dims, type_, nhwc), dst_md(dst_dims, type_, nhwc);
    Dims pad_r = onednn::right_padding(src_dims, dst_dims, {kernel[0], kernel[1]}, stride, padding);
    auto pd = dnnl::pooling_forward::primitive_desc(
        engine_, dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max, src_md, dst_md,
        Dims{stride[0], stride[1]}, Dims{kernel[0], kernel[1]}, Dims{0, 0},
        Dims{padding[0], padding[1]}, pad_r);
    add(Step(dnnl::pooling_forward(pd), src, dst, src_md, dst_md));
  }

  // dst = mean of src over H and W: (N, C, H, W) -> (N, C, 1, 1), channels_last (the same bytes
  // as the (N, C) rows a classifier reads).
  void add_global_avg_pool(int64_t src, int64_t dst, std::vector<int64_t> src_sizes) {
    TORCH_CHECK(dst != 0, "FoldedProgram: buffer 0 is the input, never written");
    Dims src_dims = dims_of(src_sizes, "src_sizes");
    Dims dst_dims{src_dims[0], src_dims[1], 1, 1};
    auto nhwc = memory::format_tag::nhwc;
    memory::desc src_md(src_dims, type_, nhwc), dst_md(dst_dims, type_, nhwc);
    auto pd = dnnl::pooling_forward::primitive_desc(
        engine_, dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_avg_include_padding,
        src_md, dst_md, Dims{1, 1}, Dims{src_dims[2], src_dims[3]}, Dims{0, 0}, Dims{0, 0},
        Dims{0, 0});
    add(Step(dnnl::pooling_forward(pd), src, dst, src_md, dst_md));
  }

  // dst = src @ weight.T + bias, src (N, in_features) rows; weight float32 (out, in), bias
  // float32 (out) (the weight cast to the program's dtype by its reorder; the bias stays
  // float32).
  void add_linear(int64_t src, int64_t dst, int64_t batch, at::Tensor weight, at::Tensor bias) {
    TORCH_CHECK(dst != 0, "FoldedProgram: buffer 0 is the input, never written");
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_cpu(),
                "FoldedProgram: the linear weight must be a 2-D float32 CPU tensor");
    TORCH_CHECK(
        bias.dim() == 1 && bias.scalar_type() == at::kFloat && bias.size(0) == weight.size(0),
        "FoldedProgram: the linear bias must be float32 with one value per output feature");
    weight = weight.contiguous();
    bias = bias.contiguous();
    Dims src_dims{batch, weight.size(1)}, dst_dims{batch, weight.size(0)};
    Dims weight_dims{weight.size(0), weight.size(1)};
    memory::desc src_md(src_dims, type_, memory::format_tag::nc);
    memory::desc dst_md(dst_dims, type_, memory::format_tag::nc);
    memory::desc weight_any(weight_dims, type_, memory::format_tag::any);
    memory::desc bias_md({weight.size(0)}, memory::data_type::f32, memory::format_tag::a);
    auto pd = dnnl::inner_product_forward::primitive_desc(
        engine_, dnnl::prop_kind::forward_inference, src_md, weight_any, bias_md, dst_md);
    Step step(dnnl::inner_product_forward(pd), src, dst, src_md, dst_md);
    step.weights = onednn::reorder_weight(engine_, stream_, weight, weight_dims,
                                          memory::format_tag::oi, pd.weights_desc());
    step.bias = memory(bias_md, engine_);
    std::memcpy(step.bias.get_data_handle(), bias.data_ptr<float>(), bias.numel() * 4);
    step.has_weights = true;
    add(std::move(step));
  }

  // Runs every step on x (the program's input: its dtype, channels_last, the shape the program
  // was built for) and returns a new tensor with the last step's output: channels_last
  // (N, C, H, W), or (N, features) after a linear step.
  at::Tensor run(at::Tensor x) {
    TORCH_CHECK(!steps_.empty(), "FoldedProgram: no steps");
    const auto& first = steps_.front().src_desc;
    TORCH_CHECK(x.is_cpu() && x.scalar_type() == scalar_type() &&
                    x.sizes() == at::IntArrayRef(first.get_dims()) &&
                    x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "FoldedProgram.run: x must be a channels_last ", dtype_name_,
                " CPU tensor of the shape the program was built for, got ", x.sizes(), " ",
                x.scalar_type());
    std::lock_guard<std::mutex> lock(mutex_);
    allocate_buffers();
    for (auto& step : steps_) {
      memory src(step.src_desc, engine_, step.src == 0 ? x.data_ptr() : buffer(step.src));
      memory dst(step.dst_desc, engine_, buffer(step.dst));
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}};
      if (step.has_weights) {
        args[DNNL_ARG_WEIGHTS] = step.weights;
        args[DNNL_ARG_BIAS] = step.bias;
      }
      step.primitive.execute(stream_, args);
    }
    stream_.wait();
    const auto& last = steps_.back();
    auto dims = last.dst_desc.get_dims();
    auto layout = dims.size() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    auto out = at::empty(std::vector<int64_t>(dims.begin(), dims.end()),
                         x.options().memory_format(layout));
    std::memcpy(out.data_ptr(), buffer(last.dst), out.nbytes());
    return out;
  }

  // The oneDNN implementation of the last convolution added, e.g. "brgconv:avx512_core_amx".
  std::string implementation() const { return impl_; }

  int64_t buffer_bytes() const {
    int64_t total = 0;
    for (auto& entry : buffer_bytes_) total += entry.second;
    return total;
  }

 private:
  void add(Step step) {
    for (auto id : {step.src, step.dst}) {
      if (id == 0) continue;
      auto bytes =
          bytes_of(id == step.src ? step.src_desc.get_dims() : step.dst_desc.get_dims(), type_);
      auto& size = buffer_bytes_[id];
      size = std::max(size, bytes);
    }
    steps_.push_back(std::move(step));
    buffers_.clear();  // sized again at the next run
  }

  void allocate_buffers() {
    if (!buffers_.empty()) return;
    for (auto& entry : buffer_bytes_) {
      buffers_[entry.first] = at::empty({entry.second}, at::TensorOptions().dtype(at::kByte));
    }
  }

  void* buffer(int64_t id) { return buffers_.at(id).data_ptr(); }

  at::ScalarType scalar_type() const {
    return type_ == memory::data_type::bf16 ? at::kBFloat16 : at::kFloat;
  }

  dnnl::engine engine_;
  dnnl::stream stream_;
  std::string dtype_name_;
  memory::data_type type_;
  std::vector<Step> steps_;
  std::unordered_map<int64_t, int64_t> buffer_bytes_;
  std::unordered_map<int64_t, at::Tensor> buffers_;
  std::string impl_;
  std::mutex mutex_;
};

TORCH_LIBRARY_FRAGMENT(fastres, m) {
  m.class_<FoldedProgram>("FoldedProgram")
      .def(torch::init<std::string>())
      .def("add_convolution", &FoldedProgram::add_convolution)
      .def("add_max_pool", &FoldedProgram::add_max_pool)
      .def("add_global_avg_pool", &FoldedProgram::add_global_avg_pool)
      .def("add_linear", &FoldedProgram::add_linear)
      .def("run", &FoldedProgram::run)
      .def("implementation", &FoldedProgram::implementation)
      .def("buffer_bytes", &FoldedProgram::buffer_bytes);
}

}  // namespace fastres

// Importing fastres._onednn loads the class above; the constant says which oneDNN it was built
// with.
extern "C" PyObject* PyInit__onednn(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_onednn",
                                   "fastres folded inference through oneDNN (FoldedProgram)", -1,
                                   nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const auto* version = dnnl::version();
  std::string text = std::to_string(version->major) + "." + std::to_string(version->minor) + "." +
                     std::to_string(version->patch);
  PyModule_AddStringConstant(module, "onednn_version", text.c_str());
  return module;
}
