"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015) as optax transforms.

For every captured dense or convolutional layer, KFAC approximates the layer's Fisher block by
a Kronecker product of two small second moments and preconditions the layer's gradient with
the damped inverse of that product. Everything the Kronecker family shares (layer discovery,
statistics checks, stacking, fallback, the ``lax.cond`` refreshes) lives in
:mod:`sofim_optax.layerwise`; this module holds the KFAC-specific math.

Every hyperparameter is keyword-only; ``docs/arguments.md`` lists what each name means across
the methods.

Example, KFAC on a linear least-squares problem with the sampled Fisher by hand:

>>> import jax, jax.numpy as jnp, optax
>>> from sofim_optax.kfac import kfac
>>> from sofim_optax.curvature import LayerStats
>>> params = {"Dense_0": {"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros((1,))}}
>>> x = jax.random.normal(jax.random.key(0), (64, 3))
>>> y = x @ jnp.array([[1.0], [2.0], [3.0]]) + 0.5
>>> opt = kfac(learning_rate=1.0, momentum=None, damping=1e-4)
>>> state = opt.init(params)
>>> @jax.jit
... def step(params, state, key):
...   def loss_fn(p):  # mean over examples of 0.5 * residual**2
...     return 0.5 * jnp.mean((x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] - y) ** 2)
...   loss, grads = jax.value_and_grad(loss_fn)(params)
...   # Sampled Fisher of a unit-variance Gaussian likelihood: per-example output
...   # gradients for targets drawn from the model, i.e. standard normal noise here.
...   g = jax.random.normal(key, (64, 1))
...   stats = {"Dense_0": LayerStats(inputs=x, output_grads=g, outputs=None)}
...   updates, state = opt.update(grads, state, params, layer_stats=stats)
...   return optax.apply_updates(params, updates), state, loss
>>> for i in range(10):
...   params, state, loss = step(params, state, jax.random.key(i))
>>> bool(loss < 1e-6)
True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax import aliases, diagonal_fisher, guards, layerwise, linalg
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar
from sofim_optax.layerwise import block_diagonal

logger = logging.getLogger("sofim_optax")

__all__ = ["DEFAULT_MAX_FACTOR_DIM", "KfacCurvature", "ScaleByKfacState", "scale_by_kfac", "kfac"]

_INVERSES = ("eigh", "cholesky", "inv")


class KfacCurvature(NamedTuple):
    """KFAC's curvature state; every field is an array or a dict of arrays.

    Factors are **stacked per dimension** (see :class:`sofim_optax.layerwise.FactorLayout`):
    the input factor ``A`` (``d_a × d_a``) and output factor ``G`` (``d_g × d_g``) of all layers
    are grouped by their size ``d``, whatever layer or role they belong to, into one array of
    shape ``(n_d, d, d)`` under the key ``"d{d}"``, in layer-path order then ``A`` before ``G``.
    For example an MLP 784-1000-10 with biases has ``"d785"`` (A of layer 0), ``"d1000"`` (G of
    layer 0), ``"d1001"`` (A of layer 1) and ``"d10"`` (G of layer 1); two layers of equal shape
    share stacks. Eigendecompositions and inverses run in one ``vmap``-ed call per key.

    Attributes:
      stat_updates: ``(n_layers,)`` int32, ``k``: how many statistics updates each layer has
        received (layers in path order); the EMA decay is ``min(1 − 1/k, ema)``.
      factors: ``{"d{d}": (n_d, d, d)}``, the EMA factors ``A`` and ``G`` (undamped), in the
        accumulation dtype (float32, or float64 for float64 kernels).
      eigvals: ``inverse="eigh"`` only (else ``{}``): ``{"d{d}": (n_d, d)}``, eigenvalues of the
        factors at the last refresh, clamped at 0.
      eigvecs: ``inverse="eigh"`` only (else ``{}``): ``{"d{d}": (n_d, d, d)}``, eigenvectors.
      inverses: ``inverse="cholesky"``/``"inv"`` only (else ``{}``): ``{"d{d}": (n_d, d, d)}``,
        the damped inverses ``(A + π√λ I)⁻¹`` and ``(G + (√λ/π) I)⁻¹`` at the last refresh.
    """

    stat_updates: jax.Array
    factors: dict[str, jax.Array]
    eigvals: dict[str, jax.Array]
    eigvecs: dict[str, jax.Array]
    inverses: dict[str, jax.Array]


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`.

    Attributes:
      count: ``()`` int32, number of updates so far (``optax.safe_increment``).
      curvature: :class:`KfacCurvature`.
      fallback_state: :class:`sofim_optax.layerwise.FallbackState`, the fallback
        transformation's own state for the parameters no captured layer covers.
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array
    curvature: KfacCurvature
    fallback_state: layerwise.FallbackState
    skipped: guards.SkipCounts


def _block_limit(max_factor_dim: int):
    """``max_dim(layer, role)`` of KFAC's factor layout: an embedding's input factor is
    exactly diagonal (token frequencies), so it is kept as ``V`` blocks of one; every other
    factor is split past ``max_factor_dim``."""
    return lambda layer, role: 1 if layer.embedding and role == "A" else max_factor_dim


def _log_split_factors(fl: layerwise.FactorLayout, param_layout, max_factor_dim: int) -> None:
    for i, layer in enumerate(param_layout.layers):
        for role, dim in (("A", layer.d_a), ("G", layer.d_g)):
            count = fl.count(i, role)
            if count > 1 and not (layer.embedding and role == "A"):
                size = layerwise.block_split(dim, max_factor_dim)[1]
                logger.info(
                    "scale_by_kfac: factor %s of layer %r has dimension %d > max_factor_dim=%d; "
                    "it is kept block-diagonal, %d blocks of %d",
                    role,
                    layer.path,
                    dim,
                    max_factor_dim,
                    count,
                    size,
                )


def _kfac_method(
    damping: Scalar, ema: Scalar, pi_adjusted: bool, inverse: str, max_factor_dim: int
) -> layerwise.LayerwiseMethod:
    limit = _block_limit(max_factor_dim)

    def layout_of(param_layout: layerwise.ParamLayout) -> layerwise.FactorLayout:
        return layerwise.FactorLayout.build(param_layout.layers, ("A", "G"), max_dim=limit)

    def init(param_layout, dtype):
        fl = layout_of(param_layout)
        _log_split_factors(fl, param_layout, max_factor_dim)
        eigh = inverse == "eigh"
        return KfacCurvature(
            stat_updates=jnp.zeros((len(param_layout.layers),), jnp.int32),
            factors=fl.zeros(dtype),
            eigvals=fl.vectors(dtype) if eigh else {},
            eigvecs=fl.eyes(dtype) if eigh else {},
            inverses={} if eigh else fl.eyes(dtype),
        )

    def update_statistics(curv: KfacCurvature, param_layout, stats, **extra):
        del extra
        fl = layout_of(param_layout)
        values = {}
        k = curv.stat_updates
        for i, st in stats.items():
            layer = param_layout.layers[i]
            old_a = fl.get(curv.factors, i, "A")
            dtype = old_a.dtype
            decay = layerwise.ema_decay(k[i] + 1, ema, dtype)
            a_blocks = layerwise.block_split(layer.d_a, limit(layer, "A"))
            g_blocks = layerwise.block_split(layer.d_g, limit(layer, "G"))
            if layer.embedding and a_blocks[0] > 1:
                # diag(A) = token frequencies, from the ids (no one-hot rows formed)
                a_hat = st.input_square_mean().astype(dtype)[:, None, None]
            elif a_blocks[0] == 1:
                a_hat = layerwise.input_factor(st.inputs, layer.has_bias, dtype)
            else:
                a_hat = block_diagonal.block_input_factor(
                    st.inputs, layer.has_bias, *a_blocks, dtype
                )
            if g_blocks[0] == 1:
                g_hat = layerwise.output_factor(st.output_grads, dtype)
            else:
                g_hat = block_diagonal.block_output_factor(st.output_grads, *g_blocks, dtype)
            values[(i, "A")] = decay * old_a + (1 - decay) * a_hat
            values[(i, "G")] = decay * fl.get(curv.factors, i, "G") + (1 - decay) * g_hat
        active = jnp.asarray(sorted(stats), jnp.int32)
        return curv._replace(
            stat_updates=k.at[active].set(optax.safe_increment(k[active])),
            factors=fl.set(curv.factors, values),
        )

    def refresh(curv: KfacCurvature, param_layout, **extra):
        del extra
        fl = layout_of(param_layout)
        if inverse == "eigh":
            eig = fl.map(jnp.linalg.eigh, curv.factors)
            return curv._replace(
                eigvals={k: jnp.maximum(w, 0.0) for k, (w, _) in eig.items()},
                eigvecs={k: v for k, (_, v) in eig.items()},
            )
        traces = fl.traces(curv.factors)
        layers = param_layout.layers

        def shift(i, role):
            layer = layers[i]
            s_a, s_g = linalg.factored_damping(
                jnp.sum(fl.get(traces, i, "A")),  # (the sum over the blocks, if in blocks)
                layer.d_a,
                jnp.sum(fl.get(traces, i, "G")),
                layer.d_g,
                damping,
                pi_adjusted,
            )
            return s_a if role == "A" else s_g

        shifts = fl.per_factor(shift)
        return curv._replace(
            inverses=layerwise.stacked_damped_inverses(curv.factors, shifts, inverse)
        )

    def precondition(curv: KfacCurvature, param_layout, grads, **extra):
        del extra
        fl = layout_of(param_layout)
        out = {}
        for i, v in grads.items():
            if fl.count(i, "A") > 1 or fl.count(i, "G") > 1:
                out[i] = _block_precondition(fl, curv, param_layout.layers[i], i, v)
                continue
            if inverse == "eigh":
                a = (fl.get(curv.eigvals, i, "A"), fl.get(curv.eigvecs, i, "A"))
                g = (fl.get(curv.eigvals, i, "G"), fl.get(curv.eigvecs, i, "G"))
                out[i] = linalg.damped_kron_solve_eigh(a, g, v, damping, pi_adjusted)
            else:
                out[i] = fl.get(curv.inverses, i, "A") @ v @ fl.get(curv.inverses, i, "G")
        return out, curv

    def _block_precondition(fl, curv, layer, i, v):
        def stacked(stacks, role):  # a whole factor as one block
            x = fl.get(stacks, i, role)
            return x if fl.count(i, role) > 1 else x[None]

        if inverse == "eigh":
            a = (stacked(curv.eigvals, "A"), stacked(curv.eigvecs, "A"))
            g = (stacked(curv.eigvals, "G"), stacked(curv.eigvecs, "G"))
            return block_diagonal.block_kron_solve_eigh(
                a, g, v, (layer.d_a, layer.d_g), damping, pi_adjusted
            )
        return block_diagonal.block_kron_apply(
            stacked(curv.inverses, "A"), v, stacked(curv.inverses, "G")
        )

    return layerwise.LayerwiseMethod(init, update_statistics, refresh, precondition)


#: The largest Kronecker factor :func:`scale_by_kfac` keeps whole by default; larger ones are
#: kept block-diagonal (its ``max_factor_dim``).
DEFAULT_MAX_FACTOR_DIM = 4096


@hp.structural("max_factor_dim")
def scale_by_kfac(
    *,
    damping: Scalar = 1e-3,
    ema: Scalar = 0.95,
    stats_period: int | jax.Array = 1,
    inverse_period: int | jax.Array = 20,
    pi_adjusted: bool = True,
    inverse: str = "eigh",
    max_factor_dim: int | None = None,
    fallback: optax.GradientTransformation | str | None = "diagonal",
    kernel_output_axes: Mapping[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer's gradient by its damped KFAC Fisher block inverse.

    For a layer computing ``s = ā ᵀ X`` with gradient matrix ``V = [∇kernel.reshape(-1, d_out);
    ∇bias]`` (``d_a × d_g``; ``ā`` = input or conv patch with a last coordinate 1 for the
    bias), KFAC (Martens & Grosse 2015) approximates the Fisher block, in the row-major
    convention ``(A ⊗ G) vec_r(X) = vec_r(A X Gᵀ)``, by

    .. math::

        F \approx A \otimes G,\qquad
        \hat A = \operatorname{mean}_n \bar a_n \bar a_n^\top,\qquad
        \hat G = \operatorname{mean}_n g_n g_n^\top ,

    where ``g_n`` is the gradient of example ``n``'s loss with respect to the layer's
    pre-activation (``LayerStats.output_grads``). For convolutions (statistics of shape
    ``(N, T, ·)``, ``T`` output positions) the KFC approximation (Grosse & Martens 2016) is
    used: ``Â = mean_{n,t} ā ā ᵀ`` and ``Ĝ = T · mean_{n,t} g gᵀ``. Statistics are averaged
    over steps:

    .. math::

        A \leftarrow \rho A + (1-\rho)\hat A,\quad G \leftarrow \rho G + (1-\rho)\hat G,\qquad
        \rho = \min(1 - 1/k,\ \text{ema}),

    ``k`` counting the statistics updates so far, this one included (so the first equals the
    batch statistics). The update returned is (no learning rate, no sign)

    .. math::

        \Delta = (A + \pi\sqrt\lambda\, I)^{-1}\, V\, (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1},
        \qquad \pi = \sqrt{\frac{\operatorname{tr}A/d_a}{\operatorname{tr}G/d_g}}

    (factored Tikhonov damping; ``π = 1`` when ``pi_adjusted=False``), i.e.
    :func:`sofim_optax.linalg.damped_kron_solve`.

    Schedule. On update number ``count`` (0-based): when ``count % stats_period == 0`` the
    statistics are refreshed from ``layer_stats``, then when ``count % inverse_period == 0`` the
    eigendecompositions/inverses; both run under ``lax.cond`` and both run at ``count = 0``.
    Factors of equal size (across layers and roles) are stacked and decomposed in one
    ``vmap``-ed call per size (state layout: :class:`KfacCurvature`).

    Which layers. ``init(params)`` allocates factors for every node of ``params`` holding a
    ``kernel`` with ``ndim >= 2`` (its sibling ``bias`` folded in as the homogeneous
    coordinate), and for every 2-D ``embedding`` table (``Embed``), whose input factor is
    exactly diagonal (``A = diag`` of the token frequencies, kept as ``V`` blocks of one:
    ``LayerStats.input_square_mean``). A table tied to the output head (``attend``) has the
    head's logit gradients among its inputs (see the capture's ``"tied_embedding"``
    statistics), which make ``A`` a full ``V × V`` matrix; KFAC keeps its diagonal, the token
    frequencies plus the mean squared logit gradients, so a vocabulary-sized table never
    allocates ``V × V``. ``update`` preconditions the layers that have a key in
    ``layer_stats``; every other parameter (norm scales and biases, with the exact per-example
    diagonal the capture gives them, and layers absent from ``layer_stats``) goes to
    ``fallback``. A one-time INFO log line (logger ``"sofim_optax"``) lists both groups.

    Args:
      damping: ``λ`` (default ``1e-3``), the Tikhonov damping of ``F + λI``, ``> 0`` (``0``
        is refused; a traced value is floored at ``linalg.DAMPING_FLOOR = 1e-12``). It lives
        on the scale of the Fisher, which depends on
        the loss normalisation: ``1e-3`` suits a loss averaged over examples with a per-example
        loss of order one (softmax cross-entropy, as in most KFAC code); a loss **summed** over
        many outputs (e.g. 784 pixels of an autoencoder) has a Fisher hundreds of times larger
        and wants a larger ``λ`` (Martens & Grosse start at 150 there). With ``inverse="eigh"``
        the damping is applied at every step, so changing it (a schedule through
        ``optax.inject_hyperparams``) takes effect at once; with ``"cholesky"``/``"inv"`` it is
        baked into the inverses and takes effect at the next inverse refresh.
      ema: upper bound of the statistics' EMA decay (default ``0.95``, the paper's ``ε``).
      stats_period: refresh the statistics every this many updates (default ``1``). Pass
        ``layer_stats`` on every update anyway (the set of its keys decides which layers are
        preconditioned); on other steps their values are not used.
      inverse_period: refresh eigendecompositions/inverses every this many updates (default
        ``20``, the paper's ``T3``).
      pi_adjusted: balance the damping between the factors with ``π`` (default ``True``).
      inverse: ``"eigh"`` (default) stores eigendecompositions of the undamped factors and
        applies ``Q_A[(Q_Aᵀ V Q_G) ⊘ ((d_A + π√λ)(d_G + √λ/π)ᵀ)]Q_Gᵀ`` (damping changeable at
        run time, never NaN); ``"cholesky"`` or ``"inv"`` store explicit damped inverses
        (cheaper to apply; a Cholesky breakdown falls back to the eigendecomposition, so no NaN
        either).
      max_factor_dim: the largest factor kept whole; ``None`` (default) means
        :data:`sofim_optax.kfac.DEFAULT_MAX_FACTOR_DIM` ``= 4096`` (``None`` rather than a
        number, so that ``optax.inject_hyperparams`` leaves it alone; a number passed there
        must be listed in ``static_args``, as ``scale_by_kfac.static_args`` does). A factor of
        dimension ``d`` above it (a vocabulary-sized ``G``) is kept block-diagonal:
        ``c = ⌈d / max_factor_dim⌉`` diagonal blocks of ``⌈d / c⌉``, formed, decomposed and
        applied block by block (``(A ⊗ G)⁻¹`` acts on each block of ``V`` as
        ``A_ii⁻¹ V_ij G_jj⁻¹``), so its memory is about ``d · d / c`` and its refresh ``c``
        times a ``d / c`` decomposition; ``1`` makes every factor diagonal. An INFO log line
        names each factor it splits (:mod:`sofim_optax.layerwise.block_diagonal`).
      fallback: transformation for the parameters no captured layer covers. ``"diagonal"``
        (default): :func:`sofim_optax.diagonal_fisher.scale_by_diagonal_fisher` with the same
        ``damping`` and ``ema``, refreshed every step (a diagonal Fisher step on the same scale as
        the preconditioned layers'; see
        :func:`sofim_optax.diagonal_fisher.resolve_fallback` for why). ``None`` passes their
        gradient through unchanged (a plain gradient step, which grows with the loss's scale).
        Any optax transformation (e.g. ``optax.scale_by_rms()``) is applied to them with its
        own state kept inside ours: once
        to the dict ``{leaf path: gradient}`` of the leaves outside every layer, and once per
        uncaptured layer to ``{leaf path: gradient}`` of its kernel and bias; for element-wise
        transformations this is the same as one call on all of them. Extra keyword arguments
        other than ``layer_stats`` are forwarded to it. Because which layers are captured is
        only known at update time, a stateful fallback allocates its state for every candidate
        layer too.

      kernel_output_axes: ``{layer path: number of output axes}`` for dense maps over several
        axes that the parameter tree cannot tell from a convolution: a bias-less
        ``DenseGeneral`` / ``LinearGeneral`` with ``features=(heads, head_dim)`` needs ``2``
        (the message of a misread layer gives the entry). Rules:
        :func:`sofim_optax.layerwise.discover_layers`. Default ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, **extra)`` requires ``layer_stats`` (a ``dict[str, LayerStats]`` as made by
      ``sofim_optax.curvature.linen.value_grad_and_stats``); its errors (missing statistics,
      unknown layer key, shapes that do not fit the kernel) are raised at trace time and name
      the layer. Updates come back in each gradient leaf's dtype; statistics and solves run in
      float32 (float64 for float64 kernels).

    References:
      Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
      Grosse & Martens, `A Kronecker-factored approximate Fisher matrix for convolution layers
      <https://arxiv.org/abs/1602.01407>`_, ICML 2016.
    """
    hp.check_choice("scale_by_kfac", "inverse", inverse, _INVERSES)
    hp.check_decay("scale_by_kfac", "ema", ema)
    hp.check_damping("scale_by_kfac", damping)
    if max_factor_dim is None:
        max_factor_dim = DEFAULT_MAX_FACTOR_DIM
    hp.check_positive_int("scale_by_kfac", "max_factor_dim", max_factor_dim, static=True)
    return layerwise.layerwise_transformation(
        name="scale_by_kfac",
        method=_kfac_method(damping, ema, pi_adjusted, inverse, max_factor_dim),
        state_cls=ScaleByKfacState,
        stats_period=stats_period,
        inverse_period=inverse_period,
        fallback=diagonal_fisher.resolve_fallback(
            "scale_by_kfac", fallback, damping=damping, ema=ema
        ),
        kernel_output_axes=kernel_output_axes,
    )


_KFAC_DOC = r"""KFAC with heavy-ball momentum on the preconditioned direction.

    .. math::

        \Delta_t &= (A + \pi\sqrt\lambda I)^{-1} V_t (G + \tfrac{\sqrt\lambda}{\pi} I)^{-1}
            \quad\text{(per captured layer, } \mathtt{scale\_by\_kfac}\text{)}\\
        u_t &= \Delta_t + \mathrm{weight\_decay}\cdot w_t\\
        m_t &= u_t + \mu\, m_{t-1}\\
        w_{t+1} &= w_t - \eta_t\, m_t

    i.e. ``optax.chain(scale_by_kfac(...), add_decayed_weights(weight_decay),
    trace(decay=momentum), scale_by_learning_rate(learning_rate))``. The momentum acts on the
    preconditioned direction, like kfac-jax's ``δ = αΔ + μδ_prev`` with fixed ``α, μ`` (no
    quadratic-model adaptation here). The K-BFGS paper's KFAC baseline (Goldfarb, Ren &
    Bahamou 2020) instead preconditions an EMA of the gradients (``G⁻¹ m A⁻¹``); the weight
    decay here is decoupled (added after preconditioning, as in AdamW).

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      momentum: ``μ`` (default ``0.9``); ``None`` for no momentum.
      damping: ``λ`` (default ``1e-3``); see :func:`scale_by_kfac` for its scale.
      weight_decay: decoupled weight decay (default ``0.0``).
      weight_decay_mask: optional mask for ``add_decayed_weights`` (default ``None``: all).
      nesterov: Nesterov momentum (default ``False``).

    {scale_by_arguments}

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``layer_stats=`` to its ``update``.
      Works under ``optax.inject_hyperparams`` (e.g. ``learning_rate`` and ``damping``
      changed at run time), ``optax.MultiSteps`` (the statistics of the last micro-batch before
      each real step are the ones used) and ``optax.apply_if_finite``.

    References:
      Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.

    The module docstring of :mod:`sofim_optax.kfac` has a worked example.
    """

kfac = aliases.make_alias(
    scale_by_kfac,
    aliases.momentum_chain,
    name="kfac",
    doc=_KFAC_DOC,
    alias_arguments=aliases.MOMENTUM_ARGUMENTS,
)
