// linear_logprobs, linear_logprobs_backward: input checks (TORCH_CHECK, the only place they are
// written: dafast/ops/linear_logprobs.py's reference calls them through dafast._C) and the
// device-independent tile loop, shared by the CPU registration (ops.cpp) and the CUDA
// registration (ops_cuda.cpp). A Backend supplies the folds
// (csrc/cpu/linear_logprobs.cpp, csrc/cuda/linear_logprobs.cu) and the tile shape; the GEMMs
// are ATen calls (MKL/oneDNN on the CPU, cuBLAS on CUDA).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include "dafast/linear_logprobs.h"
#include "ops_common.h"

namespace dafast {

// allow_float64: what the reference also takes (golden values); the kernels never do.
inline void check_linear_logprobs_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& targets, int64_t token_chunk,
                                         int64_t vocab_chunk, bool allow_float64 = false) {
  constexpr const char* op = "dafast.linear_logprobs: ";
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, "hidden must be 2-D [N, H], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, "weight must be 2-D [V, H], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), op,
                    "hidden [N, H] and weight [V, H] must have the same H, got hidden ",
                    hidden.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, "weight must have at least one row (V > 0)");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), op,
                    "targets must have shape [N] = [", hidden.size(0), "], got ", targets.sizes());
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kHalf ||
                       hidden.scalar_type() == at::kBFloat16 ||
                       (allow_float64 && hidden.scalar_type() == at::kDouble),
                   op, "hidden must be float32, float16 or bfloat16, got ",
                   dtype_name(hidden.scalar_type()));
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op,
                   "weight must have hidden's dtype ", dtype_name(hidden.scalar_type()), ", got ",
                   dtype_name(weight.scalar_type()));
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, "targets must be torch.int64, got ",
                   dtype_name(targets.scalar_type()));
  TORCH_CHECK_VALUE(hidden.device() == weight.device() && hidden.device() == targets.device(), op,
                    "hidden, weight and targets must be on one device, got ", hidden.device(),
                    ", ", weight.device(), " and ", targets.device());
  TORCH_CHECK_VALUE(token_chunk >= 0 && vocab_chunk >= 0, op,
                    "chunk sizes must be >= 0 (0: automatic), got ", token_chunk, " and ",
                    vocab_chunk);
}

// A wrong target would read past W or silently train on garbage: refuse it with its position.
inline void refuse_bad_target(const at::Tensor& targets, const at::Tensor& bad, int64_t vocab,
                              int64_t ignore_index) {
  const int64_t where = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "dafast.linear_logprobs: targets must be in [0, V) = [0, ", vocab,
                    ") or equal ignore_index (", ignore_index, "), got targets[", where, "] = ",
                    targets[where].item<int64_t>());
}

// The targets neither ignored (valid: targets != ignore_index) nor in [0, vocab): [N] bool.
inline at::Tensor bad_targets(const at::Tensor& targets, const at::Tensor& valid, int64_t vocab) {
  return valid & ((targets < 0) | (targets >= vocab));
}

// Every check of one call, for dafast/ops/linear_logprobs.py's reference path (through
// dafast._C), so that it refuses what the kernels refuse, with their messages.
inline void check_linear_logprobs_call(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets, int64_t ignore_index,
                                       int64_t token_chunk, int64_t vocab_chunk,
                                       bool allow_float64) {
  check_linear_logprobs_inputs(hidden, weight, targets, token_chunk, vocab_chunk, allow_float64);
  const at::Tensor bad = bad_targets(targets, targets != ignore_index, weight.size(0));
  if (bad.any().item<bool>()) refuse_bad_target(targets, bad, weight.size(0), ignore_index);
}

// The tokens whose target is not ignored, ready for the GEMMs. Selected (the usual case): no
// GEMM ever sees an ignored row. Masked (while a CUDA graph is captured, when nothing may wait
// for the device): every row is computed, and the ignored ones are zeroed in the results.
struct LogprobsRows {
  at::Tensor index;    // [count] positions in [0, N); undefined when every row is computed
  at::Tensor hidden;   // [count, H] in the GEMM dtype, contiguous
  at::Tensor targets;  // [count] int64, contiguous
  at::Tensor valid;    // [N] bool when masked, else undefined
  int64_t count = 0;

  at::Tensor select(const at::Tensor& per_token) const {  // [N] -> [count]
    return index.defined() ? per_token.index_select(0, index) : per_token;
  }
  at::Tensor scatter(const at::Tensor& rows, at::Tensor full) const {  // [count, *] -> [N, *]
    return index.defined() ? full.index_copy_(0, index, rows) : full.copy_(rows);
  }
  at::Tensor mask(const at::Tensor& per_token) const {  // [N] or [N, *]: 0 where ignored
    if (!valid.defined()) return per_token;
    const at::Tensor v = per_token.dim() == 1 ? valid : valid.unsqueeze(1);
    return at::where(v, per_token, at::zeros({}, per_token.options()));
  }
  // What the forward returns for the backward: the positions, or all N when every row counts.
  at::Tensor positions(int64_t n, const at::TensorOptions& options) const {
    return index.defined() ? index : at::arange(n, options.dtype(at::kLong));
  }
};

// The `count` true positions of `valid`. nonzero_static needs no synchronisation (the count is
// known); a torch without it for this device gets nonzero, one more wait.
inline at::Tensor positions_of(const at::Tensor& valid, int64_t count) {
  try {
    return at::nonzero_static(valid, count).squeeze(1);
  } catch (const c10::NotImplementedError&) {
    return valid.nonzero().squeeze(1);
  }
}

// DAFAST_LOGPROBS_MASK_ROWS=1 takes the masked path (below) on any device, so that the tests
// reach on the CPU what otherwise runs only inside a CUDA graph capture.
inline bool mask_rows_forced() {
  const char* v = std::getenv("DAFAST_LOGPROBS_MASK_ROWS");
  return v != nullptr && v[0] == '1';
}

// Checks the targets and picks the rows. `known` is the forward's positions (the backward
// passes them on): no check and no synchronisation then, the forward did both. Else one host
// synchronisation on CUDA (the row count and the bad-target count travel together;
// nonzero_static then needs none), or none when may_sync is false: the check is then a
// device-side assert (fatal to the CUDA context, without the position) and the rows are masked.
inline LogprobsRows select_rows(const at::Tensor& hidden, const at::Tensor& targets,
                                int64_t vocab, int64_t ignore_index, at::ScalarType gemm_dtype,
                                bool may_sync, const std::optional<at::Tensor>& known) {
  LogprobsRows rows;
  const int64_t n = hidden.size(0);
  const at::Tensor valid = targets != ignore_index;
  if (known.has_value() && known->defined()) {
    TORCH_CHECK_VALUE(known->dim() == 1 && known->scalar_type() == at::kLong &&
                          known->size(0) <= n && known->device() == targets.device(),
                      "dafast.linear_logprobs_backward: rows must be the forward's int64 "
                      "positions [count <= N] on ", targets.device(), ", got ", known->sizes());
    rows.count = known->size(0);
    // All N positions: the forward computed every row (masked, or none ignored).
    if (rows.count < n) {
      rows.index = *known;
    } else {
      rows.valid = valid;
    }
  } else {
    const at::Tensor bad = bad_targets(targets, valid, vocab);
    if (may_sync) {
      const at::Tensor counts = at::stack({valid.sum(), bad.sum()}).cpu();
      const int64_t* c = counts.const_data_ptr<int64_t>();
      if (c[1] > 0) refuse_bad_target(targets, bad, vocab, ignore_index);
      rows.count = c[0];
      if (rows.count < n) rows.index = positions_of(valid, rows.count);
    } else {
      at::_assert_async(bad.any().logical_not(),
                        "dafast.linear_logprobs: targets must be in [0, V) or equal ignore_index");
      rows.count = n;
      rows.valid = valid;
    }
  }
  rows.hidden = rows.select(hidden).to(gemm_dtype).contiguous();
  // A masked row's target may be anything (ignore_index): 0 keeps every gather in range.
  rows.targets = rows.valid.defined() ? targets.masked_fill(rows.valid.logical_not(), 0).contiguous()
                                      : rows.select(targets).contiguous();
  return rows;
}

// One cuBLAS call with beta = 1 where torch takes an fp32 `self` with half operands; older torch
// CUDA builds require self to have the operands' dtype and refuse before launching anything, so
// the refusal is caught once and every later call takes the fallback: the product in fp32
// (one more [rows, cols] buffer), then an add. DAFAST_ADDMM_FALLBACK=1 forces the fallback
// (tests run both paths).
inline void accumulate_mixed(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  static std::atomic<bool> fused_refused{false};
  const char* force = std::getenv("DAFAST_ADDMM_FALLBACK");
  const bool forced = force != nullptr && force[0] == '1';
  if (!forced && !fused_refused.load(std::memory_order_relaxed)) {
    try {
      at::addmm_out(acc, acc, a, b, at::kFloat);
      return;
    } catch (const c10::Error&) {
      fused_refused.store(true, std::memory_order_relaxed);
    }
  }
  acc.add_(at::mm(a, b, at::kFloat));
}

// A Backend (CpuLogprobs in ops.cpp, CudaLogprobs in ops_cuda.cpp) provides the two folds, the
// default tile shape, gemm_dtype(input dtype): the dtype the GEMMs' operands take (fp32 copies,
// or the inputs' own half dtype where the hardware multiplies it fast), and kFp32OutputGemm:
// whether a GEMM of half operands writes fp32 directly (cuBLAS) or its half product is widened
// (the CPU, where ATen has no mixed-output GEMM).
template <class Backend>
struct LogprobsTiles {
  int64_t tokens, vocab;
  at::ScalarType gemm_dtype;

  LogprobsTiles(const at::Tensor& hidden, int64_t rows, int64_t vocab_size, int64_t token_chunk,
                int64_t vocab_chunk)
      : tokens(std::min(token_chunk > 0 ? token_chunk : Backend::kTokenChunk, rows)),
        vocab(std::min(vocab_chunk > 0 ? vocab_chunk : Backend::kVocabChunk, vocab_size)),
        gemm_dtype(Backend::gemm_dtype(hidden.scalar_type())) {}

  at::Tensor weight_chunk(const at::Tensor& weight, int64_t start, int64_t cols) const {
    return weight.narrow(0, start, cols).to(gemm_dtype).contiguous();
  }
  // out (fp32, contiguous) = a @ b^T
  static void logits(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() == at::kFloat) {
      at::mm_out(out, a, b.t());
    } else if (Backend::kFp32OutputGemm) {
      at::mm_out(out, a, b.t(), at::kFloat);
    } else {
      out.copy_(at::mm(a, b.t()));
    }
  }
  // acc (fp32) += a @ b; a is cast to b's dtype first. The product is not rounded to the half
  // dtype where the backend has an fp32-output GEMM.
  static void accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor lhs = a.scalar_type() == b.scalar_type() ? a : a.to(b.scalar_type());
    if (b.scalar_type() == at::kFloat) {
      acc.addmm_(lhs, b);
    } else if (Backend::kFp32OutputGemm) {
      accumulate_mixed(acc, lhs, b);
    } else {
      acc.add_(at::mm(lhs, b));
    }
  }
};

inline at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// Returns (logp [N], lse [N], stats [3 or 0, N], dlogp_dhidden [N, H] or [0], rows [count]):
// dlogp_dhidden is d logp_i / d hidden_i = W[t_i] - sum_v p_iv W_v in fp32 (0 for ignored tokens)
// when with_dhidden is set (Backends with kDhiddenInForward only), see dafast/linear_logprobs.h;
// rows are the positions computed, which the backward takes instead of selecting them again.
// Backend::may_sync(): whether the host may wait for the device here (see select_rows).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_op(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t ignore_index, int64_t token_chunk, int64_t vocab_chunk, bool with_stats,
    bool with_dhidden) {
  check_linear_logprobs_inputs(hidden, weight, targets, token_chunk, vocab_chunk);
  TORCH_CHECK_VALUE(Backend::kDhiddenInForward || !with_dhidden, "dafast.linear_logprobs: "
                    "with_dhidden is implemented on the CPU only, not on ", hidden.device());
  const int64_t n = hidden.size(0), vocab_size = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::zeros({n}, f32);
  at::Tensor lse = at::zeros({n}, f32);
  at::Tensor stats = at::zeros({with_stats ? 3 : 0, n}, f32);
  const at::ScalarType gemm_dtype = Backend::gemm_dtype(hidden.scalar_type());
  const LogprobsRows rows = select_rows(hidden, targets, vocab_size, ignore_index, gemm_dtype,
                                        Backend::may_sync(), std::nullopt);
  const at::Tensor positions = rows.positions(n, targets.options());
  // Allocated only here when some rows are ignored; else it is the running sum below, in place.
  at::Tensor dhidden = with_dhidden && rows.count < n ? at::zeros(hidden.sizes(), f32)
                                                      : at::empty({0}, f32);
  if (rows.count == 0) {
    return {logp, lse, stats, with_dhidden ? at::zeros(hidden.sizes(), f32) : dhidden, positions};
  }

  const LogprobsTiles<Backend> tiles(hidden, rows.count, vocab_size, token_chunk, vocab_chunk);
  // Running state per row: max, sum_exp, target logit, then the statistics' sums.
  at::Tensor state = at::zeros({with_stats ? 6 : 3, rows.count}, f32);
  state[0].fill_(-std::numeric_limits<float>::infinity());
  if (with_stats) state[5].fill_(-std::numeric_limits<float>::infinity());
  float* s = state.data_ptr<float>();
  const at::Tensor buffer = at::empty({tiles.tokens * tiles.vocab}, f32);
  const at::Tensor w = weight.contiguous();
  // sum_v exp(z_v - row_max) W_v per row, in fp32 whatever the GEMM dtype.
  at::Tensor expected = with_dhidden ? at::zeros({rows.count, hidden.size(1)}, f32) : at::Tensor();
  for (int64_t v0 = 0; v0 < vocab_size; v0 += tiles.vocab) {
    const int64_t cols = std::min(tiles.vocab, vocab_size - v0);
    const at::Tensor w_chunk = tiles.weight_chunk(w, v0, cols);
    for (int64_t r0 = 0; r0 < rows.count; r0 += tiles.tokens) {
      const int64_t nr = std::min(tiles.tokens, rows.count - r0);
      at::Tensor z = tile_view(buffer, nr, cols);
      tiles.logits(z, rows.hidden.narrow(0, r0, nr), w_chunk);
      const int64_t c = rows.count;
      Backend::forward_fold(LogprobsForwardTile{
          z.data_ptr<float>(), nr, cols, cols, v0, rows.targets.data_ptr<int64_t>() + r0,
          s + r0, s + c + r0, s + 2 * c + r0, with_stats ? s + 3 * c + r0 : nullptr,
          with_stats ? s + 4 * c + r0 : nullptr, with_stats ? s + 5 * c + r0 : nullptr,
          with_dhidden ? z.data_ptr<float>() : nullptr,
          with_dhidden ? expected.data_ptr<float>() + r0 * hidden.size(1) : nullptr,
          hidden.size(1)});
      // z now holds exp(z - row_max): the GEMM that the backward would otherwise do on a
      // recomputed tile, done here once.
      if (with_dhidden) tiles.accumulate(expected.narrow(0, r0, nr), z, w_chunk);
    }
  }
  const at::Tensor row_lse = state[0] + state[1].log();
  rows.scatter(row_lse, lse);
  rows.scatter(rows.mask(state[2] - row_lse), logp);
  if (with_stats) {
    const at::Tensor entropy = row_lse - state[3] / state[1];
    const at::Tensor mean_logit = state[4] / static_cast<double>(vocab_size);
    const at::Tensor top1 = at::logical_and(state[2] >= state[0], state[2] > state[5]).to(at::kFloat);
    rows.scatter(rows.mask(at::stack({entropy, mean_logit, top1}, 1)), stats.t());
  }
  if (with_dhidden) {
    // W[t] - expected / sum_exp, in place.
    expected.div_(state[1].unsqueeze(1)).neg_().add_(w.index_select(0, rows.targets));
    dhidden = rows.count < n ? rows.scatter(expected, dhidden) : rows.mask(expected);
  }
  return {logp, lse, stats, dhidden, positions};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> linear_logprobs_backward_op(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index, int64_t token_chunk,
    int64_t vocab_chunk, bool hidden_grad, bool weight_grad,
    const std::optional<at::Tensor>& forward_rows) {
  constexpr const char* op = "dafast.linear_logprobs_backward: ";
  check_linear_logprobs_inputs(hidden, weight, targets, token_chunk, vocab_chunk);
  const int64_t n = hidden.size(0), vocab_size = weight.size(0);
  for (const auto& [name, t] : {std::pair{"grad_logp", &grad_logp}, std::pair{"lse", &lse}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, op, name, " must have shape [N] = [", n,
                      "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, name, " must be torch.float32, got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == hidden.device(), op, name, " must be on ", hidden.device(),
                      ", got ", t->device());
  }
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor grad_hidden = hidden_grad ? at::zeros(hidden.sizes(), hidden.options())
                                       : at::empty({0}, hidden.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (!hidden_grad && !weight_grad) return {grad_hidden, grad_weight};
  const at::ScalarType gemm_dtype = Backend::gemm_dtype(hidden.scalar_type());
  const LogprobsRows rows = select_rows(hidden, targets, vocab_size, ignore_index, gemm_dtype,
                                        Backend::may_sync(), forward_rows);
  // dW accumulates in fp32 over every token chunk; it is the result itself for fp32 weights.
  at::Tensor dw = weight_grad ? at::zeros(weight.sizes(), f32) : at::Tensor();
  if (rows.count > 0) {
    const LogprobsTiles<Backend> tiles(hidden, rows.count, vocab_size, token_chunk, vocab_chunk);
    const at::Tensor g = rows.mask(rows.select(grad_logp)).contiguous();
    const at::Tensor row_lse = rows.select(lse).contiguous();
    at::Tensor dh = hidden_grad ? at::zeros({rows.count, hidden.size(1)}, f32) : at::Tensor();
    const at::Tensor buffer = at::empty({tiles.tokens * tiles.vocab}, f32);
    // The gradient tile is written in place over the logits when the GEMMs run in fp32, or
    // when the fold writes fp32 only (the CPU; accumulate casts it to the GEMM dtype).
    const bool fold_in_place = gemm_dtype == at::kFloat || !Backend::kFoldWritesHalf;
    const at::Tensor grad_buffer =
        fold_in_place ? buffer : at::empty({tiles.tokens * tiles.vocab}, f32.dtype(gemm_dtype));
    const at::Tensor w = weight.contiguous();
    for (int64_t v0 = 0; v0 < vocab_size; v0 += tiles.vocab) {
      const int64_t cols = std::min(tiles.vocab, vocab_size - v0);
      const at::Tensor w_chunk = tiles.weight_chunk(w, v0, cols);
      for (int64_t r0 = 0; r0 < rows.count; r0 += tiles.tokens) {
        const int64_t nr = std::min(tiles.tokens, rows.count - r0);
        const at::Tensor h_chunk = rows.hidden.narrow(0, r0, nr);
        at::Tensor z = tile_view(buffer, nr, cols);
        const at::Tensor dz = tile_view(grad_buffer, nr, cols);
        tiles.logits(z, h_chunk, w_chunk);
        Backend::backward_fold(LogprobsBackwardTile{
            z.data_ptr<float>(), dz.data_ptr(),
            to_kernel_dtype(fold_in_place ? at::kFloat : gemm_dtype), nr, cols, cols, v0,
            rows.targets.data_ptr<int64_t>() + r0, row_lse.data_ptr<float>() + r0,
            g.data_ptr<float>() + r0});
        const at::Tensor dz_gemm = dz.scalar_type() == tiles.gemm_dtype ? dz : dz.to(tiles.gemm_dtype);
        if (hidden_grad) tiles.accumulate(dh.narrow(0, r0, nr), dz_gemm, w_chunk);
        if (weight_grad) tiles.accumulate(dw.narrow(0, v0, cols), dz_gemm.t(), h_chunk);
      }
    }
    if (hidden_grad) rows.scatter(dh.to(hidden.scalar_type()), grad_hidden);
  }
  if (weight_grad) grad_weight = dw.to(weight.scalar_type());
  return {grad_hidden, grad_weight};
}

}  // namespace dafast
