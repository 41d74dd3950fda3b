"""The docs site builds with no broken link, offline, and the README's links into it hold.

`mkdocs build --strict` (mkdocs.yml) refuses a link to a missing page or a missing anchor in
docs/; the README is not part of the site, so its links are checked here against what the
build wrote: each page exists and holds the anchor the link names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import ROOT

MKDOCS = str(Path(sys.executable).parent / "mkdocs")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [MKDOCS, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return site


def page_of(site: Path, source: str) -> Path:
    """Where mkdocs writes docs/<source> (api.md -> api.html: mkdocs.yml has no directory URLs)."""
    return site / (source.removesuffix(".md") + ".html")


def anchors(page: Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', page.read_text()))


def test_the_site_builds_strictly_with_every_page(site):
    for source in (ROOT / "docs").glob("*.md"):
        assert page_of(site, source.name).is_file(), source.name
    # The benchmarks page is BENCHMARKS.md itself, included whole.
    benchmarks = (page_of(site, "benchmarks.md")).read_text()
    assert "--8&lt;--" not in benchmarks and 'id="summary"' in benchmarks


def test_the_site_fetches_nothing_from_the_network(site):
    for page in site.rglob("*.html"):
        html = page.read_text()
        external = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', html)
        assert not external, f"{page.relative_to(site)}: {external}"
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html


def test_the_readme_links_to_pages_and_anchors_that_exist(site):
    checked = 0
    for match in LINK.finditer((ROOT / "README.md").read_text()):
        target = urlsplit(match["target"])
        if target.scheme or target.netloc:
            continue
        path = (ROOT / target.path).resolve() if target.path else ROOT / "README.md"
        assert path.exists(), f"README links to {match['target']}: no such file"
        if target.fragment and path.parent == ROOT / "docs":
            assert target.fragment in anchors(page_of(site, path.name)), (
                f"README: no anchor {match['target']}"
            )
        checked += 1
    assert checked >= 10


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is what catches one: a page that links to a missing anchor is refused."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the part](other.md#no-such-part).\n")
    (docs / "other.md").write_text("# Other\n\n## A part\n")
    config = (ROOT / "mkdocs.yml").read_text()
    (tmp_path / "mkdocs.yml").write_text(re.sub(r"(?ms)^nav:.*?^(?=\S)", "", config))
    done = subprocess.run(
        [MKDOCS, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert done.returncode != 0
    assert "no-such-part" in done.stderr
