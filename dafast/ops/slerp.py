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
reduction for |a|^2, |b|^2 and a.b, and one write.
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
    norm_x = torch.linalg.vector_norm(x)
    norm_y = torch.linalg.vector_norm(y)
    norm_x = torch.where(norm_x > eps, norm_x, 1.0)
    norm_y = torch.where(norm_y > eps, norm_y, 1.0)
    dot = ((x / norm_x) * (y / norm_y)).sum().clamp(-1.0, 1.0)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, dot))  # finite on the unselected branch too
    sin_theta = torch.sin(theta)
    coef_x = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_y = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_x * x + coef_y * y).to(a.dtype).reshape(a.shape)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """SLERP of two whole tensors on dafast's kernel (see the module docstring).

    a, b: [*] tensors of one shape, dtype (float32, float16, bfloat16) and device; any strides.
    out: optional [*] tensor of a's dtype and device, written in place and returned; it must not
    overlap a or b. Streaming merges pass it to write straight into an output buffer.
    """
    t, dot_threshold, eps = float(t), float(dot_threshold), float(eps)
    if use_native():
        if out is None:
            return torch.ops.dafast.slerp(a, b, t, dot_threshold, eps)
        torch.ops.dafast.slerp_out(a, b, t, dot_threshold, eps, out=out)
        return out
    _check_inputs(a, b, t, dot_threshold, eps)
    result = slerp_reference(a, b, t, dot_threshold, eps)
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
    def _slerp_out_fake(a, b, t, dot_threshold=0.9995, eps=1e-8, *, out):
        _check_inputs(a, b, t, dot_threshold, eps)
        _check_out(a, out)
