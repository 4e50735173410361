// What the CPU kernels share: function multiversioning (AVX2/FMA and a generic build of the
// same loop, picked at load time), an exp that GCC vectorises, and element conversions of
// bf16/fp16 storage that vectorise too.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DAFAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DAFAST_MULTIVERSION
#endif

namespace dafast {

// exp(x) to about 1 ulp for x <= 1 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
// times 2^n); 0 below -87.3 where fp32 underflows; NaN stays NaN. Selects only, no branches and
// no float-to-int conversion, so that GCC vectorises the callers' loops (with -fno-trapping-math,
// set in setup.py as torch's own build does).
__attribute__((always_inline)) inline float exp_approx(float x) {
  const float hi = x > 88.0f ? 88.0f : x;
  const float clamped = hi < -87.3f ? -87.3f : hi;
  // Adding 1.5 * 2^23 rounds to an integer n, which then sits in the low mantissa bits.
  const float shifted = clamped * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  const int32_t scale_bits = (n_bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return y * scale * static_cast<float>(!(x < -87.3f));
}

// Element conversions written so that the compiler vectorises them.
struct BF16Bits { uint16_t bits; };

inline float load(float x) { return x; }
inline float load(BF16Bits x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float x) { *p = x; }
inline void store(BF16Bits* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  p->bits = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);      // keep NaN a NaN
}

#if defined(__FLT16_MAX__)
using HalfStorage = _Float16;  // hardware conversions (F16C) where the compiler has them
inline float load(_Float16 x) { return static_cast<float>(x); }
inline void store(_Float16* p, float x) { *p = static_cast<_Float16>(x); }
#else
using HalfStorage = c10::Half;
inline float load(c10::Half x) { return static_cast<float>(x); }
inline void store(c10::Half* p, float x) { *p = c10::Half(x); }
#endif

// Calls fn with a null pointer of the storage type the kernels use for a's dtype, to pick T;
// `op` names the op in the error for any other dtype.
template <typename Fn>
auto visit_storage(const at::Tensor& a, const char* op, Fn&& fn) {
  switch (a.scalar_type()) {
    case at::kFloat: return fn(static_cast<const float*>(nullptr));
    case at::kBFloat16: return fn(static_cast<const BF16Bits*>(nullptr));
    case at::kHalf: return fn(static_cast<const HalfStorage*>(nullptr));
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", a.scalar_type());
  }
}

}  // namespace dafast
