"""One optimisation step of the SFT and DPO stages: dafast against plain TRL + PEFT, same run.

    pytest bench/test_train.py --benchmark-autosave && python bench/compare.py

Both roles train SmolLM2-135M-Instruct (the embedded model) with the same TrainingArguments,
LoRA r16 on every linear layer, fp32 weights (under bf16 autocast where the recipe's
mixed_precision auto picks it; DAFAST_BENCH_PRECISION=no|bf16 sets it), a batch of 4 sequences x
512 tokens (DPO:
4 pairs of prompt + completion = 512 tokens each); DAFAST_BENCH_BATCH / DAFAST_BENCH_SEQ change
it; DAFAST_BENCH_CHECKPOINTING=1 runs both roles with activation checkpointing (TRL's default,
off in dafast's recipes). "peer" is TRL 1.16's trainer as it ships (its own chunked fused LM
head and loss, PEFT's LoRA layers); "dafast" is the stage's trainer as dafast.stages builds it
(dafast.trainers: the loss on hidden states through dafast's linear_logprobs; the LoRA layers and
SwiGLU MLPs on dafast's kernels) and, as the stages do, dafast's caching CPU allocator on
(dafast.memory; its peak RSS with torch's allocator is reported too).
A step is TRL's training_step (forward, loss, backward; for DPO also the reference forward with
the adapter disabled) plus the AdamW update. extra_info: tokens/s (median) and the peak RSS of a
separate process that builds the trainer and takes one step, absolute and above the RSS with the
model loaded.
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dafast
import dafast.memory
from dafast import data
from dafast.recipe import Recipe
from dafast.stages import STAGES, build
from peak_rss import PEAK_MIB_CODE

BATCH = int(os.environ.get("DAFAST_BENCH_BATCH", "4"))
SEQ = int(os.environ.get("DAFAST_BENCH_SEQ", "512"))
CHECKPOINTING = os.environ.get("DAFAST_BENCH_CHECKPOINTING", "0") == "1"
# The recipe's mixed_precision for both roles (auto: bf16 autocast on a CPU with native bf16).
PRECISION = os.environ.get("DAFAST_BENCH_PRECISION", "auto")


def precision_label(mixed_precision: str = PRECISION, finetune: str = "lora") -> str:
    recipe = Recipe(mixed_precision=mixed_precision, finetune=finetune)
    return "bf16-mixed" if recipe.autocast_bf16("sft") else "fp32"


def corpus_tokens(tokenizer, count: int) -> list[list[int]]:
    """`count` chunks of SEQ - 1 corpus tokens (the bundled CPT text, so real token statistics)."""
    texts = [row["text"] for row in data.load_rows("builtin:biomat", "cpt")]
    chunks = data.pack_corpus(texts, tokenizer, SEQ)
    return [chunk[1:] for chunk in chunks[:count]]


def build_dataset(kind: str, tokenizer):
    from datasets import Dataset

    if kind == "sft":
        rows = [[tokenizer.bos_token_id] + ids for ids in corpus_tokens(tokenizer, BATCH)]
        return Dataset.from_dict({"input_ids": rows, "labels": rows})
    prompt_len = SEQ // 4
    rows = []
    for i, ids in enumerate(corpus_tokens(tokenizer, 2 * BATCH)[::2]):
        other = corpus_tokens(tokenizer, 2 * BATCH)[2 * i + 1]
        rows.append({"prompt": tokenizer.decode(ids[:prompt_len]),
                     "chosen": tokenizer.decode(ids[prompt_len:SEQ - 8]),
                     "rejected": tokenizer.decode(other[prompt_len:SEQ - 8])})
    return Dataset.from_list(rows)


def build_step(kind: str, role: str, caching_allocator: bool | None = None,
               finetune: str = "lora", mixed_precision: str = PRECISION):
    """The trainer's step function and the number of tokens a step processes. The dafast role
    builds the stage's trainer as dafast.stages does (the model on dafast's kernels, the loss on
    hidden states) and turns dafast's caching CPU allocator on, as the stages do (process-wide,
    until dafast.memory.disable(); caching_allocator=False leaves it off). The peer is TRL's own
    trainer with PEFT's LoRA on the same model and arguments. finetune="full" trains every
    weight instead of LoRA adapters (the default recipe's CPT)."""
    from dafast.models import default_model_dir

    settings = dict(batch_size=BATCH, max_length=SEQ, max_steps=10)
    recipe = Recipe(dtype="float32", mixed_precision=mixed_precision, lora=dict(r=16, alpha=32),
                    finetune=finetune,
                    activation_checkpointing=CHECKPOINTING, **{kind: settings})
    arguments = build.trainer_arguments(recipe, kind, Path("/tmp/dafast-bench-train"))
    if role == "dafast":
        model, tokenizer = build.training_model(recipe, kind, default_model_dir())
        trainer = STAGES[kind].build_trainer(
            model=model, tokenizer=tokenizer, dataset=build_dataset(kind, tokenizer),
            settings=recipe.stage(kind), arguments=arguments, callbacks=[])
    else:
        trainer = peer_trainer(kind, recipe, arguments)
        tokenizer = trainer.processing_class
    if trainer.args.activation_checkpointing:  # as Trainer.train does
        trainer.model.activation_checkpointing_enable(trainer.args.activation_checkpointing_kwargs)
    if caching_allocator is None:
        caching_allocator = role == "dafast"
    if caching_allocator:
        dafast.memory.enable()  # as run_stage does, once the trainer is built
    trainer.model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(sum(v.ne(tokenizer.pad_token_id).sum() for k, v in batch.items()
                     if k.endswith("input_ids")))

    def step():
        # Trainer.train runs the forward under accelerate's autocast (mixed precision); so here.
        with trainer.accelerator.autocast():
            loss = trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, tokens


def peer_trainer(kind: str, recipe: Recipe, arguments: dict):
    """TRL's SFT or DPO trainer as it ships (its own chunked fused LM head and loss), PEFT's LoRA
    layers (from the recipe's LoRA settings)."""
    import trl
    from peft import LoraConfig

    from dafast.models import default_model_dir, load_model

    model, tokenizer = load_model(default_model_dir(), dtype=torch.float32)
    lora = recipe.lora
    peft_config = (LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules, task_type="CAUSAL_LM")
                   if recipe.stage_finetune(kind) == "lora" else None)
    settings = recipe.stage(kind)
    if kind == "sft":
        config = trl.SFTConfig(**arguments, max_length=SEQ, packing=False, dataset_num_proc=None)
        trainer_cls = trl.SFTTrainer
    else:
        config = trl.DPOConfig(**arguments, beta=settings.beta, loss_type=["sigmoid"],
                               max_length=SEQ, dataset_num_proc=None)
        trainer_cls = trl.DPOTrainer
    return trainer_cls(model=model, args=config, train_dataset=build_dataset(kind, tokenizer),
                       processing_class=tokenizer, peft_config=peft_config)


def peak_rss_mib(kind: str, role: str, caching_allocator: bool | None = None,
                 finetune: str = "lora", mixed_precision: str = PRECISION) -> tuple[float, float]:
    """(peak RSS, peak minus the RSS once the trainer is built) of a fresh process, MiB."""
    code = (PEAK_MIB_CODE + "import sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_train import build_step\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
            f"step, _ = build_step({kind!r}, {role!r}, {caching_allocator!r}, {finetune!r}, "
            f"{mixed_precision!r})\n"
            "built = rss()\nstep()\n"
            "peak = peak_mib()\n"
            "print(peak, peak - built)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    peak, above = map(float, result.stdout.split()[-2:])
    return round(peak, 1), round(above, 1)


@pytest.mark.parametrize("role", ["dafast", "peer"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_stage_step(benchmark, kind, role):
    step, tokens = build_step(kind, role)
    benchmark.group = f"{kind} step SmolLM2-135M LoRA r16 {precision_label()} {BATCH}x{SEQ}"
    benchmark.extra_info["role"] = role
    losses = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    allocator = dafast.memory.stats()
    dafast.memory.disable()
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
        if role == "dafast" and allocator:
            benchmark.extra_info["allocator_hit_rate"] = round(
                allocator["hits"] / max(1, allocator["hits"] + allocator["misses"]), 3)
        if not torch.cuda.is_available():
            peak, above = peak_rss_mib(kind, role)
            benchmark.extra_info["peak_rss_MiB"] = peak
            benchmark.extra_info["step_rss_MiB"] = above
            if role == "dafast":
                peak, _ = peak_rss_mib(kind, role, caching_allocator=False)
                benchmark.extra_info["peak_rss_MiB_system_allocator"] = peak
    assert losses == losses  # a finite loss, not NaN


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_cpt_step_full_finetuning_vs_lora(benchmark, finetune, mixed_precision):
    """The CPT step (packed corpus chunks) with every weight trained, as the default recipe's
    CPT does, against the LoRA step it replaced, in fp32 and under bf16 autocast: the price of
    full fine-tuning per step, and what bf16 matmuls buy back."""
    if mixed_precision == "bf16" and torch.cuda.is_available():
        pytest.skip("GPUs train bf16 weights (dtype auto), not fp32 under autocast")
    step, tokens = build_step("sft", "dafast", finetune=finetune, mixed_precision=mixed_precision)
    benchmark.group = f"cpt step SmolLM2-135M full vs LoRA r16, fp32 vs bf16-mixed {BATCH}x{SEQ}"
    benchmark.extra_info["finetune"] = finetune
    benchmark.extra_info["precision"] = precision_label(mixed_precision, finetune)
    losses = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    dafast.memory.disable()
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
        if not torch.cuda.is_available():
            peak, above = peak_rss_mib("sft", "dafast", finetune=finetune,
                                       mixed_precision=mixed_precision)
            benchmark.extra_info["peak_rss_MiB"] = peak
            benchmark.extra_info["step_rss_MiB"] = above
    assert losses == losses


def test_sft_step_interleaved(benchmark):
    """The SFT step of both roles in one process, taking turns, the ratio read per round.

    On this shared machine a step's time drifts by up to 1.5x within minutes, and the peer
    (bigger, more memory traffic) drifts more than dafast, so the ratio of two groups measured
    minutes apart ranged 1.3x to 2.2x between runs. Taking turns puts both under the same
    conditions; extra_info's ratio is the median of peer time / dafast time over the rounds.
    (SFT only: DPO's two trainers together would need about 22 GB.)"""
    # The caching allocator stays off: it is process-wide and the peer would share it.
    ours, tokens = build_step("sft", "dafast", caching_allocator=False)
    peer, _ = build_step("sft", "peer")
    peer_times = []

    def peer_turn():  # pedantic's untimed setup: the peer's step, timed here
        start = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - start)

    benchmark.group = f"sft step, turns, SmolLM2-135M LoRA r16 {precision_label()} {BATCH}x{SEQ}"
    benchmark.extra_info["role"] = "dafast"
    benchmark.pedantic(ours, setup=peer_turn, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:
        peer_times = peer_times[1:]  # the first turn ran before the warm-up round
        ratios = [p / d for p, d in zip(peer_times, benchmark.stats.stats.data)]
        benchmark.extra_info["peer_median_s"] = round(statistics.median(peer_times), 3)
        benchmark.extra_info["ratio_median"] = round(statistics.median(ratios), 3)
        benchmark.extra_info["ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
        benchmark.extra_info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
        benchmark.extra_info["peer_tokens_per_s"] = round(tokens / statistics.median(peer_times), 1)
