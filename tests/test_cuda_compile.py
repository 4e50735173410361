"""CI compiles every CUDA kernel with nvcc even without a GPU: a broken .cu file must fail it."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / ".ci" / "check_cuda"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def test_a_syntax_error_in_a_kernel_fails_the_check(tmp_path):
    broken = tmp_path / "broken.cu"
    source = (ROOT / "csrc" / "cuda" / "slerp.cu").read_text()
    broken.write_text(source.replace("constexpr int kThreads = 256;", "constexpr int kThreads = ;"))
    result = subprocess.run(["bash", str(CHECK), str(broken)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert "broken.cu" in result.stdout + result.stderr

