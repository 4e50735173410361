"""The streaming merge: mergekit's semantics, sharding, adapters, bad input, atomic output."""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import save_tiny_llama
from dafast.merge import PAPER_T, merge, slerp_merge
from dafast.ops import slerp_reference

transformers = pytest.importorskip("transformers")

PAPER = {"merge_method": "slerp", "parameters": {"t": PAPER_T}, "dtype": "bfloat16"}


def tiny_llama(path: Path, seed: int, layers: int = 5, dtype=torch.bfloat16, **config) -> Path:
    """A random 5-layer Llama saved at `path` (5 layers: the paper's 5-point t gradient)."""
    return save_tiny_llama(path, dtype=dtype, seed=seed, layers=layers, vocab=128, intermediate=96,
                           max_positions=None, **config)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in glob.glob(str(model_dir / "*.safetensors")):
        out.update(load_file(file))
    return out


def paper_t(name: str, layer: int | None, n_layers: int) -> float:
    """The paper's schedule computed by hand, independently of dafast.merge.config."""
    anchors = [0, 0.5, 0.3, 0.7, 1] if "self_attn" in name else [1, 0.5, 0.7, 0.3, 0] if "mlp" in name else None
    if anchors is None:
        return 0.5
    if layer is None:
        return anchors[0]
    x = layer / (n_layers - 1) * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    return anchors[i] + (x - i) * (anchors[i + 1] - anchors[i])


def assert_slerp_of(out: dict, base: dict, other: dict, n_layers: int, dtype=torch.bfloat16):
    assert sorted(out) == sorted(base)
    for name, merged in out.items():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        t = paper_t(name, layer, n_layers)
        expected = slerp_reference(base[name].to(dtype), other[name].to(dtype), t)
        assert merged.dtype == dtype
        torch.testing.assert_close(merged.float(), expected.float(), atol=1e-6, rtol=2 ** -7, msg=name)


def test_paper_config_matches_reference_semantics(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    summary = merge({**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]},
                    tmp_path / "out")
    assert summary["tensors"] == len(tensors(a))
    assert_slerp_of(tensors(tmp_path / "out"), tensors(a), tensors(b), n_layers=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["merge_method"] == "slerp"


def test_base_model_order_and_t0_keeps_base(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.0},
              "models": [{"model": str(b)}, {"model": str(a)}]}  # base listed second
    merge(config, tmp_path / "out")
    out, base = tensors(tmp_path / "out"), tensors(a)
    assert all(torch.equal(out[k], base[k]) for k in base)


@pytest.mark.parametrize("chunk_elements", [1 << 23, 1000, 7])
def test_chunked_streaming_gives_the_same_tensors(tmp_path, chunk_elements):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = {**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    merge(config, tmp_path / "out", chunk_elements=chunk_elements, shard_bytes=60_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert_slerp_of(tensors(tmp_path / "out"), tensors(a), tensors(b), n_layers=5)


def test_sharded_fp32_inputs_and_slices(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0, layers=6, dtype=torch.float32), tiny_llama(tmp_path / "b", 1, layers=6)
    transformers.AutoModelForCausalLM.from_pretrained(a).save_pretrained(tmp_path / "a_sharded", max_shard_size="100KB")
    assert (tmp_path / "a_sharded" / "model.safetensors.index.json").is_file()
    config = {**PAPER, "base_model": str(tmp_path / "a_sharded"), "slices": [{"sources": [
        {"model": str(tmp_path / "a_sharded"), "layer_range": [1, 4]},
        {"model": str(b), "layer_range": [2, 5]}]}]}
    merge(config, tmp_path / "out")
    out, ta, tb = tensors(tmp_path / "out"), tensors(a), tensors(b)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    for layer in range(3):  # output layer i = a's layer 1+i with b's layer 2+i, at i/2
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        t = paper_t(name, layer, 3)
        expected = slerp_reference(ta[name.replace(f".{layer}.", f".{layer + 1}.")].bfloat16(),
                                   tb[name.replace(f".{layer}.", f".{layer + 2}.")], t)
        torch.testing.assert_close(out[name].float(), expected.float(), atol=1e-6, rtol=2 ** -7)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_linear_merge(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 3.0}},
                         {"model": str(b), "parameters": {"weight": 1.0}}]}
    merge(config, tmp_path / "out")
    out, ta, tb = tensors(tmp_path / "out"), tensors(a), tensors(b)
    for k in ta:
        torch.testing.assert_close(out[k], 0.75 * ta[k].float() + 0.25 * tb[k].float())


def test_lora_adapter_stands_for_base_plus_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = tiny_llama(tmp_path / "base", 0, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                      rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6}))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # PEFT initialises B to zero: make the delta real
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().state_dict()
    # t = 1 everywhere: the output is the adapter's model, W + scale * B A.
    merge({"merge_method": "slerp", "base_model": str(base_dir), "dtype": "float32", "parameters": {"t": 1.0},
           "models": [{"model": str(base_dir)}, {"model": f"{base_dir}+{tmp_path / 'adapter'}"}]},
          tmp_path / "out")
    out = tensors(tmp_path / "out")
    for name, value in out.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _bad_input_cases(tmp_path: Path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    ok = {**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(b, d)
        edit(d)
        return {**ok, "models": [{"model": str(a)}, {"model": str(d)}]}

    def drop(d):
        t = load_file(d / "model.safetensors")
        del t["model.layers.2.mlp.up_proj.weight"]
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def add_extra(d):  # a tensor the base model lacks
        t = load_file(d / "model.safetensors")
        t["model.layers.2.mlp.extra.weight"] = torch.ones(3, dtype=torch.bfloat16)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def list_header(d):
        (d / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")

    def reshape(d):
        t = load_file(d / "model.safetensors")
        t["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def to_fp16(d):
        t = {k: v.half() for k, v in load_file(d / "model.safetensors").items()}
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    def corrupt(d):
        f = d / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[10:20] = b"\xff" * 10
        f.write_bytes(bytes(raw))

    def to_pickle(d):
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def missing_shard(d):
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        index = {"weight_map": {k: "model-00002-of-00002.safetensors" for k in load_file(d / "model-00001-of-00002.safetensors")}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    no_dtype = {k: v for k, v in ok.items() if k != "dtype"}
    return [
        (variant("missing", drop), "missing lacks 1 tensor(s) the other model(s) have: model.layers.2.mlp.up_proj.weight"),
        (variant("extra", add_extra), f"{a} lacks 1 tensor(s) the other model(s) have: "
                                      "model.layers.2.mlp.extra.weight"),
        (variant("list_header", list_header), "a JSON object is expected, got list"),
        (variant("shape", reshape), "tensor 'model.norm.weight': shape [65]"),
        ({**no_dtype, "models": variant("fp16", to_fp16)["models"]}, "set `dtype:` in the config"),
        (variant("truncated", truncate), "truncated: tensor"),
        (variant("corrupt", corrupt), "corrupt"),
        (variant("pickle", to_pickle), "pickle checkpoints (pytorch_model.bin)"),
        (variant("shards", missing_shard), "names shard model-00002-of-00002.safetensors, which is missing"),
        ({**ok, "parameters": {"t": [0, 1.5]}}, "outside [0, 1]"),
        ({**ok, "merge_method": "ties"}, "merge_method"),
        ({**ok, "lambda": 0.5}, "lambda: Extra inputs are not permitted"),
        ({**ok, "base_model": str(tmp_path / "nowhere")}, "base_model"),
        ({**ok, "models": [{"model": str(a)}, {"model": str(tmp_path / "nowhere")}]}, "unknown model"),
    ]


def test_bad_input_is_refused_before_writing(tmp_path):
    for i, (config, message) in enumerate(_bad_input_cases(tmp_path)):
        out = tmp_path / f"out{i}"
        with pytest.raises((ValueError, FileNotFoundError)) as excinfo:
            merge(config, out)
        assert message in str(excinfo.value), (message, str(excinfo.value))
        assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary directory left behind


def test_existing_output_needs_overwrite(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = {**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(config, tmp_path / "out")
    assert (tmp_path / "out" / "keep").exists()
    merge(config, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_interrupted_merge_leaves_nothing(tmp_path, monkeypatch):
    import dafast.merge.streaming as merge_module

    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    calls = []
    real_run = merge_module._Executor.run

    def run_then_fail(self, shard, task):
        calls.append(task)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real_run(self, shard, task)

    monkeypatch.setattr(merge_module._Executor, "run", run_then_fail)
    with pytest.raises(KeyboardInterrupt):
        merge({**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_cli(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}))
    run = lambda *args: subprocess.run([sys.executable, "-m", "dafast.merge", *map(str, args)],
                                       capture_output=True, text=True, timeout=300)
    done = run(config, tmp_path / "out", "--shard-size", "100KB")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shards"] > 1
    again = run(config, tmp_path / "out")
    assert again.returncode == 2 and "exists; pass overwrite=True (--overwrite)" in again.stderr


def test_equals_mergekit(tmp_path):
    """Tensor for tensor against mergekit's own output (mergekit is installed in CI)."""
    pytest.importorskip("mergekit")
    mergekit_yaml = shutil.which("mergekit-yaml")
    if mergekit_yaml is None:
        pytest.skip("mergekit-yaml is not on PATH")
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({**PAPER, "base_model": str(a), "slices": [{"sources": [
        {"model": str(a), "layer_range": [0, 5]}, {"model": str(b), "layer_range": [0, 5]}]}]}))
    merge(config, tmp_path / "ours")
    done = subprocess.run([mergekit_yaml, str(config), str(tmp_path / "theirs"), "--lazy-unpickle"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs, ta, tb = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs"), tensors(a), tensors(b)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        o, m = ours[name].float(), theirs[name].float()
        # One bf16 rounding step of the output, plus fp32 noise of the inputs (outputs near 0 are
        # differences of larger numbers).
        step = torch.exp2(torch.floor(torch.log2(torch.maximum(o.abs(), m.abs()).clamp_min(2 ** -126))) - 7)
        noise = 2 ** -20 * torch.maximum(ta[name].float().abs(), tb[name].float().abs())
        assert ((o - m).abs() <= step + noise).all(), name


@pytest.mark.slow
def test_embedded_model_with_a_perturbed_copy(tmp_path):
    """The paper's config on the embedded SmolLM2 and a perturbed copy: transformers loads the
    result and generates with it."""
    pytest.importorskip("gguf")
    from dafast.models import default_model_dir

    try:
        base = default_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    weights = load_file(base / "model.safetensors")
    other = {k: (v + 0.01 * v.std() * torch.randn_like(v)).bfloat16() for k, v in weights.items()}
    (tmp_path / "other").mkdir()
    save_file(other, tmp_path / "other" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", tmp_path / "other")
    slerp_merge(base, tmp_path / "other", tmp_path / "merged", dtype="bfloat16",
                shard_bytes=100 * 10**6)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert_slerp_of(tensors(tmp_path / "merged"), weights, other, n_layers)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is nacre made of?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_merge_on_cuda_matches_cpu(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = {**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    merge(config, tmp_path / "cpu", chunk_elements=1000)
    merge(config, tmp_path / "cuda", device="cuda", chunk_elements=1000)
    cpu, cuda = tensors(tmp_path / "cpu"), tensors(tmp_path / "cuda")
    for name in cpu:
        torch.testing.assert_close(cuda[name].float(), cpu[name].float(), atol=1e-6, rtol=2 ** -7)
