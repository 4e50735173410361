"""Recipes: the typed schema of a dafast run, read from YAML with `key=value` overrides.

A recipe names a starting model, the settings of each stage (cpt, sft, dpo, orpo), the pipelines
to train (chains of stages such as "cpt-sft-dpo"), and optionally the SLERP merge with the
instruct model and the benchmark. One pipeline without merge and eval is a plain training run;
the default recipe is the paper's whole strategy matrix. Every field carries its help text, which
`python -m dafast.train --help` prints.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from dafast.teacher import DEFAULT_BASE_URL, TeacherConfig

STAGES = ("cpt", "sft", "dpo", "orpo")
DEFAULT_RECIPE = "default.yaml"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(Settings):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout; 0 keeps the fused kernel "
                           "on (dropout runs PEFT's own layer)")
    target_modules: str | list[str] = Field("all-linear", description="PEFT target_modules")


class StageSettings(Settings):
    data: str = Field("builtin:biomat", description="JSON Lines file in TRL's format for the "
                      "stage, or builtin:NAME for bundled data")
    epochs: float = Field(1.0, gt=0, description="passes over the data")
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: epochs decide)")
    learning_rate: float = Field(1e-4, gt=0, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    # below 1: transformers reads a warmup_steps of 1 or more as a step count
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps warming up")
    batch_size: int = Field(4, ge=1, description="sequences (DPO/ORPO: pairs) per device per step")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimiser step")
    max_length: int = Field(512, ge=8, description="tokens per sequence (CPT: the packed chunk "
                            "length, BOS included)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    finetune: Literal["lora", "full"] | None = Field(None, description="this stage's fine-tuning, "
                                                     "overriding the recipe's `finetune` (e.g. "
                                                     "full CPT, then LoRA SFT); null: the "
                                                     "recipe's")

    def sampling_strategy(self) -> str:
        """transformers' train_sampling_strategy for the stage."""
        return "random"


class CPTSettings(StageSettings):
    variants: int = Field(0, ge=0, description="extra copies of every document, each with its "
                          "paragraphs (or its sentences within each paragraph, see `reorder`) "
                          "in a new seeded order: the same facts in varied contexts, which is "
                          "what makes facts learned from documents answerable as questions")
    reorder: Literal["paragraphs", "sentences"] = Field("paragraphs", description="what a "
                                                        "variant re-orders")
    mix_sft: float = Field(0.0, ge=0, le=1, description="share of the SFT conversations "
                           "(`sft_data`) added to the corpus as text in the chat template")
    sft_data: str = Field("builtin:biomat", description="the conversations `mix_sft` draws from "
                          "(a JSON Lines file or builtin:NAME)")


class SFTSettings(StageSettings):
    group_by_length: bool = Field(True, description="batch conversations of similar length "
                                  "together (transformers' LengthGroupedSampler: random groups "
                                  "of batches, sorted by length within a group): less padding "
                                  "(22% -> 5% of the bundled SFT batches), the same data")

    def sampling_strategy(self) -> str:
        return "group_by_length" if self.group_by_length else "random"


class DPOSettings(StageSettings):
    learning_rate: float = Field(5e-6, gt=0, description="peak learning rate")
    beta: float = Field(0.05, gt=0, description="DPO beta (the paper: 0.05)")
    precompute_ref: bool = Field(False, description="compute the reference log-probs once, "
                                 "before training, instead of in every step")


class ORPOSettings(StageSettings):
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate")
    beta: float = Field(0.1, gt=0, description="ORPO lambda, the weight of the odds-ratio term")


class MergeSettings(Settings):
    t: Any = Field(None, description="SLERP t in mergekit's form (a number, a list over layers, "
                   "or filters); null: the paper's schedule. t=0 keeps the instruct model")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of "
                                                               "the merged weights")
    alternatives: dict[str, Any] = Field({}, description="more t-schedules, NAME: t, each also "
                                         "merged with every trained model (the paper's t sweep); "
                                         "the variants are named MODEL-slerp_NAME")

    @field_validator("alternatives")
    @classmethod
    def _names_are_directory_safe(cls, alternatives: dict[str, Any]) -> dict[str, Any]:
        for name in alternatives:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", name):
                raise ValueError(f"schedule name {name!r}: use letters, digits, '_' and '.'")
        return alternatives


class SweepSettings(Settings):
    cpt_epochs: list[float] = Field([], description="more CPT epoch counts (the paper's 1-5 "
                                    "epoch sweep): every pipeline is also trained from a CPT of "
                                    "each, its nodes named cpt_eN, cpt_eN-sft, ...")

    @field_validator("cpt_epochs")
    @classmethod
    def _positive(cls, epochs: list[float]) -> list[float]:
        if any(e <= 0 for e in epochs):
            raise ValueError(f"epoch counts must be > 0, got {epochs}")
        return epochs


class JudgeSettings(Settings):
    base_url: str = Field(DEFAULT_BASE_URL, description="the judge's OpenAI-compatible "
                          "endpoint; the default is the local server (`python -m dafast.serve` "
                          "on the embedded 135M model: it checks the plumbing, not the science)")
    model: str = Field(TeacherConfig.model, description="the judge's model name at the "
                       "endpoint (e.g. gpt-4o)")
    api_key_env: str | None = Field(None, description="environment variable holding the API "
                                    "key (e.g. OPENAI_API_KEY); null: no key (a local server)")
    cache_dir: str | None = Field(None, description="the judge's answer cache (null: "
                                  "$DAFAST_CACHE/teacher, shared with distillation)")
    max_tokens: int = Field(256, ge=16, description="longest judge answer, in tokens (the "
                            "scores' JSON)")
    concurrency: int = Field(4, ge=1, description="judge requests in flight")
    retries: int = Field(3, ge=0, description="retries of a failed judge request")
    timeout: float = Field(300.0, gt=0, description="seconds per judge request attempt")


class JudgedSettings(Settings):
    conversations: str | None = Field("builtin:biomat", description="open questions every "
                                      "variant answers, judged on depth of reasoning, "
                                      "creativity, clarity and quantitative precision (the "
                                      "paper's Table 3): JSON Lines of {\"id\", \"question\"}, "
                                      "or builtin:NAME; null: not run")
    design: str | None = Field("builtin:biomat", description="concept sets every variant "
                               "combines into an image-generation prompt, judged on fidelity, "
                               "visual specificity, scientific plausibility and originality: "
                               "JSON Lines of {\"id\", \"concepts\": [...]}, or builtin:NAME; "
                               "null: not run")
    max_new_tokens: int = Field(128, ge=1, description="longest answer or prompt a variant "
                                "writes, in tokens")
    temperature: float = Field(0.7, gt=0, le=2, description="the variants' sampling temperature "
                               "(with the paper's top-k 50, top-p 0.9, repetition penalty 1.1)")
    seed: int = Field(0, description="sampling seed (item i is sampled with seed + i, so "
                      "reruns are identical)")
    limit: int | None = Field(None, ge=1, description="only the first N items of each task")
    judge: JudgeSettings = Field(default_factory=JudgeSettings, description="the judge")


class EvalSettings(Settings):
    bench: str = Field("builtin:biomat", description="benchmark JSON Lines (the format of "
                       "docs/design.md, 'Data formats')")
    batch_size: int = Field(16, ge=1, description="questions per batch")
    loglik: bool = Field(True, description="also score each option by log-likelihood")
    cloze: bool = Field(True, description="also the cloze and PMI columns: each option's text "
                        "scored as the answer to the question without the option list")
    primary: Literal["generation", "loglik", "calibrated", "cloze", "pmi"] = Field(
        "cloze", description="the headline column: the report and its plots lead with it")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N questions")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="dtype the models "
                                                          "are evaluated in. auto: bfloat16 on "
                                                          "a GPU and on a CPU with native "
                                                          "bfloat16 arithmetic, float32 "
                                                          "elsewhere")
    judged: JudgedSettings | None = Field(None, description="judged conversations and design "
                                          "prompts for every evaluated variant "
                                          "(dafast.eval.judged); null: off")


# What a model of `models:` may set for itself: how its stages train (the paper's Mistral-Base
# DPO beta of 0.01, a LoRA rank per size). Not the plan's shape or its merges and benchmark,
# which every model shares so that their scores line up strategy by strategy.
PER_MODEL_FIELDS = ("finetune", "lora", "dtype", "mixed_precision", "save_dtype",
                    "activation_checkpointing", "cpt", "sft", "dpo", "orpo")


class ModelEntry(Settings):
    name: str = Field(description="the model's name in node names (NAME/cpt-sft) and the report")
    path: str = Field(description="the instruct model: a local HF directory, or 'default'")
    base_model: str | None = Field(None, description="its base model (the paper's Base rows)")
    overrides: dict[str, Any] = Field({}, description="this model's own settings, as recipe "
                                      "sections: e.g. {lora: {r: 64}, dpo: {beta: 0.01}}; "
                                      f"fields: {', '.join(PER_MODEL_FIELDS)}")

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, entry: Any) -> Any:
        """A bare path or name: the model named by its directory."""
        if isinstance(entry, str):
            return {"name": Path(entry.rstrip("/")).name or entry, "path": entry}
        return entry

    @field_validator("name")
    @classmethod
    def _directory_safe(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' and '-'")
        return name

    @field_validator("overrides")
    @classmethod
    def _stage_settings_only(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        other = [key for key in overrides if key not in PER_MODEL_FIELDS]
        if other:
            raise ValueError(f"{', '.join(other)}: not settable per model (per-model fields: "
                             f"{', '.join(PER_MODEL_FIELDS)})")
        return overrides


class Recipe(Settings):
    model: str | None = Field(None, description="the instruct model: a local HF directory, or "
                              "'default' for the embedded SmolLM2-135M-Instruct; null: the "
                              "default, unless `models` is given")
    models: list[ModelEntry] | None = Field(None, description="several models, each running "
                                            "the whole matrix (nodes NAME/cpt-sft, ...), and "
                                            "the report's scaling section: a list of "
                                            "{name, path, base_model, overrides} or of paths. "
                                            "Instead of `model` and `base_model`")
    base_model: str | None = Field(None, description="a base model to start pipelines from too "
                                   "(the paper's Base rows); merges still use `model`")
    output_dir: str = Field("runs/default", description="where stages, merges and the report go")
    seed: int = Field(42, description="seed of data order, initialisation and dropout")
    finetune: Literal["lora", "full"] = Field("lora", description="LoRA adapters (merged into "
                                              "the weights after each stage) or full fine-tuning")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="training dtype "
                                                          "(auto: float32 on CPU, bfloat16 on GPU)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="bf16: float32 "
                                                            "weights and optimizer state, the "
                                                            "forward and backward in bfloat16 "
                                                            "under autocast (accelerate's mixed "
                                                            "precision). auto: bf16 for the "
                                                            "stages that train every weight in "
                                                            "float32 on a CPU with native "
                                                            "bfloat16 arithmetic (AVX512-BF16 "
                                                            "or AMX), where their matmuls run "
                                                            "faster in bf16; no elsewhere (LoRA "
                                                            "stages: dafast's LoRA CPU kernel "
                                                            "multiplies in fp32 whatever its "
                                                            "input)")
    activation_checkpointing: bool = Field(False, description="recompute each layer's activations "
                                         "in backward instead of keeping them: much less "
                                         "activation memory (large models, long sequences) for "
                                         "about a third more compute. Off by default, unlike "
                                         "TRL: dafast's LoRA, MLP and head kernels already keep "
                                         "little")
    cpu_allocator: Literal["caching", "system"] = Field("caching", description="CPU memory "
                                                         "while training: dafast's caching "
                                                         "allocator for tensors of 1 MiB or more "
                                                         "(dafast.memory: peak RSS follows what "
                                                         "the tensors hold), or torch's own")
    save_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="dtype of "
                                                               "the stage models written to "
                                                               "disk (auto: the training dtype); "
                                                               "bfloat16 halves their size, and "
                                                               "the next stage trains on the "
                                                               "rounded weights")
    kernels: Literal["auto", "native", "reference"] = Field("auto", description="dafast "
                                                             "kernels, or the PyTorch references")
    pipelines: list[str] = Field(["cpt", "cpt-sft", "cpt-sft-dpo", "cpt-sft-orpo"],
                                 description="stage chains to train, stages joined by '-'")
    cpt: CPTSettings = Field(default_factory=CPTSettings,
                               description="continued pretraining on raw text")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="supervised fine-tuning")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="DPO")
    orpo: ORPOSettings = Field(default_factory=ORPOSettings, description="ORPO")
    merge: MergeSettings | None = Field(default_factory=MergeSettings, description="SLERP-merge "
                                        "every trained model with `model` (null: no merges)")
    sweep: SweepSettings = Field(default_factory=SweepSettings, description="extra variants "
                                 "for the paper's sweeps")
    eval: EvalSettings | None = Field(default_factory=EvalSettings, description="benchmark every "
                                      "model and write the report (null: no evaluation)")
    logging_steps: int = Field(1, ge=1, description="log metrics every N steps")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (runs resume from it)")
    tensorboard: bool = Field(False, description="also log to TensorBoard (needs tensorboard)")

    @field_validator("pipelines", mode="before")
    @classmethod
    def _one_pipeline(cls, pipelines: Any) -> Any:
        return [pipelines] if isinstance(pipelines, str) else pipelines  # pipelines=cpt-sft

    @field_validator("pipelines")
    @classmethod
    def _known_stages(cls, pipelines: list[str]) -> list[str]:
        if not pipelines:
            raise ValueError("no pipelines: name at least one stage chain, e.g. [cpt-sft]")
        for pipeline in pipelines:
            for stage in pipeline.split("-"):
                if stage not in STAGES:
                    raise ValueError(f"pipeline {pipeline!r}: unknown stage {stage!r} "
                                     f"(stages: {', '.join(STAGES)})")
        return pipelines

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[ModelEntry] | None) -> list[ModelEntry] | None:
        if models is not None:
            if not models:
                raise ValueError("no models: list at least one, or use `model`")
            names = [m.name for m in models]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"model name(s) {', '.join(twice)} given twice: name each "
                                 "model of `models` differently")
        return models

    @model_validator(mode="after")
    def _one_model_field(self) -> Recipe:
        if self.models is not None:
            both = [f for f in ("model", "base_model") if getattr(self, f) is not None]
            if both:
                raise ValueError(f"both `models` and `{'` and `'.join(both)}` are given: list "
                                 "each model (and its base_model) under `models` and set "
                                 f"{' and '.join(f'`{f}: null`' for f in both)} (the bundled "
                                 "recipes set `model: default`), or give one `model`")
            self.model_recipes()  # each model's overrides valid before any work starts
        return self

    def model_recipes(self) -> dict[str, Recipe]:
        """Model name -> the one-model recipe that model runs: `model` and `base_model` from its
        entry, its overrides applied. A one-model recipe: {"": itself}."""
        if self.models is None:
            return {"": self}
        recipes = {}
        for i, entry in enumerate(self.models):
            data = self.model_dump(exclude={"models"})
            data.update(model=entry.path, base_model=entry.base_model)
            for section, value in entry.overrides.items():  # a section: only the fields given
                current = data.get(section)
                both = isinstance(current, dict) and isinstance(value, dict)
                data[section] = {**current, **value} if both else value
            try:
                recipes[entry.name] = Recipe.model_validate(data)
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                     for err in e.errors())
                raise RecipeError(f"models[{i}] ({entry.name}).overrides: {problems}") from None
        return recipes

    def stage(self, kind: str) -> StageSettings:
        return getattr(self, kind)

    def stage_finetune(self, kind: str) -> str:
        """How stage `kind` fine-tunes: its own `finetune`, else the recipe's."""
        return self.stage(kind).finetune or self.finetune

    def training_dtype(self) -> str:
        """`dtype` resolved: auto is bfloat16 where there is a GPU, float32 on the CPU."""
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"

    def autocast_bf16(self, kind: str) -> bool:
        """`mixed_precision` resolved for stage `kind`: whether it trains under bf16 autocast."""
        if self.mixed_precision != "auto":
            return self.mixed_precision == "bf16"
        import torch

        from dafast._native import cpu_has_native_bf16

        return (self.stage_finetune(kind) == "full" and self.training_dtype() == "float32"
                and not torch.cuda.is_available() and cpu_has_native_bf16())

    def saved_dtype(self) -> str:
        """`save_dtype` resolved: auto keeps the training dtype."""
        return self.training_dtype() if self.save_dtype == "auto" else self.save_dtype


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and the fields."""


def builtin_recipe(name: str = DEFAULT_RECIPE) -> Path:
    return Path(str(resources.files("dafast") / "recipes" / name))


def apply_override(data: dict, assignment: str) -> None:
    """`a.b=value` sets data["a"]["b"]; the value is read as YAML (numbers, lists, null)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {assignment!r} is not key=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value)


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe (None: the bundled default), apply overrides, validate. An invalid field
    is blamed on the override that set it, else on the file."""
    source = Path(path) if path is not None else builtin_recipe()
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"{source}: cannot read the recipe: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    by_key = {}
    for assignment in overrides:
        apply_override(data, assignment)
        by_key[tuple(assignment.partition("=")[0].strip().split("."))] = assignment
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(map(str, err["loc"]))
            # the longest override that set this field or a section above it
            setter = next((by_key[k] for k in sorted(by_key, key=len, reverse=True)
                           if loc[:len(k)] == k), None)
            where = f"override {setter!r}" if setter else str(source)
            problems.append(f"  {'.'.join(loc) or '(recipe)'}: {err['msg']} (from {where})")
        origin = "the command-line overrides" if all("(from override" in p for p in problems) \
            else str(source)
        raise RecipeError(f"{origin}: invalid recipe\n" + "\n".join(problems)) from None


def describe(model: type[BaseModel] = Recipe, prefix: str = "",
             values: BaseModel | None = None) -> list[str]:
    """One line per field, `key (value): help`, nested sections indented by their dotted key.
    The values are those of `values` (a recipe: what a run would use), else the schema's
    defaults."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = next((t for t in getattr(annotation, "__args__", (annotation,))
                       if isinstance(t, type) and issubclass(t, BaseModel)), None)
        value = (getattr(values, name) if values is not None
                 else field.get_default(call_default_factory=True))
        if nested is not None:  # a null section: its fields, were it set, at the schema's defaults
            off = " (null: off)" if value is None else ""
            lines.append(f"  {prefix}{name}{off}: {field.description}")
            lines.extend(describe(nested, f"{prefix}{name}.",
                                  value if isinstance(value, BaseModel) else None))
            continue
        lines.append(f"  {prefix}{name} ({value!r}): {field.description}")
    return lines
