"""GPU benchmarks that bench/'s pytest files do not cover, each against its peers in one run:

- gemm: the measured bf16 GEMM peak (8192^3), the denominator of every MFU below;
- slerp: dafast's kernel on one Llama-3.1-8B MLP weight pair (14336 x 4096 bf16) against
  mergekit's slerp (when installed) and the device's copy bandwidth;
- train: one LoRA (r 16, every linear layer) SFT step and one DPO step on a random-weight
  Llama-3.1-8B-shaped model, 4 x 2048 tokens, bf16: dafast (LoRA and SwiGLU patches, fused
  losses) against PEFT with transformers' loss on full logits (what TRL's trainers call without
  a fused head; TRL itself is not needed). Tokens/s, peak GPU memory, MFU.

    python bench/gpu/steps.py OUT.csv [--dry-run]

MFU counts the linear layers' FLOPs only (attention excluded): per token 4P for a LoRA step
(forward, then dX but no dW), 6P for DPO (plus the reference forward), P the linear weights.
--dry-run: tiny shapes on the CPU, the same code (bench/gpu/run.sh --dry-run, CI).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import Figures, write_csv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mib(fn) -> float | None:
    """Peak allocated memory above what was allocated before one call (GPU only)."""
    if DEVICE != "cuda":
        fn()
        return None
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def gemm_peak(fig: Figures, dry: bool) -> float:
    n, dtype = (256, torch.float32) if dry else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, rounds=3 if dry else 10, warmup=2)
    flops = 2 * n ** 3 / seconds
    fig.add("matmul", f"{n}x{n}x{n} {str(dtype)[6:]}", "torch", "flops", flops, "FLOP/s")
    return flops


def slerp_bench(fig: Figures, dry: bool) -> None:
    from dafast.ops import slerp

    shape, dtype = ((64, 256), torch.float32) if dry else ((14336, 4096), torch.bfloat16)
    a, b = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    nbytes = a.numel() * a.element_size()
    label, rounds = f"{shape[0]}x{shape[1]} {str(dtype)[6:]}", 3 if dry else 20
    copy_s = median_seconds(lambda: out.copy_(a), rounds)
    fig.add("slerp t=0.3", label, "copy", "bandwidth", 2 * nbytes / copy_s, "B/s")
    ours = median_seconds(lambda: slerp(a, b, 0.3, out=out), rounds)
    fig.add("slerp t=0.3", label, "dafast", "median", ours, "s")
    # A SLERP must read a and b and write the result: 3 tensors at the copy's bandwidth at best.
    fig.add("slerp t=0.3", label, "dafast", "of_copy_bandwidth", 3 * nbytes / ours / (2 * nbytes / copy_s), "")
    try:
        from mergekit.merge_methods.slerp import slerp as mergekit_slerp
    except ImportError:
        fig.add("slerp t=0.3", label, "mergekit", "median", "absent", "")
        return
    t = torch.tensor([0.3], device=DEVICE)
    theirs = median_seconds(lambda: mergekit_slerp(t, a[None], b[None]), rounds)
    fig.add("slerp t=0.3", label, "mergekit", "median", theirs, "s")


def llama_config(dry: bool):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                           max_position_embeddings=128)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def lora_model(dry: bool):
    """A random-weight Llama with PEFT LoRA r16 on every linear layer (fp32 adapters, PEFT's
    default on a bf16 base), B random so that every adapter has a gradient."""
    import peft
    from transformers import LlamaForCausalLM

    dtype = torch.float32 if dry else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):  # built on the device: no 16 GB host copy
            base = LlamaForCausalLM(llama_config(dry))
    finally:
        torch.set_default_dtype(previous)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32,
                                                      target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def linear_params(model) -> int:
    """The frozen linear weights (decoder projections and the head): the embedding is a gather."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and not p.requires_grad and "embed_tokens" not in name)


def train_bench(fig: Figures, dry: bool, peak_flops: float) -> None:
    import dafast.lora
    import dafast.mlp
    from dafast import losses

    batch, seq = (2, 32) if dry else (4, 2048)
    model = lora_model(dry)
    llama = model.base_model.model
    head = llama.lm_head.weight
    params = linear_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = llama.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    labels = ids.clone()
    labels[batch // 2:, : seq // 4] = -100  # DPO: the prompt of each pair is not scored
    shape = f"{batch}x{seq} {llama.config.num_hidden_layers}L H{llama.config.hidden_size} V{vocab}"

    def unfused_logps(logits, lab):  # transformers' / TRL's path: full logits, fp32 log_softmax
        lab = lab[:, 1:]
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])
        return (logp[..., 0] * (lab != -100)).sum(-1)

    def sft(role):
        if role == "dafast":
            hidden = llama.model(input_ids=ids).last_hidden_state
            loss = losses.causal_lm_loss(hidden, head, ids)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def dpo(role):
        with torch.no_grad(), model.disable_adapter():
            if role == "dafast":
                ref = losses.sequence_logps(llama.model(input_ids=ids).last_hidden_state, head, labels)
            else:
                ref = unfused_logps(model(input_ids=ids).logits, labels)
        if role == "dafast":
            hidden = llama.model(input_ids=ids).last_hidden_state
            loss, _ = losses.dpo_loss(hidden, head, labels, *ref.chunk(2))
        else:
            chosen, rejected = unfused_logps(model(input_ids=ids).logits, labels).chunk(2)
            loss, _ = losses.dpo_loss_from_logps(chosen, rejected, *ref.chunk(2))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rounds = 1 if dry else 3
    for role in ("peft", "dafast"):
        if role == "dafast":  # the same model, its layers now on dafast's kernels
            dafast.lora.patch(model)
            dafast.mlp.patch(model)
        for case, step, flops_per_token in (("lora sft step", sft, 4), ("lora dpo step", dpo, 6)):
            seconds = median_seconds(lambda: step(role), rounds)
            tokens = batch * seq
            fig.add(case, shape, role, "median", seconds, "s")
            fig.add(case, shape, role, "tokens_per_s", tokens / seconds, "token/s")
            fig.add(case, shape, role, "mfu", flops_per_token * params * tokens / seconds / peak_flops, "")
            peak = peak_mib(lambda: step(role))
            if peak is not None:
                fig.add(case, shape, role, "peak_alloc", peak, "MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="CSV file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
    parser.add_argument("--only", choices=["gemm", "slerp", "train"], action="append")
    args = parser.parse_args()
    if not args.dry_run and DEVICE != "cuda":
        sys.exit("steps.py: no CUDA device (use --dry-run on the CPU)")
    torch.manual_seed(0)
    fig = Figures("gpu-steps")
    only = set(args.only or ["gemm", "slerp", "train"])
    peak = gemm_peak(fig, args.dry_run)  # always: MFU needs it
    if "slerp" in only:
        slerp_bench(fig, args.dry_run)
    if "train" in only:
        train_bench(fig, args.dry_run, peak)
    write_csv(args.out, fig.rows)
    print(f"steps.py: {len(fig.rows)} figures -> {args.out}")


if __name__ == "__main__":
    main()
