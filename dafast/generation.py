"""Chat generation with a local model: its chat template, sampling, optional JSON by schema.

Shared by ``python -m dafast.serve`` (the local OpenAI-compatible endpoint) and
``python -m dafast.chat``. JSON output is constrained with llguidance (the grammar engine vLLM
and llama.cpp use): at every step only the tokens that keep the answer a prefix of a document
of the schema are allowed, so even a 135M model answers with valid JSON.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

# The paper's sampling for conversations (top-k, top-p 0.9, repetition penalty 1.1); the
# temperature is ours (the paper does not state one).
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}


class SchemaError(ValueError):
    """A JSON schema llguidance cannot compile."""


@dataclasses.dataclass
class Output:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class _SchemaProcessor:
    """A transformers logits processor that masks every token the JSON grammar forbids.
    One per generation (batch size 1): it follows the tokens generated so far."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.started:  # the token chosen at the previous step
            self.matcher.consume_token(int(input_ids[0, -1]))
        self.started = True
        if self.matcher.is_stopped():
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            allowed[self.matcher_eos] = True
        else:
            words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            bits = np.unpackbits(words, bitorder="little")[:scores.shape[-1]]
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            allowed[:bits.shape[0]] = torch.from_numpy(bits.astype(bool))
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


class ChatModel:
    """A causal LM and its tokenizer from a local directory; generate() is thread-safe (one
    generation at a time: a small model on a CPU gains nothing from interleaving)."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model_dir}: the tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.model.eval()
        self._lock = threading.Lock()
        self._lltokenizer = None

    def _matcher(self, schema: dict):
        import llguidance
        import llguidance.hf

        if self._lltokenizer is None:
            self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise SchemaError(f"the JSON schema cannot be compiled: {'; '.join(messages)}")
        return llguidance.LLMatcher(self._lltokenizer, grammar)

    def generate(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, schema: dict | None = None) -> Output:
        from transformers import GenerationConfig, LogitsProcessorList

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        processors = LogitsProcessorList()
        if schema is not None:
            processor = _SchemaProcessor(self._matcher(schema))
            processor.matcher_eos = self.tokenizer.eos_token_id
            processors.append(processor)
        sample = temperature > 0
        # An explicit config, so the model's own generation defaults never leak in.
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=(top_k or 0) if sample else None, repetition_penalty=repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        with self._lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**ids, generation_config=config,
                                      logits_processor=processors)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        stopped = bool(new) and new[-1] == self.tokenizer.eos_token_id
        if schema is not None:  # the grammar's end, not max_tokens, decides
            stopped = processors[0].matcher.is_stopped() or processors[0].matcher.is_accepting()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Output(text, ids["input_ids"].shape[1], len(new), "stop" if stopped else "length")
