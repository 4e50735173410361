"""Write two random bf16 checkpoints of SmolLM-1.7B's shapes (hidden 2048, intermediate 8192,
vocab 49152, 24 layers: 3.4 GB each, ~1 GB shards), for the merge benchmark.

    python bench/make_checkpoints.py OUT_DIR [--layers 24] [--hidden 2048] [--intermediate 8192]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 10**9


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu", "dtype": "bfloat16",
    }


def tensor_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_checkpoint(out: Path, seed: int, layers: int = 24, hidden: int = 2048,
                     intermediate: int = 8192, vocab: int = 49152, heads: int = 32) -> Path:
    """A sharded HF directory with random bf16 weights; skipped if already complete."""
    config = llama_config(layers, hidden, intermediate, vocab, heads)
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config:
        return out
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in tensor_shapes(layers, hidden, intermediate, vocab).items():
        tensor = (0.02 * torch.randn(shape, generator=generator)).bfloat16()
        if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))  # last: marks completion
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    for name, seed in (("a", 0), ("b", 1)):
        print(write_checkpoint(args.out_dir / name, seed, args.layers, args.hidden, args.intermediate, args.vocab))


if __name__ == "__main__":
    main()
