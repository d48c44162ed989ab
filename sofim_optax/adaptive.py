"""Adaptive aliases: every curvature method with the quadratic-model step, nothing to tune.

``kfac_adaptive(...)`` is :func:`sofim_optax.scale_by_quadratic_model` around
:func:`sofim_optax.scale_by_kfac`, with the damping ``λ`` fed back into KFAC's damping, and
so on for every method below. There is no learning rate, momentum or damping to tune: each
step's length ``α`` and momentum ``μ`` minimise the damped quadratic model in the exact
Gauss-Newton curvature, and ``λ`` follows the Levenberg-Marquardt rule. ``update`` needs
what the method needs plus ``obj_fn``::

    tx = sofim_optax.kfac_adaptive()
    updates, state = tx.update(grads, state, params, layer_stats=stats,
                               obj_fn=lambda p: loss_fn(p, x, y))
    params = optax.apply_updates(params, updates)   # no learning rate: δ is the step

* ``kfac_adaptive``: :func:`~sofim_optax.scale_by_kfac`;
* ``kpsvd_adaptive``, ``kpsvd_deflation_adaptive``, ``kfac_corrected_adaptive``,
  ``kpsvd_lanczos_adaptive``: the KPSVD family's four ``scale_by_*``;
* ``mbf_adaptive``: :func:`~sofim_optax.scale_by_mini_block_fisher` (``inverse="eigh"``);
* ``kbfgs_adaptive``, ``kbfgs_l_adaptive``: :func:`~sofim_optax.scale_by_kbfgs` (the latter
  with ``memory=100``, as :func:`~sofim_optax.kbfgs_l`);

  all of these with the damping fed back;
* ``sofim_adaptive``, ``adahessian_adaptive``: :func:`~sofim_optax.scale_by_sofim` and
  :func:`~sofim_optax.scale_by_adahessian`, the damping not fed back.

"Fed back" means that the method is rebuilt at every step with ``damping = λ + η``
(``l2_regularization`` ``η``), so that its preconditioner is damped like the model; its own
``damping`` argument is then replaced by ``initial_damping``. SOFIM's ``damping`` is a ridge
on the scale of its gradient moments, and AdaHessian has none, so for them ``λ`` damps the
model only and their own arguments keep their meaning. A plain optax direction (Adam, ...)
is used the same way through :func:`sofim_optax.scale_by_quadratic_model` directly.

Like every alias, each runs under the step guard of :mod:`sofim_optax.guards`: a non-finite
gradient skips the whole step (``λ`` and the momentum included).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from sofim_optax import guards
from sofim_optax.adahessian import scale_by_adahessian
from sofim_optax.aliases import SCALE_BY_ARGUMENTS, bind_arguments, with_scale_by_arguments
from sofim_optax.kbfgs import scale_by_kbfgs
from sofim_optax.kfac import scale_by_kfac
from sofim_optax.kpsvd import (
    scale_by_kfac_corrected,
    scale_by_kpsvd,
    scale_by_kpsvd_deflation,
    scale_by_kpsvd_lanczos,
)
from sofim_optax.mini_block_fisher import scale_by_mini_block_fisher
from sofim_optax.quadratic_model import scale_by_quadratic_model
from sofim_optax.sofim import scale_by_sofim

__all__ = [
    "QUADRATIC_MODEL_ARGUMENTS",
    "make_adaptive_alias",
    "kfac_adaptive",
    "kpsvd_adaptive",
    "kpsvd_deflation_adaptive",
    "kfac_corrected_adaptive",
    "kpsvd_lanczos_adaptive",
    "mbf_adaptive",
    "kbfgs_adaptive",
    "kbfgs_l_adaptive",
    "sofim_adaptive",
    "adahessian_adaptive",
]

#: The arguments of :func:`sofim_optax.scale_by_quadratic_model` an adaptive alias takes,
#: with their defaults (read from its signature, so they never disagree).
QUADRATIC_MODEL_ARGUMENTS: Mapping[str, Any] = {
    name: p.default
    for name, p in inspect.signature(scale_by_quadratic_model).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}

_QUADRATIC_MODEL_DOC = """
    Args:
      initial_damping: ``λ₀``, the starting damping of the model (default
        ``{initial_damping!r}``); it adapts from there, so it needs no tuning beyond its
        order of magnitude.{fed}
      damping_period: steps between adaptations of ``λ``, each costing one forward pass
        (default ``{damping_period!r}``).
      damping_decay: ``λ`` is multiplied or divided by ``damping_decay ** damping_period``
        (default ``{damping_decay!r}``).
      min_damping: floor of ``λ`` (default ``{min_damping!r}``).
      max_damping: ceiling of ``λ`` (default ``{max_damping!r}``).
      lower_threshold: reduction ratio below which ``λ`` grows (default
        ``{lower_threshold!r}``).
      upper_threshold: reduction ratio above which ``λ`` shrinks (default
        ``{upper_threshold!r}``).
      adapt_momentum: adapt a momentum on the previous step (default ``{adapt_momentum!r}``).
      curvature: ``"gauss_newton"`` or ``"hessian"`` (default ``{curvature!r}``).
      l2_regularization: ``η`` of an ``(η/2)‖θ‖²`` term inside ``obj_fn`` (default
        ``{l2_regularization!r}``).
      norm_constraint: clip the step to ``δᵀ(C + ηI)δ ≤ norm_constraint`` (default
        ``{norm_constraint!r}``, off).
      reject_increasing_steps: take no step when the measured loss goes up (default
        ``{reject_increasing_steps!r}``).

    {scale_by_arguments}

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates are the step itself (no
      learning rate after it); ``update`` needs ``obj_fn`` and the method's extra arguments
      ({needs}). Its state is a :class:`sofim_optax.QuadraticModelState` around the method's.

    References:
      Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (sections 6-7: the
      quadratic model, the Levenberg-Marquardt damping; section 10: the update clipping).
      {reference}
"""


def make_adaptive_alias(
    scale_by: Callable[..., optax.GradientTransformation],
    *,
    name: str,
    summary: str,
    needs: str,
    feeds_damping: bool,
    reference: str,
    overrides: Mapping[str, Any] | None = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """Builds ``name(*, **quadratic-model arguments, **scale_by's arguments)``.

    The signature is derived from both signatures (every argument keyword-only, each
    default written once). With ``feeds_damping`` the method's ``damping`` is left out and
    the method is rebuilt at every step with the adapted damping.

    Args:
      scale_by: the method's ``scale_by_*``.
      name: the alias's ``__name__``.
      summary: the first paragraph of its docstring.
      needs: the extra ``update`` arguments, for the docstring.
      feeds_damping: feed ``λ + η`` into ``scale_by``'s ``damping``.
      reference: the method's paper, one reST line for the ``References:`` section.
      overrides: arguments (of the quadratic model or of ``scale_by``) whose default differs
        in this alias.
    """
    overrides = dict(overrides or {})
    own = {arg: overrides.pop(arg, default) for arg, default in QUADRATIC_MODEL_ARGUMENTS.items()}
    parameters = [
        inspect.Parameter(arg, inspect.Parameter.KEYWORD_ONLY, default=default)
        for arg, default in own.items()
    ]
    for p in inspect.signature(scale_by).parameters.values():
        if feeds_damping and p.name == "damping":
            continue
        if p.name in own:
            raise TypeError(f"make_adaptive_alias: {scale_by.__name__}'s {p.name!r} clashes")
        parameters.append(p.replace(default=overrides.pop(p.name, p.default)))
    if overrides:
        raise TypeError(f"make_adaptive_alias: {scale_by.__name__} has no {sorted(overrides)}")
    signature = inspect.Signature(
        parameters, return_annotation="optax.GradientTransformationExtraArgs"
    )

    def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        values = bind_arguments(signature, name, args, kwargs)
        model = {arg: values.pop(arg) for arg in own}
        if feeds_damping:
            scale_by(damping=model["initial_damping"], **values)  # bad arguments fail here

            def direction(damping):
                return scale_by(damping=damping, **values)
        else:
            direction = scale_by(**values)
        tx = scale_by_quadratic_model(direction, **model)
        return optax.GradientTransformationExtraArgs(
            tx.init, guards.skip_nonfinite_steps(tx.update, covers_nested=False)
        )

    fed = (
        f"\n        ``λ + l2_regularization`` is handed to :func:`sofim_optax.{scale_by.__name__}`"
        "\n        as its ``damping`` at every step."
        if feeds_damping
        else ""
    )
    doc = (
        summary.rstrip()
        + "\n"
        + _QUADRATIC_MODEL_DOC.format(
            fed=fed, needs=needs, scale_by_arguments=SCALE_BY_ARGUMENTS, reference=reference, **own
        )
    )
    alias.__signature__ = signature
    alias.__name__ = alias.__qualname__ = name
    alias.__doc__ = with_scale_by_arguments(doc, scale_by.__name__, parameters, own)
    alias.__module__ = __name__
    alias.scale_by = scale_by  # (the method it wraps, for tools that build its fixed twin)
    alias.feeds_damping = feeds_damping
    alias.static_args = tuple(
        dict.fromkeys(scale_by_quadratic_model.static_args + getattr(scale_by, "static_args", ()))
    )
    return alias


def _summary(method: str, scale_by: str, extra: str = "") -> str:
    return (
        f"{method} with the adaptive step: :func:`sofim_optax.scale_by_quadratic_model` around "
        f":func:`sofim_optax.{scale_by}`.{extra}\n\n"
        "    No learning rate, momentum or damping to tune (see ``sofim_optax.adaptive``).\n"
    )


_STATS = "``layer_stats``"
_KPSVD = (
    "Its direction: Koroko et al., `Efficient Approximations of the Fisher Matrix in Neural "
    "Networks using Kronecker Product Singular Value Decomposition "
    "<https://arxiv.org/abs/2201.10285>`_, 2023."
)
_KBFGS = (
    "Its direction: Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep "
    "Neural Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020."
)
# (K-BFGS damps H_a by √λ, so it sees a far smaller ridge than KFAC at the same λ)
_KBFGS_FLOOR = (
    " ``min_damping`` defaults to ``0.1`` here: with the other aliases' floor of ``1e-2``, the"
    " classification MLP's test loss stopped falling at 0.47 (the main job's quick protocol);"
    " with ``0.1`` it fell to 0.41, and the autoencoder and the CNN trained as well or better."
)
_REFERENCES = {
    "kfac_adaptive": "Its direction is the same paper's KFAC.",
    "kpsvd_adaptive": _KPSVD,
    "kpsvd_deflation_adaptive": _KPSVD,
    "kfac_corrected_adaptive": _KPSVD,
    "kpsvd_lanczos_adaptive": _KPSVD,
    "mbf_adaptive": (
        "Its direction: Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural "
        "Networks <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023."
    ),
    "kbfgs_adaptive": _KBFGS,
    "kbfgs_l_adaptive": _KBFGS,
    "sofim_adaptive": (
        "Its direction: Sen et al., `SOFIM: Stochastic Optimization Using Regularized Fisher "
        "Information Matrix <https://arxiv.org/abs/2403.02833>`_, 2024."
    ),
    "adahessian_adaptive": (
        "Its direction: Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine "
        "Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021."
    ),
}

kfac_adaptive = make_adaptive_alias(
    scale_by_kfac,
    reference=_REFERENCES["kfac_adaptive"],
    name="kfac_adaptive",
    summary=_summary("KFAC", "scale_by_kfac"),
    needs=_STATS,
    feeds_damping=True,
)
kpsvd_adaptive = make_adaptive_alias(
    scale_by_kpsvd,
    reference=_REFERENCES["kpsvd_adaptive"],
    name="kpsvd_adaptive",
    summary=_summary("KPSVD", "scale_by_kpsvd"),
    needs=_STATS,
    feeds_damping=True,
)
kpsvd_deflation_adaptive = make_adaptive_alias(
    scale_by_kpsvd_deflation,
    reference=_REFERENCES["kpsvd_deflation_adaptive"],
    name="kpsvd_deflation_adaptive",
    summary=_summary("KPSVD with deflation", "scale_by_kpsvd_deflation"),
    needs=_STATS,
    feeds_damping=True,
)
kfac_corrected_adaptive = make_adaptive_alias(
    scale_by_kfac_corrected,
    reference=_REFERENCES["kfac_corrected_adaptive"],
    name="kfac_corrected_adaptive",
    summary=_summary("KFAC-corrected", "scale_by_kfac_corrected"),
    needs=_STATS,
    feeds_damping=True,
)
kpsvd_lanczos_adaptive = make_adaptive_alias(
    scale_by_kpsvd_lanczos,
    reference=_REFERENCES["kpsvd_lanczos_adaptive"],
    name="kpsvd_lanczos_adaptive",
    summary=_summary("KPSVD-Lanczos", "scale_by_kpsvd_lanczos"),
    needs=_STATS,
    feeds_damping=True,
)
mbf_adaptive = make_adaptive_alias(
    scale_by_mini_block_fisher,
    reference=_REFERENCES["mbf_adaptive"],
    name="mbf_adaptive",
    summary=_summary(
        "Mini-Block Fisher",
        "scale_by_mini_block_fisher",
        ' Its default ``inverse`` is ``"eigh"`` here, so that each new damping acts at once '
        "rather than at the next refresh, and ``min_damping`` is ``1e-3``: with the other "
        "aliases' ``1e-2`` the small CNN's training loss was still 0.449 after 3 epochs (the "
        "main job's quick protocol), with ``1e-3`` 0.359, and the MLP and the small "
        "autoencoder trained as well or better.",
    ),
    needs=_STATS,
    feeds_damping=True,
    overrides={"inverse": "eigh", "min_damping": 1e-3},
)
kbfgs_adaptive = make_adaptive_alias(
    scale_by_kbfgs,
    reference=_REFERENCES["kbfgs_adaptive"],
    name="kbfgs_adaptive",
    summary=_summary("K-BFGS", "scale_by_kbfgs", _KBFGS_FLOOR),
    needs="``layer_stats`` and ``previous_batch_stats``",
    feeds_damping=True,
    overrides={"min_damping": 0.1},
)
kbfgs_l_adaptive = make_adaptive_alias(
    scale_by_kbfgs,
    reference=_REFERENCES["kbfgs_l_adaptive"],
    name="kbfgs_l_adaptive",
    summary=_summary(
        "K-BFGS(L)", "scale_by_kbfgs", " ``memory`` defaults to ``100`` here." + _KBFGS_FLOOR
    ),
    needs="``layer_stats`` and ``previous_batch_stats``",
    feeds_damping=True,
    overrides={"memory": 100, "min_damping": 0.1},
)
sofim_adaptive = make_adaptive_alias(
    scale_by_sofim,
    reference=_REFERENCES["sofim_adaptive"],
    name="sofim_adaptive",
    summary=_summary(
        "SOFIM",
        "scale_by_sofim",
        " SOFIM's own ``damping`` (its ridge) keeps its meaning; ``λ`` damps the model only.",
    ),
    needs="none besides ``obj_fn``",
    feeds_damping=False,
)
adahessian_adaptive = make_adaptive_alias(
    scale_by_adahessian,
    reference=_REFERENCES["adahessian_adaptive"],
    name="adahessian_adaptive",
    summary=_summary("AdaHessian", "scale_by_adahessian", " ``λ`` damps the model only."),
    needs="``obj_fn`` (also AdaHessian's own)",
    feeds_damping=False,
)
