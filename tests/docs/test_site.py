"""The documentation site builds with warnings as errors, and every link in it leads somewhere.

``mkdocs build --strict`` runs once per session into a temporary directory (a broken link, a
missing anchor or an API reference that does not resolve fails it). The built pages are then
read offline: every local ``href`` and ``src`` names a file of the site, and every ``#fragment``
an element id of the page it points at.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

import pyfiq

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


class _Page(HTMLParser):
    """The ids a page defines and the local references it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif name == "href" or (name == "src" and tag in ("img", "script", "source")):
                self.refs.append(value)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-6000:]}"
    return out


@pytest.fixture(scope="session")
def pages(site: Path) -> dict[Path, _Page]:
    parsed: dict[Path, _Page] = {}
    for path in site.rglob("*.html"):
        page = _Page()
        page.feed(path.read_text())
        parsed[path.resolve()] = page
    return parsed


def _target(site: Path, page: Path, ref: str) -> tuple[Path, str] | None:
    """The file and fragment a local reference of ``page`` names; None for another site."""
    parts = urlsplit(ref)
    if parts.scheme or parts.netloc or ref.startswith(("mailto:", "javascript:", "data:")):
        return None
    path = unquote(parts.path)
    if not path:
        file = page
    elif path.startswith("/"):
        file = site / path.lstrip("/")
    else:
        file = (page.parent / path).resolve()
    if file.is_dir() or path.endswith("/"):
        file = file / "index.html"
    return file, unquote(parts.fragment)


def test_every_local_link_and_anchor_of_the_site_exists(site: Path, pages: dict[Path, _Page]) -> None:
    broken: list[str] = []
    checked = 0
    for page, parsed in pages.items():
        for ref in parsed.refs:
            target = _target(site, page, ref)
            if target is None:
                continue
            file, fragment = target
            checked += 1
            where = f"{page.relative_to(site)}: {ref}"
            if not file.resolve().is_relative_to(site.resolve()) or not file.exists():
                broken.append(f"{where} (no file {file})")
            elif fragment and file.suffix == ".html" and fragment not in pages[file.resolve()].ids:
                broken.append(f"{where} (no id {fragment!r})")
    assert not broken, "\n".join(broken)
    assert checked > 500, "the check read the links of the site"


def test_the_link_check_finds_a_broken_link_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">x</h2><a href="../b/">b</a><a href="#gone">g</a>')
    page = _Page()
    page.feed((tmp_path / "a" / "index.html").read_text())
    missing = _target(tmp_path, tmp_path / "a" / "index.html", page.refs[0])
    assert missing is not None and not missing[0].exists()
    anchor = _target(tmp_path, tmp_path / "a" / "index.html", page.refs[1])
    assert anchor is not None and anchor[1] == "gone" and anchor[1] not in page.ids
    assert _target(tmp_path, tmp_path, "https://example.org/x#y") is None


def test_the_api_reference_covers_every_public_name(pages: dict[Path, _Page], site: Path) -> None:
    ids = set().union(*(p.ids for path, p in pages.items() if "reference" in path.relative_to(site).parts))
    public = [f"pyfiq.{name}" for name in pyfiq.__all__]
    public += [f"pyfiq.testing.{name}" for name in __import__("pyfiq.testing").testing.__all__]
    public += ["pyfiq.dashboard.create_app"]
    assert [name for name in public if name not in ids] == []


def _nav_files(nav: list[object]) -> list[str]:
    files: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            files += _nav_files(value)
        elif isinstance(value, str):
            files.append(value)
    return files


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = set(_nav_files(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert sorted(pages - listed) == [], "add these pages to the nav of mkdocs.yml"
    assert sorted(listed - pages) == []


def test_the_contributing_guide_and_changelog_are_the_repositorys_own() -> None:
    """The site includes them rather than keeping copies that drift."""
    for page, source in (("contributing.md", "CONTRIBUTING.md"), ("changelog.md", "CHANGELOG.md")):
        assert re.search(rf'--8<-- "{source}"', (DOCS / page).read_text()), page


#: A Sphinx role (":class:`X`", ":func:", ":meth:" ...) as Markdown renders it: literal text, not a link.
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj|ref|py:\w+):(?:`|<code>)")


def test_no_sphinx_role_shows_in_the_api_reference(site: Path) -> None:
    """Docstrings link with mkdocstrings cross-references (or plain code); a Sphinx role would
    show as raw text on the site."""
    reference = sorted((site / "reference").rglob("*.html"))
    assert len(reference) >= 5
    found = [f"{p.relative_to(site)}: {m.group(0)}" for p in reference for m in SPHINX_ROLE.finditer(p.read_text())]
    assert found == []
    assert SPHINX_ROLE.search("made by :func:<code>pyfiq_lifespan</code>") is not None


def test_the_api_reference_covers_the_framework_integrations(pages: dict[Path, _Page], site: Path) -> None:
    import importlib

    ids = set().union(*(p.ids for path, p in pages.items() if "reference" in path.relative_to(site).parts))
    missing = []
    for module in ("pyfiq.contrib.embedded", "pyfiq.contrib.asgi", "pyfiq.contrib.flask", "pyfiq.contrib.django"):
        names = [module, *(f"{module}.{name}" for name in importlib.import_module(module).__all__)]
        missing += [name for name in names if name not in ids]
    assert missing == []


#: A Markdown link's target: [text](target), images included.
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readmes_links_lead_to_files_and_anchors_that_exist(pages: dict[Path, _Page], site: Path) -> None:
    """The README links into docs/ relatively (the repository host renders them, and the
    package page gets them as absolute URLs at build time): each names a file of the
    repository, and each #anchor of a docs page an id of that page on the site."""
    links = MARKDOWN_LINK.findall((ROOT / "README.md").read_text())
    local = [link for link in links if not urlsplit(link).scheme]
    assert len(local) >= 20
    broken = []
    for link in local:
        path, _, fragment = link.partition("#")
        if not (ROOT / path).exists():
            broken.append(f"{link} (no file)")
        elif fragment and path.startswith("docs/") and path.endswith(".md"):
            rel = Path(path).relative_to("docs").with_suffix("")
            html = site / ("index.html" if rel.name == "index" else rel / "index.html")
            if fragment not in pages[html.resolve()].ids:
                broken.append(f"{link} (no id {fragment!r})")
    assert broken == []
