"""What the MLflow UI shows of a grid, checked without a browser: run names told apart within
the width of the run list's name column, for every shipped grid."""

from __future__ import annotations

import pytest

from bench import tracking_names
from bench.config import grid as gridmod


def shipped() -> list[str]:
    return sorted(p.stem for p in gridmod.grids_dir().glob("*.toml"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", shipped())
def test_run_names_of_every_shipped_grid_differ_within_the_name_column(name):
    g = gridmod.load(name, check_data=False)  # expanded, never trained
    width = tracking_names.NAME_WIDTH
    names = [g.run_name(s) for s in g.specs]
    seen: dict[str, str] = {}
    for s, n in zip(g.specs, names, strict=True):
        other = seen.setdefault(n[:width], s.name)
        assert other == s.name, (f"{name}: {other} and {s.name} both read {n[:width]!r} in "
                                 f"the first {width} characters")
    # the seed and the framework of every cell are in its name
    for s, n in zip(g.specs, names, strict=True):
        words = n.split()
        assert tracking_names.FRAMEWORK[s.framework] in words, n
        if "seed" in g.varying:
            assert f"s{s.seed}" in words, n


@pytest.mark.timeout(30)
def test_short_forms_read_as_documented():
    g = gridmod.load("default", check_data=False)
    names = sorted(g.run_name(s) for s in g.specs if s.framework == "torch")
    assert names == ["2stage[d3,lrs=0.1] pt", "feat pt", "full scratch pbn320 pt",
                     "full scratch pt", "full[bn=frz] lr1e-4 pt", "partial[d3,bn=frz] pt"]
    assert tracking_names.number(0.0005) == "5e-4" and tracking_names.number(0.1) == "0.1"
