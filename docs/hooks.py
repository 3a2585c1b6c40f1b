"""MkDocs hook: the reference pages are generated from the code's declarations when the site
builds (bench/reference.py), so they cannot drift from the strategies, backbones, grid fields,
dataset-card options and MLflow names they describe. None of them is a file in docs/."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # mkdocs runs from the checkout; bench is importable from it
    sys.path.insert(0, str(ROOT))


def on_files(files, config):
    from bench.reference import PAGES

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=make()))
    return files
