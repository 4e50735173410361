"""Pinned loss curves: 4 fp32 steps of each stage (cpt, sft, dpo, orpo; LoRA and full fine-tuning)
on the tiny Llama of tests/conftest.py, against numbers stored in tests/data/pinned_curves.json.

A silent change of the training math (loss, fused head, LoRA kernel, reference model, optimizer,
data order) moves the per-step loss, the gradient norm or the metrics TRL logs, or the trained
weights. The tolerance absorbs what the thread count changes (OpenMP reduction order), not more.
When a change of the numbers is intended, rewrite the file and say why in the commit:

    DAFAST_PIN_CURVES=write python -m pytest tests/test_pinned_curves.py
"""

import json
import math
import os
from pathlib import Path

import peft
import pytest
import torch
import transformers
import trl
from safetensors.torch import load_file

from dafast.stages import run_stage
from test_train import recipe_for

PINS = Path(__file__).parent / "data" / "pinned_curves.json"
WRITE = os.environ.get("DAFAST_PIN_CURVES") == "write"
REGENERATE = f"DAFAST_PIN_CURVES=write python -m pytest tests/{Path(__file__).name}"
STEPS = 4
RTOL, ATOL = 1e-4, 1e-5
# What each step's record is compared on, where the stage logs it: the loss, its gradient, the
# schedule, the tokens trained on, and the preference metrics of DPO and ORPO. Timings are not.
KEYS = ("loss", "grad_norm", "learning_rate", "num_tokens", "entropy", "mean_token_accuracy",
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
CASES = [f"{kind}-{finetune}" for kind in ("cpt", "sft", "dpo", "orpo")
         for finetune in ("full", "lora")]


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__}


def curve(stage_dir: Path) -> dict[str, list]:
    """{metric: its value at each step} for the KEYS the stage logged."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {k: [r.get(k) for r in steps] for k in KEYS if any(k in r for r in steps)}


def l2(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def weight_sums(stage_dir: Path, start: Path) -> dict:
    """Loose checksums of what training changed: the L2 norm of trained - starting weights, and
    with LoRA the norms of the adapter's A and B (an optimizer or gradient change moves them
    even where the printed loss barely moves)."""
    trained = load_file(stage_dir / "model" / "model.safetensors")
    before = load_file(start / "model.safetensors")
    sums = {"delta_norm": l2(trained[k] - before[k] for k in before)}
    adapter = stage_dir / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        tensors = load_file(adapter)
        for part in ("lora_A", "lora_B"):
            sums[f"{part}_norm"] = l2(t for name, t in tensors.items() if f".{part}." in name)
    return sums


def close(got: float, want: float) -> bool:
    return abs(got - want) <= ATOL + RTOL * abs(want)


def train_case(case: str, tiny_model: Path, tmp_path: Path) -> dict:
    kind, finetune = case.split("-")
    # save_steps past the end: no checkpoints to write, the numbers are the same
    recipe = recipe_for(tmp_path, dtype="float32", save_steps=100,
                        **{kind: dict(max_steps=STEPS, finetune=finetune)})
    assert (recipe.mixed_precision, recipe.eval, recipe.merge) == ("no", None, None)
    assert recipe.stage_finetune(kind) == finetune
    stage_dir = tmp_path / case
    run_stage(kind, recipe, tiny_model, stage_dir)
    return {"curve": curve(stage_dir), "weights": weight_sums(stage_dir, tiny_model)}


def record(case: str, got: dict) -> None:
    pins = json.loads(PINS.read_text()) if PINS.exists() else {}
    pins["versions"] = versions()
    pins["tolerance"] = {"rtol": RTOL, "atol": ATOL}
    pins.setdefault("cases", {})[case] = got
    pins["cases"] = {name: pins["cases"][name] for name in sorted(pins["cases"])}
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(compact_json(pins) + "\n")


def compact_json(value, indent: str = "") -> str:
    """Objects one key a line, lists on one line, numbers to 8 significant digits (the
    tolerance is 1e-4): a small file whose diff shows which numbers moved."""
    if isinstance(value, dict):
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list):
        return "[" + ", ".join(compact_json(v, indent) for v in value) + "]"
    if isinstance(value, float):
        return json.dumps(float(f"{value:.8g}"))
    return json.dumps(value)


def differences(got: dict, want: dict) -> list[str]:
    problems = []
    for key, pinned in want["curve"].items():
        values = got["curve"].get(key)
        if values is None:
            problems.append(f"{key!r} no longer logged (pinned {pinned})")
        elif len(values) != len(pinned):
            problems.append(f"{key}: {len(values)} logged steps, pinned {len(pinned)}")
        else:
            problems += [f"step {step}: {key} = {g!r}, pinned {w!r}"
                         for step, (g, w) in enumerate(zip(values, pinned), start=1)
                         if (g is None) != (w is None) or w is not None and not close(g, w)]
    for key, value in want["weights"].items():
        if key not in got["weights"]:
            problems.append(f"weights: {key} missing (pinned {value!r})")
        elif not close(got["weights"][key], value):
            problems.append(f"weights: {key} = {got['weights'][key]!r}, pinned {value!r}")
    return problems


@pytest.mark.parametrize("case", CASES)
def test_stage_curve_matches_the_pinned_numbers(case, tiny_model, tmp_path):
    got = train_case(case, tiny_model, tmp_path)
    assert len(got["curve"]["loss"]) == STEPS and all(map(math.isfinite, got["curve"]["loss"]))
    if WRITE:
        record(case, got)
        pytest.skip(f"recorded {case} in {PINS}")
    pins = json.loads(PINS.read_text()) if PINS.exists() else {"cases": {}}
    assert case in pins["cases"], f"{PINS} has no numbers for {case}: record them with {REGENERATE}"
    problems = differences(got, pins["cases"][case])
    assert not problems, (
        f"{case}: the training numbers changed against {PINS.name} (tolerance rel {RTOL} + abs "
        f"{ATOL}; pinned with {pins['versions']}, running {versions()}):\n  "
        + "\n  ".join(problems)
        + f"\nIf the change is intended (a fix, new data, new library versions), rewrite the "
          f"file with `{REGENERATE}` and say why in the commit.")


def test_the_comparison_catches_a_changed_loss():
    """The tolerance is tight enough to tell a changed loss from thread-count noise."""
    curve = {"loss": [10.8, 10.7], "grad_norm": [0.2, 0.3]}
    want = {"curve": curve, "weights": {"delta_norm": 1.5}}
    noisy = {"curve": {k: [v * (1 + 2e-6) for v in vs] for k, vs in curve.items()},
             "weights": {"delta_norm": 1.5 * (1 + 1e-6)}}
    assert differences(noisy, want) == []
    moved = {"curve": {**curve, "loss": [10.8, 10.7 * (1 + 1e-3)]}, "weights": want["weights"]}
    assert differences(moved, want) == [f"step 2: loss = {10.7 * (1 + 1e-3)!r}, pinned 10.7"]
    assert differences({"curve": curve, "weights": {"delta_norm": 1.5 * 1.001}}, want)
    assert differences({"curve": {"loss": curve["loss"]}, "weights": want["weights"]}, want) == [
        "'grad_norm' no longer logged (pinned [0.2, 0.3])"]
    assert differences({"curve": {**curve, "loss": [10.8]}, "weights": want["weights"]}, want) == [
        "loss: 1 logged steps, pinned 2"]
