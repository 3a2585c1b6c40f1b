"""The syntax of weights the harness pretrains itself:
`weights = "pretrained:<dataset>[k=v,...]"`.

A cell with such weights starts from a backbone the harness trained from scratch on the
source dataset, in the cell's own framework: the pretraining is a RunSpec of its own (the
cell's backbone, image size, batch size, optimizer, weight decay, precision and augmentation;
strategy `full`, weights `none`, a linear head, the source dataset), run by the runner as an
MLflow run tagged `tlbench.kind = pretrain` that the cells using it link to
(`tlbench.pretrain_run_id`). Its spec hash is the checkpoint's cache key, so a grid
pretrains once per key, also across invocations, and changing anything that determines the
checkpoint makes a new one.

    pretrained:digits_a                     defaults: epochs=10, all source samples, and
                                            the cell's lr and seed
    pretrained:digits_a[epochs=20,lr=0.01]

The checkpoint holds the backbone and its trained linear head (each backend writes its own
format; a cell loads the head only with `head_init = "source"`, else its head is new) and a
JSON sidecar with its sha256; a file that does not match it (truncated, corrupted) is
deleted and made again, never loaded. A file lock around check-and-make means two runners
(or two cells on two GPUs) needing the same pretraining make it once. Across machines the
tracking store carries it: the pretraining run publishes the checkpoint as artifacts
(publish), and a node whose cache lacks it fetches it before pretraining (fetch), using it
only when its sha256 equals the run's tag and the published sidecar.

Yosinski et al. 2014's transfer protocol (AnB, BnB and their fine-tuned `+` forms) is
`pretrained:<A or B>` with strategy `reinit_top`: see bench/grids/yosinski.toml.

This module is the syntax a RunSpec needs (parse, normalize, the pretraining's spec);
the checkpoint on disk is bench/checkpoints.py, and its sharing through the tracking
store bench/run/publish.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.config.selector import SelectorError, parse_selector
from strategies.constraint import Constraint

PREFIX = "pretrained:"


@dataclass(frozen=True)
class PretrainParam:
    default: object
    check: Constraint  # kind, minimum and help, the same Constraint a RunSpec field declares


PARAMS = {
    "epochs": PretrainParam(10, Constraint(int, minimum=1,
                                           help="epochs of training on the source dataset")),
    # the cell's seed by default: with source == target (Yosinski's BnB) the pretraining
    # then sees the cell's own train split, never its test images
    "seed": PretrainParam(None, Constraint(int, minimum=0,
                                           help="seed of the pretraining (split, init); "
                                                "default: the cell's")),
    "subset": PretrainParam(0, Constraint(int, minimum=0, help="source samples used, 0 = all")),
    "lr": PretrainParam(None, Constraint(float, minimum=0, exclusive=True,
                                         help="learning rate; defaults to the cell's lr")),
}


class WeightsError(ValueError):
    pass


def is_pretrained(weights: str) -> bool:
    return weights.startswith(PREFIX)


def parse(weights: str) -> tuple[str, dict]:
    """`pretrained:digits_a[epochs=5]` -> ('digits_a', {'epochs': 5}); raises WeightsError
    naming what is wrong and what is allowed."""
    body = weights[len(PREFIX):]
    if not body.strip():
        raise WeightsError("no source dataset; expected pretrained:<dataset>[k=v,...]")
    try:
        dataset, given = parse_selector(body)
    except SelectorError as e:
        raise WeightsError(f"{e}; expected pretrained:<dataset>[k=v,...]") from None
    if not dataset:
        raise WeightsError("no source dataset; expected pretrained:<dataset>[k=v,...]")
    params = {}
    for k, vals in given.items():
        p = PARAMS.get(k)
        if p is None:
            raise WeightsError(f"unknown parameter {k!r}; allowed: {', '.join(PARAMS)}")
        if len(vals) != 1:
            raise WeightsError(f"{k} has {len(vals)} values; one pretraining per weights "
                               f"value (list several weights values to sweep)")
        v = vals[0]
        msg = p.check.check(v)  # stated whole: kind and bound in one phrase
        if msg:
            raise WeightsError(f"{k} = {v!r}: {msg}")
        params[k] = p.check.kind(v)
    return dataset, params


def normalize(weights: str) -> str:
    """The canonical spelling: parameters sorted, defaults dropped, floats as repr. Equal
    pretrainings hash equal however they were written; a malformed value stays as written
    (grid validation reports it)."""
    if not is_pretrained(weights):
        return weights
    try:
        dataset, params = parse(weights)
    except WeightsError:
        return weights
    shown = [f"{k}={params[k]!r}" for k in sorted(params)
             if params[k] != PARAMS[k].default]
    return f"{PREFIX}{dataset}" + (f"[{','.join(shown)}]" if shown else "")


def shrink(weights: str, smoke: dict) -> str:
    """`--smoke` shrinks the pretraining a cell names as it shrinks the cell: its epochs
    and source samples capped by the smoke values (a malformed value is left to
    validation)."""
    try:
        dataset, params = parse(weights)
    except WeightsError:
        return weights
    for key in ("epochs", "subset"):
        if key in smoke:
            current = params.get(key, PARAMS[key].default) or smoke[key]
            params[key] = min(current, smoke[key])
    return normalize(f"{PREFIX}{dataset}[{','.join(f'{k}={v!r}' for k, v in params.items())}]")


def pretrain_spec(cell):
    """The RunSpec of the pretraining a cell's weights name (None for other weights)."""
    if not is_pretrained(cell.weights):
        return None
    dataset, params = parse(cell.weights)
    p = {k: params.get(k, v.default) for k, v in PARAMS.items()}
    digests = dict(d.split("=", 1) for d in cell.card_digests.split(",") if d)
    return dataclasses.replace(
        cell, dataset=dataset,
        card_digests=f"{dataset}={digests[dataset]}" if dataset in digests else "",
        subset=p["subset"], strategy="full", strategy_params=(),
        weights="none", epochs=p["epochs"], head="linear", head_init="new", select="last",
        lr=cell.lr if p["lr"] is None else p["lr"],
        seed=cell.seed if p["seed"] is None else p["seed"])
