"""Start `python -m dafast.serve` on 127.0.0.1 for a test, wait until it answers, stop it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_PACKAGES = ("fastapi", "uvicorn", "llguidance", "openai")
MISSING = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
requires_server = pytest.mark.skipif(
    bool(MISSING), reason=f"the local server needs {', '.join(MISSING)} "
                          "(pip install -e '.[serve]')")
ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: str | os.PathLike, *, timeout: float = 600.0, name: str = "local"):
    """The base URL of a server on `model`; the server is stopped on exit. The timeout is
    generous: on a shared 2-core machine importing torch and transformers alone can take
    minutes."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(os.devnull, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dafast.serve", str(model), "--port", str(port), "--name", name],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dafast.serve exited with {process.returncode}: "
                                   f"{process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dafast.serve on {model} not ready after {timeout:g} s")
            time.sleep(0.25)
        yield f"{base}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()
        log.close()
