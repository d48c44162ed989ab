"""Sphinx configuration of the sofim_optax documentation site.

Build it with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``):
warnings are errors, and nothing is fetched from the network at build time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
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
# build copies them into docs/notebooks/ (ignored by git). They are committed without
# outputs. When Fashion-MNIST is on this machine (Debian's dataset-fashion-mnist,
# $SOFIM_OPTAX_DATA or the user cache; nothing is downloaded), the build executes them at the
# small size, as CI's notebook test does (about 1.5 minutes on 2 cores), and renders them
# with those outputs. The outputs are cached in docs/_build/.jupyter_cache, under a key that
# also covers the sources of sofim_optax/ and experiments/, so a rebuild with unchanged code
# reuses them and a change to the library runs the notebooks again. Without the data they are
# rendered as committed, without outputs. SOFIM_OPTAX_DOCS_NOTEBOOKS=off skips the execution.
_DOCS = pathlib.Path(__file__).parent
_NB_SOURCE, _NB_TARGET = ROOT / "notebooks", _DOCS / "notebooks"
_NB_TARGET.mkdir(exist_ok=True)
for _nb in sorted(_NB_SOURCE.glob("*.ipynb")):
    _dest = _NB_TARGET / _nb.name
    if not _dest.exists() or _dest.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dest)


def _notebook_data_found() -> bool:
    try:
        from experiments import datasets
    except ImportError:  # the experiments' dependencies are not installed
        return False
    try:
        datasets.load_fashion_mnist(download=False, verify=False)
    except (FileNotFoundError, OSError, datasets.DatasetFormatError):
        return False
    return True


def _code_key() -> str:
    """A hash of the code the notebooks run, beyond their own cells."""
    digest = hashlib.sha256()
    for folder in ("sofim_optax", "experiments"):
        for source in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(source.relative_to(ROOT)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


# What the notebooks page says about the outputs of this build (a MyST substitution).
_OUTPUTS_SHOWN = (
    "This build ran them at the small size (`SOFIM_OPTAX_NOTEBOOK_SIZE=small`) and shows those "
    "outputs: tiny subsets and a few steps, a check that every cell runs. Their numbers and "
    "curves say nothing about the methods; the full-size results are on the "
    "[benchmarks page](benchmarks.md)."
)
_OUTPUTS_NOT_SHOWN = (
    "This build did not run them ({why}), so the pages show the cells without outputs: run a "
    "notebook to see its figures. The full-size results are on the "
    "[benchmarks page](benchmarks.md)."
)
if os.environ.get("SOFIM_OPTAX_DOCS_NOTEBOOKS", "").strip().lower() == "off":
    nb_execution_mode = "off"
    _NOTEBOOK_OUTPUTS = _OUTPUTS_NOT_SHOWN.format(why="`SOFIM_OPTAX_DOCS_NOTEBOOKS=off`")
elif _notebook_data_found():
    os.environ["SOFIM_OPTAX_NOTEBOOK_SIZE"] = "small"  # read by each notebook's setup cell
    os.environ["SOFIM_OPTAX_REPO"] = str(ROOT)  # where the setup cell finds experiments/
    _cache_root = _DOCS / "_build" / ".jupyter_cache"
    _cache = _cache_root / _code_key()
    if _cache_root.is_dir():  # outputs of older code are of no further use
        for _old in _cache_root.iterdir():
            if _old != _cache:
                shutil.rmtree(_old, ignore_errors=True)
    nb_execution_mode = "cache"
    nb_execution_cache_path = str(_cache)
    nb_execution_in_temp = True  # what a notebook writes (runs/...) goes to a temporary folder
    nb_execution_timeout = 600  # per cell
    nb_execution_raise_on_error = True
    _NOTEBOOK_OUTPUTS = _OUTPUTS_SHOWN
else:
    nb_execution_mode = "off"
    _NOTEBOOK_OUTPUTS = _OUTPUTS_NOT_SHOWN.format(
        why="Fashion-MNIST was not found on the machine that built it"
    )
nb_merge_streams = True

# -- Math, offline ---------------------------------------------------------------------------
# MathJax 3 comes from the PyPI package sphinx-mathjax-offline (in the `docs` extra), whose
# folder is copied into the site's _static/mathjax, so the pages render their math without the
# network. Without that package the site falls back to Sphinx's default, MathJax from a CDN.
_MATHJAX_PACKAGE = importlib.util.find_spec("sphinx-mathjax-offline")
html_static_path: list[str] = []
if _MATHJAX_PACKAGE is not None and _MATHJAX_PACKAGE.origin is not None:
    _MATHJAX_STATIC = pathlib.Path(_MATHJAX_PACKAGE.origin).parent / "static"
    if (_MATHJAX_STATIC / "mathjax" / "tex-mml-chtml.js").is_file():
        html_static_path.append(str(_MATHJAX_STATIC))  # its mathjax/ folder → _static/mathjax
        mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static

# -- MyST ------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_substitutions = {"notebook_outputs": _NOTEBOOK_OUTPUTS}
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
