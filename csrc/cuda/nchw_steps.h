// How the NCHW split reduction (bn_act_kernel.cu) walks one channel's elements: in steps, each
// step one read per block slot (kNchwUnit slots: the block's threads times their reads a step).
//
// A large plane is read a kNchwUnit-element chunk per step. A small plane (at most kNchwUnit / 2
// elements: ResNet's 28x28, 14x14 and 7x7) would leave most slots idle that way (a 7x7 plane
// fills 49 of 1,024), so a step reads as many whole planes as fit (20 planes of 49: 980 slots).
// Each slot's place within a step is fixed, computed once per thread (the only divisions by
// the plane size); a step then costs one division by chunks_per_plane, as before.
//
// Plain C++ with __host__ __device__ under nvcc: tests/cpp/nchw_steps_test.cpp checks on the host
// that the steps read every element of a channel exactly once.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FASTRES_HOST_DEVICE __host__ __device__
#else
#define FASTRES_HOST_DEVICE
#endif

namespace fastres::cuda {

struct NchwSteps {
  int64_t planes = 0;            // n: one plane of the channel per image
  int64_t plane_size = 0;        // h * w
  int64_t unit = 0;              // slots a step
  int64_t planes_per_step = 1;   // > 1 for small planes
  int64_t chunks_per_plane = 1;  // > 1 for planes larger than a step

  static NchwSteps of(int64_t planes, int64_t plane_size, int64_t unit) {
    NchwSteps steps;
    steps.planes = planes;
    steps.plane_size = plane_size;
    steps.unit = unit;
    if (plane_size > 0 && 2 * plane_size <= unit) {
      steps.planes_per_step = unit / plane_size;
    } else if (plane_size > unit) {
      steps.chunks_per_plane = (plane_size + unit - 1) / unit;
    }
    return steps;
  }

  FASTRES_HOST_DEVICE int64_t count() const {
    return (planes + planes_per_step - 1) / planes_per_step * chunks_per_plane;
  }
};

// A slot's place within every step: the plane of the step it reads, and where in that plane.
struct NchwSlot {
  int plane_in_step;
  int hw_in_step;
};

FASTRES_HOST_DEVICE inline NchwSlot nchw_slot(const NchwSteps& steps, int slot) {
  if (steps.planes_per_step > 1) {
    const int size = static_cast<int>(steps.plane_size);  // at most unit / 2
    return {slot / size, slot % size};
  }
  return {0, slot};
}

// Which element (plane, hw) `slot` reads at `step`; false when it reads none there (past the
// last plane, the end of a plane, or the slots left over after the whole planes of a step).
FASTRES_HOST_DEVICE inline bool nchw_element(const NchwSteps& steps, const NchwSlot& slot,
                                             int64_t step, int64_t& plane, int64_t& hw) {
  plane = step / steps.chunks_per_plane * steps.planes_per_step + slot.plane_in_step;
  hw = step % steps.chunks_per_plane * steps.unit + slot.hw_in_step;
  return slot.plane_in_step < steps.planes_per_step && plane < steps.planes &&
         hw < steps.plane_size;
}

}  // namespace fastres::cuda
