"""Every reference in the repository resolves inside it: no tracked file cites a file the repository does not contain,
every `docs/X.md §N` citation names a heading numbered N of a file that exists, and every relative markdown link
(and its #anchor) leads somewhere. Reads files only: no Ray, no torch."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The team's private notes that the code once cited; none of them is part of the repository. Written with escapes so
# that this file does not match itself; the word boundaries keep out an attribute md5 of a module named gldv2.
FOREIGN = re.compile(r"\bsolution\.md\b|\bray\.md\b|\bgldv2\.md\b|\bgpu-h200\.md\b|\.\./shared\b|\bshared/reference\b")

# `docs/method.md §2.1`, a bare file name and its section inside docs/, and chains such as `§2.3, §4` or `§2 and §3`;
# a comment may break the line between the file and its first section.
SECTION_CITATION = re.compile(
    r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)((?:[\s#,]*(?:and\s+)?§\d+(?:\.\d+)*)+)"
)
SECTION_NUMBER = re.compile(r"§(\d+(?:\.\d+)*)")
NUMBERED_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_text_files() -> dict[str, str]:
    try:
        listing = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    texts = {}
    for name in filter(None, listing.split("\0")):
        path = REPO / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return tracked_text_files()


def outside_code_fences(markdown: str) -> list[str]:
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def headings(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The section numbers and the anchors of a markdown file's headings."""
    numbers, anchors, seen = set(), set(), {}
    for line in outside_code_fences(path.read_text(encoding="utf-8")):
        if not line.startswith("#"):
            continue
        if match := NUMBERED_HEADING.match(line):
            numbers.add(match.group(1))
        anchor = github_anchor(line.lstrip("#"))
        anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return frozenset(numbers), frozenset(anchors)


def cited_file(citing: str, target: str) -> Path:
    """A path with a folder is from the repository root (how code cites docs/); a bare name is beside the citing file."""
    return REPO / target if "/" in target else (REPO / citing).parent / target


def test_no_tracked_file_cites_a_file_outside_the_repository(texts):
    found = [
        f"{name}:{number}: {match.group(0)}"
        for name, text in texts.items()
        for number, line in enumerate(text.splitlines(), 1)
        for match in FOREIGN.finditer(line)
    ]
    assert not found, "citations of files the repository does not contain:\n" + "\n".join(found)


def test_every_section_citation_names_an_existing_numbered_heading(texts):
    broken, citations = [], 0
    for name, text in texts.items():
        for match in SECTION_CITATION.finditer(text):
            target = cited_file(name, match.group(1))
            line = text.count("\n", 0, match.start()) + 1
            if not target.is_file():
                broken.append(f"{name}:{line}: {match.group(1)} does not exist")
                continue
            numbers, _ = headings(target)
            for section in SECTION_NUMBER.findall(match.group(2)):
                citations += 1
                if section not in numbers:
                    broken.append(f"{name}:{line}: {match.group(1)} has no heading numbered {section}")
    assert not broken, "\n".join(broken)
    assert citations > 0, "no `docs/X.md §N` citation found: the pattern no longer matches how the code cites"


def test_every_relative_markdown_link_resolves(texts):
    broken = []
    for name, text in texts.items():
        if not name.endswith(".md"):
            continue
        for line in outside_code_fences(text):
            for link in MARKDOWN_LINK.findall(line):
                if re.match(r"[a-z][a-z+.-]*:", link):  # http:, https:, mailto:
                    continue
                path, _, anchor = link.partition("#")
                target = (REPO / name).parent / path if path else REPO / name
                if not target.exists():
                    broken.append(f"{name}: ({link}): {path} does not exist")
                elif anchor and target.suffix == ".md" and anchor not in headings(target)[1]:
                    broken.append(f"{name}: ({link}): no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_citation_patterns_match_what_they_should():
    assert FOREIGN.search("(" + "solution" + ".md §2.1)")
    assert FOREIGN.search("see " + "ray" + ".md §0.6")
    assert FOREIGN.search("../" + "shared" + "/reference/x.json")
    assert not FOREIGN.search("gldv2" + ".md5(split, shard)")
    assert not FOREIGN.search("docs/ray-notes.md §4")
    chain = SECTION_CITATION.search("the recipe (docs/method.md §2.3, §4 and §11): ...")
    assert chain.group(1) == "docs/method.md"
    assert SECTION_NUMBER.findall(chain.group(2)) == ["2.3", "4", "11"]
    wrapped = SECTION_CITATION.search("from step 2. docs/method.md\n# §2.1 (architecture)")
    assert SECTION_NUMBER.findall(wrapped.group(2)) == ["2.1"]
    assert github_anchor(" 12. Measured on one NVIDIA H200") == "12-measured-on-one-nvidia-h200"
    assert github_anchor(" 6. Revisited Oxford and Paris (the literature's yardstick)") == (
        "6-revisited-oxford-and-paris-the-literatures-yardstick"
    )
