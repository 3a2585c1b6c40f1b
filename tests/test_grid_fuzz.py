"""The grid loader under generated input (hypothesis): a few hundred grids of random types,
sizes, unicode and nesting; every outcome is a Grid or a GridError (a clean refusal), never
another exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.config.grid import Grid, GridError, from_dict

pytestmark = pytest.mark.timeout(600)

KEYS = ["name", "description", "axes", "defaults", "smoke", "run", "datasets", "tune",
        "framework", "backbone", "dataset", "strategy", "weights", "lr", "epochs", "seed",
        "subset", "image_size", "device", "parallel", "trials", "partial", "depth", "log",
        "range", "weights, strategy", "source", "split", "val_fraction"]
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["torch", "keras", "resnet18", "digits",
                                                     "partial[depth=2]", "imagenet", "auto",
                                                     "full", "pretrained:digits", "../x"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner,
                                        max_size=4), max_leaves=12)
docs = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=7)
near_valid = st.fixed_dictionaries({
    "axes": st.fixed_dictionaries({"framework": st.just(["torch"]),
                                   "backbone": st.just(["resnet18"]),
                                   "dataset": st.just(["digits"])},
                                  optional={"strategy": values, "lr": values, "seed": values}),
}, optional={"defaults": values, "tune": values, "run": values, "name": values,
             "datasets": values, "smoke": values})


def _load(doc):
    try:
        return from_dict(doc, "fuzz.toml")
    except GridError as e:
        assert "is invalid, nothing was run" in str(e)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(docs)
def test_any_table_is_a_grid_or_a_clean_refusal(doc):
    assert _load(doc) is None or isinstance(_load(doc), Grid)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(near_valid)
def test_a_nearly_valid_grid_is_a_grid_or_a_clean_refusal(doc):
    got = _load(doc)
    assert got is None or (isinstance(got, Grid) and got.specs)
