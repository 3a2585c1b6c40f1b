"""The documentation stays true: the README short and its example grid valid, every command it
shows a real nox session, every shipped grid with a results page, and the site built --strict
(a broken link, a missing anchor or a page outside the navigation fails it)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from bench.config import grid as gridmod
from bench.paths import ROOT, grids_dir

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.mark.timeout(10)
def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.timeout(60)
def test_every_whole_grid_the_docs_show_loads():
    """The grids a newcomer copies (any TOML block with an [axes] table, README and docs)
    are valid as written, their image folders aside."""
    grids = [(p.name, block) for p in [README, *sorted(DOCS.rglob("*.md"))]
             for block in _blocks(p.read_text(), "toml") if "[axes]" in block]
    assert any(name == "README.md" for name, _ in grids), "the README shows no grid"
    for name, block in grids:
        g = gridmod.from_dict(tomllib.loads(block), name, check_data=False)
        assert g.specs, name
        assert all("does not exist" in p for p in g.data_problems), (name, g.data_problems)


@pytest.mark.timeout(10)
def test_every_nox_session_the_docs_name_exists():
    import ast

    tree = ast.parse((ROOT / "noxfile.py").read_text())
    sessions = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                and any("session" in ast.unparse(d) for d in f.decorator_list)}
    pages = [README, *DOCS.rglob("*.md")]
    named = {(p.name, m) for p in pages for m in re.findall(r"nox -s (\w+)", p.read_text())}
    assert named, "no nox command found in the docs"
    unknown = sorted((page, s) for page, s in named if s not in sessions)
    assert not unknown, f"nox sessions that do not exist: {unknown}; there are {sessions}"


@pytest.mark.timeout(10)
def test_every_shipped_grid_has_a_results_page():
    pages = {p.stem: p.read_text() for p in (DOCS / "results").glob("*.md")}
    shipped = sorted(p.stem for p in grids_dir().glob("*.toml"))
    missing = [g for g in shipped
               if g not in pages and not any(f"{g}.toml" in text for text in pages.values())]
    assert not missing, f"shipped grids with no results page in docs/results/: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_site_builds_strict(tmp_path):
    """mkdocs build --strict, the reference pages generated from the declarations."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    for page in ("reference/strategies/index.html", "reference/grid/index.html",
                 "tutorial/index.html", "results/default/index.html"):
        assert (site / page).is_file(), page
    # the generated reference holds every strategy the registry declares
    from strategies import registry

    html = (site / "reference/strategies/index.html").read_text()
    assert all(name in html for name in registry.STRATEGIES)
