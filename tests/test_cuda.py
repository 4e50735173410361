"""CUDA paths that the per-op tests do not reach: grid-stride loops past one full grid, the
scalar paths of misaligned inputs, large ranks and row counts, real head sizes, other devices
and streams, CUDA-graph capture, the model patches and a TRL trainer on the GPU, a real-size
merge. All marked `cuda` (bench/gpu/run.sh runs `pytest -m cuda -x`); skipped without a GPU."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA, lora_model, tiny_llama
from dafast.ops import (linear_logprobs, linear_logprobs_reference, lora_linear,
                        lora_linear_reference, slerp, slerp_reference, swiglu, swiglu_reference)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")]
HALF = [torch.bfloat16, torch.float16]
ROOT = Path(__file__).resolve().parent.parent
# More elements than one full grid covers in one pass (132 SMs x 8 blocks x 256 threads x 8
# bf16 lanes = 2.2M), odd so that the vector loop leaves a tail.
BIG = 5_000_003


def misaligned(n, dtype, device="cuda"):
    """n elements starting one element past a 16-byte boundary: the scalar-head path."""
    t = torch.randn(n + 1, device=device).to(dtype)[1:]
    assert t.data_ptr() % 16 != 0
    return t


def assert_close_to(out, exact, dtype, scale=None):
    """Within a few ulps of the output dtype, relative to the result's scale."""
    scale = exact.abs().max().item() if scale is None else scale
    eps = torch.finfo(dtype).eps
    err = (out.double() - exact.double()).abs().max().item()
    assert err <= 4 * eps * scale + 1e-30, (err, scale)


# ---- slerp ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_slerp_past_one_grid(dtype, aligned):
    from test_slerp import assert_as_accurate_as_reference

    a = torch.randn(BIG, device="cuda").to(dtype) if aligned else misaligned(BIG, dtype)
    b = torch.randn(BIG, device="cuda").to(dtype)
    assert_as_accurate_as_reference(slerp(a, b, 0.3), a, b, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_slerp_equally_misaligned_operands_write_in_packs(dtype):
    """a, b and out one element past a 16-byte boundary: a scalar head, then packs."""
    from test_slerp import assert_as_accurate_as_reference

    a, b, out = (misaligned(BIG, dtype) for _ in range(3))
    slerp(a, b, 0.3, out=out)
    assert_as_accurate_as_reference(out, a, b, 0.3)
    few = [misaligned(5, dtype) for _ in range(3)]  # shorter than the head
    slerp(few[0], few[1], 0.3, out=few[2])
    assert_as_accurate_as_reference(few[2], few[0], few[1], 0.3)


def test_merge_of_a_real_size_tensor():
    """An 8B MLP projection pair (14336 x 4096 bf16), as dafast.merge streams it: same answer
    on the GPU as the CPU kernel."""
    a, b = (torch.randn(14336, 4096, dtype=torch.bfloat16) for _ in range(2))
    on_gpu = slerp(a.cuda(), b.cuda(), 0.3).cpu()
    on_cpu = slerp(a, b, 0.3)
    diff = (on_gpu.float() - on_cpu.float()).abs()
    assert diff.max().item() <= 2 ** -7 * on_cpu.float().abs().max().item()
    assert (diff > 0).float().mean().item() < 0.01  # at most a rounding apart, and rarely


# ---- swiglu -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_swiglu_past_one_grid_forward_and_backward(dtype, aligned):
    gate, up, grad = (torch.randn(BIG, device="cuda").to(dtype) for _ in range(3))
    g = (gate.clone() if aligned else misaligned(BIG, dtype).copy_(gate)).requires_grad_()
    u = up.clone().requires_grad_()
    out = swiglu(g, u)
    out.backward(grad)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    swiglu_reference(g64, u64).backward(grad.double())
    assert_close_to(out, swiglu_reference(gate.double(), up.double()), dtype)
    assert_close_to(g.grad, g64.grad, dtype)
    assert_close_to(u.grad, u64.grad, dtype)


# ---- lora_linear ------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [32, 64])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16)])
def test_lora_large_rank_many_rows_within_peft_error(rank, dtype, lora_dtype):
    from test_lora_linear import max_err, peft_layer, run_all

    layer = peft_layer(1031, 777, rank, dtype, lora_dtype, device="cuda")
    ours, theirs, exact = run_all(layer, (3001,), 1031, dtype, device="cuda")
    for name, a, b, e in zip(("y", "dx", "dA", "dB"), ours, theirs, exact):
        e = e.to(a.device)
        ulp = max(torch.finfo(a.dtype).eps, 1e-5) * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(b, e) + ulp, (name, max_err(a, e), max_err(b, e))


# (rows, in_features, out_features) for the thin kernels' tiles: rows never a multiple of 16;
# 1031 and 777 odd (most rows of x and dY start off a 16-byte boundary: scalar reads); 4096, 520
# whole 16-byte packs in every dtype, 520 with a last tile of 8 columns; 200 a multiple of 8 but
# not of 64; 4100 a multiple of 4 but not of 8, so half-precision rows of dY alternate between
# aligned (packs) and misaligned (scalar) within one tile.
LORA_THIN_SHAPES = [(37, 1031, 777), (1001, 4096, 520), (259, 200, 4100)]
LORA_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


def lora_inputs(rows, in_features, out_features, rank, dtype, lora_dtype, offset=False):
    """x, W, b, A, B and dY on the GPU; with `offset`, x and dY start one element past a 16-byte
    boundary (every row misaligned, whatever the width)."""
    def make(*shape, dt, scale=1.0, shifted=False):
        n = math.prod(shape)
        flat = misaligned(n, dt) if shifted else (torch.randn(n, device="cuda") * scale).to(dt)
        return flat.view(*shape)

    x = make(rows, in_features, dt=dtype, shifted=offset)
    weight = make(out_features, in_features, dt=dtype, scale=in_features ** -0.5)
    bias = make(out_features, dt=dtype)
    lora_a = make(rank, in_features, dt=lora_dtype, scale=in_features ** -0.5)
    lora_b = make(out_features, rank, dt=lora_dtype, scale=rank ** -0.5)
    grad_y = make(rows, out_features, dt=dtype, shifted=offset)
    return x, weight, bias, lora_a, lora_b, grad_y


def assert_lora_within_reference_error(x, weight, bias, lora_a, lora_b, grad_y, scale=0.75):
    """y, dx, dA and dB of dafast.lora_linear against fp64 math on the same inputs: at most twice
    the error of lora_linear_reference (PyTorch at the inputs' dtypes) plus one ulp of the
    result's scale (1e-5 of it for fp32), as test_lora_linear.py bounds it against PEFT."""
    def run(fn, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        y = fn(*leaves)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_y.to(y.dtype))]

    ours = run(lambda t, a, b: lora_linear(t, weight, bias, a, b, scale), x, lora_a, lora_b)
    theirs = run(lambda t, a, b: lora_linear_reference(t, weight, bias, a, b, scale),
                 x, lora_a, lora_b)
    exact = run(lambda t, a, b: lora_linear_reference(t, weight.double(), bias.double(), a, b,
                                                      scale),
                x.double(), lora_a.double(), lora_b.double())
    for name, a, b, e in zip(("y", "dx", "dA", "dB"), ours, theirs, exact):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        ulp = max(torch.finfo(a.dtype).eps, 1e-5) * e.abs().max().item()
        err, ref_err = [(t.double() - e).abs().max().item() for t in (a, b)]
        assert err <= 2 * ref_err + ulp, (name, err, ref_err, ulp)


@pytest.mark.parametrize("rank", [8, 16, 17, 32, 64, 100])
@pytest.mark.parametrize("dtype,lora_dtype", LORA_DTYPES, ids=["fp32", "bf16+fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows,in_features,out_features", LORA_THIN_SHAPES,
                         ids=["x".join(map(str, shape)) for shape in LORA_THIN_SHAPES])
def test_lora_thin_products_every_rank_tile_edge_and_dtype(rows, in_features, out_features, rank,
                                                           dtype, lora_dtype):
    """r from below one rank chunk of 16 to past the 64 one block covers (two rank passes at
    100), ragged rows and columns, aligned, misaligned and mixed rows of x and dY."""
    assert_lora_within_reference_error(
        *lora_inputs(rows, in_features, out_features, rank, dtype, lora_dtype))


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("dtype,lora_dtype", LORA_DTYPES, ids=["fp32", "bf16+fp32", "bf16", "fp16"])
def test_lora_thin_products_misaligned_base_pointers(rank, dtype, lora_dtype):
    """x and dY one element past a 16-byte boundary: widths that would take 16-byte packs
    (4096, 520) read every row one element at a time."""
    inputs = lora_inputs(1001, 4096, 520, rank, dtype, lora_dtype, offset=True)
    assert inputs[0].data_ptr() % 16 != 0 and inputs[-1].data_ptr() % 16 != 0
    assert_lora_within_reference_error(*inputs)


def test_lora_wide_output_reads_dy_in_row_blocks():
    """40000 outputs at r 64: the backward's row-product partials would pass 32 MiB at 4099
    rows, so dY is read in three row blocks (dB summed over them): still within PEFT's error."""
    from test_lora_linear import max_err, peft_layer, run_all

    layer = peft_layer(64, 40000, 64, torch.bfloat16, torch.float32, device="cuda")
    ours, theirs, exact = run_all(layer, (4099,), 64, torch.bfloat16, device="cuda")
    for name, a, b, e in zip(("y", "dx", "dA", "dB"), ours, theirs, exact):
        ulp = max(torch.finfo(a.dtype).eps, 1e-5) * e.abs().max().item()
        assert max_err(a, e) <= 2 * max_err(b, e) + ulp, (name, max_err(a, e), max_err(b, e))


def test_lora_expand_past_the_grid_y_cap():
    """More than 65535 row tiles of 16: the expand kernel's row loop runs twice."""
    rows = 65535 * 16 + 4099
    x = torch.randn(rows, 40, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(24, 40, device="cuda", dtype=torch.bfloat16) / 6
    a = (torch.randn(8, 40, device="cuda") / 6).requires_grad_()
    b = torch.randn(24, 8, device="cuda").requires_grad_()
    y = lora_linear(x, weight, None, a, b, 2.0)
    exact = lora_linear_reference(x.detach().float(), weight.float(), None, a.detach(),
                                  b.detach(), 2.0)
    assert_close_to(y, exact, torch.bfloat16)  # the rows past the first 65535 tiles included
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad[-1].abs().sum() > 0


def test_lora_refuses_float64_as_the_fake_does():
    x = torch.randn(4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 is supported on the CPU only"):
        lora_linear(x, torch.randn(5, 8, device="cuda", dtype=torch.float64), None,
                    torch.randn(2, 8, device="cuda", dtype=torch.float64),
                    torch.randn(5, 2, device="cuda", dtype=torch.float64), 1.0)


# ---- linear_logprobs --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
def test_logprobs_llama_head(dtype):
    """H 4096, V 128256 (Llama-3.1-8B): several vocabulary tiles, the last one partial."""
    n, h, v = 67, 4096, 128256
    hidden = torch.randn(n, h, device="cuda").to(dtype)
    weight = (torch.randn(v, h, device="cuda") / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::5] = -100
    upstream = torch.randn(n, device="cuda")
    hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = linear_logprobs(hd, wd, targets)
    (logp * upstream).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double()  # fp64 on the GPU: seconds
    exact = linear_logprobs_reference(h64, w64, targets)
    (exact * upstream.double()).sum().backward()
    ref = linear_logprobs_reference(hidden, weight, targets)

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert err(logp, exact) <= max(2 * err(ref, exact), 1e-3 * exact.abs().max().item())
    assert err(hd.grad, h64.grad) <= 2e-2 * h64.grad.abs().max().item()


def test_logprobs_fp16_gradient_tile_in_range():
    """Large logits and upstream gradients: the fp16 gradient tile must not overflow."""
    n, h, v = 33, 64, 5003
    hidden = (torch.randn(n, h, device="cuda") * 4).half()
    weight = (torch.randn(v, h, device="cuda") * 4 / h ** 0.5).half()  # logits around +-30
    targets = torch.randint(0, v, (n,), device="cuda")
    hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (linear_logprobs(hd, wd, targets) * 30.0).sum().backward()  # |dW| stays under fp16's max
    assert torch.isfinite(hd.grad).all() and torch.isfinite(wd.grad).all()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (linear_logprobs_reference(h64, w64, targets) * 30.0).sum().backward()
    assert (hd.grad.double() - h64.grad).abs().max() <= 1e-2 * h64.grad.abs().max()


@pytest.mark.parametrize("forced", [False, True], ids=["fused", "fallback"])
def test_logprobs_accumulate_both_paths(forced):
    """addmm into an fp32 accumulator (where torch takes it) and its fallback: same gradients."""
    env = {**os.environ, "DAFAST_ADDMM_FALLBACK": "1" if forced else "0"}
    code = ("import torch, dafast.ops as o\n"
            "torch.manual_seed(0)\n"
            "h = torch.randn(300, 256, device='cuda').bfloat16().requires_grad_()\n"
            "w = (torch.randn(3001, 256, device='cuda') / 16).bfloat16().requires_grad_()\n"
            "t = torch.randint(0, 3001, (300,), device='cuda')\n"
            "o.linear_logprobs(h, w, t, chunk_size=128, vocab_chunk_size=1000).sum().backward()\n"
            "h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()\n"
            "o.linear_logprobs_reference(h64, w64, t).sum().backward()\n"
            "e = max(((h.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()).item(),\n"
            "        ((w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()).item())\n"
            "assert e < 2e-2, e\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_logprobs_backward_does_not_wait_for_the_device():
    hidden = torch.randn(100, 64, device="cuda").requires_grad_()
    weight = torch.randn(1000, 64, device="cuda")
    targets = torch.randint(0, 1000, (100,), device="cuda")
    targets[::3] = -100
    logp = linear_logprobs(hidden, weight, targets)
    loss = logp.sum()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (hidden.grad[::3] == 0).all() and hidden.grad[1].abs().sum() > 0


def test_logprobs_refuses_with_dhidden_as_the_fake_does():
    h, w = torch.randn(4, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    t = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="with_dhidden is implemented on the CPU only, not on cuda"):
        torch.ops.dafast.linear_logprobs(h, w, t, -100, 0, 0, False, True)


# ---- devices, streams, graphs -----------------------------------------------------------------

def all_ops(device):
    """Every op forward and backward on small odd shapes on `device`; the results, on the CPU."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    a, b = rand(70001, dtype=torch.bfloat16), rand(70001, dtype=torch.bfloat16)
    gate, up = rand(40007, dtype=torch.bfloat16).requires_grad_(), rand(40007, dtype=torch.bfloat16).requires_grad_()
    act = swiglu(gate, up)
    act.float().sum().backward()
    x = rand(301, 136, dtype=torch.bfloat16).requires_grad_()
    w = rand(72, 136, dtype=torch.bfloat16)
    la, lb = rand(40, 136).requires_grad_(), rand(72, 40).requires_grad_()
    y = lora_linear(x, w, None, la, lb, 0.5)
    y.float().square().mean().backward()
    hidden, head = rand(67, 96).requires_grad_(), rand(1029, 96)
    targets = torch.randint(0, 1029, (67,), generator=gen).to(device)
    targets[::7] = -100
    logp = linear_logprobs(hidden, head, targets)
    logp.sum().backward()
    out = [slerp(a, b, 0.3), act, gate.grad, up.grad, y, x.grad, la.grad, lb.grad, logp, hidden.grad]
    return [t.detach().cpu() for t in out]


def assert_all_close(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3, msg=f"result {i}")


def test_every_op_on_a_side_stream():
    want = all_ops("cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = all_ops("cuda")
    torch.cuda.synchronize()
    assert_all_close(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_every_op_on_the_second_device():
    want = all_ops("cuda:0")
    assert torch.cuda.current_device() == 0
    assert_all_close(all_ops("cuda:1"), want)


def test_training_step_ops_under_cuda_graph_capture():
    """LoRA linear -> SwiGLU -> log-probs under a frozen head, forward and backward, captured
    once and replayed: nothing in them waits for the device, and the replay equals eager."""
    torch.manual_seed(0)
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(80, 96, device="cuda") / 10).bfloat16()
    a = (torch.randn(8, 96, device="cuda") / 10).requires_grad_()
    b = (torch.randn(80, 8, device="cuda") / 10).requires_grad_()
    head = (torch.randn(1000, 40, device="cuda") / 6).bfloat16()
    targets = torch.randint(0, 1000, (64,), device="cuda")
    targets[::4] = -100

    def step():
        y = lora_linear(x, w, None, a, b, 2.0)
        h = swiglu(y[:, :40].contiguous(), y[:, 40:].contiguous())
        loss = -linear_logprobs(h, head, targets).sum()
        return (loss.detach(), *torch.autograd.grad(loss, (a, b)))

    eager = [t.clone() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- the model patches, the fused head and a TRL trainer on the GPU ----------------------------

def test_lora_and_mlp_patches_match_peft_on_cuda():
    import dafast.lora
    import dafast.mlp

    model = lora_model().cuda()
    ids = torch.randint(0, 131, (2, 17), device="cuda")

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = loss_and_grads()
    assert dafast.lora.patch(model) > 0 and dafast.mlp.patch(model) > 0
    got = loss_and_grads()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_losses_on_hidden_states_match_the_logits_path_on_cuda():
    """dafast.losses on a deferred head's hidden states against the same losses on logits."""
    import dafast.kernels
    from dafast import losses
    from test_trainers import tiny_llama as trainer_llama

    model = trainer_llama().cuda()
    ids = torch.randint(0, 300, (3, 19), device="cuda")
    labels = ids.clone()
    labels[:, :6] = -100
    logits = model(input_ids=ids).logits
    dafast.kernels.apply(model)
    hidden = model(input_ids=ids).logits
    weight = dafast.kernels.deferred_head_weight(model)
    fused, fused_metrics = losses.causal_lm_loss(hidden, weight, labels, return_metrics=True)
    plain, plain_metrics = losses.causal_lm_loss(logits, None, labels, return_metrics=True)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    for name in plain_metrics:
        torch.testing.assert_close(fused_metrics[name].float(), plain_metrics[name].float(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sft", "dpo", "orpo"])
def test_trainers_on_cuda_give_trls_losses(family, tmp_path):
    from test_trainers import assert_same_training

    assert_same_training(family, tmp_path, rtol=1e-4, use_cpu=False)
