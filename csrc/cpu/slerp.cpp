// CPU SLERP: one fused reduction pass (|a|^2, |b|^2, a.b) and one write pass, both split into
// fixed blocks run by ATen's OpenMP pool. Each block accumulates in double SIMD lanes (a
// square of an fp32 value above ~1.8e19 overflows fp32, not double; the pass is bound by
// memory, not arithmetic) and the block sums are combined in double in block order, so the
// result does not depend on the thread count. The inner loops are compiled twice (AVX2/FMA/F16C and baseline) and picked at
// load time, so one build is fast on modern x86 and still runs everywhere.
#include "cpu/kernels.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/vec_math.h"
#include "dafast/slerp.h"

namespace dafast {
namespace {

template <typename T>
DAFAST_MULTIVERSION void reduce_block(const T* a, const T* b, int64_t n, double* sums) {
  double aa = 0.0, bb = 0.0, ab = 0.0;
#pragma omp simd reduction(+ : aa, bb, ab)
  for (int64_t i = 0; i < n; ++i) {
    const double x = load(a[i]);
    const double y = load(b[i]);
    aa += x * x;
    bb += y * y;
    ab += x * y;
  }
  sums[0] = aa;
  sums[1] = bb;
  sums[2] = ab;
}

template <typename T>
DAFAST_MULTIVERSION void write_block(const T* a, const T* b, T* out, int64_t n, float ca,
                                     float cb) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(out + i, ca * load(a[i]) + cb * load(b[i]));
}

// 16 Ki elements: long enough to amortise the per-block work; also the parallel grain, so small tensors stay on one thread.
constexpr int64_t kBlock = 1 << 14;

template <typename T>
SlerpSums sums_typed(const T* a, const T* b, int64_t n) {
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(3 * num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * kBlock;
      reduce_block(a + lo, b + lo, std::min(kBlock, n - lo), &partial[3 * blk]);
    }
  });
  SlerpSums sums{0.0, 0.0, 0.0};
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    sums.aa += partial[3 * blk];
    sums.bb += partial[3 * blk + 1];
    sums.ab += partial[3 * blk + 2];
  }
  return sums;
}

template <typename T>
void write_typed(const T* a, const T* b, T* out, int64_t n, const SlerpSums& sums,
                 const SlerpParams& params) {
  float ca, cb;
  slerp_coefficients(sums, params, &ca, &cb);
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * kBlock;
      write_block(a + lo, b + lo, out + lo, std::min(kBlock, n - lo), ca, cb);
    }
  });
}

}  // namespace

SlerpSums slerp_sums_cpu(const at::Tensor& a, const at::Tensor& b) {
  return visit_storage(a, "dafast.slerp", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    return sums_typed(static_cast<const T*>(a.const_data_ptr()),
                      static_cast<const T*>(b.const_data_ptr()), a.numel());
  });
}

void slerp_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const SlerpSums& sums,
               const SlerpParams& params) {
  visit_storage(a, "dafast.slerp", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    write_typed(static_cast<const T*>(a.const_data_ptr()),
                static_cast<const T*>(b.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()),
                a.numel(), sums, params);
  });
}

}  // namespace dafast
