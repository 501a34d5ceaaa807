// CPU kernels of bn_act: vectorised with at::vec::Vectorized, threaded with at::parallel_for.
//
// This file is compiled once per instruction set, like ATen's own CPU kernels: by
// bn_act_kernel.cpp (baseline x86-64 / the platform default, namespace `generic`),
// bn_act_kernel_avx2.cpp (AVX2 + FMA, namespace `avx2`) and bn_act_kernel_avx512.cpp (AVX-512,
// namespace `avx512`); the binding picks the one ATen picks for its own kernels at run time.
// The including file includes bn_act_kernel.h, then defines FASTRES_CPU_ISA (the namespace) and
// CPU_CAPABILITY with CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512, which switch
// at::vec::Vectorized to that instruction set's implementation.
//
// Every kernel walks the dense buffer in memory order in blocks of kBlock elements. kBlock is a
// multiple of 8, so a byte of the packed ReLU mask is only ever written by one thread.
// The arithmetic is always done in opmath (float, or double for double inputs). bfloat16 and
// half are converted in registers, vector by vector, except in the NCHW reductions, which
// convert a piece of a plane into a float scratch buffer and read it twice.
#ifndef FASTRES_CPU_ISA
#error "define FASTRES_CPU_ISA before including bn_act_kernel_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastres::cpu::FASTRES_CPU_ISA {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 4096;  // elements per work item; multiple of 8 and of every vector width
constexpr int64_t kGrainBlocks = 4;
// Elements per channels_last reduction tile: large enough to amortise the per-channel merges,
// small enough (64 KiB of float) that the tile's second pass reads from L2.
constexpr int64_t kReduceTile = 16384;
// ... and at least a few rows, so that the per-channel merge at the end of each tile stays
// small against the tile's work. Not many more: the column reductions walk a tile down its
// rows with a stride of C values, and with thousands of channels a tall tile no longer fits L1.
constexpr int64_t kMinTileRows = 8;

// ---------------------------------------------------------------------------------------------
// Small helpers

// Reduced-precision values (bfloat16, half) to float and back, a vector at a time: converting
// element by element through c10's scalar conversions does not vectorise, and cost more than the
// whole fused computation (at::vec's conversions are the ones ATen's own kernels use).
template <typename T>
constexpr bool is_reduced_v = !std::is_same_v<T, opmath<T>>;

template <typename T>
void convert_to_opmath(const T* src, int64_t len, opmath<T>* dst) {
  using FVec = Vectorized<float>;
  constexpr int64_t W = FVec::size();
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W) {
    FVec low, high;
    at::vec::load_to_float(src + k, low, high);
    low.store(dst + k);
    high.store(dst + k + W);
  }
  for (; k < len; ++k) dst[k] = static_cast<float>(src[k]);
}

// Returns src as opmath, converting into buf only when the types differ.
template <typename T>
const opmath<T>* as_opmath(const T* src, int64_t len, opmath<T>* buf) {
  if constexpr (is_reduced_v<T>) {
    convert_to_opmath(src, len, buf);
    return buf;
  } else {
    return src;
  }
}

inline bool mask_bit(const uint8_t* mask, int64_t index) {
  return (mask[index >> 3] >> (index & 7)) & 1;
}

// Two vectors of opmath from 2 * Vectorized<opmath<T>>::size() values of T (for bfloat16 and
// half: one Vectorized<T>), and back: the unit of the elementwise loops.
template <typename T>
std::pair<Vectorized<opmath<T>>, Vectorized<opmath<T>>> load_pair(const T* p) {
  using Vec = Vectorized<opmath<T>>;
  if constexpr (is_reduced_v<T>) {
    Vec low, high;
    at::vec::load_to_float(p, low, high);
    return {low, high};
  } else {
    return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
  }
}

template <typename T>
void store_pair(T* p, const Vectorized<opmath<T>>& low, const Vectorized<opmath<T>>& high) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(low, high).store(p);
  } else {
    low.store(p);
    high.store(p + Vectorized<opmath<T>>::size());
  }
}

// One vector of opmath from the first n values at p (n <= the vector's width; the rest zero).
template <typename T>
Vectorized<opmath<T>> load_vec(const T* p, int64_t n) {
  using Vec = Vectorized<opmath<T>>;
  if constexpr (is_reduced_v<T>) {
    if (n == Vec::size()) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
    return std::get<0>(at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n)));
  } else {
    return Vec::loadu(p, n);
  }
}

// The 8 mask bits of elements index .. index + 7 (all inside the tensor), at any alignment.
inline uint8_t mask_byte_at(const uint8_t* mask, int64_t index) {
  const int64_t byte = index >> 3, shift = index & 7;
  if (shift == 0) return mask[byte];
  return static_cast<uint8_t>((mask[byte] | (mask[byte + 1] << 8)) >> shift);
}

// g where the mask bit of its element is set, else exactly 0, even when g is not finite, as in
// PyTorch's threshold_backward. Lane k is element index + k.
template <typename V>
Vectorized<V> masked_by(const Vectorized<V>& g, const uint8_t* mask, int64_t index) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, float>) {  // 16 lanes: two mask bytes are the lane mask
    const auto lanes =
        static_cast<__mmask16>(mask_byte_at(mask, index) | (mask_byte_at(mask, index + 8) << 8));
    return _mm512_maskz_mov_ps(lanes, g);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, float>) {
    // One mask byte selects 8 lanes: AND with all-ones or all-zeros gives g or exactly 0.
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i byte = _mm256_set1_epi32(mask_byte_at(mask, index));
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
    return _mm256_and_ps(g, _mm256_castsi256_ps(on));
  }
#endif
  alignas(64) V lanes[Vectorized<V>::size()];
  g.store(lanes);
  for (int64_t k = 0; k < Vectorized<V>::size(); ++k) {
    if (!mask_bit(mask, index + k)) lanes[k] = V(0);
  }
  return Vectorized<V>::loadu(lanes);
}

// masked_by for the first n lanes only (n <= the width; the other lanes come back as 0), reading
// no mask bit past element index + n - 1.
template <typename V>
Vectorized<V> masked_by(const Vectorized<V>& g, const uint8_t* mask, int64_t index, int64_t n) {
  if (n == Vectorized<V>::size()) return masked_by(g, mask, index);
  alignas(64) V lanes[Vectorized<V>::size()];
  g.store(lanes);
  for (int64_t k = 0; k < Vectorized<V>::size(); ++k) {
    if (k >= n || !mask_bit(mask, index + k)) lanes[k] = V(0);
  }
  return Vectorized<V>::loadu(lanes);
}

// load_pair of gm = grad * relu_mask (mask null: all ones); grad points at element `index`.
template <typename T>
std::pair<Vectorized<opmath<T>>, Vectorized<opmath<T>>> load_masked_pair(const T* grad,
                                                                         const uint8_t* mask,
                                                                         int64_t index) {
  auto [g0, g1] = load_pair(grad);
  if (mask) {
    g0 = masked_by(g0, mask, index);
    g1 = masked_by(g1, mask, index + Vectorized<opmath<T>>::size());
  }
  return {g0, g1};
}

// gm = grad_out * relu_mask as opmath (mask null: all ones), for the reductions' scratch.
template <typename T>
void load_masked_grad(const T* grad, const uint8_t* mask, int64_t first_index, int64_t len,
                      opmath<T>* gm) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W) {
    const auto [g0, g1] = load_masked_pair(grad + k, mask, first_index + k);
    g0.store(gm + k);
    g1.store(gm + k + W);
  }
  for (; k < len; ++k) {
    const bool on = mask == nullptr || mask_bit(mask, first_index + k);
    gm[k] = on ? static_cast<V>(grad[k]) : V(0);
  }
}

template <typename V>
V horizontal_sum(const Vectorized<V>& v) {
  alignas(64) V lanes[Vectorized<V>::size()];
  v.store(lanes);
  V total = 0;
  for (int64_t k = 0; k < Vectorized<V>::size(); ++k) total += lanes[k];
  return total;
}

template <typename V>
V sum_of(const V* p, int64_t n) {
  using Vec = Vectorized<V>;
  Vec acc(V(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc += Vec::loadu(p + i);
  V total = horizontal_sum(acc);
  for (; i < n; ++i) total += p[i];
  return total;
}

// Sums of the deviations from `center` and of their squares: the second pass of the corrected
// two-pass algorithm (see corrected_moments).
template <typename V>
std::pair<V, V> deviation_sums(const V* p, int64_t n, V center) {
  using Vec = Vectorized<V>;
  Vec sum(V(0)), squares(V(0));
  const Vec c(center);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec d = Vec::loadu(p + i) - c;
    sum += d;
    squares = at::vec::fmadd(d, d, squares);
  }
  V total = horizontal_sum(sum), total_squares = horizontal_sum(squares);
  for (; i < n; ++i) {
    total += p[i] - center;
    total_squares += (p[i] - center) * (p[i] - center);
  }
  return {total, total_squares};
}

// The mean and M2 of n values, in double, from a first-pass mean `center` (rounded to opmath)
// and the sums of deviations from it: the corrected two-pass algorithm (Chan, Golub and LeVeque).
// The deviations' sum carries what rounding the first mean lost, so the mean is good to about
// double precision where opmath alone would leave its rounding error, which the normalisation
// divides by the standard deviation (large for a channel whose spread is small against its
// mean). PyTorch's CPU BatchNorm accumulates in double for the same reason.
struct CorrectedMoments {
  double mean, m2;
};

inline CorrectedMoments corrected_moments(double n, double center, double sum, double squares) {
  // The subtraction is tiny against squares; rounding must not make M2 negative.
  return {center + sum / n, std::max(0.0, squares - sum * sum / n)};
}

// Running (count, mean, M2) of one channel, merged chunk by chunk with Chan et al.'s formula, so
// the variance never comes from a difference of two large sums.
struct Moments {
  double count = 0, mean = 0, m2 = 0;

  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// Calls fn(first, len, channel_or_first_channel, broadcast) for each run of [begin, end) that
// stays inside one NCHW plane (one channel: broadcast) or one NHWC row (consecutive channels).
template <typename Fn>
void for_each_run(const BnActLayout& layout, int64_t begin, int64_t end, Fn&& fn) {
  int64_t i = begin;
  while (i < end) {
    if (layout.channels_last) {
      const int64_t c = i % layout.c;
      const int64_t len = std::min(end - i, layout.c - c);
      fn(i, len, c, /*broadcast=*/false);
      i += len;
    } else {
      const int64_t plane = i / layout.hw;
      const int64_t offset = i % layout.hw;
      const int64_t len = std::min(end - i, layout.hw - offset);
      fn(i, len, plane % layout.c, /*broadcast=*/true);
      i += len;
    }
  }
}

// Uninitialised scratch memory (a std::vector would zero it on every allocation).
template <typename V>
std::unique_ptr<V[]> scratch_buffer(int64_t size) {
  return std::unique_ptr<V[]>(new V[static_cast<size_t>(size)]);
}

// Runs fn(block_begin, block_end) over kBlock-sized blocks of the whole buffer in parallel.
template <typename Fn>
void parallel_blocks(int64_t numel, Fn&& fn) {
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * kBlock, std::min(numel, (b + 1) * kBlock));
  });
}

// Sets bit (i % 8) of mask byte (i / 8) where out[i] > 0, for i in [begin, end); begin % 8 == 0.
// Tested on out as stored (after rounding to T), as PyTorch's threshold_backward tests it: a
// tiny positive value can round to zero in bfloat16 or half.
template <typename T>
void pack_relu_mask(const T* out, int64_t begin, int64_t end, uint8_t* mask) {
  int64_t i = begin;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<opmath<T>, float>) {
    const __m512 zero = _mm512_setzero_ps();
    for (; i + 32 <= end; i += 32) {
      const auto [low, high] = load_pair(out + i);
      const uint32_t bits =
          _mm512_cmp_ps_mask(low, zero, _CMP_GT_OQ) |
          (static_cast<uint32_t>(_mm512_cmp_ps_mask(high, zero, _CMP_GT_OQ)) << 16);
      std::memcpy(mask + (i >> 3), &bits, sizeof(bits));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<opmath<T>, float>) {
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 16 <= end; i += 16) {
      Vectorized<float> low, high;
      if constexpr (is_reduced_v<T>) {
        at::vec::load_to_float(out + i, low, high);
      } else {
        low = Vectorized<float>::loadu(out + i);
        high = Vectorized<float>::loadu(out + i + 8);
      }
      mask[i >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(low, zero, _CMP_GT_OQ)));
      mask[(i >> 3) + 1] =
          static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(high, zero, _CMP_GT_OQ)));
    }
  }
#endif
  for (; i < end; i += 8) {
    uint8_t byte = 0;
    const int64_t stop = std::min<int64_t>(8, end - i);
    for (int64_t k = 0; k < stop; ++k) byte |= static_cast<uint8_t>(out[i + k] > T(0)) << k;
    mask[i >> 3] = byte;
  }
}

// Column reductions of a channels_last tile (nr rows of C values, row stride C) into out[C]:
//   out[c] = sum_r f(r, c)   where f is given the vectors of one row's columns c .. c + width.
// Blocks of 4 vectors of columns keep their accumulators in registers across all rows, so each
// element is loaded once and each result stored once (accumulating into memory row by row
// costs a load and a store per vector per row).
template <typename V, typename Fn>
void column_sums(int64_t nr, int64_t C, V* out, Fn&& f) {
  using Vec = Vectorized<V>;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W) {
    Vec a0(V(0)), a1(V(0)), a2(V(0)), a3(V(0));
    for (int64_t r = 0; r < nr; ++r) {
      a0 += f(r, c);
      a1 += f(r, c + W);
      a2 += f(r, c + 2 * W);
      a3 += f(r, c + 3 * W);
    }
    a0.store(out + c);
    a1.store(out + c + W);
    a2.store(out + c + 2 * W);
    a3.store(out + c + 3 * W);
  }
  for (; c + W <= C; c += W) {
    Vec a(V(0));
    for (int64_t r = 0; r < nr; ++r) a += f(r, c);
    a.store(out + c);
  }
  if (c < C) {  // the last C % W columns: full-width loads would run past the row
    alignas(64) V lanes[W];
    Vec a(V(0));
    for (int64_t r = 0; r < nr; ++r) a += f(r, c, C - c);
    a.store(lanes);
    for (int64_t k = 0; k < C - c; ++k) out[c + k] = lanes[k];
  }
}

// Two column reductions in one walk over the tile: f returns the pair of vectors to add to
// out_a and out_b (blocks of 2 vectors of columns: 4 accumulators in registers).
template <typename V, typename Fn>
void column_sums2(int64_t nr, int64_t C, V* out_a, V* out_b, Fn&& f) {
  using Vec = Vectorized<V>;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    Vec a0(V(0)), a1(V(0)), b0(V(0)), b1(V(0));
    for (int64_t r = 0; r < nr; ++r) {
      const auto [p0, q0] = f(r, c, W);
      const auto [p1, q1] = f(r, c + W, W);
      a0 += p0;
      b0 += q0;
      a1 += p1;
      b1 += q1;
    }
    a0.store(out_a + c);
    a1.store(out_a + c + W);
    b0.store(out_b + c);
    b1.store(out_b + c + W);
  }
  for (; c < C; c += W) {  // the last C % (2 W) columns, partial loads past C
    const int64_t n = std::min(W, C - c);
    alignas(64) V lanes_a[W], lanes_b[W];
    Vec a(V(0)), b(V(0));
    for (int64_t r = 0; r < nr; ++r) {
      const auto [p, q] = f(r, c, n);
      a += p;
      b += q;
    }
    a.store(lanes_a);
    b.store(lanes_b);
    for (int64_t k = 0; k < n; ++k) {
      out_a[c + k] = lanes_a[k];
      out_b[c + k] = lanes_b[k];
    }
  }
}

// Rows per channels_last reduction tile: about kReduceTile elements and at least kMinTileRows
// rows, evened out so that every thread gets the same number of tiles (with ResNet's small
// late-stage activations there are only a handful of tiles).
inline int64_t nhwc_tile_rows(int64_t rows, int64_t channels) {
  const int64_t wanted = std::max(kMinTileRows, kReduceTile / std::max<int64_t>(1, channels));
  const int64_t threads = at::get_num_threads();
  int64_t tiles = std::max<int64_t>(1, (rows + wanted - 1) / wanted);
  tiles = (tiles + threads - 1) / threads * threads;
  return std::max<int64_t>(1, (rows + tiles - 1) / tiles);
}

// ---------------------------------------------------------------------------------------------
// Forward statistics

// NCHW: each work item is a piece of one channel plane; per piece a two-pass mean/M2 in cache.
template <typename T>
void batch_stats_nchw(const T* x, const BnActLayout& layout, std::vector<Moments>& acc) {
  using V = opmath<T>;
  const int64_t pieces_per_plane = (layout.hw + kBlock - 1) / kBlock;
  const int64_t items = layout.n * layout.c * pieces_per_plane;
  const int64_t grain =
      std::max<int64_t>(1, kGrainBlocks * kBlock / std::max<int64_t>(1, layout.hw));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    auto buf = scratch_buffer<V>(kBlock);
    Moments* mine = acc.data() + at::get_thread_num() * layout.c;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t plane = item / pieces_per_plane;
      const int64_t start = (item % pieces_per_plane) * kBlock;
      const int64_t len = std::min(kBlock, layout.hw - start);
      const V* v = as_opmath(x + plane * layout.hw + start, len, buf.get());
      const V center = sum_of(v, len) / static_cast<V>(len);
      const auto [sum, squares] = deviation_sums(v, len, center);
      const double n = static_cast<double>(len);
      const CorrectedMoments m = corrected_moments(n, center, sum, squares);
      mine[plane % layout.c].merge(n, m.mean, m.m2);
    }
  });
}

// channels_last: each work item is a tile of rows x C; per tile a two-pass mean/M2 per channel.
template <typename T>
void batch_stats_nhwc(const T* x, const BnActLayout& layout, std::vector<Moments>& acc) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  const int64_t C = layout.c;
  const int64_t rows = layout.reduce_size();
  const int64_t tile_rows = nhwc_tile_rows(rows, C);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<V> mean(C), deviations(C), squares(C);
    // Every channel of a tile has the same count, so this chunk's running moments share one
    // count and the Chan merge weights are scalars: the merge vectorises, with no division.
    double count = 0;
    std::vector<double> run_mean(C, 0.0), run_m2(C, 0.0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile_rows;
      const int64_t nr = std::min(tile_rows, rows - r0);
      // Both passes read the tile from T (still in cache for the second): converting it to
      // opmath in registers twice costs less than storing and reloading an opmath copy.
      const T* v = x + r0 * C;
      column_sums<V>(nr, C, mean.data(), [&](int64_t r, int64_t c, int64_t n = Vec::size()) {
        return load_vec(v + r * C + c, n);
      });
      const Vec inv_rows(V(1) / static_cast<V>(nr));
      at::vec::map([&](Vec a) { return a * inv_rows; }, mean.data(), mean.data(), C);
      column_sums2<V>(nr, C, deviations.data(), squares.data(),
                      [&](int64_t r, int64_t c, int64_t n) {
                        const Vec d = load_vec(v + r * C + c, n) - Vec::loadu(mean.data() + c, n);
                        return std::make_pair(d, d * d);
                      });
      const double tile_n = static_cast<double>(nr);
      const double inv_tile_n = 1.0 / tile_n;
      const double total = count + tile_n;
      const double w_mean = tile_n / total;
      const double w_m2 = count * tile_n / total;
      for (int64_t c = 0; c < C; ++c) {
        // corrected_moments(tile_n, ...) with the division by tile_n hoisted out of the loop.
        const double sum = deviations[c];
        const double tile_mean = mean[c] + sum * inv_tile_n;
        const double tile_m2 = std::max(0.0, squares[c] - sum * sum * inv_tile_n);
        const double delta = tile_mean - run_mean[c];
        run_mean[c] += delta * w_mean;
        run_m2[c] += tile_m2 + delta * delta * w_m2;
      }
      count = total;
    }
    Moments* mine = acc.data() + at::get_thread_num() * C;
    for (int64_t c = 0; c < C; ++c) mine[c].merge(count, run_mean[c], run_m2[c]);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward reductions

template <typename T>
void backward_reduce_nchw(const T* grad, const T* x, const uint8_t* mask, const opmath<T>* mean,
                          const BnActLayout& layout, std::vector<double>& acc) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  const int64_t C = layout.c;
  const int64_t pieces_per_plane = (layout.hw + kBlock - 1) / kBlock;
  const int64_t items = layout.n * C * pieces_per_plane;
  const int64_t grain =
      std::max<int64_t>(1, kGrainBlocks * kBlock / std::max<int64_t>(1, layout.hw));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    auto gm = scratch_buffer<V>(kBlock), xbuf = scratch_buffer<V>(kBlock);
    double* mine = acc.data() + at::get_thread_num() * 2 * C;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t plane = item / pieces_per_plane;
      const int64_t c = plane % C;
      const int64_t first = plane * layout.hw + (item % pieces_per_plane) * kBlock;
      const int64_t len = std::min(kBlock, (plane + 1) * layout.hw - first);
      load_masked_grad(grad + first, mask, first, len, gm.get());
      const V* xv = as_opmath(x + first, len, xbuf.get());
      const Vec m(mean[c]);
      Vec sg(V(0)), sgx(V(0));
      int64_t k = 0;
      for (; k + Vec::size() <= len; k += Vec::size()) {
        Vec g = Vec::loadu(gm.get() + k);
        sg += g;
        sgx = at::vec::fmadd(g, Vec::loadu(xv + k) - m, sgx);
      }
      V tail_g = 0, tail_gx = 0;
      for (; k < len; ++k) {
        tail_g += gm[k];
        tail_gx += gm[k] * (xv[k] - mean[c]);
      }
      mine[c] += horizontal_sum(sg) + tail_g;
      mine[C + c] += horizontal_sum(sgx) + tail_gx;
    }
  });
}

template <typename T>
void backward_reduce_nhwc(const T* grad, const T* x, const uint8_t* mask, const opmath<T>* mean,
                          const BnActLayout& layout, std::vector<double>& acc) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  const int64_t C = layout.c;
  const int64_t rows = layout.reduce_size();
  const int64_t tile_rows = nhwc_tile_rows(rows, C);
  const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<V> sg(C), sgx(C);
    double* mine = acc.data() + at::get_thread_num() * 2 * C;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t first = t * tile_rows * C;
      const int64_t nr = std::min(tile_rows, rows - t * tile_rows);
      column_sums2<V>(nr, C, sg.data(), sgx.data(), [&](int64_t r, int64_t c, int64_t n) {
        const int64_t index = first + r * C + c;
        Vec g = load_vec(grad + index, n);
        if (mask) g = masked_by(g, mask, index, n);
        return std::make_pair(g, g * (load_vec(x + index, n) - Vec::loadu(mean + c, n)));
      });
      for (int64_t c = 0; c < C; ++c) {
        mine[c] += sg[c];
        mine[C + c] += sgx[c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes over one run (see for_each_run). Per-channel arrays are indexed from the
// run's first channel; `broadcast` means the whole run shares channel 0 of those arrays.

template <typename V>
Vectorized<V> channel_vec(const V* values, int64_t k, bool broadcast) {
  return broadcast ? Vectorized<V>(values[0]) : Vectorized<V>::loadu(values + k);
}

template <typename V>
V channel_val(const V* values, int64_t k, bool broadcast) {
  return broadcast ? values[0] : values[k];
}

template <typename V>
V activation_scalar(V y, Activation activation) {
  if (activation == Activation::kRelu) return (y < V(0)) ? V(0) : y;  // NaN stays NaN (torch.relu)
  if (activation == Activation::kSilu) return y / (V(1) + std::exp(-y));  // torch's CPU formula
  return y;
}

template <typename V>
Vectorized<V> activation_vec(Vectorized<V> y, Activation activation) {
  using Vec = Vectorized<V>;
  if (activation == Activation::kRelu) return at::vec::clamp_min(y, Vec(V(0)));
  if (activation == Activation::kSilu) return y / (Vec(V(1)) + y.neg().exp());
  return y;
}

// The BatchNorm affine of a vector of x at offset k of the run.
template <typename V>
Vectorized<V> normalise_vec(const Vectorized<V>& x, const V* mean, const V* mean_low,
                            const V* scale, const V* shift, int64_t k, bool broadcast) {
  const Vectorized<V> centred =
      x - channel_vec(mean, k, broadcast) - channel_vec(mean_low, k, broadcast);
  return at::vec::fmadd(centred, channel_vec(scale, k, broadcast),
                        channel_vec(shift, k, broadcast));
}

// out = act((x - mean - mean_low) * scale + shift + residual), or with residual_after_activation
// act((x - mean - mean_low) * scale + shift) + residual, straight from T to T: each vector is
// converted in registers, computed in opmath and converted back.
template <typename T>
void apply_run(const T* x, const T* residual, const opmath<T>* mean, const opmath<T>* mean_low,
               const opmath<T>* scale, const opmath<T>* shift, int64_t len, bool broadcast,
               Activation activation, bool residual_after_activation, T* out) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  constexpr int64_t W = Vec::size();
  const bool add_before = residual != nullptr && !residual_after_activation;
  const bool add_after = residual != nullptr && residual_after_activation;
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W) {
    const auto [x0, x1] = load_pair(x + k);
    Vec y0 = normalise_vec(x0, mean, mean_low, scale, shift, k, broadcast);
    Vec y1 = normalise_vec(x1, mean, mean_low, scale, shift, k + W, broadcast);
    if (add_before) {
      const auto [r0, r1] = load_pair(residual + k);
      y0 += r0;
      y1 += r1;
    }
    y0 = activation_vec(y0, activation);
    y1 = activation_vec(y1, activation);
    if (add_after) {
      const auto [r0, r1] = load_pair(residual + k);
      y0 += r0;
      y1 += r1;
    }
    store_pair(out + k, y0, y1);
  }
  for (; k < len; ++k) {
    const V centred = static_cast<V>(x[k]) - channel_val(mean, k, broadcast) -
                      channel_val(mean_low, k, broadcast);
    V y = centred * channel_val(scale, k, broadcast) + channel_val(shift, k, broadcast);
    if (add_before) y += static_cast<V>(residual[k]);
    y = activation_scalar(y, activation);
    if (add_after) y += static_cast<V>(residual[k]);
    out[k] = static_cast<T>(y);
  }
}

// grad_x = k_grad * gm + k_x * (x - mean) + k_const and grad_residual = gm, straight from T to T.
template <typename T>
void backward_apply_run(const T* grad, const T* x, const uint8_t* mask, int64_t first_index,
                        const opmath<T>* mean, const opmath<T>* k_grad, const opmath<T>* k_x,
                        const opmath<T>* k_const, int64_t len, bool broadcast, T* grad_x,
                        T* grad_residual) {
  using V = opmath<T>;
  using Vec = Vectorized<V>;
  constexpr int64_t W = Vec::size();
  auto grad_x_vec = [&](const Vec& gm, const Vec& xv, int64_t j) {
    const Vec d =
        at::vec::fmadd(gm, channel_vec(k_grad, j, broadcast), channel_vec(k_const, j, broadcast));
    return at::vec::fmadd(xv - channel_vec(mean, j, broadcast), channel_vec(k_x, j, broadcast), d);
  };
  int64_t k = 0;
  for (; k + 2 * W <= len; k += 2 * W) {
    const auto [g0, g1] = load_masked_pair(grad + k, mask, first_index + k);
    const auto [x0, x1] = load_pair(x + k);
    store_pair(grad_x + k, grad_x_vec(g0, x0, k), grad_x_vec(g1, x1, k + W));
    if (grad_residual) store_pair(grad_residual + k, g0, g1);
  }
  for (; k < len; ++k) {
    const bool on = mask == nullptr || mask_bit(mask, first_index + k);
    const V gm = on ? static_cast<V>(grad[k]) : V(0);
    const V centred = static_cast<V>(x[k]) - channel_val(mean, k, broadcast);
    grad_x[k] =
        static_cast<T>(gm * channel_val(k_grad, k, broadcast) + channel_val(k_const, k, broadcast) +
                       centred * channel_val(k_x, k, broadcast));
    if (grad_residual) grad_residual[k] = static_cast<T>(gm);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public kernels

template <typename T>
void bn_batch_stats(const T* x, const BnActLayout& layout, opmath<T>* mean, opmath<T>* var,
                    opmath<T>* mean_low) {
  std::vector<Moments> acc(static_cast<size_t>(at::get_num_threads() * layout.c));
  if (layout.channels_last) {
    batch_stats_nhwc(x, layout, acc);
  } else {
    batch_stats_nchw(x, layout, acc);
  }
  for (int64_t c = 0; c < layout.c; ++c) {
    Moments total;
    for (int64_t t = 0; t < at::get_num_threads(); ++t) {
      const Moments& part = acc[t * layout.c + c];
      total.merge(part.count, part.mean, part.m2);
    }
    mean[c] = static_cast<opmath<T>>(total.mean);
    if (mean_low != nullptr) {
      mean_low[c] = static_cast<opmath<T>>(total.mean - static_cast<double>(mean[c]));
    }
    var[c] = static_cast<opmath<T>>(total.count > 0 ? total.m2 / total.count : 0.0);
  }
}

template <typename T>
void bn_scale_shift(const opmath<T>* mean, const opmath<T>* var, const opmath<T>* weight,
                    const opmath<T>* bias, double eps, int64_t channels, opmath<T>* scale,
                    opmath<T>* shift) {
  using V = opmath<T>;
  for (int64_t c = 0; c < channels; ++c) {
    const V invstd = V(1) / std::sqrt(var[c] + static_cast<V>(eps));
    scale[c] = (weight ? weight[c] : V(1)) * invstd;
    shift[c] = bias ? bias[c] : V(0);
  }
}

template <typename T>
void bn_act_apply(const T* x, const T* residual, const opmath<T>* mean, const opmath<T>* mean_low,
                  const opmath<T>* scale, const opmath<T>* shift, const BnActLayout& layout,
                  Activation activation, bool residual_after_activation, T* out,
                  uint8_t* relu_mask) {
  parallel_blocks(layout.numel(), [&](int64_t begin, int64_t end) {
    for_each_run(layout, begin, end, [&](int64_t i, int64_t len, int64_t c, bool broadcast) {
      apply_run(x + i, residual ? residual + i : nullptr, mean + c, mean_low + c, scale + c,
                shift + c, len, broadcast, activation, residual_after_activation, out + i);
    });
    if (relu_mask != nullptr) pack_relu_mask(out, begin, end, relu_mask);
  });
}

template <typename T>
void bn_act_backward_reduce(const T* grad_out, const T* x, const uint8_t* relu_mask,
                            const opmath<T>* mean, const BnActLayout& layout, opmath<T>* sum_g,
                            opmath<T>* sum_gx) {
  const int64_t C = layout.c;
  std::vector<double> acc(static_cast<size_t>(at::get_num_threads() * 2 * C), 0.0);
  if (layout.channels_last) {
    backward_reduce_nhwc(grad_out, x, relu_mask, mean, layout, acc);
  } else {
    backward_reduce_nchw(grad_out, x, relu_mask, mean, layout, acc);
  }
  for (int64_t c = 0; c < C; ++c) {
    double g = 0, gx = 0;
    for (int64_t t = 0; t < at::get_num_threads(); ++t) {
      g += acc[t * 2 * C + c];
      gx += acc[t * 2 * C + C + c];
    }
    sum_g[c] = static_cast<opmath<T>>(g);
    sum_gx[c] = static_cast<opmath<T>>(gx);
  }
}

template <typename T>
void bn_backward_coefficients(const opmath<T>* mean, const opmath<T>* var, const opmath<T>* weight,
                              const opmath<T>* sum_g, const opmath<T>* sum_gx, double eps,
                              int64_t reduce_size, int64_t channels, bool training,
                              opmath<T>* k_grad, opmath<T>* k_x, opmath<T>* k_const,
                              opmath<T>* grad_weight) {
  using V = opmath<T>;
  const V inv_m = V(1) / static_cast<V>(reduce_size);
  for (int64_t c = 0; c < channels; ++c) {
    const V invstd = V(1) / std::sqrt(var[c] + static_cast<V>(eps));
    const V w = weight ? weight[c] : V(1);
    grad_weight[c] = sum_gx[c] * invstd;
    k_grad[c] = w * invstd;
    if (training) {
      // d/dx of w * (x - mean) * invstd through mean and invstd:
      //   w * invstd * (gm - sum_g / M - (x - mean) * invstd^2 * sum_gx / M)
      k_x[c] = -k_grad[c] * invstd * invstd * sum_gx[c] * inv_m;
      k_const[c] = -k_grad[c] * sum_g[c] * inv_m;
    } else {
      k_x[c] = V(0);
      k_const[c] = V(0);
    }
  }
}

template <typename T>
void bn_act_backward_apply(const T* grad_out, const T* x, const uint8_t* relu_mask,
                           const opmath<T>* mean, const opmath<T>* k_grad, const opmath<T>* k_x,
                           const opmath<T>* k_const, const BnActLayout& layout, T* grad_x,
                           T* grad_residual) {
  parallel_blocks(layout.numel(), [&](int64_t begin, int64_t end) {
    for_each_run(layout, begin, end, [&](int64_t i, int64_t len, int64_t c, bool broadcast) {
      backward_apply_run(grad_out + i, x + i, relu_mask, i, mean + c, k_grad + c, k_x + c,
                         k_const + c, len, broadcast, grad_x + i,
                         grad_residual ? grad_residual + i : nullptr);
    });
  });
}

#define FASTRES_INSTANTIATE_CPU_BN_ACT(T)                                                       \
  template void bn_batch_stats<T>(const T*, const BnActLayout&, opmath<T>*, opmath<T>*,         \
                                  opmath<T>*);                                                  \
  template void bn_scale_shift<T>(const opmath<T>*, const opmath<T>*, const opmath<T>*,         \
                                  const opmath<T>*, double, int64_t, opmath<T>*, opmath<T>*);   \
  template void bn_act_apply<T>(const T*, const T*, const opmath<T>*, const opmath<T>*,         \
                                const opmath<T>*, const opmath<T>*, const BnActLayout&,         \
                                Activation, bool, T*, uint8_t*);                                \
  template void bn_act_backward_reduce<T>(const T*, const T*, const uint8_t*, const opmath<T>*, \
                                          const BnActLayout&, opmath<T>*, opmath<T>*);          \
  template void bn_backward_coefficients<T>(                                                    \
      const opmath<T>*, const opmath<T>*, const opmath<T>*, const opmath<T>*, const opmath<T>*, \
      double, int64_t, int64_t, bool, opmath<T>*, opmath<T>*, opmath<T>*, opmath<T>*);          \
  template void bn_act_backward_apply<T>(const T*, const T*, const uint8_t*, const opmath<T>*,  \
                                         const opmath<T>*, const opmath<T>*, const opmath<T>*,  \
                                         const BnActLayout&, T*, T*);

FASTRES_INSTANTIATE_CPU_BN_ACT(float)
FASTRES_INSTANTIATE_CPU_BN_ACT(double)
FASTRES_INSTANTIATE_CPU_BN_ACT(c10::Half)
FASTRES_INSTANTIATE_CPU_BN_ACT(c10::BFloat16)

}  // namespace fastres::cpu::FASTRES_CPU_ISA
