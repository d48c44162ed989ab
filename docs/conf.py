"""Sphinx configuration of the sofim_optax documentation site.

Build it with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``):
warnings are errors, and nothing is fetched from the network at build time.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Document the checkout, not whatever sofim_optax happens to be installed.
sys.path.insert(0, str(ROOT))

import sofim_optax  # noqa: E402

project = "sofim_optax"
author = "sofim_optax developers"
copyright = "sofim_optax developers"
release = sofim_optax.__version__
version = release

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
root_doc = "index"

# -- The notebooks -------------------------------------------------------------------------
# They live in notebooks/ (where Colab opens them and tests/test_notebooks.py runs them); the
# build copies them into docs/notebooks/ (ignored by git) and renders them as they are. They
# are committed without outputs and are not executed here: running them needs the data set
# and minutes of CPU, and the figures of their full-size runs are on the benchmarks page.
_NB_SOURCE, _NB_TARGET = ROOT / "notebooks", pathlib.Path(__file__).parent / "notebooks"
_NB_TARGET.mkdir(exist_ok=True)
for _nb in sorted(_NB_SOURCE.glob("*.ipynb")):
    _dest = _NB_TARGET / _nb.name
    if not _dest.exists() or _dest.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dest)
nb_execution_mode = "off"

# -- MyST ------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc ---------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Keep the library's own aliases by name in signatures instead of expanding them.
autodoc_type_aliases = {
    "Scalar": "sofim_optax.hyperparameters.Scalar",
    "ScalarOrSchedule": "sofim_optax.hyperparameters.ScalarOrSchedule",
    "LayerStatsDict": "sofim_optax.curvature.LayerStatsDict",
}
# Sphinx 9 prints an alias that sits inside a larger annotation (``Scalar | None``,
# ``tuple[..., LayerStatsDict]``) as ``TypeAliasForwardRef('...')``; print its name instead.
from sphinx.util.inspect import TypeAliasForwardRef  # noqa: E402

TypeAliasForwardRef.__repr__ = lambda self: self.name
autosummary_generate = False
# Signatures show ``Scalar``, not ``sofim_optax.hyperparameters.Scalar`` (still linked).
python_use_unqualified_type_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Cross-references ------------------------------------------------------------------------
# Every reference to this library must resolve (nitpicky). There is no intersphinx (the build
# must not need the network), so references to other libraries' names are left as text.
nitpicky = True
_EXTERNAL = r"(jax|jnp|lax|jaxlib|optax|flax|nn|nnx|chex|np|numpy|typing|collections|builtins|abc)"
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL + r"(\..*)?"),
    (
        r"py:class",
        r"(int|float|bool|str|bytes|tuple|list|dict|set|object|type|None|Any|Callable"
        r"|Sequence|Mapping|Iterable|Iterator|NamedTuple|Literal|Union|Optional|Exception"
        r"|ValueError|TypeError|PyTree|ArrayTree|Array|PRNGKey|DTypeLike|dtype)",
    ),
]

# -- HTML ------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"sofim_optax {release}"
html_static_path: list[str] = []
html_theme_options = {"source_repository": "", "navigation_with_keys": True}


# -- Short references in docstrings ----------------------------------------------------------
# Docstrings name their neighbours briefly (``:func:`kron_sum_apply```), and the public home
# of many objects is a package that re-exports its submodules (``sofim_optax.linalg``,
# ``sofim_optax.layerwise``) or the flat namespace ``sofim_optax``. When Sphinx's own lookup
# fails, look the name up in the packages above the current module, then take the one
# documented object of this library whose name ends with it. A name that is ambiguous (two
# ``value_grad_and_stats``) or unknown stays unresolved, and nitpicky mode reports it.
def _resolve_short_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    domain = env.get_domain("py")
    objects = domain.objects
    candidates = []
    module = node.get("py:module") or ""
    parts = module.split(".") if module else []
    while parts:
        parts.pop()
        name = ".".join([*parts, target])
        if parts and name in objects:
            candidates = [name]
            break
    if not candidates:
        candidates = [
            n for n in objects if n.startswith("sofim_optax.") and n.endswith("." + target)
        ]
    if len(candidates) != 1:
        return None
    node = node.deepcopy()
    node["reftarget"] = candidates[0]
    node.attributes.pop("refspecific", None)
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], candidates[0], node, contnode
    )


def setup(app):
    app.connect("missing-reference", _resolve_short_reference)
