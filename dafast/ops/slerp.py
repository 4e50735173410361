"""slerp: spherical linear interpolation of two whole tensors, with mergekit's semantics.

    out = ca * a + cb * b
    theta = acos(clamp(dot(a / |a|, b / |b|), -1, 1))       a norm <= eps counts as 1
    ca, cb = sin((1 - t) theta) / sin(theta), sin(t theta) / sin(theta)
    ca, cb = 1 - t, t                                        when |dot| > dot_threshold

t = 0 returns a and t = 1 returns b, bit for bit. Inputs are float32, float16 or bfloat16 (the
reference also takes float64, to compute golden values); the arithmetic is float32 and the
result has the inputs' dtype.

NaN policy: a NaN or infinity anywhere in a or b makes the whole output NaN, in the kernels and
the reference alike. A merge must never turn a corrupt tensor into plausible numbers; callers
that want to name the bad tensor check `out.isnan().any()` or their inputs.

The native kernels (csrc/cpu/slerp.cpp, csrc/cuda/slerp.cu) take two passes: one fused
reduction for |a|^2, |b|^2 and a.b, and one write. Both passes are ops of their own, so a tensor
too large to hold at once is merged in chunks: the sums of the chunks add up to the whole
tensor's, and each chunk is then written with the whole tensor's sums:

    sums = sum(slerp_sums(a_i, b_i) for a_i, b_i in chunks)
    for a_i, b_i, out_i in chunks: slerp(a_i, b_i, t, sums=sums, out=out_i)
"""

from __future__ import annotations

import torch

from dafast._native import check_inputs, extension_loaded, use_native


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                    eps: float = 1e-8) -> torch.Tensor:
    """Pure-PyTorch SLERP, step for step as mergekit computes it.

    a, b: [*] tensors of one shape and dtype (float32, float16, bfloat16 or float64).
    Returns [*] in a's dtype. Computes in float32 (float64 for float64 inputs), without host
    synchronisation: both branches are evaluated and the coefficients selected with where().
    """
    check_inputs("slerp", a, b, t, dot_threshold, eps, None, None, True)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.reshape(-1).to(acc)
    y = b.reshape(-1).to(acc)
    # The norms of fp32 values above ~1.8e19 overflow fp32: the angle is taken on x and y
    # scaled by a power of two (exact; 1 for ordinary inputs, which keep mergekit's results).
    peak = torch.maximum(x.abs().max(), y.abs().max()) if x.numel() else x.new_zeros(())
    huge = peak.isfinite() & (peak > 2.0**60)
    scale = torch.where(huge, torch.exp2(-torch.ceil(torch.log2(torch.where(huge, peak, 1.0)))), 1.0)
    xs, ys = x * scale, y * scale
    norm_x = torch.linalg.vector_norm(xs)
    norm_y = torch.linalg.vector_norm(ys)
    norm_x = torch.where(norm_x > eps * scale, norm_x, scale)  # a norm <= eps counts as 1
    norm_y = torch.where(norm_y > eps * scale, norm_y, scale)
    dot = ((xs / norm_x) * (ys / norm_y)).sum().clamp(-1.0, 1.0)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))  # finite on the unselected branch too
    sin_theta = torch.sin(theta)
    coef_x = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_y = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_x * x + coef_y * y).to(a.dtype).reshape(a.shape)


def slerp_sums_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[*], [*] -> float64 [3]: |a|^2, |b|^2 and a.b, accumulated in float64."""
    check_inputs("slerp", a, b, 0.0, 0.0, 0.0, None, None, True)  # valid t, threshold, eps
    x = a.reshape(-1).double()
    y = b.reshape(-1).double()
    return torch.stack([x.dot(x), y.dot(y), x.dot(y)])


def slerp_from_sums_reference(a: torch.Tensor, b: torch.Tensor, sums: torch.Tensor, t: float,
                              dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of a and b (or chunks of larger tensors) with the coefficients from `sums`, the
    float64 [|a|^2, |b|^2, a.b] of the whole tensors; the math of csrc/include/dafast/slerp.h."""
    check_inputs("slerp", a, b, t, dot_threshold, eps, sums, None, True)
    aa, bb, ab = sums.unbind()
    norm_a = torch.where(aa.sqrt() > eps, aa.sqrt(), 1.0)
    norm_b = torch.where(bb.sqrt() > eps, bb.sqrt(), 1.0)
    dot = (ab / (norm_a * norm_b)).clamp(-1.0, 1.0)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))
    coef_a = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / torch.sin(theta))
    coef_b = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
    finite = sums.isfinite().all()  # the NaN policy: non-finite sums poison the output
    coef_a, coef_b = (torch.where(finite, c, float("nan")).float() for c in (coef_a, coef_b))
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (coef_a * a.to(acc) + coef_b * b.to(acc)).to(a.dtype)


def slerp_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reduction pass alone: [*], [*] -> float64 [3] on a's device (|a|^2, |b|^2, a.b).
    Sums of chunks add up to the sums of the whole; pass them to slerp(..., sums=)."""
    if use_native():
        return torch.ops.dafast.slerp_sums(a, b)
    check_inputs("slerp", a, b, 0.0, 0.0, 0.0, None, None, False)  # the kernels' dtypes only
    return slerp_sums_reference(a, b)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8, *, sums: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """SLERP of two whole tensors on dafast's kernel (see the module docstring).

    a, b: [*] tensors of one shape, dtype (float32, float16, bfloat16) and device; any strides.
    sums: optional float64 [3] from slerp_sums over the whole tensors that a and b are chunks of.
    out: optional [*] tensor of a's dtype and device, written in place and returned; it must not
    overlap a or b. Streaming merges pass it to write straight into an output buffer.
    """
    t, dot_threshold, eps = float(t), float(dot_threshold), float(eps)
    if use_native():
        if out is None and sums is None:
            return torch.ops.dafast.slerp(a, b, t, dot_threshold, eps)
        if out is None:
            out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        torch.ops.dafast.slerp_out(a, b, t, dot_threshold, eps, sums=sums, out=out)
        return out
    check_inputs("slerp", a, b, t, dot_threshold, eps, sums, out, False)  # the kernels' dtypes only
    if sums is None:
        result = slerp_reference(a, b, t, dot_threshold, eps)
    else:
        result = slerp_from_sums_reference(a, b, sums, t, dot_threshold, eps)
    return result if out is None else out.copy_(result)


if extension_loaded():
    # Shape functions only: the C++ op checks its inputs when it runs.

    @torch.library.register_fake("dafast::slerp")
    def _slerp_fake(a, b, t, dot_threshold=0.9995, eps=1e-8):
        return a.new_empty(a.shape)

    @torch.library.register_fake("dafast::slerp_out")
    def _slerp_out_fake(a, b, t, dot_threshold=0.9995, eps=1e-8, *, sums=None, out):
        return None  # writes `out` in place

    @torch.library.register_fake("dafast::slerp_sums")
    def _slerp_sums_fake(a, b):
        return a.new_empty(3, dtype=torch.float64)
