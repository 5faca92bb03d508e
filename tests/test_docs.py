"""The front door: a README a user reads in two minutes, and links that lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = sorted([README, ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(ROOT / "web" / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_shows_a_picture_in_its_first_30_lines():
    assert any(line.startswith("![") for line in README.read_text().splitlines()[:30])


def test_the_readme_gives_the_demo_and_the_test_command_and_ci_runs_the_test_command():
    text = README.read_text()
    assert "scripts/demo.sh" in text and "scripts/test.sh" in text
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_links_every_help_page():
    text = README.read_text()
    for page in (ROOT / "web" / "docs").glob("*.md"):
        assert f"(web/docs/{page.name})" in text, f"the README's node list lacks {page.stem}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file(document):
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{document.relative_to(ROOT)} links {target}, which does not exist"
