// Shape of a dense 4-D activation as the bn_act kernels see it.
//
// Plain C++ (no torch, no CUDA) so that CPU kernels, CUDA kernels and the bindings can all share
// it. A dense tensor is either NCHW-contiguous or channels_last (NHWC in memory); element i of the
// buffer (memory order) belongs to channel
//   (i / hw) % c   for NCHW,
//   i % c          for channels_last.
// The packed ReLU mask uses the same memory order: bit (i % 8) of byte (i / 8) is set where
// output element i is positive.
#pragma once

#include <cstdint>

// Callable from host and device code when compiled by nvcc.
#if defined(__CUDACC__)
#define FASTRES_HOST_DEVICE __host__ __device__
#else
#define FASTRES_HOST_DEVICE
#endif

namespace fastres {

struct BnActLayout {
  int64_t n = 0;   // batch
  int64_t c = 0;   // channels
  int64_t hw = 0;  // height * width
  bool channels_last = false;

  FASTRES_HOST_DEVICE int64_t numel() const { return n * c * hw; }
  // Elements reduced into one channel's statistics.
  FASTRES_HOST_DEVICE int64_t reduce_size() const { return n * hw; }
};

// The activation applied after the normalisation (and the residual add). The op schemas take it
// by name: "identity", "relu", "silu" (z * sigmoid(z)).
enum class Activation : uint8_t { kIdentity = 0, kRelu = 1, kSilu = 2 };

// Bytes needed for the packed ReLU mask of `numel` elements.
FASTRES_HOST_DEVICE inline int64_t relu_mask_bytes(int64_t numel) { return (numel + 7) / 8; }

}  // namespace fastres
