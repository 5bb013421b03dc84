"""The front page and docs/: every relative link and anchor resolves; README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_slug_follows_github() -> None:
    assert slug("Faults, tested") == "faults-tested"
    assert slug("`moco`") == "moco"
    assert slug("Results against published numbers") == "results-against-published-numbers"


def test_every_relative_link_resolves(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n## Some heading\n")
    page.write_text("[ok](b.md#some-heading) [bad](b.md#nope) [gone](c.md) [web](https://x.y)\n"
                    "```\n[in code](missing.md)\n```\n")
    assert [b.split(": ", 1)[1] for b in broken_links(page)] == \
        ["b.md#nope (no such heading)", "c.md (no such file)"]
    for doc in _pages():
        assert not broken_links(doc), broken_links(doc)


def test_readme_is_a_front_page() -> None:
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= 10_240, "README.md is over 10 kB: move reference to docs/"
    text = readme.read_text()
    # the two commands of the quick start, as CI (.ci/run) installs and tests
    assert 'pip install -e ".[dev]" && python tools/train.py recipes/quickstart.yaml' \
        in text
    assert 'pip install -e ".[dev]" && pytest\n' in text


def test_the_architecture_table_names_every_module() -> None:
    """docs/ARCHITECTURE.md's module table stays true: a new module gets its row."""
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    package = ROOT / "ssl_ema"
    modules = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))
               if p.name != "__init__.py"]
    assert [m for m in modules if f"`{m}`" not in table] == []
