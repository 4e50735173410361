// Fused linear log-probabilities, shared by the CPU and CUDA kernels.
//
//   logp[i] = z[i, t_i] - logsumexp_v z[i, v],   z = hidden W^T   (never held whole)
//
// The op body (csrc/linear_logprobs_op.h) walks the logits in tiles of [token chunk, vocab chunk]: a GEMM
// writes one fp32 tile, then a device kernel folds it. The forward fold updates, per token, a
// running max m, sum_exp s = sum exp(z - m) and the target's logit (plus, on request, the sums for
// the entropy, the mean logit and whether the target is the argmax). The backward fold turns a
// recomputed tile into the gradient of the logits, g_i * (onehot(t_i) - exp(z - lse_i)), which
// two more GEMMs turn into dHidden and dW. Rows are tokens whose target is not ignored: the
// body drops ignored tokens before any GEMM.
//
// A frozen head (LoRA) needs only dHidden, and d logp_i / d hidden_i = W[t_i] - sum_v p_iv W_v
// does not depend on the upstream gradient. On request (CPU) the forward computes it: the fold
// turns each tile into exp(z - m) in place and one more GEMM adds it times W's chunk to a running
// [rows, H] sum, rescaled like sum_exp. The backward is then one multiply by the upstream
// gradient: two GEMMs per step instead of three (forward, recompute, dHidden).
#pragma once

#include <cstdint>

#include "dafast/common.h"

namespace dafast {

// One fp32 logits tile: row-major [rows, cols], row stride `ld`; column c is vocabulary entry
// vocab_start + c. All per-row arrays hold `rows` entries.
struct LogprobsForwardTile {
  const float* logits;
  int64_t rows, cols, ld;
  int64_t vocab_start;
  const int64_t* targets;  // in [0, V)
  float* row_max;          // running max, -inf before the first tile
  float* sum_exp;          // sum of exp(z - row_max)
  float* target_logit;     // z[target], written by the tile that holds it
  // Statistics, all null unless requested; updated like sum_exp.
  float* sum_exp_z;          // sum of exp(z - row_max) * z      (entropy = lse - sum_exp_z / sum_exp)
  float* sum_z;              // sum of z                         (mean logit = sum_z / V)
  float* max_before_target;  // max of z over v < target, -inf at start (target is top-1 when
                             // z[target] >= max and z[target] > max_before_target: first argmax)
  // d logp / d hidden in the forward (CPU, frozen head), both null unless requested. The fold
  // writes exp(z - row_max) to `probs` (may alias logits: the target logit and the statistics
  // are read first) and rescales row r of `expected` ([rows, hidden_size], contiguous: the
  // running sum of exp(z_v - row_max) W_v, which the body's GEMM adds to) when row_max grows.
  float* probs;
  float* expected;
  int64_t hidden_size;
};

// The backward fold: grad[r, c] = upstream[r] * ([vocab_start + c == target] - exp(z - lse[r])).
// `grad` may alias `logits` when grad_dtype is fp32 (the CPU path works in place).
struct LogprobsBackwardTile {
  const float* logits;
  void* grad;
  DType grad_dtype;
  int64_t rows, cols, ld;  // ld is the row stride of both logits and grad
  int64_t vocab_start;
  const int64_t* targets;
  const float* lse;
  const float* upstream;   // d loss / d logp, per row
};

// Default tile shapes. CPU: a 1024 x 2048 fp32 tile (8 MiB) plus a 2048-row chunk of W stay in
// the last-level cache, and the GEMMs are still large enough to run near peak. CUDA: 4096 x 8192
// fp32 (128 MiB), large enough for cuBLAS to fill any GPU, small next to the weights.
constexpr int64_t kCpuTokenChunk = 1024;
constexpr int64_t kCpuVocabChunk = 2048;
constexpr int64_t kCudaTokenChunk = 4096;
constexpr int64_t kCudaVocabChunk = 8192;

}  // namespace dafast
