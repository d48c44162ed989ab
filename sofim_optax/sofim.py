"""SOFIM: stochastic optimisation with a regularised rank-one Fisher matrix.

Sen, Qin, Gayathri C, Raghu Kishore N, Chen, Raman, "SOFIM: Stochastic
Optimization Using Regularized Fisher Information Matrix", arXiv 2403.02833
(2024).

SOFIM models the Fisher information matrix by the outer product of the
bias-corrected first moment of the gradients plus a ridge,
``F = m̂ m̂ᵀ + ρ I``, and takes the Newton-type step ``F⁻¹ m̂``. By
Sherman–Morrison that step is exactly ``m̂ / (ρ + ‖m̂‖²)``: SOFIM is
bias-corrected momentum whose step length adapts through one scalar. We compute
that closed form, which has no cancellation, instead of the paper's expanded
``m̂/ρ − m̂ ‖m̂‖² / (ρ (ρ + ‖m̂‖²))``, which loses most of its digits in float32
when ``‖m̂‖² ≫ ρ``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax import aliases, distributed, guards
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar

__all__ = ["ScaleBySofimState", "scale_by_sofim", "sofim", "SOFIM_SCOPES"]

SOFIM_SCOPES = ("global", "per_tensor", "mini_block")
DEFAULT_MINI_BLOCK_SIZE = 1024


class ScaleBySofimState(NamedTuple):
    """State of :func:`scale_by_sofim`.

    Attributes:
      count: number of updates applied so far, int32 scalar.
      mu: exponential moving average of the gradients, a pytree shaped like the
        parameters, in ``mu_dtype`` (float32 for float32/bfloat16 parameters by
        default).
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array  # shape=(), dtype=int32
    mu: optax.Updates
    skipped: guards.SkipCounts


def _check_hyperparameters(b1: Any, damping: Any, scope: str, block_size: Any) -> None:
    where = "scale_by_sofim"
    hp.check_choice(where, "scope", scope, SOFIM_SCOPES)
    if scope == "mini_block":  # other scopes ignore block_size
        hp.check_positive_int(where, "block_size", block_size, static=True)
    hp.check_decay(where, "b1", b1)
    hp.check_damping(where, damping)


def _rank_one_ridge_step(block: jax.Array, rho: jax.Array) -> jax.Array:
    """``(ρI + b bᵀ)⁻¹ b = b / (ρ + ‖b‖²)`` for one block (exact, cancellation-free)."""
    return block / (rho + jnp.sum(jnp.square(block)))


def _mini_block_step(mhat: jax.Array, rho: jax.Array, block_size: int) -> jax.Array:
    """Applies the rank-one step to each ``block_size`` chunk of a flattened leaf.

    The last chunk is zero-padded. Zeros add nothing to a block's squared norm
    and their own result is ``0 / (ρ + s) = 0``, so padding never changes any
    real entry; it is sliced off afterwards.
    """
    flat = mhat.reshape(-1)
    size = flat.shape[0]
    num_blocks = -(-size // block_size)
    padded = jnp.pad(flat, (0, num_blocks * block_size - size))
    blocks = padded.reshape(num_blocks, block_size)
    stepped = jax.vmap(_rank_one_ridge_step, in_axes=(0, None))(blocks, rho)
    return stepped.reshape(-1)[:size].reshape(mhat.shape)


@hp.structural("block_size")
def scale_by_sofim(
    *,
    b1: Scalar = 0.9,
    damping: Scalar = 0.5,
    scope: str = "global",
    block_size: int = DEFAULT_MINI_BLOCK_SIZE,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by SOFIM's regularised rank-one Fisher inverse.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad m_0 = 0,\\
        \hat m_t &= m_t / (1 - \beta_1^t),\\
        d_t &= (\hat m_t \hat m_t^\top + \rho I)^{-1} \hat m_t
             = \hat m_t / (\rho + \lVert \hat m_t \rVert^2).

    Returns :math:`d_t` (no learning rate and no sign: chain with
    ``optax.scale_by_learning_rate`` or use the alias :func:`sofim`). The
    squared norm is accumulated in float32 (or wider) whatever the parameter
    dtype, and ``d_t`` comes back in each gradient leaf's dtype.

    The first step: bias correction makes :math:`\hat m_1 = g_1` exactly, so the
    first update is :math:`g_1 / (\rho + \lVert g_1\rVert^2)`. A large initial
    gradient therefore gives a short first step; that is the method, not a bug.

    Scale of ``damping``: ρ lives on the scale of :math:`\lVert\hat m\rVert^2`, the
    squared gradient norm, which depends on the model size and on how the loss
    is normalised (batch mean or sum, per pixel or per example). The step length
    :math:`\eta\lVert\hat m\rVert / (\rho + \lVert\hat m\rVert^2)` is at most
    :math:`\eta / (2\sqrt\rho)`; for small gradients SOFIM behaves like momentum
    SGD with learning rate :math:`\eta/\rho`. So ρ does not transfer between
    set-ups and must be tuned together with the learning rate.

    Args:
      b1: decay of the first moment :math:`\beta_1 \in [0, 1)`. Default 0.9.
      damping: the ridge :math:`\rho > 0` of the Fisher model (the paper's ρ;
        named ``damping`` as in every method here). Default 0.5, the default of the
        DP-FedSOFIM code co-authored by SOFIM's first author (the SOFIM paper does
        not state its own).
      scope: over which vector the rank-one Fisher is built. ``"global"`` (the
        default and the paper's formulation): one vector of all parameters, so
        one scalar :math:`\rho + \lVert\hat m\rVert^2` for the whole model.
        ``"per_tensor"``: one rank-one Fisher per parameter leaf (the Fisher model
        is block-diagonal over leaves; a LARS-like, materially different
        optimiser). ``"mini_block"``: each leaf is flattened and cut into chunks of
        ``block_size`` entries, one rank-one Fisher per chunk, computed with one
        ``vmap`` over the chunks of a leaf.
      block_size: chunk size for ``scope="mini_block"`` (default 1024); other
        scopes ignore it. It fixes shapes, so with ``scope="mini_block"`` under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      mu_dtype: dtype of the first moment. Default ``None``: the gradient's dtype
        promoted to at least float32 (so bfloat16 parameters get a float32
        moment, the numerics rule of every method here; this departs from optax's
        convention of keeping the parameters' dtype).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` ignores extra
      keyword arguments.

    References:
      Sen et al., `SOFIM: Stochastic Optimization Using Regularized Fisher
      Information Matrix <https://arxiv.org/abs/2403.02833>`_, 2024.
    """
    _check_hyperparameters(b1, damping, scope, block_size)

    def init_fn(params: optax.Params) -> ScaleBySofimState:
        def zeros(p: jax.Array) -> jax.Array:
            dtype = (
                mu_dtype if mu_dtype is not None else hp.accumulation_dtype(jnp.asarray(p).dtype)
            )
            return jnp.zeros(jnp.shape(p), dtype)

        return ScaleBySofimState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            skipped=guards.no_skips(),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleBySofimState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleBySofimState]:
        del params, extra_args
        count = optax.safe_increment(state.count)

        def moment(g: jax.Array, m: jax.Array) -> jax.Array:
            beta = jnp.asarray(b1, m.dtype)
            return beta * m + (1 - beta) * g.astype(m.dtype)

        def bias_corrected(m: jax.Array) -> jax.Array:
            # Computed in the moment's own dtype (float64 moments stay exact).
            return m / (1 - jnp.asarray(b1, m.dtype) ** count.astype(m.dtype))

        mu = jax.tree.map(moment, updates, state.mu)

        if scope == "global":
            # With c = 1 − β₁ᵗ and m̂ = m/c: m̂/(ρ + ‖m̂‖²) = m · (1/c)/(ρ + ‖m‖²/c²).
            # Folding the bias correction into that one scalar lets XLA fuse
            # the moment update with the reduction, leaving one scaling pass.
            leaves = jax.tree.leaves(mu)
            norm_dtype = hp.accumulation_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
            squared_norm = sum(
                (jnp.sum(jnp.square(m.astype(norm_dtype))) for m in leaves),
                start=jnp.zeros([], norm_dtype),
            )
            inv_c = 1 / (1 - jnp.asarray(b1, norm_dtype) ** count.astype(norm_dtype))
            scale = inv_c / (jnp.asarray(damping, norm_dtype) + squared_norm * inv_c * inv_c)
            directions = jax.tree.map(lambda m: m * scale.astype(m.dtype), mu)
        elif scope == "per_tensor":
            directions = jax.tree.map(
                lambda m: _rank_one_ridge_step(bias_corrected(m), jnp.asarray(damping, m.dtype)), mu
            )
        else:
            directions = jax.tree.map(
                lambda m: _mini_block_step(
                    bias_corrected(m), jnp.asarray(damping, m.dtype), block_size
                ),
                mu,
            )

        new_updates = jax.tree.map(lambda d, g: d.astype(g.dtype), directions, updates)
        return new_updates, state._replace(count=count, mu=mu)

    # A non-finite gradient would stay in ``mu`` for good: such a step is skipped.
    return optax.GradientTransformationExtraArgs(
        init_fn, distributed.mesh_agnostic(guards.skip_nonfinite_steps(update_fn))
    )


_SOFIM_DOC = r"""The SOFIM optimiser: :func:`scale_by_sofim`, decoupled weight decay, learning rate.

    .. math::

        \theta_{t} = \theta_{t-1} - \eta_t \left(
            \frac{\hat m_t}{\rho + \lVert \hat m_t \rVert^2} + \lambda\, \theta_{t-1}\right)

    with :math:`\hat m_t` the bias-corrected first moment of the gradients (see
    :func:`scale_by_sofim`). Weight decay is decoupled (AdamW style): it is added
    after preconditioning and scaled by the learning rate, so it never enters
    the moment or the Fisher model. The SOFIM paper does not say how it handles
    weight decay; the DP-FedSOFIM code of its first author uses this same form.

    Example::

        import optax, sofim_optax
        opt = sofim_optax.sofim(learning_rate=0.05, damping=0.5)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    Args:
      learning_rate: η, a float or an optax schedule. Tune it with ``damping``: the
        largest possible step is η/(2√ρ).
      b1: decay of the first moment. Default 0.9.
      damping: the Fisher ridge ρ > 0, on the scale of the squared gradient norm.
        Default 0.5.
      weight_decay: λ of the decoupled weight decay. Default 0.0.
      scope: ``"global"`` (default), ``"per_tensor"`` or ``"mini_block"``; see
        :func:`scale_by_sofim`.
      block_size: chunk size for ``scope="mini_block"`` (default 1024).
      mu_dtype: dtype of the moment (default ``None``: at least float32).
      weight_decay_mask: which parameters weight decay applies to, as for
        ``optax.add_decayed_weights``. Default ``None``: all.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Sen et al., `SOFIM: Stochastic Optimization Using Regularized Fisher
      Information Matrix <https://arxiv.org/abs/2403.02833>`_, 2024.
    """

sofim = aliases.make_alias(
    scale_by_sofim,
    aliases.decay_chain,
    name="sofim",
    doc=_SOFIM_DOC,
    alias_arguments=aliases.DECAY_ARGUMENTS,
)
