"""The README's set-up checks what CI checks: install.sh installs by default the extras that
.ci/run installs, so `bash install.sh && python -m pytest` skips no comparison CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_sh_defaults_to_the_extras_ci_installs():
    default = re.search(r"EXTRAS=\$\{DAFAST_EXTRAS:-([^}]*)\}", (ROOT / "install.sh").read_text())
    ci = re.search(r"DAFAST_EXTRAS=(\S+) bash install.sh", (ROOT / ".ci" / "run").read_text())
    assert default and ci
    assert set(default.group(1).split(",")) >= set(ci.group(1).split(","))
    assert "bench" in default.group(1)  # mergekit: the peer of test_slerp and test_merge


def test_readme_quick_start_says_which_extras_are_installed():
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "DAFAST_EXTRAS" in quick_start and "mergekit" in quick_start
