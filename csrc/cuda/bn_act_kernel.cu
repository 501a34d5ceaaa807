// CUDA kernels and launchers of bn_act. No torch headers: this file compiles in seconds.
//
// Forward (training):  split per-channel reduction (Welford) -> finalize (Chan merge, scale/shift)
//                      -> elementwise pass (normalise, add residual, ReLU, pack the ReLU mask).
// Backward:            split per-channel reduction (sum gm, sum gm*(x - mean)) -> finalize
//                      (grad_weight, grad_bias, coefficients) -> elementwise pass.
//
// Reductions: NCHW uses one block column per channel, working through steps of 1,024 elements
// (a chunk of a plane, or several whole small planes: nchw_steps.h); channels_last uses blocks of
// (channels x rows) threads so that a warp reads consecutive channels of a row. Both write
// per-split partials that a finalize kernel merges (a warp a channel), so the reduction scales to
// ResNet-50's largest activations (3.2 M elements a channel at batch 256). Elementwise passes give
// each thread 8 consecutive elements (one byte of the ReLU mask), loaded with 16-byte vector
// accesses when every pointer is 16-byte aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>

#include "bn_act_kernel.h"
#include "nchw_steps.h"

namespace fastres::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kNchwUnitsPerThread = 4;
constexpr int64_t kNchwUnit = kThreads * kNchwUnitsPerThread;  // plane elements per block step
constexpr int kGroup = 8;                                      // elements per elementwise thread

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------------------------
// Element conversions

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ bool mask_bit(const uint8_t* mask, int64_t i) {
  return (mask[i >> 3] >> (i & 7)) & 1;
}

// Loads/stores a group of kGroup elements; 16-byte vector accesses when kAligned and full.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_group(const T* p, int count, float (&v)[kGroup]) {
  if (kAligned && count == kGroup) {
    alignas(16) T raw[kGroup];
    constexpr int kVectors = sizeof(T) * kGroup / 16;
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      reinterpret_cast<uint4*>(raw)[k] = reinterpret_cast<const uint4*>(p)[k];
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = to_float(raw[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = k < count ? to_float(p[k]) : 0.f;
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store_group(T* p, int count, const T (&raw)[kGroup]) {
  if (kAligned && count == kGroup) {
    constexpr int kVectors = sizeof(T) * kGroup / 16;
#pragma unroll
    for (int k = 0; k < kVectors; ++k) {
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(raw)[k];
    }
  } else {
    // Unrolled with a guard, not `k < count` as the loop bound: a run-time trip count would
    // index raw dynamically and put it in local memory (a stack frame) for every group.
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < count) p[k] = raw[k];
    }
  }
}

// The channel of consecutive elements in memory order, advanced one element at a time.
struct ChannelCursor {
  int64_t c, hw, channels, plane_size;
  bool channels_last;

  __device__ ChannelCursor(const BnActLayout& layout, int64_t index)
      : channels(layout.c), plane_size(layout.hw), channels_last(layout.channels_last) {
    if (channels_last) {
      c = index % channels;
      hw = 0;
    } else {
      hw = index % plane_size;
      c = (index / plane_size) % channels;
    }
  }

  __device__ void advance() {
    if (channels_last) {
      if (++c == channels) c = 0;
    } else if (++hw == plane_size) {
      hw = 0;
      if (++c == channels) c = 0;
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Accumulators (plain structs so that they can live in shared memory)

struct Welford {
  float n, mean, m2;

  __device__ void add(float v) {
    n += 1.f;
    const float d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  __device__ void merge(const Welford& o) {
    if (o.n == 0.f) return;
    if (n == 0.f) {
      *this = o;
      return;
    }
    const float total = n + o.n;
    const float d = o.mean - mean;
    const float w = o.n / total;
    mean += d * w;
    m2 += o.m2 + d * d * n * w;
    n = total;
  }
  __device__ Welford shfl_down(unsigned offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
};

struct GradSums {
  float g, gx;

  __device__ void merge(const GradSums& o) {
    g += o.g;
    gx += o.gx;
  }
  __device__ GradSums shfl_down(unsigned offset) const {
    return {__shfl_down_sync(0xffffffffu, g, offset), __shfl_down_sync(0xffffffffu, gx, offset)};
  }
};

// What the forward reduction adds per element: x itself, into a Welford accumulator.
template <typename T>
struct StatsReducer {
  using Acc = Welford;
  const T* x;

  __device__ Acc identity() const { return {0.f, 0.f, 0.f}; }
  __device__ void add(Acc& acc, int64_t i, int64_t) const { acc.add(to_float(x[i])); }
};

// What the backward reduction adds per element: gm = grad * mask and gm * (x - mean).
template <typename T>
struct GradReducer {
  using Acc = GradSums;
  const T* grad;
  const T* x;
  const uint8_t* mask;
  const float* mean;

  __device__ Acc identity() const { return {0.f, 0.f}; }
  __device__ void add(Acc& acc, int64_t i, int64_t c) const {
    if (mask != nullptr && !mask_bit(mask, i)) return;  // masked off: contributes exactly 0
    const float g = to_float(grad[i]);
    acc.g += g;
    acc.gx += g * (to_float(x[i]) - __ldg(mean + c));
  }
};

template <typename Acc>
__device__ Acc warp_reduce(Acc acc) {
#pragma unroll
  for (unsigned offset = 16; offset > 0; offset /= 2) acc.merge(acc.shfl_down(offset));
  return acc;
}

// ----------------------------------------------------------------------------------------------
// Split reductions: partials[split * C + c]

template <typename Reducer>
__global__ void reduce_nchw_kernel(Reducer reducer, BnActLayout layout, NchwSteps steps,
                                   typename Reducer::Acc* partials) {
  using Acc = typename Reducer::Acc;
  const int64_t c = blockIdx.x;
  NchwSlot slots[kNchwUnitsPerThread];
#pragma unroll
  for (int k = 0; k < kNchwUnitsPerThread; ++k)
    slots[k] = nchw_slot(steps, threadIdx.x + k * kThreads);
  Acc acc = reducer.identity();
  const int64_t step_count = steps.count();
  for (int64_t step = blockIdx.y; step < step_count; step += gridDim.y) {
#pragma unroll
    for (int k = 0; k < kNchwUnitsPerThread; ++k) {
      int64_t plane, hw;
      if (nchw_element(steps, slots[k], step, plane, hw)) {
        reducer.add(acc, (plane * layout.c + c) * layout.hw + hw, c);
      }
    }
  }
  __shared__ Acc warp_partials[kThreads / 32];
  acc = warp_reduce(acc);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_partials[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_partials[lane] : reducer.identity();
    acc = warp_reduce(acc);
    if (lane == 0) partials[blockIdx.y * layout.c + c] = acc;
  }
}

// blockDim = (channel threads, row threads), a power of two each, kThreads in all.
template <typename Reducer>
__global__ void reduce_nhwc_kernel(Reducer reducer, BnActLayout layout,
                                   typename Reducer::Acc* partials) {
  using Acc = typename Reducer::Acc;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = layout.n * layout.hw;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  Acc acc = reducer.identity();
  if (c < layout.c) {
#pragma unroll 4
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += row_step) {
      reducer.add(acc, r * layout.c + c, c);
    }
  }
  __shared__ Acc tile[kThreads];
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  tile[slot] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.y / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      acc.merge(tile[slot + stride * blockDim.x]);
      tile[slot] = acc;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < layout.c) partials[blockIdx.y * layout.c + c] = acc;
}

// ----------------------------------------------------------------------------------------------
// Per-channel finalize kernels. The split reductions leave up to a few hundred partials a channel
// (channels_last with C <= 256: 132 to 528 on an H100-class GPU): one warp merges a channel's,
// each lane every 32nd split, then the lanes by shuffles. In double: no cancellation between
// large sums.

constexpr int kWarp = 32;
constexpr int kChannelsPerBlock = kThreads / kWarp;

// This thread's channel (one warp a channel; the same for all 32 lanes) and lane.
__device__ __forceinline__ int64_t warp_channel() {
  return static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x / kWarp;
}

// Chan et al.'s pairwise merge of (n, mean, m2) with (on, om, om2).
__device__ __forceinline__ void chan_merge(double& n, double& m, double& m2, double on, double om,
                                           double om2) {
  if (on == 0) return;
  const double total = n + on, d = om - m;
  m += d * (on / total);
  m2 += om2 + d * d * (n * on / total);
  n = total;
}

__global__ void finalize_forward_kernel(const Welford* partials, int splits, int64_t channels,
                                        const float* weight, const float* bias, float eps,
                                        bool training, float* mean, float* var, float* scale,
                                        float* shift) {
  const int64_t c = warp_channel();
  const int lane = threadIdx.x % kWarp;
  if (c >= channels) return;  // the whole warp: c is the same on every lane
  if (training) {
    double n = 0, m = 0, m2 = 0;
    for (int s = lane; s < splits; s += kWarp) {
      const Welford p = partials[s * channels + c];
      chan_merge(n, m, m2, p.n, p.mean, p.m2);
    }
#pragma unroll
    for (unsigned offset = kWarp / 2; offset > 0; offset /= 2) {
      chan_merge(n, m, m2, __shfl_down_sync(0xffffffffu, n, offset),
                 __shfl_down_sync(0xffffffffu, m, offset),
                 __shfl_down_sync(0xffffffffu, m2, offset));
    }
    if (lane == 0) {
      mean[c] = n > 0 ? static_cast<float>(m) : NAN;
      var[c] = n > 0 ? static_cast<float>(m2 / n) : NAN;
    }
  }
  if (lane != 0) return;
  // out = (x - mean) * scale + shift: centring first keeps full accuracy for a large mean.
  scale[c] = (weight ? weight[c] : 1.f) / sqrtf(var[c] + eps);
  shift[c] = bias ? bias[c] : 0.f;
}

// The per-channel results of the backward reduction for channel c: grad_weight, grad_bias (when
// not null) and the coefficients of grad_x = k_grad * gm + k_x * (x - mean) + k_const.
__device__ void backward_coefficients(int64_t c, double g, double gx, int64_t reduce_size,
                                      const float* mean, const float* var, const float* weight,
                                      float eps, bool training, float* grad_weight,
                                      float* grad_bias, float* k_grad, float* k_x, float* k_const) {
  const float invstd = 1.f / sqrtf(var[c] + eps);
  const float kg = (weight ? weight[c] : 1.f) * invstd;
  if (grad_bias != nullptr) grad_bias[c] = static_cast<float>(g);
  if (grad_weight != nullptr) grad_weight[c] = static_cast<float>(gx) * invstd;
  k_grad[c] = kg;
  if (training) {
    // d/dx of w * (x - mean) * invstd through the batch mean and invstd.
    const float inv_m = 1.f / static_cast<float>(reduce_size);
    k_x[c] = -kg * invstd * invstd * static_cast<float>(gx) * inv_m;
    k_const[c] = -kg * static_cast<float>(g) * inv_m;
  } else {
    k_x[c] = 0.f;
    k_const[c] = 0.f;
  }
}

// Channel c's sums over every split, by the calling warp; lane 0 gets them.
__device__ void merged_partials(const GradSums* partials, int splits, int64_t channels, int64_t c,
                                double& g, double& gx) {
  g = 0;
  gx = 0;
  for (int s = threadIdx.x % kWarp; s < splits; s += kWarp) {
    g += partials[s * channels + c].g;
    gx += partials[s * channels + c].gx;
  }
#pragma unroll
  for (unsigned offset = kWarp / 2; offset > 0; offset /= 2) {
    g += __shfl_down_sync(0xffffffffu, g, offset);
    gx += __shfl_down_sync(0xffffffffu, gx, offset);
  }
}

__global__ void finalize_backward_kernel(const GradSums* partials, int splits, int64_t channels,
                                         int64_t reduce_size, const float* mean, const float* var,
                                         const float* weight, float eps, bool training,
                                         float* grad_weight, float* grad_bias, float* k_grad,
                                         float* k_x, float* k_const) {
  const int64_t c = warp_channel();
  if (c >= channels) return;  // the whole warp
  double g, gx;
  merged_partials(partials, splits, channels, c, g, gx);
  if (threadIdx.x % kWarp != 0) return;
  backward_coefficients(c, g, gx, reduce_size, mean, var, weight, eps, training, grad_weight,
                        grad_bias, k_grad, k_x, k_const);
}

// Synchronized BatchNorm: the reduction's per-channel sums, before they are all-reduced.
__global__ void finalize_backward_sums_kernel(const GradSums* partials, int splits,
                                              int64_t channels, float* sum_grad,
                                              float* sum_grad_centred) {
  const int64_t c = warp_channel();
  if (c >= channels) return;  // the whole warp
  double g, gx;
  merged_partials(partials, splits, channels, c, g, gx);
  if (threadIdx.x % kWarp != 0) return;
  sum_grad[c] = static_cast<float>(g);
  sum_grad_centred[c] = static_cast<float>(gx);
}

// Synchronized BatchNorm: training coefficients from sums over every process.
__global__ void coefficients_from_sums_kernel(const float* sum_grad, const float* sum_grad_centred,
                                              int64_t channels, int64_t count, const float* mean,
                                              const float* var, const float* weight, float eps,
                                              float* k_grad, float* k_x, float* k_const) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  backward_coefficients(c, sum_grad[c], sum_grad_centred[c], count, mean, var, weight, eps,
                        /*training=*/true, nullptr, nullptr, k_grad, k_x, k_const);
}

// ----------------------------------------------------------------------------------------------
// Elementwise passes

__device__ __forceinline__ float activation_of(float y, Activation activation) {
  if (activation == Activation::kRelu) return y < 0.f ? 0.f : y;     // NaN stays NaN (torch.relu)
  if (activation == Activation::kSilu) return y / (1.f + expf(-y));  // torch's CUDA formula
  return y;
}

template <typename T, bool kAligned>
__global__ void apply_kernel(const T* x, const T* residual, const float* mean, const float* scale,
                             const float* shift, BnActLayout layout, Activation activation,
                             bool residual_after_activation, T* out, uint8_t* relu_mask) {
  const int64_t numel = layout.numel();
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = g * kGroup;
    const int count = numel - base < kGroup ? static_cast<int>(numel - base) : kGroup;
    float xv[kGroup], rv[kGroup];
    load_group<T, kAligned>(x + base, count, xv);
    if (residual != nullptr) {
      load_group<T, kAligned>(residual + base, count, rv);
    } else {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) rv[k] = 0.f;
    }
    ChannelCursor cursor(layout, base);
    alignas(16) T ov[kGroup];
    uint8_t bits = 0;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t c = cursor.c;
      const float y = fmaf(xv[k] - __ldg(mean + c), __ldg(scale + c), __ldg(shift + c));
      ov[k] = from_float<T>(residual_after_activation ? activation_of(y, activation) + rv[k]
                                                      : activation_of(y + rv[k], activation));
      bits |= static_cast<uint8_t>(to_float(ov[k]) > 0.f) << k;
      cursor.advance();
    }
    store_group<T, kAligned>(out + base, count, ov);
    if (relu_mask != nullptr) {
      relu_mask[g] = count == kGroup ? bits : bits & ((1u << count) - 1u);
    }
  }
}

template <typename T, bool kAligned>
__global__ void backward_apply_kernel(const T* grad, const T* x, const uint8_t* relu_mask,
                                      const float* mean, const float* k_grad, const float* k_x,
                                      const float* k_const, BnActLayout layout, T* grad_x,
                                      T* grad_residual) {
  const int64_t numel = layout.numel();
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = g * kGroup;
    const int count = numel - base < kGroup ? static_cast<int>(numel - base) : kGroup;
    float gv[kGroup], xv[kGroup];
    load_group<T, kAligned>(grad + base, count, gv);
    load_group<T, kAligned>(x + base, count, xv);
    const unsigned bits = relu_mask != nullptr ? relu_mask[g] : 0xffu;
    ChannelCursor cursor(layout, base);
    alignas(16) T dx[kGroup], dr[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const float gm = ((bits >> k) & 1u) ? gv[k] : 0.f;
      const int64_t c = cursor.c;
      const float centred = xv[k] - __ldg(mean + c);
      dx[k] = from_float<T>(
          fmaf(__ldg(k_grad + c), gm, fmaf(__ldg(k_x + c), centred, __ldg(k_const + c))));
      dr[k] = from_float<T>(gm);
      cursor.advance();
    }
    store_group<T, kAligned>(grad_x + base, count, dx);
    if (grad_residual != nullptr) store_group<T, kAligned>(grad_residual + base, count, dr);
  }
}

// ----------------------------------------------------------------------------------------------
// Launch geometry

// The multiprocessor count of `device`, asked once per device and cached (it is needed several
// times per op). A failed query is cleared with cudaGetLastError, so that it cannot surface later
// as the error of an unrelated launch; the fallback only shapes the grid.
int multiprocessors(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cached{};
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 80;
  }
  count = std::max(count, 1);
  if (cacheable) cached[device].store(count, std::memory_order_relaxed);
  return count;
}

struct ReduceGeometry {
  dim3 grid, block;
  NchwSteps nchw;  // NCHW only
  int splits = 1;
};

ReduceGeometry reduce_geometry(const BnActLayout& layout, int device) {
  const int64_t target_blocks = 8LL * multiprocessors(device);
  constexpr int64_t kMaxSplits = 65535;  // gridDim.y limit
  ReduceGeometry geo;
  if (!layout.channels_last) {
    geo.nchw = NchwSteps::of(layout.n, layout.hw, kNchwUnit);
    const int64_t units = std::max<int64_t>(1, geo.nchw.count());
    const int64_t splits =
        std::clamp<int64_t>(ceil_div(target_blocks, layout.c), 1, std::min(units, kMaxSplits));
    geo.splits = static_cast<int>(splits);
    geo.grid = dim3(static_cast<unsigned>(layout.c), geo.splits);
    geo.block = dim3(kThreads);
  } else {
    int channel_threads = 1;
    while (channel_threads < 32 && channel_threads < layout.c) channel_threads *= 2;
    const int row_threads = kThreads / channel_threads;
    const int64_t column_blocks = ceil_div(layout.c, channel_threads);
    const int64_t rows = layout.n * layout.hw;
    // At least 4 rows a thread, so that each block has work worth its launch.
    const int64_t splits = std::clamp<int64_t>(
        ceil_div(target_blocks, column_blocks), 1,
        std::min(std::max<int64_t>(1, ceil_div(rows, 4LL * row_threads)), kMaxSplits));
    geo.splits = static_cast<int>(splits);
    geo.grid = dim3(static_cast<unsigned>(column_blocks), geo.splits);
    geo.block = dim3(channel_threads, row_threads);
  }
  return geo;
}

dim3 elementwise_grid(const BnActLayout& layout, int device) {
  const int64_t groups = ceil_div(layout.numel(), kGroup);
  return dim3(static_cast<unsigned>(
      std::clamp<int64_t>(ceil_div(groups, kThreads), 1, 32LL * multiprocessors(device))));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Workspace: [3 * C floats of per-channel values, padded][per-split partials].
size_t channel_area_bytes(const BnActLayout& layout) {
  return static_cast<size_t>(ceil_div(3 * layout.c * sizeof(float), 256) * 256);
}

unsigned channel_blocks(const BnActLayout& layout) {
  return static_cast<unsigned>(ceil_div(layout.c, kThreads));
}

// Blocks of the finalize kernels: a warp a channel.
unsigned warp_channel_blocks(const BnActLayout& layout) {
  return static_cast<unsigned>(ceil_div(layout.c, kChannelsPerBlock));
}

template <typename Reducer>
void launch_reduction(const Reducer& reducer, const BnActLayout& layout, const ReduceGeometry& geo,
                      typename Reducer::Acc* partials, cudaStream_t stream) {
  if (layout.channels_last) {
    reduce_nhwc_kernel<<<geo.grid, geo.block, 0, stream>>>(reducer, layout, partials);
  } else {
    reduce_nchw_kernel<<<geo.grid, geo.block, 0, stream>>>(reducer, layout, geo.nchw, partials);
  }
}

template <typename Acc>
Acc* partials_in(void* workspace, const BnActLayout& layout) {
  return reinterpret_cast<Acc*>(static_cast<char*>(workspace) + channel_area_bytes(layout));
}

template <typename T>
void forward_typed(const BnActForwardParams& p, int device, cudaStream_t stream) {
  const BnActLayout& layout = p.layout;
  float* scale = static_cast<float*>(p.workspace);
  float* shift = scale + layout.c;
  auto* partials = partials_in<Welford>(p.workspace, layout);
  const T* x = static_cast<const T*>(p.x);
  const ReduceGeometry geo = reduce_geometry(layout, device);
  if (p.training) launch_reduction(StatsReducer<T>{x}, layout, geo, partials, stream);
  finalize_forward_kernel<<<warp_channel_blocks(layout), kThreads, 0, stream>>>(
      partials, geo.splits, layout.c, p.weight, p.bias, p.eps, p.training, p.mean, p.var, scale,
      shift);
  if (p.out == nullptr) return;  // statistics only
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const dim3 grid = elementwise_grid(layout, device);
  if (aligned16(x) && aligned16(residual) && aligned16(out)) {
    apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, residual, p.mean, scale, shift, layout,
                                                         p.activation, p.residual_after_activation,
                                                         out, p.relu_mask);
  } else {
    apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, residual, p.mean, scale, shift, layout,
                                                          p.activation, p.residual_after_activation,
                                                          out, p.relu_mask);
  }
}

template <typename T>
void backward_reduce_typed(const BnActBackwardParams& p, int device, cudaStream_t stream,
                           ReduceGeometry& geo) {
  geo = reduce_geometry(p.layout, device);
  const GradReducer<T> reducer{static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x),
                               p.relu ? p.relu_mask : nullptr, p.mean};
  launch_reduction(reducer, p.layout, geo, partials_in<GradSums>(p.workspace, p.layout), stream);
}

// grad_x (and grad_residual) from the coefficients in the workspace's channel area.
template <typename T>
void backward_apply_typed(const BnActBackwardParams& p, int device, cudaStream_t stream) {
  const BnActLayout& layout = p.layout;
  const float* k_grad = static_cast<const float*>(p.workspace);
  const float* k_x = k_grad + layout.c;
  const float* k_const = k_x + layout.c;
  const T* grad = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* mask = p.relu ? p.relu_mask : nullptr;
  T* grad_x = static_cast<T*>(p.grad_x);
  T* grad_residual = static_cast<T*>(p.grad_residual);
  const dim3 grid = elementwise_grid(layout, device);
  if (aligned16(grad) && aligned16(x) && aligned16(grad_x) && aligned16(grad_residual)) {
    backward_apply_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        grad, x, mask, p.mean, k_grad, k_x, k_const, layout, grad_x, grad_residual);
  } else {
    backward_apply_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        grad, x, mask, p.mean, k_grad, k_x, k_const, layout, grad_x, grad_residual);
  }
}

float* channel_area(const BnActBackwardParams& p, int index) {
  return static_cast<float*>(p.workspace) + index * p.layout.c;
}

template <typename T>
void backward_typed(const BnActBackwardParams& p, int device, cudaStream_t stream) {
  ReduceGeometry geo;
  backward_reduce_typed<T>(p, device, stream, geo);
  finalize_backward_kernel<<<warp_channel_blocks(p.layout), kThreads, 0, stream>>>(
      partials_in<GradSums>(p.workspace, p.layout), geo.splits, p.layout.c, p.layout.reduce_size(),
      p.mean, p.var, p.weight, p.eps, p.training, p.grad_weight, p.grad_bias, channel_area(p, 0),
      channel_area(p, 1), channel_area(p, 2));
  backward_apply_typed<T>(p, device, stream);
}

template <typename T>
void backward_sums_typed(const BnActBackwardParams& p, float* sum_grad, float* sum_grad_centred,
                         int device, cudaStream_t stream) {
  ReduceGeometry geo;
  backward_reduce_typed<T>(p, device, stream, geo);
  finalize_backward_sums_kernel<<<warp_channel_blocks(p.layout), kThreads, 0, stream>>>(
      partials_in<GradSums>(p.workspace, p.layout), geo.splits, p.layout.c, sum_grad,
      sum_grad_centred);
}

template <typename T>
void backward_from_sums_typed(const BnActBackwardParams& p, const float* sum_grad,
                              const float* sum_grad_centred, int64_t count, int device,
                              cudaStream_t stream) {
  coefficients_from_sums_kernel<<<channel_blocks(p.layout), kThreads, 0, stream>>>(
      sum_grad, sum_grad_centred, p.layout.c, count, p.mean, p.var, p.weight, p.eps,
      channel_area(p, 0), channel_area(p, 1), channel_area(p, 2));
  backward_apply_typed<T>(p, device, stream);
}

// Calls fn(T{}) with T the activation type of `dtype`.
template <typename Fn>
void dispatch_activation(ActivationType dtype, Fn&& fn) {
  switch (dtype) {
    case ActivationType::kFloat:
      return fn(float{});
    case ActivationType::kHalf:
      return fn(__half{});
    case ActivationType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
}

}  // namespace

size_t bn_act_workspace_bytes(const BnActLayout& layout, int device) {
  const ReduceGeometry geo = reduce_geometry(layout, device);
  const size_t partial_bytes = std::max(sizeof(Welford), sizeof(GradSums));
  return channel_area_bytes(layout) + static_cast<size_t>(geo.splits) * layout.c * partial_bytes;
}

void launch_bn_act_forward(const BnActForwardParams& params, int device, cudaStream_t stream) {
  dispatch_activation(params.dtype,
                      [&](auto tag) { forward_typed<decltype(tag)>(params, device, stream); });
}

void launch_bn_stats(const BnActForwardParams& params, int device, cudaStream_t stream) {
  BnActForwardParams stats_only = params;
  stats_only.training = true;
  stats_only.weight = stats_only.bias = nullptr;
  stats_only.out = nullptr;
  launch_bn_act_forward(stats_only, device, stream);
}

void launch_bn_act_backward(const BnActBackwardParams& params, int device, cudaStream_t stream) {
  dispatch_activation(params.dtype,
                      [&](auto tag) { backward_typed<decltype(tag)>(params, device, stream); });
}

void launch_bn_act_backward_reduce(const BnActBackwardParams& params, float* sum_grad,
                                   float* sum_grad_centred, int device, cudaStream_t stream) {
  dispatch_activation(params.dtype, [&](auto tag) {
    backward_sums_typed<decltype(tag)>(params, sum_grad, sum_grad_centred, device, stream);
  });
}

void launch_bn_act_backward_apply(const BnActBackwardParams& params, const float* sum_grad,
                                  const float* sum_grad_centred, int64_t count, int device,
                                  cudaStream_t stream) {
  dispatch_activation(params.dtype, [&](auto tag) {
    backward_from_sums_typed<decltype(tag)>(params, sum_grad, sum_grad_centred, count, device,
                                            stream);
  });
}

}  // namespace fastres::cuda
