"""The API reference covers the public API, and the factories' docstrings are complete.

Fast and without Sphinx: the reference pages' sources (``docs/api/*.rst``) are parsed for
their autodoc and ``py:`` directives, so a public name added to the library without a
reference entry fails here, before ``make docs`` is run. The docstring checks read what
``help()`` and the site show: every public factory has an ``Args:`` section, a
``References:`` section (every method of the library implements a paper), and names each of
its arguments with its default.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import types

import pytest

import sofim_optax
from sofim_optax import curvature, guards, layerwise, linalg

API = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api"

_DIRECTIVE = re.compile(
    r"^\.\. (auto(?:function|class|exception|data|attribute|module)|py:(?:function|class|data"
    r"|exception|module)|currentmodule)::\s*([\w.]+)",
    flags=re.M,
)


def _lookup(name: str):
    """The object a dotted name documents: attributes first (``sofim_optax.kfac`` is the
    function), then modules (``sofim_optax.kfac.KfacCurvature`` lives in the module)."""
    parts = name.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        pass
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def documented_names(api_dir: pathlib.Path = API) -> set[str]:
    """Full names of everything the reference pages document (autodoc and ``py:`` directives),
    resolved against ``.. currentmodule::`` / ``.. automodule::`` as Sphinx does."""
    names = set()
    for page in sorted(api_dir.glob("*.rst")):
        module = None
        for kind, target in _DIRECTIVE.findall(page.read_text()):
            if kind == "currentmodule" or kind.endswith("module"):
                module = target
                if kind != "currentmodule":
                    names.add(target)
                continue
            if module and not target.startswith("sofim_optax"):
                target = f"{module}.{target}"
            names.add(target)
    return names


def _covered(public: str, names: set[str], objects: dict[int, str]) -> bool:
    if public in names:
        return True
    obj = _lookup(public)
    # A function, class or module re-exported under another name counts where it is
    # documented (``sofim_optax.LayerStats`` is ``sofim_optax.curvature.LayerStats``).
    # Plain values (numbers, strings) must be documented under their own name.
    is_entity = inspect.isroutine(obj) or inspect.isclass(obj) or inspect.ismodule(obj)
    return is_entity and id(obj) in objects


def public_names() -> list[str]:
    out = [f"sofim_optax.{n}" for n in sofim_optax.__all__]
    for package in (linalg, curvature, layerwise, guards):
        out += [f"{package.__name__}.{n}" for n in package.__all__]
    return out


def missing_entries(api_dir: pathlib.Path = API) -> list[str]:
    names = documented_names(api_dir)
    objects = {id(o): n for n in names if (o := _lookup(n)) is not None}
    return [p for p in public_names() if not _covered(p, names, objects)]


def test_every_documented_name_exists():
    """No reference entry points at a name the library does not have."""
    assert [n for n in sorted(documented_names()) if _lookup(n) is None] == []


def test_every_public_name_has_a_reference_entry():
    assert missing_entries() == []


def test_a_missing_entry_is_found(tmp_path):
    """The check is not vacuous: without ``scale_by_kfac`` and ``curvature.losses``'s page
    section, exactly those are reported."""
    for page in API.glob("*.rst"):
        text = page.read_text()
        text = text.replace(".. autofunction:: scale_by_kfac\n", "")
        text = text.replace(".. automodule:: sofim_optax.curvature.losses\n", "")
        (tmp_path / page.name).write_text(text)
    assert missing_entries(tmp_path) == [
        "sofim_optax.scale_by_kfac",
        "sofim_optax.curvature.losses",
    ]


# ----------------------------------------------------------------------------------------
# The factories' docstrings.
# ----------------------------------------------------------------------------------------


def _factories() -> dict[str, types.FunctionType]:
    out = {}
    for name in sofim_optax.__all__:
        obj = getattr(sofim_optax, name)
        if inspect.isfunction(obj) and "GradientTransformation" in str(
            inspect.signature(obj).return_annotation
        ):
            out[name] = obj
    return out


def _args_entries(doc: str) -> dict[str, str]:
    """``{argument: its text}`` from a Google-style ``Args:`` section (``a, b: ...`` entries
    give the text to each name)."""
    match = re.search(r"^( *)Args:\n(.*?)(?=^\1\S|\Z)", doc, flags=re.M | re.S)
    if match is None:
        return {}
    entries, current = {}, None
    indent = None
    for line in match.group(2).splitlines():
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        head = re.match(r"\s*([a-z_0-9, ]+):(.*)", line) if width == indent else None
        if head:
            current = [n.strip() for n in head.group(1).split(",")]
            for n in current:
                entries[n] = head.group(2)
        elif current:
            for n in current:
                entries[n] += " " + line.strip()
    return entries


def _renderings(default) -> list[str]:
    """How a docstring may write a default."""
    if default is None or isinstance(default, bool):
        return [str(default)]
    if isinstance(default, str):
        return [f'"{default}"', f"'{default}'"]
    if isinstance(default, (int, float)):
        out = {repr(default), str(default), f"{default:g}"}
        if isinstance(default, float) and default.is_integer():
            out.add(str(int(default)))
        mantissa, _, exponent = f"{default:e}".partition("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        out.add(f"{mantissa}e{int(exponent)}")
        return sorted(out)
    return [repr(default)]


def _mentions_default(text: str, default) -> bool:
    for r in _renderings(default):
        if re.search(r"(?<![\w.])" + re.escape(r) + r"(?!\w|\.\d)", text):
            return True
    return False


FACTORIES = _factories()


def test_the_factories_are_found():
    assert len(FACTORIES) >= 21  # 11 aliases (mbf among them) and 10 scale_by_*


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_docstring_is_complete(name):
    factory = FACTORIES[name]
    doc = inspect.getdoc(factory) or ""
    assert re.search(r"^Args:$", doc, flags=re.M), f"{name}: no Args: section"
    assert re.search(r"^References:$", doc, flags=re.M), f"{name}: no References: section"
    entries = _args_entries(doc)
    problems = []
    for p in inspect.signature(factory).parameters.values():
        listed = re.search(rf"``{p.name}=([^`]*)``", doc)
        if p.name in entries:
            text = entries[p.name]
        elif listed:
            text = listed.group(1)
        else:
            problems.append(f"{p.name} is not described")
            continue
        if p.default is not inspect.Parameter.empty and not _mentions_default(text, p.default):
            problems.append(f"{p.name}: its default {p.default!r} is not stated")
    assert problems == [], f"{name}: {problems}"
