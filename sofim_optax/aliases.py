"""How the ready-made aliases are built from their ``scale_by_*`` transformations.

An alias such as :func:`sofim_optax.kfac` is ``scale_by_kfac(...)`` chained with weight
decay, momentum and the learning rate. Its signature is *derived* from the ``scale_by_*``
one by :func:`make_alias`: ``learning_rate`` first (the one positional argument), then the
alias's own keyword-only arguments (``momentum``, ``weight_decay``, ...), then every
argument of the ``scale_by_*`` with the same default. So each default is written once, the
alias and its transformation can never disagree, and ``inspect.signature`` (which
``optax.inject_hyperparams``, ``help`` and Sphinx read) shows the full, explicit list.

The chains shared by several methods are here: :func:`momentum_chain` (KFAC, the KPSVD
family, Nyström-SGD) and :func:`decay_chain` (SOFIM, AdaHessian).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import optax

from sofim_optax import guards
from sofim_optax.hyperparameters import Scalar, ScalarOrSchedule

__all__ = [
    "make_alias",
    "with_scale_by_arguments",
    "bind_arguments",
    "specialize",
    "momentum_chain",
    "decay_chain",
    "MOMENTUM_ARGUMENTS",
    "DECAY_ARGUMENTS",
    "SCALE_BY_ARGUMENTS",
]

_NO_DEFAULT = inspect.Parameter.empty

#: The line of an alias's ``doc`` that :func:`make_alias` replaces by the list of the
#: ``scale_by_*`` arguments the alias's ``Args:`` section does not describe, with their defaults.
SCALE_BY_ARGUMENTS = "{scale_by_arguments}"

#: The alias arguments of :func:`momentum_chain`, with their defaults.
MOMENTUM_ARGUMENTS: Mapping[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 0.0,
    "weight_decay_mask": None,
    "nesterov": False,
}
#: The alias arguments of :func:`decay_chain`, with their defaults.
DECAY_ARGUMENTS: Mapping[str, Any] = {"weight_decay": 0.0, "weight_decay_mask": None}

_ANNOTATIONS = {
    "momentum": "Scalar | None",
    "gradient_momentum": "Scalar | None",
    "gradient_ema": "Scalar | None",
    "weight_decay": "Scalar",
    "weight_decay_mask": "Any",
    "nesterov": "bool",
}


def momentum_chain(
    scale: optax.GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    momentum: Scalar | None,
    weight_decay: Scalar,
    weight_decay_mask: Any,
    nesterov: bool,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scale, add_decayed_weights(weight_decay, weight_decay_mask), trace(momentum,
    nesterov), scale_by_learning_rate(learning_rate))``, the momentum term left out when
    ``momentum is None``: heavy-ball momentum on the preconditioned direction, decoupled
    weight decay."""
    parts = [scale, optax.add_decayed_weights(weight_decay, weight_decay_mask)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def decay_chain(
    scale: optax.GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    weight_decay: Scalar,
    weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scale, add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))``: decoupled (AdamW-style) weight decay."""
    return optax.chain(
        scale,
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_alias(
    scale_by: Callable[..., optax.GradientTransformation],
    chain: Callable[..., optax.GradientTransformation],
    *,
    name: str,
    doc: str,
    alias_arguments: Mapping[str, Any],
    learning_rate_default: Any = _NO_DEFAULT,
    overrides: Mapping[str, Any] | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """Builds ``name(learning_rate, *, **alias_arguments, **scale_by's arguments)``.

    Calling it returns ``chain(scale_by(**its arguments), learning_rate=...,
    **alias arguments)`` under the step guard of :mod:`sofim_optax.guards` (a non-finite
    gradient skips the whole chain, momentum included, and is counted in the method's
    ``skipped.steps``).

    Args:
      scale_by: the transformation; all its arguments must be keyword-only.
      chain: ``chain(scale, *, learning_rate, **alias_arguments)``.
      name: the alias's ``__name__``.
      doc: its docstring (the math and the alias's own arguments; the ``scale_by_*``
        arguments are documented there). A line holding only :data:`SCALE_BY_ARGUMENTS`
        (``{scale_by_arguments}``) is replaced by a sentence that names every ``scale_by``
        argument the ``Args:`` section does not describe, each with its default in this alias
        (so that the docstring names every argument and default, and never disagrees with the
        signature).
      alias_arguments: the alias's own keyword-only arguments and their defaults.
      learning_rate_default: a default learning rate (default: none, it must be given).
      overrides: ``scale_by`` arguments whose default differs in this alias.
    """
    overrides = dict(overrides or {})
    scale_parameters = inspect.signature(scale_by).parameters
    parameters = [
        inspect.Parameter(
            "learning_rate",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=learning_rate_default,
            annotation="ScalarOrSchedule",
        )
    ]
    parameters += [
        inspect.Parameter(
            arg,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=_ANNOTATIONS.get(arg, _NO_DEFAULT),
        )
        for arg, default in alias_arguments.items()
    ]
    for p in scale_parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"make_alias: {scale_by.__name__}'s {p.name!r} is not keyword-only")
        parameters.append(p.replace(default=overrides.pop(p.name, p.default)))
    if overrides:
        raise TypeError(f"make_alias: {scale_by.__name__} has no arguments {sorted(overrides)}")
    signature = inspect.Signature(
        parameters, return_annotation="optax.GradientTransformationExtraArgs"
    )

    def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        values = bind_arguments(signature, name, args, kwargs)
        learning_rate = values.pop("learning_rate")
        own = {arg: values.pop(arg) for arg in alias_arguments}
        tx = chain(scale_by(**values), learning_rate=learning_rate, **own)
        # A non-finite gradient skips the whole chain (momentum and schedule included), so
        # that the step is the step that did not happen (counted in the method's state).
        return optax.GradientTransformationExtraArgs(
            tx.init, guards.skip_nonfinite_steps(tx.update, covers_nested=False)
        )

    alias.__signature__ = signature
    alias.__name__ = alias.__qualname__ = name
    alias.__doc__ = with_scale_by_arguments(doc, scale_by.__name__, parameters[1:], alias_arguments)
    alias.__module__ = scale_by.__module__
    if hasattr(scale_by, "static_args"):
        alias.static_args = scale_by.static_args
    return alias


def bind_arguments(
    signature: inspect.Signature, name: str, args: tuple, kwargs: dict
) -> dict[str, Any]:
    """``args``/``kwargs`` bound to ``signature`` with its defaults applied, as a dict; a
    ``TypeError`` that shows ``name`` and the full signature otherwise."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{name}{signature}: {err}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def with_scale_by_arguments(
    doc: str, scale_by_name: str, parameters: list[inspect.Parameter], own: Mapping[str, Any]
) -> str:
    """``doc`` with its :data:`SCALE_BY_ARGUMENTS` line written out (see :func:`make_alias`):
    ``parameters`` are the alias's keyword-only parameters, ``own`` those that are not
    ``scale_by_name``'s."""
    line = re.search(r"^( *)" + re.escape(SCALE_BY_ARGUMENTS) + r"[ \t]*$", doc, flags=re.M)
    if line is None:
        return doc
    described = set(re.findall(r"^ +([a-z_0-9]+):", doc, flags=re.M))
    rest = [
        p
        for p in parameters
        if p.name not in own and p.name not in described and p.default is not _NO_DEFAULT
    ]
    if rest:
        listed = ", ".join(f"``{p.name}={p.default!r}``" for p in rest)
        text = (
            f"Every other argument is :func:`{scale_by_name}`'s (keyword-only, described "
            f"there), with these defaults: {listed}."
        )
    else:
        text = f"Every argument of :func:`{scale_by_name}` is described above."
    indent = line.group(1)
    filled = textwrap.fill(
        text,
        width=92,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return doc[: line.start()] + filled + doc[line.end() :]


def specialize(
    factory: Callable[..., Any],
    *,
    name: str,
    doc: str,
    fixed: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    static_args: tuple[str, ...] = (),
) -> Callable[..., Any]:
    """``factory`` with the arguments in ``fixed`` bound, as a public function of its own.

    The result's signature is ``factory``'s without the ``fixed`` arguments and with the
    defaults in ``defaults`` replacing ``factory``'s (so ``inspect.signature`` and
    ``optax.inject_hyperparams`` see exactly what it takes and what it defaults to); the
    KPSVD family's four ``scale_by_*`` are one factory specialised by ``kind``.
    """
    defaults = dict(defaults or {})
    signature = inspect.signature(factory)
    unknown = (set(fixed) | set(defaults)) - set(signature.parameters)
    if unknown:
        raise TypeError(f"specialize: {factory.__name__} has no arguments {sorted(unknown)}")
    public = signature.replace(
        parameters=[
            p.replace(default=defaults.get(p.name, p.default))
            for p in signature.parameters.values()
            if p.name not in fixed
        ]
    )

    def specialized(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = public.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{name}{public}: {err}") from None
        bound.apply_defaults()
        return factory(**fixed, **bound.arguments)

    specialized.__signature__ = public
    specialized.__name__ = specialized.__qualname__ = name
    specialized.__doc__ = doc
    specialized.__module__ = factory.__module__
    if static_args:
        specialized.static_args = tuple(static_args)
    return specialized
