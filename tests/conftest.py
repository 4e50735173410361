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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template, tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dafast.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama(dtype=torch.float32, hidden_act="silu"):
    """A random Llama with SmolLM2's layout (GQA, SiLU MLP) at toy sizes, odd where it can be:
    2 layers, hidden 64, intermediate 97, vocabulary 131."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=97, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=131,
                         max_position_embeddings=64, hidden_act=hidden_act)
    return LlamaForCausalLM(config).to(dtype)


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
