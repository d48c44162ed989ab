r"""The damped inverse of a sum of two Kronecker products, by simultaneous diagonalisation.

The rank-two members of the KPSVD family (Deflation, KFAC-corrected, Lanczos; Koroko et al.
2022, §4) approximate a layer's Fisher block by ``A1 ⊗ G1 + A2 ⊗ G2`` with a PSD first term
and a possibly indefinite second one. With generalised eigendecompositions
``K1ᵀ (A1 + δ_a I) K1 = I``, ``K1ᵀ A2 K1 = diag(s1)`` and likewise ``K2, s2`` on the output
side (:func:`generalized_eigh`, :func:`kron_sum_factors`), the damped sum is
``(K1 ⊗ K2)⁻ᵀ (I + diag(s1) ⊗ diag(s2)) (K1 ⊗ K2)⁻¹``, so its inverse applied to a gradient
matrix ``V`` is ``K1 [(K1ᵀ V K2) ⊘ (1 + s1 s2ᵀ)] K2ᵀ`` (:func:`kron_sum_apply`), with
``1 + s1 s2ᵀ`` made positive per :data:`INDEFINITE_MODES`. One block per call; ``jax.vmap``
over stacks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sofim_optax.hyperparameters import accumulation_dtype
from sofim_optax.linalg.solves import DAMPING_FLOOR, factored_damping

__all__ = [
    "generalized_eigh",
    "kron_sum_factors",
    "kron_sum_apply",
    "kron_sum_solve",
    "INDEFINITE_MODES",
]

#: How :func:`kron_sum_apply` treats the generalised eigenvalue products ``s1_i s2_j`` of an
#: indefinite second term (see :func:`kron_sum_factors`).
INDEFINITE_MODES = ("abs", "clip", "exact")


def _acc_dtype(*arrays: Any) -> Any:
    return accumulation_dtype(*arrays)


def generalized_eigh(
    F1: jax.Array, F2: jax.Array, shift: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """``(K, s)`` with ``Kᵀ (F1 + shift I) K = I`` and ``Kᵀ F2 K = diag(s)`` (ascending ``s``).

    ``F1`` symmetric PSD (eigenvalues clamped at 0), ``F2`` symmetric, ``shift > 0``; two
    ``eigh``: ``F1 + shift I = Q diag(d) Qᵀ``, ``W = Q diag(d)^{-1/2}``, ``Wᵀ F2 W = E diag(s) Eᵀ``,
    ``K = W E``. One block; ``jax.vmap`` it over stacks.
    """
    dtype = _acc_dtype(F1, F2)
    F1, F2 = jnp.asarray(F1).astype(dtype), jnp.asarray(F2).astype(dtype)
    shift = jnp.asarray(shift).astype(dtype)
    d, Q = jnp.linalg.eigh(0.5 * (F1 + F1.T))
    d = jnp.maximum(d, 0.0) + shift  # PSD F1 up to round-off; ≥ shift > 0
    W = Q / jnp.sqrt(d)[None, :]  # Wᵀ F1d W = I
    M = W.T @ (0.5 * (F2 + F2.T)) @ W
    s, E = jnp.linalg.eigh(0.5 * (M + M.T))
    return W @ E, s


def kron_sum_factors(
    A1: jax.Array,
    G1: jax.Array,
    A2: jax.Array,
    G2: jax.Array,
    damping: jax.Array | float,
    pi_adjusted: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Simultaneous diagonalisation of ``(A1_d ⊗ G1_d, A2 ⊗ G2)`` (Koroko et al. 2022, §4).

    The damping enters the first (PSD) term as KFAC's factored Tikhonov damping,
    ``A1_d = A1 + π√λ I``, ``G1_d = G1 + (√λ/π) I`` with the ``π`` of
    :func:`~sofim_optax.linalg.factored_damping` computed from ``A1, G1`` (``π = 1`` when
    ``pi_adjusted=False``), so that with ``A2 ⊗ G2 = 0`` the solve is exactly
    :func:`~sofim_optax.linalg.damped_kron_solve`. (The authors' code adds the full ``λ`` to
    each of ``A1``, ``G1``, i.e. ``λ²I`` plus ``λ``-sized cross terms, while their KFAC and
    KPSVD use ``√λ`` per factor; we use one damping rule for the whole family.)

    With ``A1_d = Q diag(d) Qᵀ``, ``W = Q diag(d)^{-1/2}`` and ``Wᵀ A2 W = E diag(s1) Eᵀ``,
    ``K1 = W E`` gives ``K1ᵀ A1_d K1 = I`` and ``K1ᵀ A2 K1 = diag(s1)``; likewise ``K2, s2`` for
    ``G1_d, G2``. Then ``A1_d ⊗ G1_d + A2 ⊗ G2 = (K1 ⊗ K2)^{-ᵀ} diag(1 + s1 ⊗ s2)
    (K1 ⊗ K2)^{-1}``. Cost: two ``eigh`` per factor.

    The result depends on ``damping``: ``K1`` diagonalises the pencil ``(A1 + π√λ I, A2)``,
    whose generalised eigenvectors change with ``λ`` unless ``A1`` and ``A2`` commute (no
    rescaling of ``s1`` accounts for a new ``λ``), and likewise ``K2``. A new damping therefore
    needs a new call, unlike :func:`~sofim_optax.linalg.damped_kron_solve_eigh`, which takes
    ``λ`` at solve time.

    Args:
      A1, G1: the first term, PSD (``d_a × d_a``, ``d_g × d_g``); negative eigenvalues from
        round-off are clamped at 0.
      A2, G2: the second term, symmetric, possibly indefinite.
      damping: ``λ ≥ 0``, floored at ``DAMPING_FLOOR``.
      pi_adjusted: balance the damping between ``A1`` and ``G1`` (default ``True``).

    Returns:
      ``(K1, s1, K2, s2)``, in at least float32.
    """
    dtype = _acc_dtype(A1, G1, A2, G2)
    A1, G1, A2, G2 = (jnp.asarray(t).astype(dtype) for t in (A1, G1, A2, G2))
    for name, x in (("A1", A1), ("G1", G1), ("A2", A2), ("G2", G2)):
        if x.ndim != 2 or x.shape[0] != x.shape[1]:
            raise ValueError(f"kron_sum_factors: {name} must be square, got {x.shape}")
    if A1.shape != A2.shape or G1.shape != G2.shape:
        raise ValueError(
            f"kron_sum_factors: A1 {A1.shape} / A2 {A2.shape} and G1 {G1.shape} / G2 {G2.shape} must match"
        )
    shift_a, shift_g = factored_damping(
        jnp.trace(A1), A1.shape[0], jnp.trace(G1), G1.shape[0], damping, pi_adjusted
    )
    K1, s1 = generalized_eigh(A1, A2, shift_a.astype(dtype))
    K2, s2 = generalized_eigh(G1, G2, shift_g.astype(dtype))
    return K1, s1, K2, s2


def _denominator(s1: jax.Array, s2: jax.Array, indefinite: str) -> jax.Array:
    prod = s1[:, None] * s2[None, :]
    if indefinite == "abs":
        return 1.0 + jnp.abs(prod)
    if indefinite == "clip":
        return 1.0 + jnp.maximum(prod, 0.0)
    if indefinite == "exact":
        d = 1.0 + prod
        return jnp.where(d < 0, jnp.minimum(d, -DAMPING_FLOOR), jnp.maximum(d, DAMPING_FLOOR))
    raise ValueError(f"kron_sum: indefinite must be one of {INDEFINITE_MODES}, got {indefinite!r}")


def kron_sum_apply(
    K1: jax.Array,
    s1: jax.Array,
    K2: jax.Array,
    s2: jax.Array,
    V: jax.Array,
    indefinite: str = "abs",
) -> jax.Array:
    r"""``X = K1 [(K1ᵀ V K2) ⊘ D] K2ᵀ`` from :func:`kron_sum_factors`, shape of ``V`` (``d_a × d_g``).

    ``D_ij`` is, per ``indefinite``:

    * ``"abs"`` (default, the authors' choice): ``1 + |s1_i s2_j|``;
    * ``"clip"``: ``1 + max(s1_i s2_j, 0)`` (drops the second term's negative directions);
    * ``"exact"``: ``1 + s1_i s2_j`` (its magnitude floored at ``DAMPING_FLOOR``): the exact
      inverse of the damped sum whenever it is invertible, indefinite or not; a preconditioner
      only when the sum is positive definite.

    The three agree when ``s1_i s2_j ≥ 0`` for all ``i, j``, e.g. when ``A2 ⊗ G2`` is PSD. The
    second term of a rank-two approximation of a Fisher block (Deflation, Lanczos) or of a
    KFAC correction is generally indefinite, and ``1 + s1 s2ᵀ`` can then be ``≤ 0``: the
    approximation is not positive definite in those directions and its exact inverse would
    flip or blow up the step. ``"abs"`` and ``"clip"`` keep every ``D_ij ≥ 1``: the step is
    never larger than with the damped first term alone, in any direction.
    """
    dtype = _acc_dtype(K1, K2, V)
    D = _denominator(s1.astype(dtype), s2.astype(dtype), indefinite)
    Vd = jnp.asarray(V).astype(dtype)
    Y = (K1.T.astype(dtype) @ Vd @ K2.astype(dtype)) / D
    return (K1.astype(dtype) @ Y @ K2.T.astype(dtype)).astype(jnp.asarray(V).dtype)


def kron_sum_solve(
    A1: jax.Array,
    G1: jax.Array,
    A2: jax.Array,
    G2: jax.Array,
    V: jax.Array,
    damping: jax.Array | float,
    pi_adjusted: bool = True,
    indefinite: str = "abs",
) -> jax.Array:
    r"""Apply ``(A1_d ⊗ G1_d + A2 ⊗ G2)⁻¹`` to ``vec_r(V)``: the ``X`` with
    ``A1_d X G1_d + A2 X G2 = V`` (row-major convention, symmetric factors).

    ``A1_d = A1 + π√λ I``, ``G1_d = G1 + (√λ/π) I`` (factored Tikhonov damping of the PSD
    first term, see :func:`kron_sum_factors`), by simultaneous diagonalisation (Koroko et al.
    2022, §4); when ``A2 ⊗ G2`` is indefinite the ``indefinite`` rule of :func:`kron_sum_apply`
    applies (default ``"abs"``: the operator inverted is then
    ``(K1 ⊗ K2)^{-ᵀ} diag(1 + |s1 ⊗ s2|) (K1 ⊗ K2)^{-1}``, positive definite and equal to the
    damped sum wherever ``s1_i s2_j ≥ 0``).

    Args:
      A1, G1, A2, G2: factors (``d_a × d_a``, ``d_g × d_g``); ``A1``, ``G1`` PSD.
      V: right-hand side, shape ``(d_a, d_g)``.
      damping: ``λ``.
      pi_adjusted: see :func:`kron_sum_factors`.
      indefinite: ``"abs"``, ``"clip"`` or ``"exact"`` (see :func:`kron_sum_apply`).

    Returns:
      ``X``, shape ``(d_a, d_g)``, in ``V``'s dtype (computed in at least float32).
    """
    if indefinite not in INDEFINITE_MODES:
        raise ValueError(
            f"kron_sum_solve: indefinite must be one of {INDEFINITE_MODES}, got {indefinite!r}"
        )
    V = jnp.asarray(V)
    A1 = jnp.asarray(A1)
    G1 = jnp.asarray(G1)
    if V.shape != (A1.shape[0], G1.shape[0]):
        raise ValueError(
            f"kron_sum_solve: V must have shape (d_a, d_g) = {(A1.shape[0], G1.shape[0])}, got {V.shape}"
        )
    K1, s1, K2, s2 = kron_sum_factors(A1, G1, A2, G2, damping, pi_adjusted)
    return kron_sum_apply(K1, s1, K2, s2, V, indefinite)
