// The fused LoRA linear layer, shared by the CPU kernels, the CUDA kernels and the torch glue.
//
//   y = x W^T + b + s (x A^T) B^T      x [M, in], W [out, in], b [out], A [r, in], B [out, r]
//
// with x of any leading shape flattened to M rows. W and b are frozen; backward gives
//
//   dXA = s dY B        [M, r]    (kept in fp32, never returned)
//   dB  = s dY^T xa     [out, r]  where xa = x A^T is saved by the forward
//   dA  = dXA^T x       [r, in]
//   dx  = dY W + dXA A  [M, in]
//
// so the forward saves only x and xa. dtypes follow PEFT: W and b have x's dtype; A and B have
// x's dtype, or are float32 while x is bf16/fp16 (then xa is float32, as PEFT's lora_A output).
#pragma once

#include <cstdint>

namespace dafast {

struct LoraShapes {
  int64_t rows;          // M: x's leading dimensions flattened
  int64_t in_features;   // x.size(-1) == W.size(1) == A.size(1)
  int64_t out_features;  // W.size(0) == B.size(0)
  int64_t rank;          // r: A.size(0) == B.size(1)
};

}  // namespace dafast
