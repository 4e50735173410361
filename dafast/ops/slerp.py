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

from dafast._native import extension_loaded, use_native

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float,
                  eps: float, *, allow_float64: bool = False) -> None:
    """The checks of csrc/ops_common.h, for the reference path and the fake; same messages."""
    if a.dtype != b.dtype:
        raise TypeError(f"dafast.slerp: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in KERNEL_DTYPES and not (allow_float64 and a.dtype == torch.float64):
        raise TypeError(f"dafast.slerp: dtype must be float32, float16 or bfloat16, got {a.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"dafast.slerp: a and b must have the same shape, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"dafast.slerp: a and b must be on the same device, got {a.device} and {b.device}")
    if not 0.0 <= t <= 1.0:  # also false for NaN
        raise ValueError(f"dafast.slerp: t must be in [0, 1], got {t}")
    if not 0.0 <= dot_threshold < 1.0:
        raise ValueError(f"dafast.slerp: dot_threshold must be in [0, 1), got {dot_threshold}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"dafast.slerp: eps must be in [0, 1), got {eps}")


def _check_sums(a: torch.Tensor, sums: torch.Tensor) -> None:
    if sums.dtype != torch.float64:
        raise TypeError(f"dafast.slerp: sums must be float64 (from slerp_sums), got {sums.dtype}")
    if sums.shape != (3,):
        raise ValueError(f"dafast.slerp: sums must have shape [3] (|a|^2, |b|^2, a.b), got {list(sums.shape)}")
    if sums.device != a.device:
        raise ValueError(f"dafast.slerp: sums must be on {a.device}, got {sums.device}")


def _check_out(a: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype != a.dtype:
        raise TypeError(f"dafast.slerp: out must have dtype {a.dtype}, got {out.dtype}")
    if out.shape != a.shape:
        raise ValueError(f"dafast.slerp: out must have shape {list(a.shape)}, got {list(out.shape)}")
    if out.device != a.device:
        raise ValueError(f"dafast.slerp: out must be on {a.device}, got {out.device}")


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                    eps: float = 1e-8) -> torch.Tensor:
    """Pure-PyTorch SLERP, step for step as mergekit computes it.

    a, b: [*] tensors of one shape and dtype (float32, float16, bfloat16 or float64).
    Returns [*] in a's dtype. Computes in float32 (float64 for float64 inputs), without host
    synchronisation: both branches are evaluated and the coefficients selected with where().
    """
    _check_inputs(a, b, t, dot_threshold, eps, allow_float64=True)
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
    _check_inputs(a, b, 0.0, 0.0, 0.0, allow_float64=True)
    x = a.reshape(-1).double()
    y = b.reshape(-1).double()
    return torch.stack([x.dot(x), y.dot(y), x.dot(y)])


def slerp_from_sums_reference(a: torch.Tensor, b: torch.Tensor, sums: torch.Tensor, t: float,
                              dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of a and b (or chunks of larger tensors) with the coefficients from `sums`, the
    float64 [|a|^2, |b|^2, a.b] of the whole tensors; the math of csrc/include/dafast/slerp.h."""
    _check_inputs(a, b, t, dot_threshold, eps, allow_float64=True)
    _check_sums(a, sums)
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
    _check_inputs(a, b, 0.0, 0.0, 0.0)
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
    _check_inputs(a, b, t, dot_threshold, eps)
    if sums is None:
        result = slerp_reference(a, b, t, dot_threshold, eps)
    else:
        result = slerp_from_sums_reference(a, b, sums, t, dot_threshold, eps)
    if out is None:
        return result
    _check_out(a, out)
    return out.copy_(result)


if extension_loaded():

    @torch.library.register_fake("dafast::slerp")
    def _slerp_fake(a, b, t, dot_threshold=0.9995, eps=1e-8):
        _check_inputs(a, b, t, dot_threshold, eps)
        return a.new_empty(a.shape)

    @torch.library.register_fake("dafast::slerp_out")
    def _slerp_out_fake(a, b, t, dot_threshold=0.9995, eps=1e-8, *, sums=None, out):
        _check_inputs(a, b, t, dot_threshold, eps)
        _check_out(a, out)
        if sums is not None:
            _check_sums(a, sums)

    @torch.library.register_fake("dafast::slerp_sums")
    def _slerp_sums_fake(a, b):
        _check_inputs(a, b, 0.0, 0.0, 0.0)
        return a.new_empty(3, dtype=torch.float64)
