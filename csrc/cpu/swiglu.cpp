// CPU SwiGLU (see dafast/swiglu.h): one pass forward (read g, u; write h), one pass backward
// (read dh, g, u; write dg, du), where eager PyTorch makes two and four. Blocks of 16 Ki
// elements across ATen's OpenMP pool; the loops are vectorised (AVX2/FMA clone) with the
// polynomial exp of vec_math.h and the bf16/fp16 conversions there.
#include "cpu/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "cpu/vec_math.h"
#include "dafast/swiglu.h"

namespace dafast {
namespace {

constexpr int64_t kBlock = 1 << 14;  // also the parallel grain: small tensors stay on one thread

inline float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

template <typename T>
DAFAST_MULTIVERSION void forward_block(const T* g, const T* u, T* h, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load(g[i]);
    store(h + i, swiglu_value(gi, load(u[i]), sigmoid(gi)));
  }
}

template <typename T>
DAFAST_MULTIVERSION void backward_block(const T* dh, const T* g, const T* u, T* dg, T* du,
                                        int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load(g[i]);
    float dgi, dui;
    swiglu_grads(load(dh[i]), gi, load(u[i]), sigmoid(gi), &dgi, &dui);
    store(dg + i, dgi);
    store(du + i, dui);
  }
}

template <typename Fn>
void for_blocks(int64_t n, Fn&& fn) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * kBlock;
      fn(lo, std::min(kBlock, n - lo));
    }
  });
}

}  // namespace

void swiglu_forward_cpu(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  visit_storage(gate, "dafast.swiglu", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* g = static_cast<const T*>(gate.const_data_ptr());
    const T* u = static_cast<const T*>(up.const_data_ptr());
    T* h = static_cast<T*>(out.mutable_data_ptr());
    for_blocks(gate.numel(), [&](int64_t lo, int64_t n) { forward_block(g + lo, u + lo, h + lo, n); });
  });
}

void swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up,
                         at::Tensor& grad_gate, at::Tensor& grad_up) {
  visit_storage(gate, "dafast.swiglu", [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const T* dh = static_cast<const T*>(grad_out.const_data_ptr());
    const T* g = static_cast<const T*>(gate.const_data_ptr());
    const T* u = static_cast<const T*>(up.const_data_ptr());
    T* dg = static_cast<T*>(grad_gate.mutable_data_ptr());
    T* du = static_cast<T*>(grad_up.mutable_data_ptr());
    for_blocks(gate.numel(), [&](int64_t lo, int64_t n) {
      backward_block(dh + lo, g + lo, u + lo, dg + lo, du + lo, n);
    });
  });
}

}  // namespace dafast
