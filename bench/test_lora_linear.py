"""LoRA linear forward + backward, and one LoRA SFT step: dafast against PEFT (the peer) and the
frozen base linear (the baseline: x W^T with a gradient for x only), in the same run.

    pytest bench/test_lora_linear.py --benchmark-autosave && python bench/compare.py

Layer: SmolLM2-135M's projections (576->576, 576->1536, 1536->576), 4096 tokens, r 16, no bias,
in fp32 and in bf16 with PEFT's default fp32 adapters (on a GPU: Llama-3.1-8B's projections,
8192 tokens, bf16). extra_info["saved_MiB"] is what each variant saves for backward
(saved_tensors_hooks, parameters excluded), extra_info["extra_MiB"] the part of it that is not
the layer's input x itself.

Step: a random-weight Llama with SmolLM2-135M's shapes, LoRA r 16 on every linear layer,
forward + backward + AdamW, fp32, batch 4 x 512 tokens (DAFAST_BENCH_BATCH, DAFAST_BENCH_SEQ
change it). extra_info has tokens/s and the peak RSS of a separate process doing one step.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dafast
from dafast.ops import lora_linear
from peak_rss import PEAK_MIB_CODE

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RANK = 16
if CUDA:
    TOKENS, SHAPES, DTYPES = 8192, [(4096, 4096), (4096, 14336), (14336, 4096)], [torch.bfloat16]
else:
    TOKENS, SHAPES = 4096, [(576, 576), (576, 1536), (1536, 576)]
    DTYPES = [torch.float32, torch.bfloat16]


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def make_layer(in_features, out_features, dtype):
    """PEFT's LoRA layer as get_peft_model makes it (fp32 adapters on a bf16 base), B random."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False, device=DEVICE, dtype=dtype)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"])
    layer = peft.get_peft_model(_Holder(base), config).base_model.model.proj
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def variants(layer, x):
    """{role: forward function} for one layer; each returns y."""
    weight = layer.get_base_layer().weight
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    return {
        "dafast": lambda: lora_linear(x, weight, None, lora_a, lora_b, scale),
        "peer": lambda: layer(x),
        "baseline": lambda: F.linear(x, weight),
    }


def saved_mib(forward, x, parameters):
    """(all, beyond x) MiB of the activations `forward` saves for backward: the distinct storages
    of its saved tensors, parameters' storages left out."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        forward()
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    total = sum(n for ptr, n in storages.items() if ptr not in parameter_storages)
    beyond_x = total - storages.get(x.untyped_storage().data_ptr(), 0)
    return round(total / 2**20, 2), round(beyond_x / 2**20, 2)


def synchronized(fn):
    if not CUDA:
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def dtype_id(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


@pytest.mark.parametrize("role", ["dafast", "peer", "baseline"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_forward_backward(benchmark, shape, dtype, role):
    in_features, out_features = shape
    layer = make_layer(in_features, out_features, dtype)
    x = torch.randn(TOKENS, in_features, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(TOKENS, out_features, device=DEVICE).to(dtype)
    weight = layer.get_base_layer().weight
    lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    forward = variants(layer, x)[role]
    wrt = [x] if role == "baseline" else [x, *lora]

    def step():
        return torch.autograd.grad(forward(), wrt, grad_y)

    benchmark.group = (f"lora fwd+bwd {dtype_id(dtype)} {in_features}->{out_features} "
                       f"M={TOKENS} r={RANK}")
    benchmark.extra_info["role"] = role
    benchmark.extra_info["saved_MiB"], benchmark.extra_info["extra_MiB"] = saved_mib(
        forward, x, [weight, *lora])
    # PEFT's and ATen's bf16 GEMMs take seconds on CPUs without bf16 units: fewer rounds there.
    slow = dtype != torch.float32 and not CUDA and role != "dafast"
    grads = benchmark.pedantic(synchronized(step), rounds=3 if slow else 10, warmup_rounds=1)
    if role == "dafast" and grads is not None:  # same inputs, same answer: equal work compared
        reference = torch.autograd.grad(layer(x), wrt, grad_y)
        for ours, theirs in zip(grads, reference):
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())


# ---- one LoRA SFT step ---------------------------------------------------------------------

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True)
BATCH = int(os.environ.get("DAFAST_BENCH_BATCH", "4"))
SEQ = int(os.environ.get("DAFAST_BENCH_SEQ", "512"))


def build_step(patched: bool):
    """One SFT-like step (forward, backward, AdamW) of a LoRA model of SmolLM2-135M's shapes."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).to(DEVICE)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    model = peft.get_peft_model(base, config).train()
    if patched:
        dafast.lora.patch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (BATCH, SEQ), device=DEVICE)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peak_rss_mib(patched: bool) -> float:
    """Peak RSS of a fresh process that builds the model and takes one step (CPU only)."""
    code = (PEAK_MIB_CODE + f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"from test_lora_linear import build_step\nbuild_step({patched})()\nprint(peak_mib())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, check=True)
    return round(float(result.stdout.split()[-1]), 1)


@pytest.mark.parametrize("role", ["dafast", "peer"])
def test_sft_step(benchmark, role):
    step = build_step(patched=role == "dafast")
    benchmark.group = f"lora SFT step SmolLM2-135M shapes fp32 {BATCH}x{SEQ}"
    benchmark.extra_info["role"] = role
    benchmark.pedantic(synchronized(step), rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = round(BATCH * SEQ / benchmark.stats.stats.median, 1)
        if not CUDA:
            benchmark.extra_info["peak_rss_MiB"] = peak_rss_mib(patched=role == "dafast")
