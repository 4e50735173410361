"""python -m dafast.chat: one-shot and the interactive loop, on the tiny model."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from dafast import chat
from dafast.generation import CHAT_SAMPLING, ChatModel

ROOT = Path(__file__).parents[1]


def test_one_shot_greedy_answer_is_the_models_own(tiny_model, capsys):
    assert chat.main([str(tiny_model), "--prompt", "What is silk?", "--greedy",
                      "--max-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip()
    expected = ChatModel(tiny_model).generate([{"role": "user", "content": "What is silk?"}],
                                              max_tokens=6)
    assert printed == expected.text.strip() and expected.completion_tokens == 6


def test_the_paper_sampling_is_the_default():
    assert CHAT_SAMPLING["top_p"] == 0.9 and CHAT_SAMPLING["repetition_penalty"] == 1.1
    assert CHAT_SAMPLING["top_k"] > 0 and CHAT_SAMPLING["temperature"] > 0


def test_interactive_loop_keeps_the_conversation(tiny_model, monkeypatch, capsys):
    seen = []
    original = ChatModel.generate

    def recording(self, messages, **kwargs):
        seen.append([m["role"] for m in messages])
        return original(self, messages, **kwargs)

    monkeypatch.setattr(ChatModel, "generate", recording)  # our own class: counts the turns
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand more\n/reset\nagain\n"))
    assert chat.main([str(tiny_model), "--max-tokens", "3", "--seed", "1"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]
    assert len(capsys.readouterr().out.strip().splitlines()) >= 1


def test_bad_model_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dafast.chat", str(tmp_path / "none"),
                             "--prompt", "x"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown model" in result.stderr
