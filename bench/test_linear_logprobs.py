"""CE, DPO and ORPO from hidden states: forward + backward of the loss (hidden requires grad), in
the same run: dafast (dafast.losses on the fused linear_logprobs op), TRL 1.16's chunked kernel
(trl.kernels.ChunkedLogProbFunction, called as its fused LM head calls it: the peer) and the
unfused path (logits = hidden @ W^T, float32 log_softmax, gather: the baseline; Liger-Kernel's
fused losses join on a GPU, role "liger"). Peer and baseline get the same loss arithmetic on
top of their per-token log-probs (dafast.losses' formulas), so only the log-prob path differs.

    pytest bench/test_linear_logprobs.py --benchmark-autosave -s && python bench/compare.py
    DAFAST_BENCH_BATCH=1 DAFAST_BENCH_SEQ=128 pytest bench/test_linear_logprobs.py --benchmark-disable

The second is CI's smoke run: one untimed step each, on a 4099-entry vocabulary.

Shapes (CPU): 4 pairs (8 sequences) x 1024 tokens, H 576, V 49152 (SmolLM2's head), fp32 and
bf16; CE scores the same 8 sequences. GPU: 4 pairs x 2048, H 4096, V 128256 (Llama-3.1-8B),
bf16. DAFAST_BENCH_BATCH (pairs) and DAFAST_BENCH_SEQ change them. Every token carries a label
(no prompt or padding to skip: the least favourable batch for dafast, which drops ignored
tokens before its GEMMs). The head is frozen (LoRA: no dW), and trainable for CE in fp32 (full
fine-tuning). DPO uses precomputed reference log-probs.

extra_info["peak_MiB"]: on the CPU the peak RSS increase of a fresh process over its RSS once the
inputs are allocated, during one step (first call, after a tiny warm-up GEMM); on a GPU the peak
allocated memory beyond the inputs. ATen's bf16 GEMMs run at a few GFLOP/s on CPUs without bf16
units, so there the bf16 peer and baseline run one round: TRL's step takes over a minute, the
unfused one about ten minutes (2-core EPYC), so that one runs only with DAFAST_BENCH_SLOW=1.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dafast import losses
from dafast.ops.linear_logprobs import linear_logprobs_reference

trl_kernels = pytest.importorskip("trl.kernels")
import trl.trainer.utils  # noqa: E402,F401  the chunked kernel's backward imports it on first use
from trl.kernels.chunked_logprob import _use_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    H, V, SEQ, DTYPES = 4096, 128256, 2048, [torch.bfloat16]
else:
    H, V, SEQ, DTYPES = 576, 49152, 1024, [torch.float32, torch.bfloat16]
PAIRS = int(os.environ.get("DAFAST_BENCH_BATCH", "4"))
SEQ = int(os.environ.get("DAFAST_BENCH_SEQ", str(SEQ)))
SLOW = os.environ.get("DAFAST_BENCH_SLOW") == "1"  # see the module docstring
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what its fused head passes
BETA = 0.1
ROLES = ["dafast", "peer", "baseline"] + (["liger"] if CUDA else [])
# A smoke run (--benchmark-disable, as CI's) also shrinks the vocabulary: every GEMM here is
# [tokens, H] x [H, V], and at V 49152 the file would take a minute even at CI's token counts.
SMOKE_VOCAB = 4099
CASES = [(loss, "frozen") for loss in ("ce", "dpo", "orpo")] + [("ce", "trainable")]


def dtype_id(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def make_inputs(dtype, head, vocab=V):
    """hidden [2 PAIRS, SEQ, H] (requires grad), weight [vocab, H], labels [2 PAIRS, SEQ] (chosen
    rows first), reference sequence log-probs [PAIRS] x 2. Made in their dtype: no large
    temporaries."""
    gen = torch.Generator(DEVICE).manual_seed(0)
    hidden = torch.randn(2 * PAIRS, SEQ, H, generator=gen, device=DEVICE, dtype=dtype)
    weight = torch.randn(vocab, H, generator=gen, device=DEVICE, dtype=dtype).mul_(2 / H ** 0.5)
    labels = torch.randint(0, vocab, (2 * PAIRS, SEQ), generator=gen, device=DEVICE)
    # Reference log-probs near the policy's (uniform-ish logits), so DPO's sigmoid is not saturated.
    ref = torch.full((2, PAIRS), -(SEQ - 1) * math.log(vocab), device=DEVICE)
    return hidden.requires_grad_(), weight.requires_grad_(head == "trainable"), labels, ref


# ---- per-token log-probs [B, T - 1] (0 where ignored) of the contenders without a loss API ----

def baseline_token_logps(hidden, weight, labels):
    h, t = hidden[:, :-1], labels[:, 1:]
    logp = linear_logprobs_reference(h.reshape(-1, h.shape[-1]), weight, t.reshape(-1))
    return logp.view(t.shape)


def trl_token_logps(hidden, weight, labels):
    """As trl.trainer.utils.add_fused_lm_head calls the kernel: compacted to the labelled tokens
    where Triton runs, every position (labels clamped, result masked) elsewhere."""
    h, t = hidden[:, :-1], labels[:, 1:]
    mask = t != -100
    apply = trl_kernels.ChunkedLogProbFunction.apply
    if _use_triton(h.device):
        logp = apply(h[mask], weight, None, t[mask], 1.0, TRL_CHUNK, None, 1.0, ("log_probs",))[0]
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    logp = apply(h.reshape(-1, h.shape[-1]), weight, None, t.clamp(min=0).reshape(-1), 1.0,
                 TRL_CHUNK, None, 1.0, ("log_probs",))[0]
    return logp.view(mask.shape).masked_fill(~mask, 0)


# ---- dafast.losses' arithmetic on given per-token log-probs ---------------------------------

def ce_from_token_logps(logp, labels):
    return -logp.sum() / (labels[:, 1:] != -100).sum().clamp(min=1)


def dpo_from_token_logps(logp, ref):
    chosen, rejected = logp.sum(-1).chunk(2)
    return losses.dpo_loss_from_logps(chosen, rejected, ref[0], ref[1], beta=BETA)[0]


def orpo_from_token_logps(logp, labels):
    """dafast.losses.orpo_loss with nll_labels = the chosen rows of labels."""
    pairs = labels.shape[0] // 2
    completion = labels[:, 1:] != -100
    avg = (logp * completion).sum(-1) / completion.sum(-1)
    nll = -(logp[:pairs] * completion[:pairs]).sum() / completion[:pairs].sum()
    chosen, rejected = avg.chunk(2)
    log_odds = (chosen - rejected) - (losses.log1mexp(chosen) - losses.log1mexp(rejected))
    return nll - BETA * torch.nn.functional.logsigmoid(log_odds).mean()


def loss_fn(loss, role, hidden, weight, labels, ref):
    """The loss of one contender: dafast through dafast.losses' public functions, the others
    through their per-token log-probs and the same arithmetic."""
    if role == "dafast":
        if loss == "ce":
            return losses.causal_lm_loss(hidden, weight, labels)
        if loss == "dpo":
            return losses.dpo_loss(hidden, weight, labels, ref[0], ref[1], beta=BETA)[0]
        return losses.orpo_loss(hidden, weight, labels, beta=BETA)[0]
    if role == "liger":
        return liger_loss(loss, hidden, weight, labels)
    logp = (trl_token_logps if role == "peer" else baseline_token_logps)(hidden, weight, labels)
    if loss == "ce":
        return ce_from_token_logps(logp, labels)
    if loss == "dpo":
        return dpo_from_token_logps(logp, ref)
    return orpo_from_token_logps(logp, labels)


def liger_loss(loss, hidden, weight, labels):
    """Liger-Kernel's fused losses (GPU only; DPO without a reference model: the policy's cost)."""
    liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
    h, t = hidden[:, :-1], labels[:, 1:]
    if loss == "ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss()(weight, h.reshape(-1, h.shape[-1]), t.reshape(-1))
    if loss == "dpo":
        out = liger_chunked.LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)(weight, h, t)
    else:
        out = liger_chunked.LigerFusedLinearORPOLoss(beta=BETA)(weight, h, t)
    return out[0] if isinstance(out, tuple) else out


def build_step(loss, dtype, head, role, vocab=V):
    """One forward + backward of the loss: returns (step, inputs); step() returns the gradients
    (hidden's, and the weight's for a trainable head)."""
    hidden, weight, labels, ref = inputs = make_inputs(dtype, head, vocab)
    wrt = [hidden, weight] if head == "trainable" else [hidden]

    def step():
        grads = torch.autograd.grad(loss_fn(loss, role, hidden, weight, labels, ref), wrt)
        if CUDA:
            torch.cuda.synchronize()
        return grads

    return step, inputs


# ---- peak memory ---------------------------------------------------------------------------

def _proc_kib(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_rss_child(loss, dtype_name, head, role):
    """In a fresh process: print the peak RSS increase (MiB) of one step over the RSS with the
    inputs allocated. The kernel's peak RSS counter (VmHWM) is reset after the warm-up."""
    step, _ = build_step(loss, getattr(torch, dtype_name), head, role)
    for warm_dtype in (torch.float32, torch.bfloat16):  # thread pools and BLAS state, not the step
        torch.ones(64, 64, dtype=warm_dtype) @ torch.ones(64, 64, dtype=warm_dtype)
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_kib("VmRSS")
    step()
    print((_proc_kib("VmHWM") - before) / 1024)


def peak_rss_mib(loss, dtype, head, role):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_linear_logprobs import peak_rss_child\n"
            f"peak_rss_child({loss!r}, {str(dtype).split('.')[-1]!r}, {head!r}, {role!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"peak RSS child failed: {done.stderr[-2000:]}")
    return round(float(done.stdout.split()[-1]), 1)


def peak_cuda_mib(step):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step()
    peak = torch.cuda.max_memory_allocated() - before
    del grads
    return round(peak / 2**20, 1)


# ---- the benchmark ---------------------------------------------------------------------------

def check_against_fp32_baseline(loss, dtype, head, grads, inputs):
    """dafast's gradients equal the unfused path's on the same (rounded) inputs, upcast to fp32
    (equal work compared; on the CPU dafast's GEMMs also run in fp32)."""
    hidden, weight, labels, ref = inputs
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_(head == "trainable")
    wrt = [h, w] if head == "trainable" else [h]
    expected = torch.autograd.grad(loss_fn(loss, "baseline", h, w, labels, ref), wrt)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours.float(), theirs, rtol=tol,
                                   atol=tol * theirs.abs().max().item())


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss, head", CASES, ids=[f"{loss}-{head}" for loss, head in CASES])
def test_loss_step(benchmark, loss, head, dtype, role):
    if head == "trainable" and dtype != torch.float32 and not CUDA:
        pytest.skip("trainable head on the CPU in fp32 only: bf16 adds minutes of ATen bf16 GEMMs")
    slow = dtype != torch.float32 and not CUDA and role != "dafast"
    if slow and benchmark.disabled:
        pytest.skip("ATen's bf16 GEMMs take seconds even at smoke shapes on this CPU")
    if slow and role == "baseline" and not SLOW:
        pytest.skip("the CPU's bf16 unfused step takes ~10 min (and its memory run as much again): "
                    "DAFAST_BENCH_SLOW=1 runs it")
    step, inputs = build_step(loss, dtype, head, role, SMOKE_VOCAB if benchmark.disabled else V)
    tokens = 2 * PAIRS * SEQ
    benchmark.group = (f"{loss} fwd+bwd {head} head {dtype_id(dtype)} {2 * PAIRS}x{SEQ} "
                       f"H={H} V={V}")
    benchmark.extra_info["role"] = role
    # No warm-up round (a step is seconds to minutes): the median of 3 rounds ignores a slow first.
    grads = benchmark.pedantic(step, rounds=1 if slow else 3)
    if role == "dafast":
        check_against_fp32_baseline(loss, dtype, head, grads, inputs)
    if benchmark.stats is None:
        return
    benchmark.extra_info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
    benchmark.extra_info["peak_MiB"] = (peak_cuda_mib(step) if CUDA
                                        else peak_rss_mib(loss, dtype, head, role))
    print(f"\n{benchmark.group} {role:8s} median {benchmark.stats.stats.median:8.2f} s  "
          f"peak +{benchmark.extra_info['peak_MiB']:8.1f} MiB")
