r"""The Kronecker-product-SVD family: KPSVD, Deflation, KFAC-corrected and Lanczos.

Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou, Tran, "Efficient Approximations of the
Fisher Matrix in Neural Networks using Kronecker Product Singular Value Decomposition"
(arXiv 2201.10285; ESAIM: Proceedings and Surveys 73, 2023).

KFAC approximates a layer's Fisher block ``F = mean_n (ā_n ā_nᵀ) ⊗ (g_n g_nᵀ)`` by
``mean(āāᵀ) ⊗ mean(ggᵀ)``, which is not the Kronecker product closest to ``F``. The four
methods here use closer approximations, found matrix-free (never forming ``F``) by SVDs of the
Van Loan–Pitsianis rearrangement ``𝓡(F)`` (:func:`sofim_optax.linalg.nearest_kronecker`):

============== ================================ =========================================
method         approximation of ``F``            computed by
============== ================================ =========================================
KPSVD          ``R ⊗ S``                         power SVD of ``𝓡(F)`` (rank one)
Deflation      ``R1 ⊗ S1 + R2 ⊗ S2``             power SVD, deflated for the second term
KFAC-corrected ``A ⊗ G + R ⊗ S``                 KFAC's ``A, G`` and a power SVD of
                                                 ``𝓡(F) − vec(A) vec(G)ᵀ``
Lanczos        ``R1 ⊗ S1 + R2 ⊗ S2``             restarted Golub–Kahan–Lanczos
============== ================================ =========================================

All four share one state type (:class:`ScaleByKpsvdState`) and one curvature
(:class:`sofim_optax.kpsvd_curvature.KroneckerSvdCurvature`, whose module writes out the
conv-layer Fisher, the averaging of the factors and the damping rule); the layer discovery,
checks, periods and fallback are KFAC's (:mod:`sofim_optax.layerwise`). Each ``scale_by_*``
holds the algorithm (no learning rate, no sign); each alias chains it as :func:`kpsvd` does.

The four ``scale_by_*`` take the same keyword-only arguments (Lanczos also ``krylov_dim``),
each documented on every member. When a ``damping`` changed at run time (a schedule, or an
adaptive damping through ``optax.inject_hyperparams``) takes effect:

- KPSVD: at the very next step. Its refresh stores eigendecompositions of the undamped
  ``R, S``, and the shifts are applied to their eigenvalues at every step.
- Deflation, KFAC-corrected and Lanczos: **at the next inverse refresh** (up to
  ``inverse_period − 1`` steps later); until then the update keeps the damping of the last
  refresh. The reason is mathematical, not a shortcut: their solve diagonalises the damped
  first term and the second term simultaneously, and the diagonalising ``K1`` and ``s1``
  are the generalised eigenvectors and eigenvalues of the pencil
  ``(R1 + π√λ I, R2)`` (``K2, s2``: of ``(S1 + (√λ/π) I, S2)``). Unless ``R1`` and ``R2``
  commute, a new ``λ`` changes the eigenvectors themselves, not a diagonal, so it can only
  be applied by redoing the two ``eigh`` per factor of a refresh. Nor can an iterative
  solve with the undamped factors stand in: the ``"abs"`` and ``"clip"`` rules are defined
  in that ``λ``-dependent basis (only ``"exact"`` would be reachable, at many products
  per step). A shorter ``inverse_period`` shortens the delay.

Each returns an ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
params=None, *, layer_stats, **extra)`` requires ``layer_stats`` (``dict[str, LayerStats]``,
e.g. from ``sofim_optax.curvature.linen.value_grad_and_stats(..., fisher="sampled",
rng=key)``); errors are raised at trace time and name the layer. Updates come back in each
gradient leaf's dtype; statistics, SVDs and solves run in float32 (float64 for float64
kernels).

References:
  Koroko et al., `Efficient Approximations of the Fisher Matrix in Neural Networks using
  Kronecker Product Singular Value Decomposition <https://arxiv.org/abs/2201.10285>`_, 2023.
  Van Loan & Pitsianis, Approximation with Kronecker products, 1993.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import optax

from sofim_optax import aliases, diagonal_fisher, guards, layerwise
from sofim_optax import kpsvd_curvature as family
from sofim_optax.hyperparameters import Scalar
from sofim_optax.kfac import DEFAULT_MAX_FACTOR_DIM
from sofim_optax.kpsvd_curvature import KroneckerSvdCurvature

__all__ = [
    "ScaleByKpsvdState",
    "scale_by_kpsvd",
    "kpsvd",
    "scale_by_kpsvd_deflation",
    "kpsvd_deflation",
    "scale_by_kfac_corrected",
    "kfac_corrected",
    "scale_by_kpsvd_lanczos",
    "kpsvd_lanczos",
]


class ScaleByKpsvdState(NamedTuple):
    """State of every ``scale_by_*`` of the family.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`sofim_optax.kpsvd_curvature.KroneckerSvdCurvature`.
      fallback_state: :class:`sofim_optax.layerwise.FallbackState`, the fallback
        transformation's state for the parameters no captured layer covers.
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array
    curvature: KroneckerSvdCurvature
    fallback_state: layerwise.FallbackState
    skipped: guards.SkipCounts


def _scale_by_family(
    kind: str,
    *,
    damping: Scalar = 1e-3,
    ema: Scalar = 0.95,
    stats_period: int | jax.Array = 10,
    inverse_period: int | jax.Array = 20,
    pi_adjusted: bool = True,
    tol: Scalar = 1e-5,
    max_iters: int | jax.Array = 5,
    krylov_dim: int | None = 4,
    indefinite: str = "abs",
    fallback: optax.GradientTransformation | str | None = "diagonal",
    kernel_output_axes: Mapping[str, int] | None = None,
    max_factor_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The one factory of the family; ``kind`` is one of ``kpsvd_curvature.KINDS``."""
    cfg = family.FamilyConfig(
        kind=kind,
        damping=damping,
        ema=ema,
        pi_adjusted=pi_adjusted,
        tol=tol,
        max_iters=max_iters,
        krylov_dim=krylov_dim,
        indefinite=indefinite,
    )
    fallback = diagonal_fisher.resolve_fallback(_NAMES[kind], fallback, damping=damping, ema=ema)
    return family.transformation(
        _NAMES[kind],
        ScaleByKpsvdState,
        cfg,
        stats_period,
        inverse_period,
        fallback,
        kernel_output_axes=kernel_output_axes,
        max_factor_dim=DEFAULT_MAX_FACTOR_DIM if max_factor_dim is None else max_factor_dim,
    )


_NAMES = {
    "kpsvd": "scale_by_kpsvd",
    "deflation": "scale_by_kpsvd_deflation",
    "kfac_corrected": "scale_by_kfac_corrected",
    "lanczos": "scale_by_kpsvd_lanczos",
}


def _member(kind: str, doc: str):
    """The public ``scale_by_*`` of one member: the factory with ``kind`` (and the arguments
    the member does not use) bound."""
    unused = {"kpsvd": {"krylov_dim": None, "indefinite": "abs"}, "lanczos": {}}
    fixed = {"kind": kind, **unused.get(kind, {"krylov_dim": None})}
    static = ("krylov_dim", "max_factor_dim") if kind == "lanczos" else ("max_factor_dim",)
    return aliases.specialize(
        _scale_by_family,
        name=_NAMES[kind],
        doc=doc,
        fixed=fixed,
        defaults={"max_iters": MAX_ITERS[kind]},
        static_args=static,
    )


#: Default solver budget per statistics update: power iterations per term, or Lanczos passes
#: of ``krylov_dim`` steps (each step one product with 𝓡 and one with 𝓡ᵀ, like a power
#: iteration). The solver starts from the averaged factors of the last update, so a small
#: budget keeps refining the same triplets from update to update; where it stops short, the
#: next singular values are close together, and then every vector of their span fits the
#: block about equally well.
MAX_ITERS = {"kpsvd": 5, "deflation": 5, "kfac_corrected": 5, "lanczos": 2}


_SHARED_ARGS = r"""
    Args:
      damping: ``λ`` (default ``1e-3``), ``> 0`` (a traced value is floored at
        ``linalg.DAMPING_FLOOR``), on the Fisher's scale (see :func:`sofim_optax.scale_by_kfac`
        on how the loss normalisation sets it).
        Factored Tikhonov damping of the first (PSD) term: ``π√λ`` on the input side,
        ``√λ/π`` on the output side. {damping_effect}
      ema: upper bound of the factors' EMA decay ``ρ = min(1 − 1/k, ema)`` (default
        ``0.95``, the paper's).
      stats_period: recompute the factors every this many updates (default ``10``; the
        paper uses 100 for both periods). A statistics update runs the solver, each iteration
        two products with the whole batch (twice KFAC's statistics); at 10, every member's
        step is within 1.4× KFAC's default step on the deep autoencoder, and 312 steps on the
        Fashion-MNIST MLP end no higher than with every period at 1 (docs/benchmarks.md).
        At a learning rate near the edge of stability (0.1 on a small autoencoder) every 10
        diverged where every update trained: pass ``1`` there, or use the adaptive alias.
        Pass ``layer_stats`` on every update anyway.
      inverse_period: refresh the eigendecompositions (KPSVD) or the simultaneous
        diagonalisation (rank two) every this many updates (default ``20``).
      pi_adjusted: balance the damping with ``π = sqrt((tr R1/d_a)/(tr S1/d_g))`` (default
        ``True``; ``False``: ``√λ`` on both sides).
      tol: relative stopping tolerance of the solver (default ``1e-5``; the paper's ``1e-6``
        is absolute).
      max_iters: cap on solver iterations per statistics update (power iterations per term,
        or Lanczos passes; default ``{max_iters}``, the paper's 1000). Each update starts
        from the averaged factors of the last one, so the iterations carry on across updates;
        the cost is proportional to the iterations run (``lax.while_loop``), recorded in
        ``state.curvature.solver_iterations``.{extra}
      fallback: transformation for the parameters no captured layer covers (default
        ``"diagonal"``: a diagonal Fisher step with the same damping; ``None``: identity); see
        :func:`sofim_optax.scale_by_kfac`.
      kernel_output_axes: ``{{layer path: number of output axes}}`` for a bias-less
        ``DenseGeneral`` with several output axes (see :func:`sofim_optax.scale_by_kfac`).
        Default ``None``.
      max_factor_dim: a layer whose ``d_a`` or ``d_g`` exceeds it (a vocabulary-sized head)
        takes the fallback path, with an INFO log line, so that no ``d × d`` block of it is
        ever formed; ``None`` (default) means
        :data:`sofim_optax.kfac.DEFAULT_MAX_FACTOR_DIM` ``= 4096`` (a number given through
        ``optax.inject_hyperparams`` must be listed in its ``static_args``). The family's
        blocks mix both factors, so unlike KFAC it cannot keep them block-diagonal.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
      params=None, *, layer_stats, **extra)`` requires ``layer_stats`` (as made by
      ``sofim_optax.curvature.linen.value_grad_and_stats``); errors are raised at trace time
      and name the layer.

    References:
      Koroko et al., `Efficient Approximations of the Fisher Matrix in Neural Networks using
      Kronecker Product Singular Value Decomposition <https://arxiv.org/abs/2201.10285>`_,
      ESAIM: Proceedings and Surveys 73, 2023.
    """

_INDEFINITE_ARG = """
      indefinite: how the generalised eigenvalue products ``s1_i s2_j`` of an indefinite
        second term enter the solve (:func:`sofim_optax.linalg.kron_sum_apply`): ``"abs"``
        (default, the authors': ``1 + |s1_i s2_j|``), ``"clip"`` (``1 + max(s1_i s2_j, 0)``)
        or ``"exact"`` (``1 + s1_i s2_j``; positive definite sums only)."""
_KRYLOV_ARG = """
      krylov_dim: bidiagonalisation steps per Lanczos pass (default ``4``; the paper's ``2``
        stalls on the second triplet). A Python int: under ``optax.inject_hyperparams`` list
        it in ``static_args``."""
_DAMPING_AT_ONCE = "A change at run time takes effect at the next step."
_DAMPING_AT_REFRESH = (
    "A change at run time takes effect at the next\n"
    "        inverse refresh (see :mod:`sofim_optax.kpsvd`)."
)


def _member_doc(kind: str, summary: str, damping_effect: str, extra: str = "") -> str:
    return summary + _SHARED_ARGS.format(
        damping_effect=damping_effect, extra=extra, max_iters=MAX_ITERS[kind]
    )


_SCALE_BY_KPSVD_DOC = r"""Precondition each captured layer by the damped inverse of its KPSVD approximation.

    KPSVD (Koroko et al. 2022, §3.1) uses the Kronecker product closest to the Fisher block
    in Frobenius norm,

    .. math::

        (\hat R, \hat S) = \arg\min_{R,S} \|F - R\otimes S\|_F ,

    the top singular triplet of ``𝓡(F)``, by power iteration with the matrix-free products
    ``𝓡(F)vec(V) = vec(mean_n (g_nᵀVg_n) ā_nā_nᵀ)``, ``𝓡(F)ᵀvec(U) = vec(mean_n (ā_nᵀUā_n)
    g_ng_nᵀ)``, split as ``R̂ = √σ mat(u)``, ``Ŝ = √σ mat(v)``. Warm-started from the averaged
    ``S`` (the identity on the first update), so the iterates, and the factors, stay positive
    semi-definite. The factors are averaged separately, ``R ← ρR + (1−ρ)R̂``,
    ``S ← ρS + (1−ρ)Ŝ``, and the update is KFAC's with ``R, S`` in place of ``A, G``:

    .. math::

        \Delta = (R + \pi\sqrt\lambda I)^{-1}\, V\, (S + \tfrac{\sqrt\lambda}{\pi} I)^{-1},
        \qquad \pi = \sqrt{\frac{\operatorname{tr}R/d_a}{\operatorname{tr}S/d_g}} ,

    from eigendecompositions refreshed every ``inverse_period`` steps; the damping applies at
    every step, so a schedule on it through ``optax.inject_hyperparams`` acts at once.

    """
scale_by_kpsvd = _member("kpsvd", _member_doc("kpsvd", _SCALE_BY_KPSVD_DOC, _DAMPING_AT_ONCE, ""))

_SCALE_BY_KPSVD_DEFLATION_DOC = r"""Deflation: precondition each layer by a rank-two Kronecker approximation.

    The best approximation of the Fisher block by a sum of two Kronecker products,
    ``min ‖F − R_1 ⊗ S_1 − R_2 ⊗ S_2‖_F``, is the rank-two truncated SVD of ``𝓡(F)``.
    Deflation (Koroko et al. 2022, §3.2) computes it by power iteration twice: ``(R̂_1, Ŝ_1)``
    as KPSVD, then ``(R̂_2, Ŝ_2)`` from the deflated ``𝓡(F) − vec(R̂_1) vec(Ŝ_1)ᵀ``, each
    warm-started from its averaged factor. The four factors are averaged separately.
    ``R_1, S_1`` are PSD; ``R_2, S_2`` are indefinite. Every ``inverse_period`` steps the
    damped sum is diagonalised simultaneously (:func:`sofim_optax.linalg.kron_sum_factors`),
    and each step returns

    .. math::

        \Delta = \big((R_1 + \pi\sqrt\lambda I)\otimes(S_1 + \tfrac{\sqrt\lambda}{\pi} I)
            + R_2\otimes S_2\big)^{-1}\operatorname{vec}(V)
            = K_1\big[(K_1^\top V K_2) \oslash (1 + s_1 s_2^\top)\big]K_2^\top

    with ``1 + s1 s2ᵀ`` replaced per ``indefinite``, since the rank-two approximation of a PSD
    matrix need not be PSD.

    Damping: a ``damping`` changed at run time (``optax.inject_hyperparams``) takes effect at
    the next inverse refresh, not before: ``K_1, s_1`` and ``K_2, s_2`` are the generalised
    eigendecompositions of the damped first term against the second, and a new ``λ`` changes
    the eigenvectors (not only a diagonal), so it needs a refresh's two ``eigh`` per factor
    (details in :mod:`sofim_optax.kpsvd`).

    Note: the authors' public ``deflation.py`` never deflates (its ``method`` attribute is set
    to ``"kpsvd"``, so the second power SVD finds the first pair again); this follows the
    paper's mathematics.

    """
scale_by_kpsvd_deflation = _member(
    "deflation",
    _member_doc("deflation", _SCALE_BY_KPSVD_DEFLATION_DOC, _DAMPING_AT_REFRESH, _INDEFINITE_ARG),
)

_SCALE_BY_KFAC_CORRECTED_DOC = r"""Precondition each captured layer by KFAC plus a Kronecker correction.

    KFAC's ``A ⊗ G`` (averaged as in :func:`sofim_optax.scale_by_kfac`) is corrected by the
    Kronecker product closest to what it misses of the minibatch Fisher block (Koroko et al.
    2022, §3.3):

    .. math::

        (\hat R, \hat S) = \arg\min_{R,S} \|F - A\otimes G - R\otimes S\|_F ,

    the top singular triplet of ``𝓡(F) − vec(A) vec(G)ᵀ`` by power iteration
    (:func:`sofim_optax.linalg.nearest_kronecker` with ``subtract=(A, G)``), where ``A, G`` are
    the averages **including** this minibatch (the authors' code subtracts the averaged
    factors), warm-started from the averaged ``S``. ``R, S`` are averaged separately, and
    ``A ⊗ G + R ⊗ S`` is inverted by simultaneous diagonalisation of the damped KFAC term and
    the (indefinite) correction, as in :func:`scale_by_kpsvd_deflation`.
    ``state.curvature.factors`` holds ``A, G`` under the roles ``A1, G1`` and ``R, S`` under
    ``A2, G2``.

    Damping: a ``damping`` changed at run time (``optax.inject_hyperparams``) takes effect at
    the next inverse refresh, not before: the simultaneous diagonalisation is the generalised
    eigendecomposition of ``(A + π√λ I, R)`` and of ``(G + (√λ/π) I, S)``, whose eigenvectors
    change with ``λ`` (``A`` and ``R`` do not commute in general), so a new ``λ`` needs a
    refresh's two ``eigh`` per factor (details in :mod:`sofim_optax.kpsvd`). KFAC itself
    (:func:`sofim_optax.scale_by_kfac` with ``inverse="eigh"``) applies it at once.

    Note: the authors' public ``kfac_cor.py`` does not subtract ``A ⊗ G`` (its ``method`` is
    ``"kpsvd"``) and crashes at its second refresh; this follows the mathematics.

    """
scale_by_kfac_corrected = _member(
    "kfac_corrected",
    _member_doc(
        "kfac_corrected", _SCALE_BY_KFAC_CORRECTED_DOC, _DAMPING_AT_REFRESH, _INDEFINITE_ARG
    ),
)

_SCALE_BY_KPSVD_LANCZOS_DOC = r"""Lanczos: precondition each layer by a rank-two Kronecker approximation.

    The same target as :func:`scale_by_kpsvd_deflation`, ``min ‖F − R_1 ⊗ S_1 − R_2 ⊗ S_2‖_F``,
    computed by Golub–Kahan–Lanczos bidiagonalisation of ``𝓡(F)`` (Koroko et al. 2022, §3.4;
    :func:`sofim_optax.linalg.nearest_kronecker` with ``rank=2, method="lanczos"``) with
    ``krylov_dim`` steps per pass and explicit restarts from ``q = v_1 + v_2``, started from
    ``S_1/‖S_1‖ + S_2/‖S_2‖`` of the averaged factors (a fixed PSD start on the first update).
    Both top triplets come out of one Krylov space instead of two sequential power
    iterations. The factors are averaged separately and inverted as in Deflation; so, as
    there, a ``damping`` changed at run time (``optax.inject_hyperparams``) takes effect at the
    next inverse refresh, not before (the simultaneous diagonalisation depends on ``λ``; see
    :mod:`sofim_optax.kpsvd`).

    Departures from the authors' code: their stopping test ``‖𝓡v_k − σ_k u_k‖`` is zero after
    any pass (so they never restart) and their ``K = 2`` with restart ``v_1 + v_2`` stalls on
    the second triplet; here the residual is ``‖𝓡ᵀu_k − σ_k v_k‖`` and ``krylov_dim``
    defaults to 4, with full reorthogonalisation.

    """
scale_by_kpsvd_lanczos = _member(
    "lanczos",
    _member_doc(
        "lanczos", _SCALE_BY_KPSVD_LANCZOS_DOC, _DAMPING_AT_REFRESH, _KRYLOV_ARG + _INDEFINITE_ARG
    ),
)


_ALIAS_DOC = """{title} with heavy-ball momentum on the preconditioned direction.

    ``optax.chain(scale_by_{name}(...), add_decayed_weights(weight_decay, weight_decay_mask),
    trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``, as
    :func:`sofim_optax.kfac`: weight decay added after preconditioning and heavy-ball momentum
    on the preconditioned direction, as in the authors' driver (PyTorch SGD after the
    preconditioner). The authors' KL-clipping of the step is not included; chain it yourself
    if wanted.

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      momentum: ``μ`` (default ``0.9``, the paper's); ``None`` for none.
      weight_decay: decoupled weight decay (default ``0.0``; the paper uses ``1e-3``).
      weight_decay_mask: optional mask for ``add_decayed_weights`` (default ``None``: all).
      nesterov: Nesterov momentum (default ``False``).
      damping: ``λ`` (default ``1e-3``), as :func:`scale_by_{name}`.
        {damping}

    {{scale_by_arguments}}

    References:
      Koroko et al., `Efficient Approximations of the Fisher Matrix in Neural Networks using
      Kronecker Product Singular Value Decomposition <https://arxiv.org/abs/2201.10285>`_,
      ESAIM: Proceedings and Surveys 73, 2023.
    """


# When a damping changed at run time takes effect, per member (the end of the alias's
# ``damping`` entry).
_AT_ONCE = "A change (``optax.inject_hyperparams``) takes effect at the next step."
_AT_REFRESH = (
    "A change (``optax.inject_hyperparams``) takes effect at the next inverse\n"
    "        refresh, not before: the simultaneous diagonalisation of the solve depends on ``λ``."
)


def _alias(scale_by, name: str, title: str, damping: str):
    return aliases.make_alias(
        scale_by,
        aliases.momentum_chain,
        name=name,
        doc=_ALIAS_DOC.format(title=title, name=name, damping=damping),
        alias_arguments=aliases.MOMENTUM_ARGUMENTS,
    )


kpsvd = _alias(scale_by_kpsvd, "kpsvd", "KPSVD", _AT_ONCE)
kpsvd_deflation = _alias(scale_by_kpsvd_deflation, "kpsvd_deflation", "Deflation", _AT_REFRESH)
kfac_corrected = _alias(scale_by_kfac_corrected, "kfac_corrected", "KFAC-corrected", _AT_REFRESH)
kpsvd_lanczos = _alias(scale_by_kpsvd_lanczos, "kpsvd_lanczos", "Lanczos", _AT_REFRESH)
