import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")

# Every kernel test runs on each device; CUDA cases are skipped, with the reason, where there is no GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(dtype=torch.float32, *, hidden=64, intermediate=97, layers=2, heads=4, kv_heads=2,
               vocab=131, tokenizer=None, tied=False, act="silu", max_positions=64, seed=None,
               **config):
    """The tests' one random Llama factory. The defaults are SmolLM2's layout (GQA, SiLU MLP) at
    toy sizes, odd where they can be: 2 layers, hidden 64, intermediate 97, vocabulary 131.
    `tokenizer`: take its vocabulary size and BOS/EOS/pad ids (instead of `vocab`);
    `max_positions` None: LlamaConfig's default; `seed`: seed torch first (else the weights
    follow the caller's RNG state); `config`: more LlamaConfig fields. Initialised in fp32, then
    cast to `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is not None:
        vocab = len(tokenizer)
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if max_positions is not None:
        config["max_position_embeddings"] = max_positions
    if seed is not None:
        torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, tie_word_embeddings=tied, hidden_act=act,
                         **config)
    return LlamaForCausalLM(config).to(dtype)


def save_tiny_llama(path, tokenizer=None, **kwargs):
    """tiny_llama(tokenizer=tokenizer, **kwargs) saved as an HF directory at `path` (with the
    tokenizer, if given); returns the path."""
    tiny_llama(tokenizer=tokenizer, **kwargs).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_smollm_tiny(path):
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template, tied embeddings,
    seeded: the tiny model the trainer tests train, saved at `path`."""
    from transformers import AutoTokenizer

    from dafast.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    return save_tiny_llama(path, tokenizer, hidden=32, intermediate=64, tied=True,
                           max_positions=None, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """save_smollm_tiny's model directory, shared by the session."""
    return save_smollm_tiny(tmp_path_factory.mktemp("tiny") / "model")


def lora_model(dtype=torch.float32, base=None, **lora_kwargs):
    """tiny_llama (or `base`) with PEFT LoRA r8 on every linear layer, B nonzero."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **lora_kwargs)
    model = peft.get_peft_model(tiny_llama(dtype) if base is None else base, config)
    with torch.no_grad():  # PEFT starts B at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    """Base URL of `python -m dafast.serve` on the tiny random model (fast, nonsense answers)."""
    from served import MISSING, serving

    if MISSING:
        pytest.skip(f"the local server needs {', '.join(MISSING)} (pip install -e '.[serve]')")
    with serving(tiny_model) as url:
        yield url
