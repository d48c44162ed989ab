"""Block-diagonal Kronecker factors: the size cap of KFAC's factors.

A factor of dimension ``d`` larger than a method's ``max_factor_dim`` (a vocabulary-sized
``G``, a wide layer's ``A``) is kept block-diagonal: ``d`` is cut into ``c`` consecutive blocks
of ``b`` coordinates (:func:`~sofim_optax.layerwise.block_split`; the last block is
zero-padded to ``b``) and only the ``c`` diagonal blocks ``F_jj`` of the factor are formed,
stored, decomposed and inverted. Memory drops from ``d²`` to ``c·b² ≈ d·b`` and a refresh
from ``d³`` to ``c·b³``; the approximation drops the correlations between blocks, exactly as a
diagonal factor (``b = 1``) drops all of them.

With both factors in blocks the preconditioner stays one Kronecker product of two
block-diagonal matrices, so ``(A ⊗ G)⁻¹`` acts on the gradient matrix ``V`` block by block:
``Δ_{ij} = A_ii⁻¹ V_{ij} G_jj⁻¹`` for the ``(i, j)`` block of ``V``. A whole factor is the case
``c = 1``. The padded coordinates hold zeros in the factors and in ``V``, so they stay zero
in ``Δ`` and never reach the parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sofim_optax import linalg
from sofim_optax.layerwise.factors import homogeneous_inputs

__all__ = [
    "block_input_factor",
    "block_output_factor",
    "to_blocks",
    "from_blocks",
    "block_kron_solve_eigh",
    "block_kron_apply",
]


def _rows_in_blocks(x: jax.Array, count: int, size: int) -> jax.Array:
    """``(m, d)`` rows → ``(m, count, size)``, zero-padded to ``count·size`` coordinates."""
    x = jnp.pad(x, ((0, 0), (0, count * size - x.shape[-1])))
    return x.reshape(x.shape[0], count, size)


def block_input_factor(
    inputs: jax.Array, has_bias: bool, count: int, size: int, dtype: Any = jnp.float32
) -> jax.Array:
    """The diagonal blocks of ``Â = mean ā āᵀ`` (:func:`~sofim_optax.layerwise.input_factor`):
    ``(count, size, size)``, the mean over examples (and positions) of each block's outer
    product."""
    x = homogeneous_inputs(inputs, has_bias, dtype)
    x = _rows_in_blocks(x.reshape(-1, x.shape[-1]), count, size)
    return jnp.einsum("mcp,mcq->cpq", x, x) / x.shape[0]


def block_output_factor(
    output_grads: jax.Array, count: int, size: int, dtype: Any = jnp.float32
) -> jax.Array:
    """The diagonal blocks of ``Ĝ`` (:func:`~sofim_optax.layerwise.output_factor`, KFC's
    scaling for positions included): ``(count, size, size)``."""
    g = jnp.asarray(output_grads).astype(dtype)
    n = g.shape[0]
    g = _rows_in_blocks(g.reshape(-1, g.shape[-1]), count, size)
    return jnp.einsum("mcp,mcq->cpq", g, g) / n


def to_blocks(v: jax.Array, a_blocks: tuple[int, int], g_blocks: tuple[int, int]) -> jax.Array:
    """``V (d_a, d_g)`` → ``(c_a, b_a, c_g, b_g)``, zero-padded; ``*_blocks = (c, b)``."""
    (ca, ba), (cg, bg) = a_blocks, g_blocks
    v = jnp.pad(v, ((0, ca * ba - v.shape[0]), (0, cg * bg - v.shape[1])))
    return v.reshape(ca, ba, cg, bg)


def from_blocks(w: jax.Array, d_a: int, d_g: int) -> jax.Array:
    """Inverse of :func:`to_blocks`: the ``(d_a, d_g)`` matrix, padding dropped."""
    ca, ba, cg, bg = w.shape
    return w.reshape(ca * ba, cg * bg)[:d_a, :d_g]


def block_kron_solve_eigh(
    a_eigh: tuple[jax.Array, jax.Array],
    g_eigh: tuple[jax.Array, jax.Array],
    v: jax.Array,
    dims: tuple[int, int],
    damping: jax.Array | float,
    pi_adjusted: bool = True,
) -> jax.Array:
    r"""``A_d⁻¹ V G_d⁻¹`` for block-diagonal ``A`` and ``G`` from their blocks' eigendecompositions.

    :func:`sofim_optax.linalg.damped_kron_solve_eigh` block by block: with
    ``A_ii = Q_i diag(α_i) Q_iᵀ`` and ``G_jj = R_j diag(γ_j) R_jᵀ``,

    .. math::

        \Delta_{ij} = Q_i\Big[(Q_i^\top V_{ij} R_j) \oslash
            \big((\alpha_i + \pi\sqrt\lambda)(\gamma_j + \sqrt\lambda/\pi)^\top\big)\Big]R_j^\top,

    with ``π`` from the whole factors' traces (the sums of all their blocks' eigenvalues) over
    their true dimensions ``dims = (d_a, d_g)`` (the padding adds zero eigenvalues only).
    Eigenvalues are clamped at 0, so every divisor is at least ``λ``.

    Args:
      a_eigh: ``(α, Q)``, shapes ``(c_a, b_a)`` and ``(c_a, b_a, b_a)``.
      g_eigh: ``(γ, R)``, shapes ``(c_g, b_g)`` and ``(c_g, b_g, b_g)``.
      v: the gradient matrix ``(d_a, d_g)``.
      dims: ``(d_a, d_g)``.
      damping: ``λ``.
      pi_adjusted: see :func:`sofim_optax.linalg.factored_damping`.

    Returns:
      ``Δ``, shape ``(d_a, d_g)``.
    """
    alpha, q = a_eigh
    gamma, r = g_eigh
    alpha, gamma = jnp.maximum(alpha, 0.0), jnp.maximum(gamma, 0.0)
    shift_a, shift_g = linalg.factored_damping(
        jnp.sum(alpha), dims[0], jnp.sum(gamma), dims[1], damping, pi_adjusted
    )
    w = to_blocks(v.astype(q.dtype), alpha.shape, gamma.shape)
    w = jnp.einsum("ipa,ipjq,jqb->iajb", q, w, r)
    w = w / ((alpha + shift_a)[:, :, None, None] * (gamma + shift_g)[None, None, :, :])
    w = jnp.einsum("ipa,iajb,jqb->ipjq", q, w, r)
    return from_blocks(w, *dims)


def block_kron_apply(a_inv: jax.Array, v: jax.Array, g_inv: jax.Array) -> jax.Array:
    """``A⁻¹ V G⁻¹`` from the blocks of the damped inverses, ``(c_a, b_a, b_a)`` and
    ``(c_g, b_g, b_g)``; ``v`` is ``(d_a, d_g)``."""
    w = to_blocks(v.astype(a_inv.dtype), a_inv.shape[:2], g_inv.shape[:2])
    w = jnp.einsum("ipa,iajq,jqb->ipjb", a_inv, w, g_inv)
    return from_blocks(w, *v.shape)
