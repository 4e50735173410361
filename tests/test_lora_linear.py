"""dafast.ops.lora_linear against PEFT's LoRA Linear layer (same weights) and fp64 math."""

import pytest
import torch
from torch import nn

import dafast
from dafast.ops import lora_linear, lora_linear_reference
from conftest import DEVICES, HAS_CUDA

peft = pytest.importorskip("peft")

# (leading shape of x, in_features, out_features, r): M = 1, 7, 1000; odd widths; 2-D and 3-D x.
FP32_CASES = [
    ((1,), 576, 576, 8),
    ((1, 7), 576, 1536, 16),
    ((7,), 4097, 576, 1),
    ((7,), 576, 4097, 64),
    ((1000,), 576, 1536, 16),
    ((8, 125), 1536, 576, 64),
    ((2, 500), 4097, 1536, 8),
]
# PEFT's half-precision GEMMs are very slow on CPUs without bf16/fp16 units: smaller products.
HALF_CASES = [
    ((1,), 576, 576, 8),
    ((1, 7), 4097, 576, 16),
    ((7,), 1536, 4097, 64),
    ((8, 125), 576, 1536, 1),
]
# (x and W dtype, adapter dtype): PEFT's default for a half model is fp32 adapters
# (autocast_adapter_dtype=True); all-half adapters are the other option.
HALF_DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float32), (torch.float16, torch.float16)]


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_layer(in_features, out_features, r, dtype=torch.float32, lora_dtype=torch.float32,
               bias=True, device="cpu"):
    """A PEFT LoRA Linear layer with random A and B (PEFT would start B at zero)."""
    base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(base), config,
                                autocast_adapter_dtype=lora_dtype == torch.float32)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, device=device) / p.shape[1] ** 0.5)
    assert layer.lora_A["default"].weight.dtype == lora_dtype
    return layer


def params(layer):
    """(weight, bias, lora_a, lora_b, scale) of a PEFT layer: the op's arguments."""
    base = layer.get_base_layer()
    return (base.weight, base.bias, layer.lora_A["default"].weight,
            layer.lora_B["default"].weight, layer.scaling["default"])


def forward_backward(fn, x, grad_y, wrt):
    y = fn(x)
    wrt = [t for t in wrt if t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, wrt, grad_y)]


def run_all(layer, lead, in_features, dtype, device="cpu"):
    """Output and gradients (x, A, B) of PEFT, of dafast and of fp64 math, on the same inputs."""
    x = torch.randn(*lead, in_features, device=device).to(dtype).requires_grad_()
    weight, bias, lora_a, lora_b, scale = params(layer)
    grad_y = torch.randn(*lead, weight.shape[0], device=device).to(dtype)
    ours = forward_backward(lambda t: lora_linear(t, weight, bias, lora_a, lora_b, scale),
                            x, grad_y, (x, lora_a, lora_b))
    theirs = forward_backward(layer, x, grad_y, (x, lora_a, lora_b))
    as64 = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    w64, b64 = weight.detach().double(), None if bias is None else bias.detach().double()
    exact = forward_backward(lambda t: lora_linear_reference(t, w64, b64, *as64[1:], scale),
                             as64[0], grad_y.double(), as64)
    return ours, theirs, exact


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("lead,in_features,out_features,r", FP32_CASES)
def test_fp32_matches_peft(lead, in_features, out_features, r):
    layer = peft_layer(in_features, out_features, r)
    ours, theirs, exact = run_all(layer, lead, in_features, torch.float32)
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = b.abs().max().item()
        assert max_err(a, b) <= 1e-5 * scale, (name, max_err(a, b), scale)
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, exact):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item(), name


@pytest.mark.parametrize("dtype,lora_dtype", HALF_DTYPES, ids=["bf16+fp32", "bf16", "fp16+fp32", "fp16"])
@pytest.mark.parametrize("lead,in_features,out_features,r", HALF_CASES)
def test_half_within_peft_error(dtype, lora_dtype, lead, in_features, out_features, r):
    """Against fp64 math on the same rounded inputs, dafast's error is at most twice PEFT's own
    error at that dtype, plus one ulp of the result's scale (1e-5 of it for the fp32 gradients of
    fp32 adapters: the fp32 tolerance of test_fp32_matches_peft)."""
    layer = peft_layer(in_features, out_features, r, dtype, lora_dtype)
    ours, theirs, exact = run_all(layer, lead, in_features, dtype)
    for name, a, b, e in zip(("y", "dx", "dA", "dB"), ours, theirs, exact):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        ulp = max(torch.finfo(a.dtype).eps, 1e-5) * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(b, e) + ulp, (name, max_err(a, e), max_err(b, e))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", ["x", "ab", "a", "b"], ids=lambda n: f"grad-{n}")
def test_only_the_gradients_asked_for(device, needs):
    layer = peft_layer(576, 1536, 16, device=device)
    weight, bias, lora_a, lora_b, scale = params(layer)
    x = torch.randn(3, 7, 576, device=device, requires_grad="x" in needs)
    lora_a.requires_grad_("a" in needs)
    lora_b.requires_grad_("b" in needs)
    wrt = [t for t in (x, lora_a, lora_b) if t.requires_grad]
    grad_y = torch.randn(3, 7, 1536, device=device)
    ours = torch.autograd.grad(lora_linear(x, weight, bias, lora_a, lora_b, scale), wrt, grad_y)
    theirs = torch.autograd.grad(layer(x), wrt, grad_y)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_saves_only_x_and_xa():
    layer = peft_layer(576, 1536, 16)
    weight, bias, lora_a, lora_b, scale = params(layer)
    x = torch.randn(64, 576, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, weight, bias, lora_a, lora_b, scale)
    activations = [t for t in saved if not isinstance(t, nn.Parameter)
                   and not any(t is p for p in (weight, lora_a, lora_b))]
    assert sorted(tuple(t.shape) for t in activations) == [(64, 16), (64, 576)]


@pytest.mark.parametrize("device", DEVICES)
def test_edge_shapes(device):
    layer = peft_layer(33, 17, 5, bias=False, device=device)
    weight, _, lora_a, lora_b, scale = params(layer)
    empty = torch.randn(0, 33, device=device, requires_grad=True)
    y = lora_linear(empty, weight, None, lora_a, lora_b, scale)
    assert y.shape == (0, 17)
    grad_a, grad_b = torch.autograd.grad(y.sum(), (lora_a, lora_b))
    assert not grad_a.any() and not grad_b.any()
    strided = torch.randn(33, 9, device=device).t()  # non-contiguous x
    torch.testing.assert_close(lora_linear(strided, weight, None, lora_a, lora_b, scale),
                               layer(strided), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, torch.float32), *HALF_DTYPES])
def test_opcheck(device, dtype, lora_dtype):
    x = torch.randn(3, 5, 33, device=device).to(dtype).requires_grad_()
    weight = torch.randn(17, 33, device=device).to(dtype)
    bias = torch.randn(17, device=device).to(dtype)
    lora_a = torch.randn(4, 33, device=device).to(lora_dtype).requires_grad_()
    lora_b = torch.randn(17, 4, device=device).to(lora_dtype).requires_grad_()
    op, backward = torch.ops.dafast.lora_linear.default, torch.ops.dafast.lora_linear_backward.default
    torch.library.opcheck(op, (x, weight, bias, lora_a, lora_b, 0.5))
    torch.library.opcheck(op, (x.detach(), weight, None, lora_a, lora_b, 0.5))
    xa = torch.ops.dafast.lora_linear(x, weight, bias, lora_a, lora_b, 0.5)[1].detach()
    grad_y = torch.randn(3, 5, 17, device=device).to(dtype)
    args = (grad_y, x.detach(), weight, lora_a.detach(), lora_b.detach(), xa, 0.5)
    torch.library.opcheck(backward, (*args, [True, True, True]))
    torch.library.opcheck(backward, (grad_y, None, weight, lora_a.detach(), lora_b.detach(), None,
                                     0.5, [True, False, False]))


def test_gradcheck_fp64():
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a, b: lora_linear(x, weight.detach(), bias.detach(), a, b, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, lora_a, lora_b))
    # W and b are frozen in LoRA, but their gradients are right should they train.
    full = lambda *t: lora_linear(*t, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(full, (x, weight, bias, lora_a, lora_b))


def test_compiles_without_graph_breaks():
    layer = peft_layer(33, 17, 4)
    weight, bias, lora_a, lora_b, scale = params(layer)
    x = torch.randn(5, 33, requires_grad=True)
    fn = lambda t: lora_linear(t, weight, bias, lora_a, lora_b, scale).sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_grads = torch.autograd.grad(fn(x), (x, lora_a, lora_b))
    compiled_grads = torch.autograd.grad(compiled(x), (x, lora_a, lora_b))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_reference_mode_agrees():
    layer = peft_layer(576, 1536, 16)
    weight, bias, lora_a, lora_b, scale = params(layer)
    x = torch.randn(2, 9, 576, requires_grad=True)
    results = {}
    for mode in ("native", "reference"):
        with dafast.kernels.mode(mode):
            y = lora_linear(x, weight, bias, lora_a, lora_b, scale)
            results[mode] = [y, *torch.autograd.grad(y.sum(), (x, lora_a, lora_b))]
    assert "dafast_lora_linear" in type(results["native"][0].grad_fn).__name__
    assert "dafast" not in type(results["reference"][0].grad_fn).__name__
    for a, b in zip(results["native"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_bad_input_raises_clear_errors(mode):
    x, weight, bias = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    lora_a, lora_b = torch.randn(2, 16), torch.randn(8, 2)
    bad = [
        (ValueError, r"rank mismatch: lora_a has shape \[2, 16\] \(r=2\) but lora_b has shape "
                     r"\[8, 3\] \(r=3\)", (x, weight, bias, lora_a, torch.randn(8, 3))),
        (ValueError, r"in_features mismatch: x has shape \[4, 15\] but weight has shape \[8, 16\]",
         (torch.randn(4, 15), weight, bias, lora_a, lora_b)),
        (ValueError, r"lora_a must be \[r, in_features=16\], got shape \[2, 15\]",
         (x, weight, bias, torch.randn(2, 15), lora_b)),
        (ValueError, r"lora_b must be \[out_features=8, r\], got shape \[9, 2\]",
         (x, weight, bias, lora_a, torch.randn(9, 2))),
        (ValueError, r"bias must be \[out_features=8\], got shape \[7\]",
         (x, weight, torch.randn(7), lora_a, lora_b)),
        (TypeError, "x must be float32, float16, bfloat16 or float64, got torch.int64",
         (x.long(), weight, bias, lora_a, lora_b)),
        (TypeError, "weight must have x's dtype torch.bfloat16, got torch.float32",
         (x.bfloat16(), weight, bias.bfloat16(), lora_a, lora_b)),
        (TypeError, r"lora_a and lora_b must have x's dtype torch.bfloat16 \(or torch.float32 "
                    r"when x is bfloat16 or float16\), got torch.float16",
         (x.bfloat16(), weight.bfloat16(), bias.bfloat16(), lora_a.half(), lora_b.half())),
        (TypeError, r"lora_a and lora_b must have x's dtype torch.float32 \(or",
         (x, weight, bias, lora_a.bfloat16(), lora_b.bfloat16())),
        (TypeError, "lora_a and lora_b must have the same dtype, got torch.float32 and torch.bfloat16",
         (x.bfloat16(), weight.bfloat16(), bias.bfloat16(), lora_a, lora_b.bfloat16())),
        (ValueError, "weight must be on x's device cpu, got meta",
         (x, weight.to("meta"), bias, lora_a, lora_b)),
        (ValueError, "lora_b must be on x's device cpu, got meta",
         (x, weight, bias, lora_a, lora_b.to("meta"))),
    ]
    with dafast.kernels.mode(mode):
        for error, message, args in bad:
            with pytest.raises(error, match="dafast.lora_linear: " + message):
                lora_linear(*args, 1.0)
        with pytest.raises(ValueError, match="scale must be finite, got nan"):
            lora_linear(x, weight, bias, lora_a, lora_b, float("nan"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_device_mismatch_is_refused():
    weight, lora_a, lora_b = torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(ValueError, match="weight must be on x's device cuda"):
        lora_linear(torch.randn(4, 16, device="cuda"), weight, None, lora_a.cuda(), lora_b.cuda(), 1.0)
    with pytest.raises(TypeError, match="float64 is supported on the CPU only"):
        lora_linear(*(t.double().cuda() for t in (torch.randn(4, 16), weight)), None,
                    lora_a.double().cuda(), lora_b.double().cuda(), 1.0)


def _rounding_models(x, weight, bias, lora_a, lora_b, scale):
    """y as the module docstring says each device rounds it, from fp64 math: xa in A's dtype,
    then one rounding of the sum (CPU) or two, of b + s xa B^T and then of the sum (CUDA)."""
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    xa = (x64 @ lora_a.double().t()).to(lora_a.dtype).double()
    lora = b64 + scale * (xa @ lora_b.double().t())
    once = (x64 @ w64.t() + lora).to(x.dtype)
    twice = (lora.to(x.dtype).double() + x64 @ w64.t()).to(x.dtype)
    return once, twice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rounds_as_the_docstring_says(device, dtype):
    # K = 256 keeps cuBLAS off split-K; a LoRA term as large as the base one makes the second
    # rounding visible in many elements.
    x = torch.randn(300, 256, device=device).to(dtype)
    weight = (torch.randn(192, 256, device=device) / 16).to(dtype)
    bias = torch.randn(192, device=device).to(dtype)
    lora_a = (torch.randn(16, 256, device=device) / 16).to(dtype)
    lora_b = torch.randn(192, 16, device=device).to(dtype)
    y = lora_linear(x, weight, bias, lora_a, lora_b, 2.0)
    once, twice = _rounding_models(x, weight, bias, lora_a, lora_b, 2.0)
    own, other = (once, twice) if device == "cpu" else (twice, once)
    agree_own = (y == own).float().mean().item()
    agree_other = (y == other).float().mean().item()
    assert agree_own >= 0.99 and agree_other < agree_own - 0.02, (agree_own, agree_other)


def test_fake_refuses_float64_on_cuda_as_the_kernel_does():
    """torch.compile traces with the fake: it must refuse what the CUDA kernel refuses
    (the kernel's own refusal, with this message, is in tests/test_cuda.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f64 = dict(device="cuda", dtype=torch.float64)
        args = (torch.empty(4, 8, **f64), torch.empty(5, 8, **f64), None,
                torch.empty(2, 8, **f64), torch.empty(5, 2, **f64), 1.0)
        with pytest.raises(TypeError, match="float64 is supported on the CPU only"):
            torch.ops.dafast.lora_linear(*args)
        cpu = [None if t is None or isinstance(t, float) else t.to("cpu") for t in args[:5]]
        assert torch.ops.dafast.lora_linear(*cpu, 1.0)[0].shape == (4, 5)
