"""The merge under faults: killed mid-write (its staging directory is cleaned by the next merge,
a live one's is not), the output's permissions, NaN inputs, errors as `error:` lines."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dafast.merge import merge
from dafast.merge.staging import OWNER, Staging
from test_merge import PAPER, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _config(a, b):
    return {**PAPER, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}


def test_a_killed_merge_leaves_nothing_after_the_next_merge(tmp_path):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = tmp_path / "merge.yml"
    import yaml

    config.write_text(yaml.safe_dump(_config(a, b)))
    out = tmp_path / "out"
    # A merge killed (-9) while it writes: tiny chunks and fsync keep it busy long enough.
    proc = subprocess.Popen([sys.executable, "-m", "dafast.merge", str(config), str(out),
                             "--chunk-elements", "64", "--fsync"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*/*.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()

    with Staging(tmp_path / "out") as live:  # a live merge's staging directory is kept
        old_umask = os.umask(0o027)
        try:
            merge(_config(a, b), out)
        finally:
            os.umask(old_umask)
        assert list(tmp_path.glob(".out.tmp-*")) == [live.path]
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the umask's, not mkdtemp's 0700
    assert not (out / OWNER).exists()
    assert set(load_file(out / "model.safetensors")) == set(load_file(a / "model.safetensors"))


def test_nan_inputs_are_refused_unless_allowed(tmp_path, capsys):
    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    weights = load_file(b / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 merged tensor.*model.layers.1.self_attn.q_proj.weight"):
        merge(_config(a, b), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    summary = merge(_config(a, b), tmp_path / "out", allow_nonfinite=True)
    assert summary["nonfinite"] == ["model.layers.1.self_attn.q_proj.weight"]
    assert load_file(tmp_path / "out" / "model.safetensors")[
        "model.layers.1.self_attn.q_proj.weight"].isnan().all()  # the kernel's NaN policy

    from dafast.merge.cli import main

    import yaml

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_config(a, b)))
    assert main([str(config), str(tmp_path / "out2")]) == 2
    assert "error: 1 merged tensor(s) came out with NaN" in capsys.readouterr().err
    assert main([str(config), str(tmp_path / "out2"), "--allow-nonfinite"]) == 0


def test_cli_reports_os_errors_as_an_error_line(tmp_path, capsys):
    import yaml

    from dafast.merge.cli import main

    a, b = tiny_llama(tmp_path / "a", 0), tiny_llama(tmp_path / "b", 1)
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(_config(a, b)))
    (tmp_path / "file").write_text("not a directory")
    assert main([str(config), str(tmp_path / "file" / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    (b / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b'"x" ')
    assert main([str(config), str(tmp_path / "out")]) == 2
    assert "a JSON object is expected, got str" in capsys.readouterr().err
