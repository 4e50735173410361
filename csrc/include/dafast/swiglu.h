// SwiGLU, the gated activation of Llama-family MLPs, shared by the CPU and CUDA kernels:
//
//   h = silu(g) * u = g * sigmoid(g) * u               (HF: act_fn(gate_proj(x)) * up_proj(x))
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,   s = sigmoid(g)
//
// Both directions read only g and u: the op saves those two for backward, where HF's eager
// MLP holds silu(g) as well (and its product, for down_proj). Math in fp32 whatever the storage
// dtype, one rounding of each output. Each device brings its own exp; these take s.
#pragma once

#include "dafast/common.h"

namespace dafast {

DAFAST_HOST_DEVICE inline float swiglu_value(float g, float u, float s) { return g * s * u; }

DAFAST_HOST_DEVICE inline void swiglu_grads(float dh, float g, float u, float s, float* dg,
                                            float* du) {
  *dg = dh * u * s * (1.0f + g * (1.0f - s));
  *du = dh * g * s;
}

}  // namespace dafast
