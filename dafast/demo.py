"""The main job until the trainer lands: the paper's SLERP merge on the embedded model.

    python -m dafast.demo [--out out/demo]

Converts the embedded SmolLM2-135M-Instruct once, writes a perturbed copy of it that stands in
for a fine-tuned model, merges the two with the paper's t-schedule on dafast's streaming merge,
and has the instruct and the merged model answer a question of the paper's domain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dafast.merge import slerp_merge
from dafast.models import default_model_dir

QUESTION = "What gives nacre its toughness?"


def perturbed_copy(base: Path, out: Path, scale: float = 0.02, seed: int = 0) -> Path:
    """base + scale * std * noise per tensor, in bf16: a stand-in for a fine-tuned model."""
    if (out / "config.json").is_file():
        return out
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(base / "model.safetensors")
    noisy = {k: (v + scale * v.std() * torch.randn(v.shape, generator=generator)).bfloat16()
             for k, v in weights.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())  # last: marks completion
    return out


def answer(model_dir: Path, question: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dafast.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    args = parser.parse_args(argv)

    base = default_model_dir()
    other = perturbed_copy(base, args.out / "perturbed")
    start = time.perf_counter()
    summary = slerp_merge(base, other, args.out / "merged", overwrite=True)
    print(f"merged {summary['tensors']} tensors ({summary['bytes'] / 1e6:.0f} MB) in "
          f"{time.perf_counter() - start:.1f} s -> {summary['out_dir']}")
    for name, model_dir in (("instruct", base), ("merged", args.out / "merged")):
        print(f"\n[{name}] {QUESTION}\n{answer(model_dir, QUESTION)}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
