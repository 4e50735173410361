"""dafast.ops.linear_logprobs: native kernels against float64 math, the unfused reference and
TRL's chunked kernel; gradients, ignored tokens, chunk boundaries, opcheck, bad input."""

import pytest
import torch

import dafast
from dafast.ops import linear_logprobs, linear_logprobs_reference
from conftest import DEVICES, KERNEL_DTYPES

H = 64
# (N, V): every N and V of the issue, paired so that the float64 golden logits stay small.
SHAPES = [(1, 50257), (7, 49152), (1000, 1000), (300, 50257), (4097, 1000)]


def make_inputs(n, v, dtype, device, ignore_every=5):
    hidden = torch.randn(n, H, device=device).to(dtype)
    weight = (torch.randn(v, H, device=device) / H ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def golden(hidden, weight, targets, **kw):
    """The exact answer for these (already rounded) inputs: the reference in float64."""
    return linear_logprobs_reference(hidden.cpu().double(), weight.cpu().double(), targets.cpu(), **kw)


def golden_grads(hidden, weight, targets, upstream):
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    (linear_logprobs_reference(h, w, targets.cpu()) * upstream.cpu().double()).sum().backward()
    return h.grad, w.grad


def max_err(x, exact):
    return (x.detach().cpu().double() - exact).abs().max().item()


def assert_accurate(out, exact, reference_out, rtol):
    """out is within rtol of the float64 answer (relative to its scale), and no worse than twice
    the error of the unfused PyTorch path at the same dtype."""
    scale = exact.abs().max().item() + 1e-30
    err, ref_err = max_err(out, exact), max_err(reference_out, exact)
    assert err <= max(rtol * scale, 2 * ref_err), (err, ref_err, scale)


@pytest.fixture(params=["0", "1"], ids=["cpu-fp32-gemm", "cpu-bf16-gemm"])
def cpu_bf16_gemm(request, monkeypatch):
    """Both CPU GEMM paths for bf16 inputs (fp32 copies, or bf16 where the CPU multiplies it
    natively), whatever this CPU has: DAFAST_CPU_BF16_GEMM forces one."""
    monkeypatch.setenv("DAFAST_CPU_BF16_GEMM", request.param)
    return request.param == "1"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, v", SHAPES)
def test_logprobs_and_stats_match_float64(device, dtype, n, v, cpu_bf16_gemm):
    hidden, weight, targets = make_inputs(n, v, dtype, device)
    logp, stats = linear_logprobs(hidden, weight, targets, return_stats=True)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    exact, exact_stats = golden(hidden, weight, targets, return_stats=True)
    ref_logp, ref_stats = linear_logprobs_reference(hidden, weight, targets, return_stats=True)
    # GEMMs accumulate in fp32 on every device: 1e-6 of the scale, or no worse than twice the
    # reference, whose bf16 logits the CPU's bf16 GEMM path rounds alike.
    assert_accurate(logp, exact, ref_logp, rtol=1e-6)
    assert_accurate(stats.entropy, exact_stats.entropy, ref_stats.entropy, rtol=1e-5)
    assert_accurate(stats.mean_logit, exact_stats.mean_logit, ref_stats.mean_logit, rtol=1e-5)
    assert torch.equal(stats.is_top1.cpu(), exact_stats.is_top1)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (stats.entropy[ignored] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, v", [(7, 49152), (1000, 1000), (300, 50257)])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable", "frozen"])
def test_gradients_match_float64(device, dtype, n, v, frozen_head, cpu_bf16_gemm):
    # A frozen head takes another path on the CPU: dHidden computed in the forward.
    hidden, weight, targets = make_inputs(n, v, dtype, device)
    upstream = torch.randn(n, device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_head)
    (linear_logprobs(h, w, targets) * upstream).sum().backward()
    assert h.grad.dtype == dtype and (frozen_head or w.grad.dtype == dtype)
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (linear_logprobs_reference(rh, rw, targets) * upstream).sum().backward()
    exact_h, exact_w = golden_grads(hidden, weight, targets, upstream)
    # fp32: 1e-6 of the scale; half precision: the rounding of the gradient to its dtype.
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert_accurate(h.grad, exact_h, rh.grad, rtol)
    if not frozen_head:
        assert_accurate(w.grad, exact_w, rw.grad, rtol)
    assert (h.grad[targets == -100] == 0).all()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_dhidden_in_forward_matches_float64(dtype, cpu_bf16_gemm):
    """with_dhidden (CPU): d logp_i / d hidden_i, which is the gradient of sum(logp) for hidden
    (each logp_i depends on hidden_i alone); 0 for ignored tokens; logp unchanged. Exact to fp32
    when the GEMMs run on fp32 copies, to bf16's rounding when they run in bf16."""
    hidden, weight, targets = make_inputs(300, 5003, dtype, "cpu")
    logp, _, _, dhidden, _ = torch.ops.dafast.linear_logprobs(hidden, weight, targets, -100, 100,
                                                               333, False, True)
    assert dhidden.dtype == torch.float32 and dhidden.shape == hidden.shape
    torch.testing.assert_close(logp, linear_logprobs(hidden, weight, targets), rtol=1e-6, atol=0)
    exact_h, _ = golden_grads(hidden, weight, targets, torch.ones(300))
    rtol = 2 ** -8 if dtype == torch.bfloat16 and cpu_bf16_gemm else 1e-6
    assert max_err(dhidden, exact_h) <= rtol * exact_h.abs().max().item()
    assert (dhidden[targets == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_weight_skips_dw(device, monkeypatch):
    """A frozen head's backward never asks the kernel for dW (on the CPU it calls no backward
    op at all: dHidden came with the forward), and its dHidden is the trainable head's."""
    hidden, weight, targets = make_inputs(1000, 1000, torch.float32, device)
    asked_for_dw = []
    backward_op = torch.ops.dafast.linear_logprobs_backward

    def spy(*args):
        asked_for_dw.append(args[9])  # weight_grad, as dafast/ops/linear_logprobs.py passes it
        return backward_op(*args)

    monkeypatch.setattr(torch.ops.dafast, "linear_logprobs_backward", spy)
    h_full, w_full = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_logprobs(h_full, w_full, targets).sum().backward()
    assert asked_for_dw == [True] and w_full.grad.abs().sum() > 0  # the spy sees the calls
    asked_for_dw.clear()
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, targets).sum().backward()
    assert True not in asked_for_dw
    assert asked_for_dw == ([] if device == "cpu" else [False])
    torch.testing.assert_close(h.grad, h_full.grad, rtol=1e-6, atol=1e-7)
    lse = torch.ops.dafast.linear_logprobs(hidden, weight, targets)[1]
    grad_h, grad_w = torch.ops.dafast.linear_logprobs_backward(
        torch.ones(1000, device=device), hidden, weight, targets, lse, -100, 0, 0, True, False)
    assert grad_w.shape == (0,) and grad_h.shape == hidden.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [(7, 1000), (100, 333), (4096, 1 << 20)])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable", "frozen"])
def test_chunk_boundaries_inside_sequences(device, dtype, chunks, frozen_head):
    # Four sequences of 256 tokens, flattened: token chunks of 7 or 100 cut through them, vocab
    # chunks of 1000 or 333 do not divide V = 5003 (1 << 20: one chunk of everything).
    hidden, weight, targets = make_inputs(1024, 5003, dtype, device, ignore_every=0)
    targets[:30] = -100  # a prompt: the chunks are cut among the remaining rows
    upstream = torch.randn(1024, device=device)
    results = []
    for chunk_size, vocab_chunk_size in [chunks, (None, None)]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_head)
        logp = linear_logprobs(h, w, targets, chunk_size=chunk_size,
                               vocab_chunk_size=vocab_chunk_size)
        (logp * upstream).sum().backward()
        results.append((logp, h.grad) if frozen_head else (logp, h.grad, w.grad))
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16 gradients: one rounding apart
    for chunked, default in zip(*results):
        torch.testing.assert_close(chunked.float(), default.float(), rtol=rtol,
                                   atol=rtol * default.float().abs().max().item())
    assert_accurate(results[0][0], golden(hidden, weight, targets),
                    linear_logprobs_reference(hidden, weight, targets), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_all_ignored(device, dtype):
    hidden, weight, _ = make_inputs(33, 1000, dtype, device)
    targets = torch.full((33,), -100, device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, stats = linear_logprobs(h, w, targets, return_stats=True)
    assert (logp == 0).all() and (stats.entropy == 0).all() and not stats.is_top1.any()
    logp.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_and_empty_input(device):
    hidden, weight, targets = make_inputs(50, 1000, torch.float32, device, ignore_every=0)
    targets[::3] = 7
    logp = linear_logprobs(hidden, weight, targets, ignore_index=7)
    assert (logp[::3] == 0).all()
    torch.testing.assert_close(logp, linear_logprobs_reference(hidden, weight, targets, 7))
    empty = linear_logprobs(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    hidden = torch.randn(H, 300, device=device).t()           # [300, H], transposed
    weight = torch.randn(1000, 2 * H, device=device)[:, ::2]  # [1000, H], strided
    targets = torch.randint(0, 1000, (600,), device=device)[::2]
    out = linear_logprobs(hidden, weight, targets)
    torch.testing.assert_close(out, linear_logprobs(hidden.contiguous(), weight.contiguous(),
                                                    targets.contiguous()))
    assert_accurate(out, golden(hidden, weight, targets),
                    linear_logprobs_reference(hidden, weight, targets), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_is_not_hidden(device):
    hidden, weight, targets = make_inputs(20, 1000, torch.float32, device, ignore_every=0)
    hidden[3, 5] = float("nan")
    logp = linear_logprobs(hidden, weight, targets)
    assert logp[3].isnan() and logp[torch.arange(20, device=device) != 3].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("with_stats", [False, True])
def test_opcheck(device, dtype, with_stats):
    hidden, weight, targets = make_inputs(37, 300, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(torch.ops.dafast.linear_logprobs.default,
                          (hidden, weight, targets, -100, 16, 128, with_stats))
    if device == "cpu":  # with_dhidden: CPU only, used when the head is frozen
        torch.library.opcheck(torch.ops.dafast.linear_logprobs.default,
                              (hidden, weight.detach(), targets, -100, 16, 128, with_stats, True))
    lse = torch.ops.dafast.linear_logprobs(hidden, weight, targets)[1]
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.dafast.linear_logprobs_backward.default,
                              (torch.randn(37, device=device), hidden.detach(), weight.detach(),
                               targets, lse, -100, 16, 128, *flags))


def test_compiles_without_graph_breaks():
    hidden, weight, targets = make_inputs(100, 1000, torch.float32, "cpu")
    compiled = torch.compile(lambda h, w, t: linear_logprobs(h, w, t), fullgraph=True)
    torch.testing.assert_close(compiled(hidden, weight, targets),
                               linear_logprobs(hidden, weight, targets))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_trl_chunked_kernel(device, dtype):
    """TRL 1.16's ChunkedLogProbFunction (the kernel behind its fused LM head) on the same inputs."""
    chunked = pytest.importorskip("trl.kernels").ChunkedLogProbFunction
    hidden, weight, targets = make_inputs(1000, 5003, dtype, device, ignore_every=0)
    upstream = torch.randn(1000, device=device)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    grads = []
    for impl in ("trl", "dafast"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if impl == "trl":
            logp, entropy, _, mean_logit, is_top1 = chunked.apply(h, w, None, targets, 1.0, 4096,
                                                                  None, 1.0, outputs)
            theirs = (logp, entropy, mean_logit, is_top1)
        else:
            logp, stats = linear_logprobs(h, w, targets, return_stats=True)
            ours = (logp, stats.entropy, stats.mean_logit, stats.is_top1)
        (logp * upstream).sum().backward()
        grads.append((h.grad, w.grad))
    # TRL computes the tiles in the input dtype: bf16 logits there, fp32 here.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for a, b in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(a, b.float(), **tol)
    if dtype == torch.float32:
        assert torch.equal(ours[3], theirs[3])
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * b.float().abs().max().item())


@pytest.mark.parametrize("mode", ["native", "reference"])
def test_bad_input_raises_clear_errors(mode):
    hidden, weight = torch.randn(10, H), torch.randn(100, H)
    targets = torch.randint(0, 100, (10,))
    with dafast.kernels.mode(mode):
        bad = targets.clone()
        bad[4] = 100
        with pytest.raises(ValueError, match=r"targets must be in \[0, V\) = \[0, 100\) or equal "
                                             r"ignore_index \(-100\), got targets\[4\] = 100"):
            linear_logprobs(hidden, weight, bad)
        bad[4] = -3
        with pytest.raises(ValueError, match=r"got targets\[4\] = -3"):
            linear_logprobs(hidden, weight, bad)
        with pytest.raises(ValueError, match=r"must have the same H, got hidden \[10, 64\] and "
                                             r"weight \[100, 32\]"):
            linear_logprobs(hidden, weight[:, :32], targets)
        with pytest.raises(ValueError, match=r"targets must have shape \[N\] = \[10\], got \[9\]"):
            linear_logprobs(hidden, weight, targets[:9])
        with pytest.raises(ValueError, match=r"hidden must be 2-D \[N, H\], got shape \[2, 5, 64\]"):
            linear_logprobs(hidden.view(2, 5, H), weight, targets)
        with pytest.raises(TypeError, match="weight must have hidden's dtype torch.float32, got "
                                            "torch.bfloat16"):
            linear_logprobs(hidden, weight.bfloat16(), targets)
        with pytest.raises(TypeError, match="targets must be torch.int64, got torch.int32"):
            linear_logprobs(hidden, weight, targets.int())
        with pytest.raises(TypeError, match="hidden must be float32, float16 or bfloat16, got "
                                            "torch.float64"):
            linear_logprobs(hidden.double(), weight.double(), targets)
        with pytest.raises(ValueError, match="chunk sizes must be >= 0"):
            linear_logprobs(hidden, weight, targets, chunk_size=-1)


def test_reference_switch_routes_to_reference(monkeypatch):
    import importlib

    # The package re-exports the function under the module's name: fetch the module itself.
    module = importlib.import_module("dafast.ops.linear_logprobs")
    calls = []
    real = module.linear_logprobs_reference
    monkeypatch.setattr(module, "linear_logprobs_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, targets = make_inputs(10, 100, torch.float32, "cpu")
    native = linear_logprobs(hidden, weight, targets)
    assert calls == []
    with dafast.kernels.mode("reference"):
        torch.testing.assert_close(linear_logprobs(hidden, weight, targets), native)
    assert calls == [1]


def _step(hidden, weight, targets, ignore_index=-100, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, stats = linear_logprobs(h, w, targets, ignore_index, return_stats=True, **kw)
    (logp * torch.linspace(-1, 2, logp.shape[0], device=logp.device)).sum().backward()
    return logp.detach(), stats, h.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [-100, 7])  # 7: an ignored target inside [0, V)
def test_masked_rows_path_matches_selected(device, ignore_index, monkeypatch):
    """The path a CUDA graph capture takes (every row computed, ignored ones zeroed), forced by
    DAFAST_LOGPROBS_MASK_ROWS, gives the selected path's results."""
    hidden, weight, targets = make_inputs(301, 1000, torch.float32, device, ignore_every=0)
    targets[1::4] = ignore_index
    selected = _step(hidden, weight, targets, ignore_index, chunk_size=64, vocab_chunk_size=300)
    monkeypatch.setenv("DAFAST_LOGPROBS_MASK_ROWS", "1")
    masked = _step(hidden, weight, targets, ignore_index, chunk_size=64, vocab_chunk_size=300)
    assert (masked[0][targets == ignore_index] == 0).all()
    assert (masked[1].entropy[targets == ignore_index] == 0).all()
    for a, b in zip((selected[0], *selected[1], *selected[2:]), (masked[0], *masked[1], *masked[2:])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_positions_serve_the_backward(device):
    hidden, weight, targets = make_inputs(50, 300, torch.float32, device)
    *_, rows = torch.ops.dafast.linear_logprobs(hidden, weight, targets)
    assert torch.equal(rows, (targets != -100).nonzero().squeeze(1))
    lse = torch.ops.dafast.linear_logprobs(hidden, weight, targets)[1]
    g = torch.randn(50, device=device)
    args = (g, hidden, weight, targets, lse, -100, 0, 0, True, True)
    with_rows = torch.ops.dafast.linear_logprobs_backward(*args, rows)
    without = torch.ops.dafast.linear_logprobs_backward(*args)
    for a, b in zip(with_rows, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    all_rows = torch.ops.dafast.linear_logprobs(hidden, weight, targets.clamp(min=0))[4]
    assert torch.equal(all_rows, torch.arange(50, device=device))
    with pytest.raises(ValueError, match="rows must be the forward's int64 positions"):
        torch.ops.dafast.linear_logprobs_backward(*args, rows.int())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_target_position_on_every_device(device):
    """The check runs on the device, the message still names the position (one wait)."""
    hidden, weight, targets = make_inputs(10, 100, torch.float32, device)
    targets[6] = 100
    with pytest.raises(ValueError, match=r"got targets\[6\] = 100"):
        linear_logprobs(hidden, weight, targets)


def test_fake_refuses_with_dhidden_off_the_cpu():
    """torch.compile traces with the fake: it refuses what linear_logprobs_op.h refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):  # the positions' count is data-dependent
        hidden, weight = torch.empty(4, 8, device="cuda"), torch.empty(5, 8, device="cuda")
        targets = torch.zeros(4, dtype=torch.long, device="cuda")
        with pytest.raises(ValueError, match="with_dhidden is implemented on the CPU only, not "
                                             "on cuda:0"):
            torch.ops.dafast.linear_logprobs(hidden, weight, targets, -100, 0, 0, False, True)
        assert torch.ops.dafast.linear_logprobs(hidden, weight, targets)[0].shape == (4,)
