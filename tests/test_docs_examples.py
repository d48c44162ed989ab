"""The code on the documentation pages runs as it is.

Every ``python`` block of the pages below is executed in order, in one namespace per page
(each block may use what the blocks before it defined), on the pages' own tiny data. These
tests compile several optimizers, so they are marked ``slow``: ``make test-slow`` and
``make doctest`` run them, ``make test`` does not. (``docs/layerwise.md`` has its own test,
``tests/test_layerwise_example.py``.)
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "docs/quickstart.md",
    "docs/periods_and_damping.md",
    "docs/adaptive.md",
    "docs/layer_stats.md",
    "docs/captured_layers.md",
    "docs/checkpointing.md",
    "docs/nnx.md",
]

# Pages whose code needs a package of the `test` extra beyond the library's own dependencies.
NEEDS = {"docs/checkpointing.md": "orbax.checkpoint", "docs/nnx.md": "orbax.checkpoint"}

pytestmark = pytest.mark.slow


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page):
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    path = ROOT / page
    blocks = python_blocks(path)
    assert blocks, f"{page} has no python block"
    namespace: dict = {"__name__": "docs_example"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page} (python block {i + 1})", "exec"), namespace)
