"""dafast.ops.swiglu against its pure-PyTorch reference: forward and backward, every dtype, odd
shapes, strides, extreme values, errors, and torch.library.opcheck."""

import pytest
import torch
import torch.nn.functional as F

import dafast
from conftest import DEVICES, KERNEL_DTYPES
from dafast.ops.swiglu import swiglu, swiglu_reference

# 0 and 1 elements; odd sizes; more than one CPU block (16 Ki) with a ragged last block; a 3-D
# activation of an odd width.
SHAPES = [(0,), (1,), (7,), (3, 5, 33), (2 * 16384 + 11,), (2, 37, 97)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-3)}


def inputs(shape, dtype, device, scale=3.0):
    gate = (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    return gate, up


def run(fn, gate, up, grad):
    gate.grad = up.grad = None
    out = fn(gate, up)
    out.backward(grad)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, shape):
    gate, up = inputs(shape, dtype, device)
    grad = torch.randn(shape, device=device).to(dtype)
    got = run(swiglu, gate, up, grad)
    want = run(swiglu_reference, gate, up, grad)
    for g, w, name in zip(got, want, ("out", "grad_gate", "grad_up")):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **TOL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_float64_math(device):
    """The kernels' own formula (not autograd's) against float64 autograd of silu(g) * u."""
    gate, up = inputs((4099,), torch.float32, device, scale=6.0)
    grad = torch.randn(4099, device=device)
    got = run(swiglu, gate, up, grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    want = run(lambda g, u: F.silu(g) * u, g64, u64, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_extreme_and_non_finite_values(device, dtype):
    gate = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 60.0, float("nan"), 1.0],
                        device=device).to(dtype)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 1.0, float("nan")], device=device).to(dtype)
    out = swiglu(gate, up)
    want = swiglu_reference(gate, up)
    assert out[-2:].isnan().all()
    torch.testing.assert_close(out[:-2], want[:-2], **TOL[dtype])
    grad_gate, grad_up = torch.ops.dafast.swiglu_backward(torch.ones_like(gate), gate, up)
    assert grad_gate[-2:].isnan().all() and grad_up[-2].isnan()
    assert grad_gate[:-2].isfinite().all() and grad_up[:-2].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_non_contiguous_inputs(device, dtype):
    gate = torch.randn(97, 33, device=device).to(dtype).t()      # transposed
    up = torch.randn(33, 194, device=device).to(dtype)[:, ::2]   # every other column
    assert gate.shape == up.shape == (33, 97)
    assert not gate.is_contiguous() and not up.is_contiguous()
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), **TOL[dtype])
    grad = torch.randn(97, 33, device=device).to(dtype).t()
    got = torch.ops.dafast.swiglu_backward(grad, gate, up)
    want = torch.ops.dafast.swiglu_backward(grad.contiguous(), gate.contiguous(), up.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_only_the_needed_gradient():
    gate, up = inputs((5, 9), torch.float32, "cpu")
    out = swiglu(gate, up.detach())
    out.sum().backward()
    assert gate.grad is not None and up.grad is None


def test_float64_and_reference_mode_take_the_reference():
    gate, up = inputs((3, 11), torch.float64, "cpu")
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    with dafast.kernels.mode("reference"):
        g32, u32 = gate.detach().float(), up.detach().float()
        torch.testing.assert_close(swiglu(g32, u32), F.silu(g32) * u32)


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_bad_input_raises_clear_errors(mode):
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    with dafast.kernels.mode(mode):
        with pytest.raises(ValueError, match=r"up must have gate's shape \[4, 6\], got \[4, 5\]"):
            swiglu(gate, up[:, :5])
        with pytest.raises(TypeError, match="up must have gate's dtype torch.float32, got "
                                            "torch.bfloat16"):
            swiglu(gate, up.bfloat16())
        with pytest.raises(TypeError, match="gate must be float32, float16 or bfloat16"):
            swiglu(gate.long(), up.long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_opcheck(device, dtype):
    gate, up = inputs((3, 5, 33), dtype, device)
    torch.library.opcheck(torch.ops.dafast.swiglu.default, (gate, up))
    torch.library.opcheck(torch.ops.dafast.swiglu.default, (gate.detach(), up))
    grad = torch.randn(3, 5, 33, device=device).to(dtype)
    torch.library.opcheck(torch.ops.dafast.swiglu_backward.default,
                          (grad, gate.detach(), up.detach()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_misaligned_views_take_the_scalar_path():
    base = torch.randn(2 * 1024 + 3, device="cuda")
    gate, up = base[1:1025], base[1027:2051]  # 4-byte aligned, not 16
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
