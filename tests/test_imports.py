"""bench/ is framework-free: it imports, validates grids and lists cells with torch and
tensorflow blocked."""

import subprocess
import sys

from bench.paths import ROOT

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'tensorflow', 'keras'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


def test_bench_imports_with_frameworks_blocked():
    code = BLOCK + """
import bench, bench.spec, bench.grid, bench.runner, bench.tracking, bench.report, bench.cli
import bench.timing, bench.cell, bench.data, bench.driver, strategies, strategies.registry
import strategies.backbones
g = bench.grid.load('default')
assert g.specs
assert bench.cli.main(['run', 'default', '--dry-run']) == 0
for m in ('torch', 'tensorflow', 'keras'):
    assert m not in sys.modules, m
print('ok', len(g.specs))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_block_really_blocks():
    out = subprocess.run([sys.executable, "-c", BLOCK + "import torch"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "blocked" in out.stderr
