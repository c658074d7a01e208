"""Every relative link and image in README.md and docs/*.md points to a file that exists."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target), an optional "title" after the target; <img src="...">.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SOURCE = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def relative_targets(text: str) -> list[str]:
    """Link targets that are paths inside the repository (no URL scheme, no pure #anchor)."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = MARKDOWN_LINK.findall(text) + HTML_SOURCE.findall(text)
    return [t for t in targets
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def resolve(document: Path, target: str) -> Path:
    return (document.parent / unquote(target.split("#", 1)[0])).resolve()


CASES = [(doc, target) for doc in DOCUMENTS for target in relative_targets(doc.read_text())]


@pytest.mark.parametrize("document, target", CASES,
                         ids=[f"{d.relative_to(ROOT)}->{t}" for d, t in CASES])
def test_relative_link_resolves(document, target):
    path = resolve(document, target)
    assert path.exists(), f"{document.relative_to(ROOT)} links to {target}, which does not exist"
    assert ROOT in path.parents or path == ROOT, f"{target} points outside the repository"


def test_readme_links_the_docs():
    """The README reaches the documentation pages (at least those the README sections name)."""
    targets = {resolve(ROOT / "README.md", t) for t in relative_targets(
        (ROOT / "README.md").read_text())}
    assert (ROOT / "docs" / "regime_map.md").resolve() in targets


def test_the_checker_sees_a_broken_link(tmp_path):
    """The extraction finds links, images and anchored links, and skips code and URLs."""
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) ![b](img/missing.png \"t\") [c](x.md#part) "
                    "[u](https://example.org) [h](#here) `[code](not-a-link.md)`\n"
                    "```\n[fenced](nope.md)\n```\n")
    targets = relative_targets(page.read_text())
    assert targets == ["missing.md", "img/missing.png", "x.md#part"]
    assert not resolve(page, targets[0]).exists()
