"""The code blocks of the documentation pages, as the snippet test runs them.

The rule (CONTRIBUTING.md, "Documentation"): every ```python block of ``docs/**/*.md`` and of
``README.md`` runs as written, imports included, unless the line directly above its opening fence is
``<!-- fragment -->``. A block whose first line is a comment naming a test file
(``# test_billing.py``) is run with pytest as that file. A ```text block with the line
``<!-- output -->`` directly above it is what the Python block before it prints, exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FRAGMENT = "<!-- fragment -->"
OUTPUT = "<!-- output -->"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_TEST_FILE = re.compile(r"#\s*(test_\w+\.py)\s*$")
#: Redis URLs that name the Redis a reader runs on their own machine: the runner points them at
#: the suite's server (``rediss://`` and other hosts are left alone).
LOCAL_REDIS = re.compile(r"\bredis://(?:localhost|127\.0\.0\.1)(?::6379)?(?:/\d+)?(?![\w:.])")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # relative to the repository's root: docs/guide/tasks.md, README.md
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    fragment: bool
    output_marker: bool

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def test_file(self) -> str | None:
        """``test_x.py`` when the block's first line names the test file it is."""
        first = self.source.lstrip("\n").split("\n", 1)[0]
        match = _TEST_FILE.fullmatch(first.strip())
        return match.group(1) if match else None


def blocks_of(text: str, page: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order (indented ones, in lists, included)."""
    lines = text.split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        language = (opening.group("info").split() or [""])[0].lstrip(".").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if closing and not closing.group("info") and closing.group("fence").startswith(fence):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        above = lines[i - 1].strip() if i > 0 else ""
        found.append(
            Block(
                page=page,
                line=i + 1,
                language=language,
                source="\n".join(body) + "\n",
                fragment=above == FRAGMENT,
                output_marker=above == OUTPUT,
            )
        )
        i = j + 1
    return found


def page_blocks(docs: Path = DOCS, readme: Path | None = README) -> list[Block]:
    """The blocks of every page under ``docs`` (pages in path order), then the README's, which
    follows the same rule."""
    root = docs.parent
    blocks: list[Block] = []
    for path in [*sorted(docs.rglob("*.md")), *([readme] if readme is not None else [])]:
        blocks += blocks_of(path.read_text(), path.relative_to(root).as_posix())
    return blocks


def python_blocks(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in ("python", "py")]


def expected_outputs(blocks: list[Block]) -> dict[str, str]:
    """Block id -> the text an ``<!-- output -->`` block says that Python block prints."""
    expected: dict[str, str] = {}
    last_python: Block | None = None
    for block in blocks:
        if block.language in ("python", "py"):
            last_python = block
        elif block.output_marker:
            if last_python is None or last_python.page != block.page or last_python.fragment:
                raise ValueError(f"{block.id}: an output block follows no runnable Python block of its page")
            expected[last_python.id] = block.source
    return expected


def for_the_suite(source: str, url: str) -> str:
    """The block's source with every local Redis URL pointing at ``url``."""
    return LOCAL_REDIS.sub(url, source)
