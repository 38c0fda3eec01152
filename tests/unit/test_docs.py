"""README.md and docs/ stay short, linked and in step with benchmarks/results/*.json (issue 22)."""

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# tools/ is not on the install's path: import the generator from the checkout (python -m tools.docs_gen).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
docs_gen = importlib.import_module("tools.docs_gen")
DOCS = docs_gen.doc_files()
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_generated_blocks_match_the_results_json(path):
    problems = docs_gen.drift([path])
    assert not problems, "\n".join(problems)


def test_every_renderer_is_used_and_every_block_is_known():
    used = set()
    for path in DOCS:
        for name in docs_gen.blocks(path.read_text()):
            assert name in docs_gen.RENDERERS, f"{_id(path)}: unknown generated block {name!r}"
            used.add(name)
    assert used == set(docs_gen.RENDERERS), f"renderers without a block: {set(docs_gen.RENDERERS) - used}"


def test_a_changed_figure_is_caught(tmp_path):
    text = (ROOT / "docs" / "results.md").read_text()
    assert "<!-- generated:serve -->" in text
    doctored = tmp_path / "results.md"
    doctored.write_text(text.replace("**2.99×**", "**3.99×**", 1))
    assert doctored.read_text() != text
    problems = docs_gen.drift([doctored], root=tmp_path)
    assert problems == ["results.md: block 'serve' differs from benchmarks/results (run make docs)"]


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; move detail into docs/ (limit 160)"


@pytest.mark.parametrize("path", DOCS, ids=_id)
def test_relative_links_point_to_existing_files(path):
    missing = []
    for m in LINK.finditer(path.read_text()):
        target = m["target"].split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # an anchor in the same page, or a URL
        if not (path.parent / target).exists():
            missing.append(m["target"])
    assert not missing, f"{_id(path)}: links to missing files: {missing}"
