"""Deflation: a rank-two Kronecker approximation of the Fisher block by deflated power SVD (Koroko et al. 2022, §3.2).

A thin module: the method is one :class:`sofim_optax._kronecker_svd_family.FamilyConfig`; the
shared code is in :mod:`sofim_optax._kronecker_svd_family` and :mod:`sofim_optax._kronecker`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from sofim_optax import _kronecker as kron
from sofim_optax import _kronecker_svd_family as family
from sofim_optax._kronecker_svd_family import KroneckerSvdCurvature

__all__ = ["ScaleByKpsvdDeflationState", "scale_by_kpsvd_deflation", "kpsvd_deflation"]


class ScaleByKpsvdDeflationState(NamedTuple):
    """State of :func:`scale_by_kpsvd_deflation`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`sofim_optax._kronecker_svd_family.KroneckerSvdCurvature`.
      fallback_state: the fallback transformation's state (see :func:`sofim_optax.scale_by_kfac`).
    """

    count: jax.Array
    curvature: KroneckerSvdCurvature
    fallback_state: kron.FallbackState


def scale_by_kpsvd_deflation(
    damping: Any = 1e-3,
    ema: Any = 0.95,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    pi_adjusted: bool = True,
    tol: Any = 1e-5,
    max_iters: int = 100,
    indefinite: str = "abs",
    fallback: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer by the inverse of a rank-two Kronecker approximation (Deflation).

    The best approximation of a layer's Fisher block ``F = mean_n (ā_nā_nᵀ) ⊗ (g_ng_nᵀ)`` by a
    sum of two Kronecker products,

    .. math::

        \min \|F - R_1\otimes S_1 - R_2 \otimes S_2\|_F ,

    is the rank-two truncated SVD of the rearrangement ``𝓡(F)``. Deflation (Koroko et al. 2022)
    computes it by power iteration twice: ``(R̂_1, Ŝ_1)`` as KPSVD, then ``(R̂_2, Ŝ_2)`` from the
    deflated ``𝓡(F) − vec(R̂_1) vec(Ŝ_1)ᵀ`` with the fresh minibatch pair (matrix-free,
    :func:`sofim_optax.linalg.nearest_kronecker` with ``rank=2, method="power"``), each
    warm-started from its averaged factor. The four factors are averaged separately
    (``ρ = min(1 − 1/k, ema)``). ``R_1, S_1`` are PSD; ``R_2, S_2`` are indefinite. Every
    ``inverse_period`` steps the damped sum is diagonalised simultaneously
    (:func:`sofim_optax.linalg.kron_sum_factors`), and each step returns

    .. math::

        \Delta = \big((R_1 + \pi\sqrt\lambda I)\otimes(S_1 + \tfrac{\sqrt\lambda}{\pi} I)
            + R_2\otimes S_2\big)^{-1}\operatorname{vec}(V)
            = K_1\big[(K_1^\top V K_2) \oslash (1 + s_1 s_2^\top)\big]K_2^\top

    with ``1 + s1 s2ᵀ`` replaced per ``indefinite`` (default ``1 + |s1 s2ᵀ|``, the authors'),
    since the rank-two approximation of a PSD matrix need not be PSD.

    Note: the authors' public ``deflation.py`` never deflates (its ``method`` attribute is set
    to ``"kpsvd"``, so the second power SVD finds the first pair again); this follows the
    paper's mathematics.

    Args:
      damping: ``λ`` (default ``1e-3``), floored at ``linalg.DAMPING_FLOOR``; on the Fisher's
        scale (see :func:`sofim_optax.scale_by_kfac` on how the loss normalisation sets it).
        Factored Tikhonov damping of the first term ``R1 ⊗ S1``: ``π√λ`` on the input side, ``√λ/π`` on the
        output side. Baked in at each inverse refresh.
      ema: upper bound of the factors' EMA decay ``ρ = min(1 − 1/k, ema)`` (default ``0.95``,
        the paper's).
      stats_period: recompute the factors every this many updates (default ``1``; the paper
        uses 100 for both periods). Pass ``layer_stats`` on every update anyway.
      inverse_period: refresh the simultaneous diagonalisation every this many updates (default ``20``).
      pi_adjusted: balance the damping with ``π = sqrt((tr R1/d_a)/(tr S1/d_g))``
        (default ``True``; ``False``: ``√λ`` on both sides).
      tol: relative stopping tolerance of the power iterations (default ``1e-5``; the paper's
        ``1e-6`` is absolute, see :func:`sofim_optax.linalg.nearest_kronecker`).
      max_iters: cap on power iterations per term per statistics update (default ``100``; the paper's 1000). The
        warm start from the averaged factors usually converges in a few; the cost is
        proportional to the iterations actually run (``lax.while_loop``), recorded in
        ``state.curvature.solver_iterations``.
      indefinite: how the generalised eigenvalue products ``s1_i s2_j`` of an indefinite second
        term enter the solve (:func:`sofim_optax.linalg.kron_sum_apply`): ``"abs"`` (default, the
        authors': ``1 + |s1_i s2_j|``), ``"clip"`` (``1 + max(s1_i s2_j, 0)``) or ``"exact"``
        (``1 + s1_i s2_j``: the exact inverse; only for positive definite sums).
      fallback: transformation for the parameters no captured layer covers (default ``None``:
        identity); see :func:`sofim_optax.scale_by_kfac`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, **extra)`` requires ``layer_stats`` (``dict[str, LayerStats]``, e.g. from
      ``sofim_optax.curvature.linen.value_grad_and_stats(..., fisher="sampled", rng=key)``);
      errors (missing statistics, unknown layer, shapes) are raised at trace time and name the
      layer. Updates come back in each gradient leaf's dtype; statistics, SVDs and solves run
      in float32 (float64 for float64 kernels). Layers, schedule, stacking and fallback work as
      in :func:`sofim_optax.scale_by_kfac`; the conv-layer Fisher and the shared choices are
      described in :mod:`sofim_optax._kronecker_svd_family`.

    References:
      Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou, Tran, `Efficient Approximations of
      the Fisher Matrix in Neural Networks using Kronecker Product Singular Value Decomposition
      <https://arxiv.org/abs/2201.10285>`_, ESAIM: Proceedings and Surveys 73, 2023.
      Van Loan & Pitsianis, Approximation with Kronecker products, 1993.
    """
    cfg = family.FamilyConfig(
        kind="deflation", damping=damping, ema=ema, pi_adjusted=pi_adjusted, tol=tol,
        max_iters=max_iters, krylov_dim=None, indefinite=indefinite,
    )
    return family.transformation(
        "scale_by_kpsvd_deflation", ScaleByKpsvdDeflationState, cfg, stats_period, inverse_period, fallback
    )


def kpsvd_deflation(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    damping: Any = 1e-3,
    weight_decay: Any = 0.0,
    ema: Any = 0.95,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    pi_adjusted: bool = True,
    tol: Any = 1e-5,
    max_iters: int = 100,
    indefinite: str = "abs",
    fallback: optax.GradientTransformation | None = None,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Deflation with heavy-ball momentum on the preconditioned direction.

    ``optax.chain(scale_by_kpsvd_deflation(...), add_decayed_weights(weight_decay), trace(momentum),
    scale_by_learning_rate(learning_rate))``, as :func:`sofim_optax.kfac`: weight decay added
    after preconditioning and SGD momentum, as in the authors' driver (PyTorch SGD after the
    preconditioner). The authors' KL-clipping of the step (``ν = min(1, sqrt(κ/Σ|⟨∇, Δ⟩|))``) is
    not included; chain it yourself if wanted.

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      momentum: ``μ`` (default ``0.9``, the paper's); ``None`` for none.
      damping: ``λ`` (default ``1e-3``).
      weight_decay: decoupled weight decay (default ``0.0``; the paper uses ``1e-3``).
      ema, stats_period, inverse_period, pi_adjusted, tol, max_iters, indefinite, fallback:
        see :func:`scale_by_kpsvd_deflation`.
      nesterov: Nesterov momentum (default ``False``).
      weight_decay_mask: optional mask for ``add_decayed_weights``.
    """
    return kron.momentum_alias(
        scale_by_kpsvd_deflation(
            damping=damping, ema=ema, stats_period=stats_period, inverse_period=inverse_period,
            pi_adjusted=pi_adjusted, tol=tol, max_iters=max_iters, indefinite=indefinite, fallback=fallback,
        ),
        learning_rate, momentum, weight_decay, nesterov, weight_decay_mask,
    )
