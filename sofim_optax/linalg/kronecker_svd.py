r"""Nearest Kronecker products of a Fisher block, matrix-free (the KPSVD family's SVDs).

The math of the KPSVD family (Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou, Tran,
"Efficient Approximations of the Fisher Matrix in Neural Networks using Kronecker Product
Singular Value Decomposition", arXiv 2201.10285, ESAIM: Proceedings and Surveys 73, 2023).

Conventions (those of the whole package). For one layer, ``ā_n ∈ R^{d_a}`` is example
``n``'s input with the homogeneous bias coordinate last and ``g_n ∈ R^{d_g}`` the gradient of
its loss with respect to the layer's pre-activation. The layer's gradient matrix is
``ā gᵀ`` (``d_a × d_g``) and the row-major ``vec_r(ā gᵀ) = ā ⊗ g``, so the Fisher block is

.. math::

    F = \frac1m \sum_n (\bar a_n \bar a_n^\top) \otimes (g_n g_n^\top),
    \qquad (R \otimes S)\,\mathrm{vec}_r(X) = \mathrm{vec}_r(R X S^\top).

**Rearrangement** (Van Loan & Pitsianis 1993). ``𝓡(F) ∈ R^{d_a² × d_g²}`` with
``𝓡(F)[(i,j),(p,q)] = F[(i,p),(j,q)]`` (:func:`rearrange`) satisfies
``𝓡(R ⊗ S) = vec(R) vec(S)ᵀ`` and ``‖𝓡(F)‖_F = ‖F‖_F``. Hence
``min ‖F − Σ_{k≤r} R_k ⊗ S_k‖_F`` is the rank-``r`` truncated SVD of ``𝓡(F)``:
``R_k = √σ_k mat(u_k)``, ``S_k = √σ_k mat(v_k)`` (the balanced split of the paper). For the
batch estimate ``𝓡(F) = (1/m) Σ_n vec(ā_n ā_nᵀ) vec(g_n g_nᵀ)ᵀ``, so both products needed by
an iterative SVD cost ``O(m (d_a² + d_g²))`` and never form ``F`` or ``𝓡(F)``:

.. math::

    \mathcal R(F)\,\mathrm{vec}(V) = \mathrm{vec}\Big(\frac1m \sum_n (g_n^\top V g_n)\,
        \bar a_n \bar a_n^\top\Big),\qquad
    \mathcal R(F)^\top \mathrm{vec}(U) = \mathrm{vec}\Big(\frac1m \sum_n
        (\bar a_n^\top U \bar a_n)\, g_n g_n^\top\Big)

(:func:`rearranged_matvec`, :func:`rearranged_rmatvec`). With non-negative weights these are
re-weighted KFAC factors: started from a positive semi-definite (PSD) matrix, the power
iteration's iterates all stay PSD.

Public functions (one block each; ``jax.vmap`` them over stacks; all jittable):

* :func:`rearrange` — the explicit ``𝓡(F)`` of a dense ``F`` (tests, small experiments).
* :func:`rearranged_matvec`, :func:`rearranged_rmatvec` — the matrix-free products.
* :func:`nearest_kronecker` — the ``rank`` best Kronecker terms, by power SVD (deflated for
  ``rank > 1``) or restarted Golub–Kahan–Lanczos bidiagonalisation, warm-startable, optionally
  of ``F − A ⊗ G`` (KFAC-corrected).

The damped inverse of a sum of two Kronecker products is in :mod:`sofim_optax.linalg.kron_sum`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sofim_optax.hyperparameters import accumulation_dtype

__all__ = [
    "rearrange",
    "rearranged_matvec",
    "rearranged_rmatvec",
    "nearest_kronecker",
]

_METHODS = ("power", "lanczos")


def _acc_dtype(*arrays: Any) -> Any:
    return accumulation_dtype(*arrays)


def _safe_div(x: jax.Array, norm: jax.Array) -> jax.Array:
    """``x / norm``, and 0 where ``norm == 0`` (no NaN for a zero operator)."""
    return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), 0.0)


# --------------------------------------------------------------------------------------
# The rearrangement and its matrix-free products.
# --------------------------------------------------------------------------------------


def rearrange(F: jax.Array, d_a: int, d_g: int) -> jax.Array:
    r"""Van Loan–Pitsianis rearrangement of a dense ``(d_a d_g) × (d_a d_g)`` matrix.

    ``𝓡(F)[i·d_a + j, p·d_g + q] = F[i·d_g + p, j·d_g + q]``, shape ``(d_a², d_g²)``, so that
    ``𝓡(R ⊗ S) = vec_r(R) vec_r(S)ᵀ`` (``jnp.kron`` order). For tests and small experiments:
    it forms a matrix of the size of ``F``.
    """
    F = jnp.asarray(F)
    if F.shape != (d_a * d_g, d_a * d_g):
        raise ValueError(f"rearrange: F must have shape ({d_a * d_g}, {d_a * d_g}), got {F.shape}")
    return F.reshape(d_a, d_g, d_a, d_g).transpose(0, 2, 1, 3).reshape(d_a * d_a, d_g * d_g)


def _check_samples(
    inputs: jax.Array, output_grads: jax.Array, where: str
) -> tuple[jax.Array, jax.Array]:
    inputs, output_grads = jnp.asarray(inputs), jnp.asarray(output_grads)
    if inputs.ndim != 2 or output_grads.ndim != 2 or inputs.shape[0] != output_grads.shape[0]:
        raise ValueError(
            f"{where}: expects inputs (m, d_a) and output_grads (m, d_g) with the same number m of "
            f"samples (for a convolution, flatten the positions into the samples first); got "
            f"{inputs.shape} and {output_grads.shape}"
        )
    dtype = _acc_dtype(inputs, output_grads)
    return inputs.astype(dtype), output_grads.astype(dtype)


def rearranged_matvec(inputs: jax.Array, output_grads: jax.Array, V: jax.Array) -> jax.Array:
    r"""``mat(𝓡(F) vec(V)) = (1/m) Σ_n (g_nᵀ V g_n) ā_n ā_nᵀ``, shape ``(d_a, d_a)``.

    Args:
      inputs: ``ā``, shape ``(m, d_a)`` (bias coordinate included by the caller).
      output_grads: ``g``, shape ``(m, d_g)``.
      V: shape ``(d_g, d_g)`` (any matrix; only its symmetric part matters).
    """
    a, g = _check_samples(inputs, output_grads, "rearranged_matvec")
    return _reweighted(a, g, jnp.asarray(V).astype(a.dtype))


def rearranged_rmatvec(inputs: jax.Array, output_grads: jax.Array, U: jax.Array) -> jax.Array:
    r"""``mat(𝓡(F)ᵀ vec(U)) = (1/m) Σ_n (ā_nᵀ U ā_n) g_n g_nᵀ``, shape ``(d_g, d_g)``.

    Args: as :func:`rearranged_matvec`, with ``U`` of shape ``(d_a, d_a)``.
    """
    a, g = _check_samples(inputs, output_grads, "rearranged_rmatvec")
    return _reweighted(g, a, jnp.asarray(U).astype(a.dtype))


def _reweighted(x: jax.Array, y: jax.Array, M: jax.Array) -> jax.Array:
    """``(1/m) Σ_n (y_nᵀ M y_n) x_n x_nᵀ``: both products with ``𝓡(F)``, with the roles of
    ``ā`` and ``g`` swapped (``𝓡(F) vec(V)``: ``x = ā, y = g``; ``𝓡(F)ᵀ vec(U)``: the reverse)."""
    weights = jnp.einsum("np,pq,nq->n", y, M, y)
    return (x * weights[:, None]).T @ x / x.shape[0]


def _operator(a: jax.Array, g: jax.Array, subtract: Sequence[tuple[jax.Array, jax.Array]]):
    """Products with ``𝓡(F) − Σ_j vec(A_j) vec(G_j)ᵀ`` on matrices (never vectors of d²)."""

    def matvec(V):
        return _reweighted(a, g, V) - sum((A_j * jnp.vdot(G_j, V) for A_j, G_j in subtract), 0.0)

    def rmatvec(U):
        return _reweighted(g, a, U) - sum((G_j * jnp.vdot(A_j, U) for A_j, G_j in subtract), 0.0)

    return matvec, rmatvec


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x))


# --------------------------------------------------------------------------------------
# Power SVD.
# --------------------------------------------------------------------------------------


def _power_svd(matvec, rmatvec, v0, tol, max_iters):
    r"""Top singular triplet of a matrix-free operator by alternating power iteration.

    ``u ← 𝓡v/‖𝓡v‖, v ← 𝓡ᵀu/‖𝓡ᵀu‖`` until ``‖𝓡v − σu‖ ≤ tol·σ`` or ``max_iters`` iterations;
    returns ``(u, σ, v)`` with ``u = 𝓡v/‖𝓡v‖`` and ``σ = ‖𝓡v‖`` for the final ``v`` (for a
    fixed ``v`` this is the best ``σ u`` in Frobenius norm), the iteration count and the
    relative residual.
    """
    v = _safe_div(v0, _norm(v0))
    w = matvec(v)

    def cond(carry):
        k, _, _, res = carry
        return (k < max_iters) & (res > tol)

    def body(carry):
        k, v, w, _ = carry
        sigma_u = _norm(w)
        u = _safe_div(w, sigma_u)
        z = rmatvec(u)
        sigma = _norm(z)
        v = _safe_div(z, sigma)
        w = matvec(v)
        res = _safe_div(_norm(w - sigma * u), sigma)
        return k + 1, v, w, res

    init = (jnp.zeros([], jnp.int32), v, w, jnp.asarray(jnp.inf, v.dtype))
    k, v, w, res = lax.while_loop(cond, body, init)
    sigma = _norm(w)
    return _safe_div(w, sigma), sigma, v, k, jnp.where(jnp.isfinite(res), res, 0.0)


# --------------------------------------------------------------------------------------
# Restarted Golub–Kahan–Lanczos bidiagonalisation.
# --------------------------------------------------------------------------------------


def _gkl_pass(matvec, rmatvec, q, K):
    """K steps of GKL bidiagonalisation from ``q`` with full reorthogonalisation.

    Returns ``(P, Q, B, beta_K)``: ``𝓡 Q_j = Σ_i P_i B_ij`` with ``P``, ``Q`` stacks of ``K``
    orthonormal matrices (``(K, d_a, d_a)``, ``(K, d_g, d_g)``), ``B`` upper bidiagonal ``K × K``
    and ``β_K = ‖𝓡ᵀ p_K − α_K q_K‖`` (the coupling to the next Lanczos vector).
    """
    dtype = q.dtype
    Ps, Qs, alphas, betas = [], [], [], []
    q = _safe_div(q, _norm(q))
    Qs.append(q)
    w = matvec(q)
    alpha = _norm(w)
    Ps.append(_safe_div(w, alpha))
    alphas.append(alpha)
    beta = jnp.zeros([], dtype)
    for k in range(K):
        z = rmatvec(Ps[k]) - alphas[k] * Qs[k]
        for qj in Qs:  # full reorthogonalisation (zero in exact arithmetic)
            z = z - jnp.vdot(qj, z) * qj
        beta = _norm(z)
        if k == K - 1:
            break
        betas.append(beta)
        Qs.append(_safe_div(z, beta))
        w = matvec(Qs[k + 1]) - beta * Ps[k]
        for pj in Ps:
            w = w - jnp.vdot(pj, w) * pj
        alpha = _norm(w)
        Ps.append(_safe_div(w, alpha))
        alphas.append(alpha)
    B = jnp.diag(jnp.stack(alphas))
    if K > 1:
        B = B + jnp.diag(jnp.stack(betas), k=1)
    return jnp.stack(Ps), jnp.stack(Qs), B, beta


def _lanczos_svd(matvec, rmatvec, q0, rank, K, tol, max_iters):
    r"""Top-``rank`` singular triplets by explicitly restarted GKL bidiagonalisation.

    Each pass runs ``K`` bidiagonalisation steps from ``q``; the Ritz triplets come from the
    SVD of the small bidiagonal ``B = U_B Σ V_Bᵀ``: ``u_k = P U_B[:, k]``, ``v_k = Q V_B[:, k]``.
    Because ``𝓡 Q = P B`` holds exactly, ``𝓡 v_k = σ_k u_k`` always; the true residual is
    ``‖𝓡ᵀ u_k − σ_k v_k‖ = β_K |U_B[K−1, k]|``. Stop when it is ``≤ tol·σ_1`` for every
    ``k < rank``, else restart from ``q = Σ_k v_k`` (the paper's restart vector).
    """
    dtype = q0.dtype

    def ritz(q):
        P, Q, B, beta = _gkl_pass(matvec, rmatvec, q, K)
        UB, s, VBt = jnp.linalg.svd(B)
        U = jnp.tensordot(UB[:, :rank].T, P, axes=1)  # (rank, d_a, d_a)
        V = jnp.tensordot(VBt[:rank], Q, axes=1)  # (rank, d_g, d_g)
        res = jnp.abs(beta * UB[K - 1, :rank])
        rel = _safe_div(jnp.max(res), s[0])
        return U, s[:rank], V, jnp.where(s[0] > 0, rel, 0.0)

    def cond(carry):
        k, _, _, _, _, rel = carry
        return (k < max_iters) & (rel > tol)

    def body(carry):
        k, U, s, V, q, _ = carry
        U, s, V, rel = ritz(q)
        return k + 1, U, s, V, jnp.sum(V, axis=0), rel

    # max_iters >= 1, so the loop body (traced once) always runs at least once.
    d_a = matvec(q0).shape[0]
    init = (
        jnp.zeros([], jnp.int32),
        jnp.zeros((rank, d_a, d_a), dtype),
        jnp.zeros((rank,), dtype),
        jnp.zeros((rank,) + q0.shape, dtype),
        q0,
        jnp.asarray(jnp.inf, dtype),
    )
    k, U, s, V, _, rel = lax.while_loop(cond, body, init)
    return U, s.astype(dtype), V, k, rel


# --------------------------------------------------------------------------------------
# nearest_kronecker.
# --------------------------------------------------------------------------------------


def _default_start(d_g: int, term: int, dtype: Any) -> jax.Array:
    """PSD start: the identity for the first term (``⟨I, S_1⟩ = tr S_1 > 0`` for the PSD top
    factor, so it never misses it); a fixed pseudo-random PSD rank-one ``r rᵀ``, ``r ~ U[0, 1]``
    (the authors' start), for the next terms."""
    if term == 0:
        return jnp.eye(d_g, dtype=dtype)
    r = jax.random.uniform(jax.random.key(1000 + term), (d_g,), dtype=dtype)
    return jnp.outer(r, r)


def _start(init: jax.Array | None, d_g: int, term: int, dtype: Any) -> jax.Array:
    default = _default_start(d_g, term, dtype)
    if init is None:
        return default
    v = jnp.asarray(init).astype(dtype)
    if v.shape != (d_g, d_g):
        raise ValueError(
            f"nearest_kronecker: init[{term}] must have shape ({d_g}, {d_g}), got {v.shape}"
        )
    v = 0.5 * (v + v.T)
    n = _norm(v)
    ok = (n > 0) & jnp.isfinite(n)
    return jnp.where(ok, _safe_div(v, jnp.where(ok, n, 1.0)), default / _norm(default))


def _orient(u: jax.Array, v: jax.Array, ref: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Fixes the joint sign of a singular pair (``σ u vᵀ`` does not depend on it).

    ``⟨v, ref⟩ ≥ 0`` when a non-zero reference (the warm start) is given, so that factors
    averaged over steps do not flip; otherwise ``tr(mat(u)) ≥ 0`` (which makes the PSD top
    pair PSD rather than negative semi-definite).
    """
    tr = jnp.trace(u)
    sign = jnp.where(tr < 0, -1.0, 1.0)
    if ref is not None:
        d = jnp.vdot(v, ref)
        sign = jnp.where(d != 0, jnp.sign(d), sign)
    sign = sign.astype(u.dtype)
    return sign * u, sign * v


def nearest_kronecker(
    inputs: jax.Array,
    output_grads: jax.Array,
    rank: int = 1,
    method: str = "power",
    tol: float | jax.Array = 1e-6,
    max_iters: int | jax.Array = 1000,
    init: jax.Array | Sequence[jax.Array | None] | None = None,
    subtract: tuple[jax.Array, jax.Array] | None = None,
    krylov_dim: int | None = None,
    return_info: bool = False,
) -> Any:
    r"""The ``rank`` Kronecker products closest to a Fisher block, matrix-free.

    Returns ``[(R_1, S_1), …, (R_rank, S_rank)]`` (``R_k``: ``d_a × d_a``, input side;
    ``S_k``: ``d_g × d_g``, output side) minimising

    .. math::

        \Big\| F - A\otimes G - \sum_{k\le r} R_k \otimes S_k \Big\|_F,\qquad
        F = \frac1m \sum_n (\bar a_n \bar a_n^\top)\otimes(g_n g_n^\top),

    where ``A ⊗ G`` is ``subtract`` (zero when ``None``). This is the rank-``r`` truncated SVD
    ``Σ σ_k u_k v_kᵀ`` of ``𝓡(F) − vec(A) vec(G)ᵀ`` (module docstring), split in a balanced way:
    ``R_k = √σ_k mat(u_k)``, ``S_k = √σ_k mat(v_k)`` (``‖R_k‖_F = ‖S_k‖_F``). ``F`` and
    ``𝓡(F)`` are never formed; each product costs ``O(m (d_a² + d_g²))``.

    Methods (Koroko et al. 2022):

    * ``"power"``: alternating power iteration ``u ← 𝓡v/‖𝓡v‖``, ``v ← 𝓡ᵀu/‖𝓡ᵀu‖`` (KPSVD,
      paper §3.1). For ``rank > 1`` the terms are found one after the other, each on the
      operator deflated by the terms found before it (``𝓡 − Σ_{j<k} vec(R_j) vec(S_j)ᵀ``; the
      paper's "Deflation", §3.2). Stops when ``‖𝓡v − σu‖ ≤ tol·σ`` or after ``max_iters``
      iterations (per term).
    * ``"lanczos"``: Golub–Kahan–Lanczos bidiagonalisation with ``krylov_dim`` steps per pass,
      full reorthogonalisation, and explicit restarts from ``q = Σ_k v_k`` (the paper's restart
      vector). Stops when ``max_k ‖𝓡ᵀu_k − σ_k v_k‖ ≤ tol·σ_1`` or after ``max_iters`` passes.

    Departures from the authors' code (arXiv 2201.10285's public implementation), with reasons:
    the stopping tests are **relative** (``tol·σ``; an absolute ``1e-6`` means "never" or
    "always" depending on the loss scale); the Lanczos test uses the residual of ``𝓡ᵀ``, since
    ``‖𝓡v_k − σ_k u_k‖`` (the code's test) is zero by construction after any pass, which stops
    the code after one pass; Lanczos reorthogonalises (the code does not; in exact arithmetic it
    changes nothing and it keeps the Ritz vectors orthonormal in float32).

    Signs. ``σ u vᵀ`` does not depend on the joint sign of ``(u, v)``, but ``R`` and ``S``
    averaged separately over steps do: each pair is oriented so that ``⟨S_k, init_k⟩ ≥ 0`` when
    a non-zero warm start is given, else ``tr R_k ≥ 0``. Started from a PSD matrix (the
    default, or the PSD EMA factor), the power iteration's top pair is PSD.

    Args:
      inputs: ``ā``, shape ``(m, d_a)``, taken as given (append the bias coordinate first;
        for a convolution flatten positions into samples, see ``sofim_optax.kpsvd``).
      output_grads: ``g``, shape ``(m, d_g)``: per-example pre-activation gradients.
      rank: number of Kronecker terms ``r ≥ 1`` (default 1).
      method: ``"power"`` (default) or ``"lanczos"``.
      tol: relative tolerance (default ``1e-6``, the paper's ``ε``). In float32 the products
        themselves are accurate to about ``1e-6`` relative, so a smaller ``tol`` runs to the
        cap; ``max_iters`` bounds the cost either way.
      max_iters: cap on power iterations per term, or on Lanczos passes (default ``1000``,
        the paper's). A ``lax.while_loop``: jittable, cost proportional to the iterations run.
      init: warm start(s) on the output side: one ``(d_g, d_g)`` matrix, or a sequence of up to
        ``rank`` of them (``None`` entries allowed), e.g. the previous step's ``S_k``. An all-zero
        or non-finite start is replaced by the default: the identity for the first term, a fixed
        pseudo-random PSD ``r rᵀ`` for the others. ``"lanczos"`` starts from
        ``Σ_k init_k/‖init_k‖``.
      subtract: ``(A, G)`` to fit ``F − A ⊗ G`` instead of ``F`` (KFAC-corrected).
      krylov_dim: ``"lanczos"`` only: bidiagonalisation steps per pass (default ``rank + 2``).
        The paper uses 2 for rank 2; with ``krylov_dim = rank`` the restart from
        ``Σ_k v_k`` stalls (the second Ritz pair stops improving: measured here, the second
        singular value came out 15 times too small after 5000 passes), so the default is larger
        (a departure). Must be ``≥ rank``.
      return_info: also return ``{"singular_values": (r,), "iterations": (r,) int32 (power:
        per term; lanczos: passes, repeated), "residual": (r,) relative residuals}``.

    Returns:
      The list of ``rank`` pairs ``(R_k, S_k)`` in at least float32, or ``(pairs, info)``.
    """
    if method not in _METHODS:
        raise ValueError(f"nearest_kronecker: method must be one of {_METHODS}, got {method!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"nearest_kronecker: rank must be a positive int, got {rank!r}")
    if isinstance(max_iters, int) and (isinstance(max_iters, bool) or max_iters < 1):
        raise ValueError(f"nearest_kronecker: max_iters must be >= 1, got {max_iters!r}")
    a, g = _check_samples(inputs, output_grads, "nearest_kronecker")
    dtype = a.dtype
    d_a, d_g = a.shape[1], g.shape[1]
    if init is None or (hasattr(init, "ndim") and jnp.ndim(init) == 2):
        inits: list = [init] + [None] * (rank - 1)
    else:
        inits = list(init)
        if len(inits) > rank:
            raise ValueError(f"nearest_kronecker: {len(inits)} warm starts for rank {rank}")
        inits += [None] * (rank - len(inits))
    refs = [None if x is None else jnp.asarray(x).astype(dtype) for x in inits]
    base: list[tuple[jax.Array, jax.Array]] = []
    if subtract is not None:
        A0, G0 = (jnp.asarray(t).astype(dtype) for t in subtract)
        if A0.shape != (d_a, d_a) or G0.shape != (d_g, d_g):
            raise ValueError(
                f"nearest_kronecker: subtract=(A, G) must have shapes ({d_a}, {d_a}) and ({d_g}, {d_g}), "
                f"got {A0.shape} and {G0.shape}"
            )
        base.append((A0, G0))
    tol = jnp.asarray(tol, dtype)

    pairs, sigmas, iters, resids = [], [], [], []
    if method == "power":
        found: list[tuple[jax.Array, jax.Array]] = []
        for k in range(rank):
            matvec, rmatvec = _operator(a, g, base + found)
            v0 = _start(inits[k], d_g, k, dtype)
            u, sigma, v, it, res = _power_svd(matvec, rmatvec, v0, tol, max_iters)
            u, v = _orient(u, v, refs[k])
            root = jnp.sqrt(sigma)
            found.append((root * u, root * v))
            sigmas.append(sigma)
            iters.append(it)
            resids.append(res)
        pairs = found
    else:
        K = rank + 2 if krylov_dim is None else int(krylov_dim)
        if K < rank:
            raise ValueError(f"nearest_kronecker: krylov_dim={K} must be >= rank={rank}")
        starts = [_start(x, d_g, k, dtype) for k, x in enumerate(inits) if x is not None]
        q0 = sum(starts) if starts else _default_start(d_g, 0, dtype)
        matvec, rmatvec = _operator(a, g, base)
        U, s, V, it, rel = _lanczos_svd(matvec, rmatvec, q0, rank, K, tol, max_iters)
        for k in range(rank):
            u, v = _orient(U[k], V[k], refs[k])
            root = jnp.sqrt(jnp.maximum(s[k], 0.0))
            pairs.append((root * u, root * v))
            sigmas.append(s[k])
            iters.append(it)
            resids.append(rel)
    if not return_info:
        return pairs
    info = {
        "singular_values": jnp.stack(sigmas),
        "iterations": jnp.stack([jnp.asarray(i, jnp.int32) for i in iters]),
        "residual": jnp.stack(resids),
    }
    return pairs, info
