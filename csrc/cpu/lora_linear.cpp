// CPU LoRA linear (see dafast/lora_linear.h for the math): ATen GEMMs, the LoRA product accumulated
// onto the base product in place (addmm with beta = 1), so each output row is written once.
//
// Every GEMM runs in fp32 (fp64 for fp64 inputs), whatever the storage dtype: on CPUs without
// bf16/fp16 matrix instructions ATen's half-precision GEMMs are 5-50x slower than converting to
// fp32 first (measured on the AVX2 machine this was written on), and fp32 accumulation is what
// PEFT's half-precision GEMMs promise anyway. Half inputs are converted in blocks of rows whose
// fp32 copy stays under 64 MiB; one block of dY then feeds dB, dXA and dx, one block of x feeds
// dA. fp32 inputs need no copy and run as one block: MKL is fastest on whole matrices (blocks of
// a few hundred rows measured up to 2x slower). MKL and ATen's conversions are threaded (OpenMP),
// so the block loop itself is sequential.
//
// One product has a kernel of its own: a wide matrix times an r-wide one (xa = x A^T and
// dXA = s dY B), for which MKL measured 1.5-6x slower than thin_rows() below (fp32 only; fp64,
// for gradcheck, stays on ATen). The other thin products (dY^T xa, dXA^T x) are MKL's: a
// hand-written version measured slower.
#include "cpu/kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu/vec_math.h"

namespace dafast {
namespace {

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

// Rows per block: all of them when nothing is converted, else as many as keep the fp32 copy of
// the widest operand under 64 MiB.
int64_t block_rows(const LoraShapes& s, bool converts) {
  const int64_t rows = std::max<int64_t>(s.rows, 1);
  if (!converts) return rows;
  const int64_t width = std::max<int64_t>(1, std::max(s.in_features, s.out_features));
  return std::min(rows, std::max<int64_t>(256, (int64_t{1} << 24) / width));
}

// ---- thin_rows: out [M, r] = scale * Y [M, K] Bm [K, r], fp32 -------------------------------

typedef float Vec8 __attribute__((vector_size(32)));  // two SSE or one AVX register
constexpr int64_t kLanes = 16;     // rank columns held in registers: two Vec8 per row
constexpr int64_t kBlockRows = 4;  // rows per register block: 8 accumulators

// Rows [0, nrows) (nrows <= kBlockRows) of Y at `y`; bm is [K, padded_r] with zero columns past
// r, padded_r a multiple of kLanes; writes the first r columns of out (row stride ldo).
DAFAST_MULTIVERSION void thin_rows_block(const float* y, int64_t ldy, int64_t nrows, int64_t k_len,
                                         const float* bm, int64_t padded_r, int64_t r,
                                         float scale, float* out, int64_t ldo) {
  const float* row[kBlockRows];
  for (int64_t i = 0; i < kBlockRows; ++i) row[i] = y + std::min(i, nrows - 1) * ldy;
  for (int64_t j0 = 0; j0 < padded_r; j0 += kLanes) {
    Vec8 acc[kBlockRows][2] = {};
    for (int64_t k = 0; k < k_len; ++k) {
      Vec8 b0, b1;  // memcpy: unaligned loads (and no Vec8-returning helper, whose ABI varies)
      std::memcpy(&b0, bm + k * padded_r + j0, sizeof b0);
      std::memcpy(&b1, bm + k * padded_r + j0 + 8, sizeof b1);
      for (int64_t i = 0; i < kBlockRows; ++i) {
        const float v = row[i][k];
        acc[i][0] += v * b0;
        acc[i][1] += v * b1;
      }
    }
    const int64_t width = std::min(kLanes, r - j0);
    for (int64_t i = 0; i < nrows; ++i) {
      float lanes[kLanes];
      const Vec8 lo = acc[i][0] * scale, hi = acc[i][1] * scale;
      std::memcpy(lanes, &lo, sizeof lo);
      std::memcpy(lanes + 8, &hi, sizeof hi);
      std::memcpy(out + i * ldo + j0, lanes, width * sizeof(float));
    }
  }
}

// bm [K, r] as thin_rows_block wants it: fp32, r padded with zero columns to a multiple of kLanes.
at::Tensor padded_thin(const at::Tensor& bm) {
  const int64_t r = bm.size(1);
  at::Tensor padded = at::zeros({bm.size(0), (r + kLanes - 1) / kLanes * kLanes},
                                bm.options().dtype(at::kFloat));
  padded.narrow(1, 0, r).copy_(bm);
  return padded;
}

// out [M, r] (contiguous rows) = scale * y [M, K] (contiguous) * bm, bm from padded_thin().
void thin_rows(const at::Tensor& y, const at::Tensor& bm_padded, int64_t r, double scale,
               at::Tensor& out) {
  const int64_t rows = y.size(0), k_len = y.size(1), padded_r = bm_padded.size(1);
  const float* yp = y.const_data_ptr<float>();
  const float* bp = bm_padded.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m0 = blk * kBlockRows;
      thin_rows_block(yp + m0 * k_len, k_len, std::min(kBlockRows, rows - m0), k_len, bp,
                      padded_r, r, static_cast<float>(scale), op + m0 * ldo, ldo);
    }
  });
}

// y [M, K] times bm [K, r] into out, with the kernel above (fp32) or ATen (fp64).
void rows_times_thin(const at::Tensor& y, const at::Tensor& bm, const at::Tensor& bm_padded,
                     double scale, at::Tensor& out) {
  if (y.scalar_type() == at::kFloat) {
    thin_rows(y, bm_padded, bm.size(1), scale, out);
  } else {
    at::mm_out(out, y, bm);
    if (scale != 1.0) out.mul_(scale);
  }
}

// ---- the op ------------------------------------------------------------------------------

// Scratch rows in the compute type for an output stored in another dtype; undefined when the
// output already has the compute type and is written in place.
at::Tensor scratch_for(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType type) {
  return t.scalar_type() == type ? at::Tensor() : at::empty({rows, cols}, t.options().dtype(type));
}

// Where a block of an output is computed: the output itself, or the first rows of its scratch.
at::Tensor compute_view(const at::Tensor& dst, const at::Tensor& scratch, int64_t rows) {
  return scratch.defined() ? scratch.narrow(0, 0, rows) : dst;
}

}  // namespace

void lora_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                             const at::Tensor& lora_b, double scale, const LoraShapes& s,
                             at::Tensor& y, at::Tensor& xa) {
  const at::ScalarType acc = compute_type(x);
  const at::Tensor w = as_type(weight, acc), a = as_type(lora_a, acc), b = as_type(lora_b, acc);
  const at::Tensor b0 = bias.has_value() ? as_type(*bias, acc) : at::Tensor();
  const at::Tensor a_padded = acc == at::kFloat ? padded_thin(a.t()) : at::Tensor();
  const int64_t block = block_rows(s, x.scalar_type() != acc);
  at::Tensor y_scratch = scratch_for(y, block, s.out_features, acc);
  at::Tensor xa_scratch = scratch_for(xa, block, s.rank, acc);

  for (int64_t m0 = 0; m0 < s.rows; m0 += block) {
    const int64_t n = std::min(block, s.rows - m0);
    const at::Tensor x_c = as_type(x.narrow(0, m0, n), acc);
    at::Tensor xa_c = xa.narrow(0, m0, n);
    at::Tensor xa_acc = compute_view(xa_c, xa_scratch, n);
    rows_times_thin(x_c, a.t(), a_padded, 1.0, xa_acc);
    if (!xa_acc.is_same(xa_c)) {
      // Round xa to its storage dtype and use the rounded values below, as PEFT's lora_B does;
      // backward then differentiates the function that was computed.
      xa_c.copy_(xa_acc);
      xa_acc.copy_(xa_c);
    }
    at::Tensor y_c = y.narrow(0, m0, n);
    at::Tensor y_acc = compute_view(y_c, y_scratch, n);
    if (b0.defined()) {
      at::addmm_out(y_acc, b0, x_c, w.t());
    } else {
      at::mm_out(y_acc, x_c, w.t());
    }
    y_acc.addmm_(xa_acc, b.t(), /*beta=*/1.0, /*alpha=*/scale);
    if (!y_acc.is_same(y_c)) y_c.copy_(y_acc);
  }
}

void lora_linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& xa, double scale,
                              const LoraShapes& s, at::Tensor& grad_x, at::Tensor& grad_a,
                              at::Tensor& grad_b) {
  const bool need_x = grad_x.defined(), need_a = grad_a.defined(), need_b = grad_b.defined();
  const at::ScalarType acc = compute_type(grad_y);
  const at::Tensor a = as_type(lora_a, acc), b = as_type(lora_b, acc);
  const at::Tensor w = need_x ? as_type(weight, acc) : at::Tensor();
  const at::Tensor b_padded = acc == at::kFloat ? padded_thin(b) : at::Tensor();
  const int64_t block = block_rows(s, grad_y.scalar_type() != acc);
  const auto acc_options = grad_y.options().dtype(acc);

  // dA and dB are sums over all rows: accumulated in the compute type, rounded once at the end.
  at::Tensor da = need_a ? at::zeros({s.rank, s.in_features}, acc_options) : at::Tensor();
  at::Tensor db = need_b ? at::zeros({s.out_features, s.rank}, acc_options) : at::Tensor();
  at::Tensor dx_scratch = need_x ? scratch_for(grad_x, block, s.in_features, acc) : at::Tensor();
  at::Tensor dxa = at::empty({block, s.rank}, acc_options);

  for (int64_t m0 = 0; m0 < s.rows; m0 += block) {
    const int64_t n = std::min(block, s.rows - m0);
    const at::Tensor dy_c = as_type(grad_y.narrow(0, m0, n), acc);
    if (need_b) db.addmm_(dy_c.t(), as_type(xa.narrow(0, m0, n), acc), 1.0, scale);
    if (!need_x && !need_a) continue;
    at::Tensor dxa_c = dxa.narrow(0, 0, n);
    rows_times_thin(dy_c, b, b_padded, scale, dxa_c);
    if (need_a) da.addmm_(dxa_c.t(), as_type(x.narrow(0, m0, n), acc));
    if (need_x) {
      at::Tensor dx_c = grad_x.narrow(0, m0, n);
      at::Tensor dx_acc = compute_view(dx_c, dx_scratch, n);
      at::mm_out(dx_acc, dy_c, w);
      dx_acc.addmm_(dxa_c, a);  // beta = 1: each row of dx is written once
      if (!dx_acc.is_same(dx_c)) dx_c.copy_(dx_acc);
    }
  }
  if (need_a) grad_a.copy_(da);
  if (need_b) grad_b.copy_(db);
}

}  // namespace dafast
