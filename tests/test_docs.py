"""Every design-document reference in the repository resolves: the file is in the repository,
and a section it names is a heading there."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".txt") and path.is_file():
            yield path


def test_design_references_resolve():
    design = ROOT / "docs" / "design.md"
    headings = {line.lstrip("#").strip() for line in design.read_text().splitlines()
                if line.startswith("#")}
    references = []
    for path in tracked_text_files():
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, f"{path}: DESIGN.md is not in the repository"
        for match in re.finditer(r"docs/design\.md(.{0,30})", text):
            references.append(path)
            named = re.search(r"[\"']([A-Z][a-z]+(?: [a-z]+)*)[\"']", match.group(1))
            if named:  # `docs/design.md, "Data formats"`: that section
                assert named.group(1) in headings, f"{path}: no section {named.group(1)!r}"
    assert len(references) >= 4  # README, recipe help, benchmark reader, bundled data's README
