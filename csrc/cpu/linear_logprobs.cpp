// CPU folds of fused linear log-probabilities (see dafast/linear_logprobs.h): after each tile's
// GEMM (ATen, in linear_logprobs_op.h), one pass over the fp32 tile, rows split across ATen's
// OpenMP pool. A row of a tile is a few KiB and stays in L1 between the max and the exp-sum
// passes.
// The loops are compiled twice (AVX2/FMA and baseline), as in slerp.cpp, and use a polynomial
// exp written so that `omp simd` vectorises it: libm's expf would keep them scalar.
#include "cpu/kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/vec_math.h"
#include "dafast/linear_logprobs.h"

namespace dafast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

DAFAST_MULTIVERSION float row_max(const float* z, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = z[c] > m ? z[c] : m;
  return m;
}

DAFAST_MULTIVERSION float row_sum_exp(const float* z, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += exp_approx(z[c] - m);
  return s;
}

// sum exp(z - m), sum exp(z - m) * z and sum z in one pass.
DAFAST_MULTIVERSION void row_sums_with_stats(const float* z, int64_t n, float m, float* sums) {
  float s = 0.f, sz = 0.f, zsum = 0.f;
#pragma omp simd reduction(+ : s, sz, zsum)
  for (int64_t c = 0; c < n; ++c) {
    const float e = exp_approx(z[c] - m);
    s += e;
    sz += e * z[c];
    zsum += z[c];
  }
  sums[0] = s;
  sums[1] = sz;
  sums[2] = zsum;
}

// probs = exp(z - m); returns their sum. probs may alias z.
DAFAST_MULTIVERSION float row_exp(const float* z, float* probs, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) {
    probs[c] = exp_approx(z[c] - m);
    s += probs[c];
  }
  return s;
}

DAFAST_MULTIVERSION void row_scale(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

// grad = -g * exp(z - lse); the caller adds g at the target. grad may alias z.
DAFAST_MULTIVERSION void row_grad(const float* z, float* grad, int64_t n, float lse, float g) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) grad[c] = -g * exp_approx(z[c] - lse);
}

void forward_row(const LogprobsForwardTile& t, int64_t r) {
  const float* z = t.logits + r * t.ld;
  const float m_old = t.row_max[r];
  const float m_new = std::fmax(m_old, row_max(z, t.cols));
  // exp(-inf) = 0 for the first tile; NaN from a NaN logit propagates through the sums.
  const float rescale = std::exp(m_old - m_new);
  const int64_t local = t.targets[r] - t.vocab_start;
  // Everything that reads z comes before row_exp, which may overwrite it.
  if (local >= 0 && local < t.cols) t.target_logit[r] = z[local];
  float tile_sum = 0.f;
  if (t.sum_exp_z != nullptr) {
    float sums[3];
    row_sums_with_stats(z, t.cols, m_new, sums);
    tile_sum = sums[0];
    t.sum_exp_z[r] = t.sum_exp_z[r] * rescale + sums[1];
    t.sum_z[r] += sums[2];
    const int64_t before = local < 0 ? 0 : (local > t.cols ? t.cols : local);
    if (before > 0) t.max_before_target[r] = std::fmax(t.max_before_target[r], row_max(z, before));
  }
  if (t.probs != nullptr) {
    const float s = row_exp(z, t.probs + r * t.ld, t.cols, m_new);
    if (t.sum_exp_z == nullptr) tile_sum = s;
    // The max rarely grows after the first few chunks: most tiles skip this pass over the row.
    if (!(rescale == 1.f)) row_scale(t.expected + r * t.hidden_size, t.hidden_size, rescale);
  } else if (t.sum_exp_z == nullptr) {
    tile_sum = row_sum_exp(z, t.cols, m_new);
  }
  t.sum_exp[r] = t.sum_exp[r] * rescale + tile_sum;
  t.row_max[r] = m_new;
}

void backward_row(const LogprobsBackwardTile& t, int64_t r) {
  const float* z = t.logits + r * t.ld;
  float* grad = static_cast<float*>(t.grad) + r * t.ld;
  const float g = t.upstream[r];
  row_grad(z, grad, t.cols, t.lse[r], g);
  const int64_t local = t.targets[r] - t.vocab_start;
  if (local >= 0 && local < t.cols) grad[local] += g;
}

// Enough rows per task that a task is worth a thread hand-off (~64 Ki elements).
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1)); }

}  // namespace

void linear_logprobs_forward_fold_cpu(const LogprobsForwardTile& tile) {
  at::parallel_for(0, tile.rows, row_grain(tile.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) forward_row(tile, r);
  });
}

void linear_logprobs_backward_fold_cpu(const LogprobsBackwardTile& tile) {
  TORCH_CHECK(tile.grad_dtype == DType::kFloat32, "dafast.linear_logprobs: the CPU fold writes fp32");
  at::parallel_for(0, tile.rows, row_grain(tile.cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) backward_row(tile, r);
  });
}

}  // namespace dafast
