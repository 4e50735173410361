// SLERP of two whole tensors with mergekit's semantics, shared by the CPU and CUDA kernels.
//
//   out = ca * a + cb * b, where the coefficients depend on the angle between a and b:
//   theta = acos(dot(a/|a|, b/|b|)) (a norm <= eps counts as 1, so a zero tensor is safe),
//   ca = sin((1-t) theta) / sin(theta), cb = sin(t theta) / sin(theta),
//   and |dot| > dot_threshold falls back to linear interpolation ca = 1-t, cb = t.
//
// Both kernels take two passes over the data: one fused reduction for |a|^2, |b|^2 and a.b,
// then slerp_coefficients() below, then one write pass. Non-finite input makes the reduction
// non-finite, hence NaN coefficients and an all-NaN output: a NaN is never hidden.
#pragma once

#include <cmath>

#include "dafast/common.h"

namespace dafast {

struct SlerpParams {
  float t;              // interpolation factor in [0, 1]; 0 returns a, 1 returns b
  float dot_threshold;  // |cos theta| above this interpolates linearly
  float eps;            // norms at or below eps are treated as 1 (zero-vector safety)
};

struct SlerpSums {
  double aa;  // |a|^2
  double bb;  // |b|^2
  double ab;  // a . b
};

// x - x is 0 for finite x and NaN for +-inf or NaN; portable across host and device code.
DAFAST_HOST_DEVICE inline bool is_finite(double x) { return x - x == 0.0; }

// The two interpolation weights from the reduced sums. Computed in double: it runs once per
// tensor, and t = 0 or 1 then yields exactly (1, 0) or (0, 1), so t = 0 returns a bit for bit.
DAFAST_HOST_DEVICE inline void slerp_coefficients(const SlerpSums& s, const SlerpParams& p,
                                                  float* coef_a, float* coef_b) {
  if (!is_finite(s.aa) || !is_finite(s.bb) || !is_finite(s.ab)) {
    *coef_a = *coef_b = NAN;  // poison the whole output rather than return plausible numbers
    return;
  }
  double norm_a = sqrt(s.aa);
  double norm_b = sqrt(s.bb);
  if (norm_a <= p.eps) norm_a = 1.0;
  if (norm_b <= p.eps) norm_b = 1.0;
  const double dot = fmin(fmax(s.ab / (norm_a * norm_b), -1.0), 1.0);
  const double t = p.t;
  if (fabs(dot) > p.dot_threshold) {
    *coef_a = static_cast<float>(1.0 - t);
    *coef_b = static_cast<float>(t);
    return;
  }
  const double theta = acos(dot);
  const double sin_theta = sin(theta);
  *coef_a = static_cast<float>(sin((1.0 - t) * theta) / sin_theta);
  *coef_b = static_cast<float>(sin(t * theta) / sin_theta);
}

}  // namespace dafast
