"""Framework-neutral capture engine behind the Flax adapters.

The adapters (``linen.py``, ``nnx.py``) only know how to *find* a dense or
convolutional layer call and how to read its options. Everything else lives
here, once:

1. **Discovery.** The user's loss is traced once with :func:`jax.eval_shape`
   (no computation) while every captured layer reports its path, its kind and
   the shape of its output. Unsupported layers, shared layers and layers called
   inside nested transformations are refused at this point, with the layer's
   path in the message.
2. **One forward, one backward.** A zero array ("perturbation") is created for
   every captured layer output, and the loss is differentiated with a single
   :func:`jax.vjp` with respect to the parameters and the perturbations
   together. A layer returns ``outputs + perturbation``; the cotangent of the
   perturbation is ``dL/ds`` for that layer's pre-activation output ``s``.
   The layer inputs and outputs are returned from the same trace as auxiliary
   values, so nothing is recomputed.
3. **Sampled Fisher.** When the loss helpers of :mod:`.losses` register the
   model's predictions, the traced function also returns the negative
   log-likelihood of targets sampled from the model's predictive distribution,
   and the same VJP function is pulled back along a second cotangent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax

from sofim_optax import distributed
from sofim_optax.curvature._layer_specs import (
    CaptureError,
    DenseGeneralSpec,
    EinsumSpec,
    EmbedSpec,
    LayerSpec,
    ScaleShiftSpec,
    scale_shift_spec,
)
from sofim_optax.curvature.stats import LayerStats, LayerStatsDict, square_mean
from sofim_optax.hyperparameters import accumulation_dtype

FisherType = Literal["empirical", "sampled"]
LossReduction = Literal["mean", "sum"]

logger = logging.getLogger("sofim_optax.curvature")


# ---------------------------------------------------------------------------
# Sessions: the state of one active capture.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Likelihood:
    """A predictive distribution registered by a loss helper.

    Attributes:
      name: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
      sample: ``sample(key, predictions) -> targets``.
      per_example_loss: ``per_example_loss(predictions, targets) -> (N,)``, the
        negative log-likelihood of each example (up to a constant).
    """

    name: str
    sample: Callable[[jax.Array, jax.Array], jax.Array]
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass
class _Registration:
    likelihood: Likelihood
    predictions: Any  # an array, or a ShapeDtypeStruct during discovery


@dataclasses.dataclass
class _LayerRecord:
    spec: LayerSpec
    inputs: Any
    outputs: Any


@dataclasses.dataclass
class Session:
    """State of one capture while the user's loss runs.

    Attributes:
      mode: ``"discover"`` (shape-only trace) or ``"perturb"`` (the real trace).
      fisher: the requested Fisher type.
      perturbations: zero arrays keyed by layer path (``"perturb"`` mode only).
      layers: per-layer records, in call order.
      registrations: predictive distributions registered by the loss helpers.
      trace: the JAX trace the loss runs at; layer calls at any other trace are
        inside a nested transformation and are refused.
      scratch: adapter-private data (e.g. NNX instance-to-path tables).
      tied: embeddings also used by ``attend`` (a tied output head), found by discovery.
      attends: the ``attend`` calls of those embeddings (query as ``inputs``, logits as
        ``outputs``), keyed by the table's path.
      attend_perturbations: zero arrays for the logits of each ``attend`` (``"perturb"``).
      uncaptured: normalisation layers and tied tables that discovery leaves without
        statistics, with the reason (applied more than once, inside a nested transformation,
        ...).
      skip: layers run without capture (the tied embeddings and the uncaptured
        normalisations, in the real trace).
    """

    mode: Literal["discover", "perturb"]
    fisher: FisherType
    perturbations: dict[str, jax.Array] | None = None
    layers: dict[str, _LayerRecord] = dataclasses.field(default_factory=dict)
    registrations: list[_Registration] = dataclasses.field(default_factory=list)
    trace: Any = None
    scratch: dict[Any, Any] = dataclasses.field(default_factory=dict)
    tied: set[str] = dataclasses.field(default_factory=set)
    attends: dict[str, _LayerRecord] = dataclasses.field(default_factory=dict)
    attend_perturbations: dict[str, jax.Array] | None = None
    uncaptured: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: frozenset[str] = frozenset()


_ACTIVE: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "sofim_optax_capture", default=None
)


def current_session() -> Session | None:
    """The innermost active capture session of this thread, or ``None``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def _activate(session: Session) -> Iterator[Session]:
    token = _ACTIVE.set(session)
    session.trace = jex_core.get_opaque_trace_state()
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def _at_session_trace(session: Session) -> bool:
    return jex_core.get_opaque_trace_state() == session.trace


def _abstract_record(spec: LayerSpec | None, inputs: Any, outputs: Any) -> _LayerRecord:
    """The discovery trace's record of a call: shapes and dtypes only."""
    return _LayerRecord(
        spec,
        jax.ShapeDtypeStruct(jnp.shape(inputs), jnp.result_type(inputs)),
        jax.ShapeDtypeStruct(jnp.shape(outputs), jnp.result_type(outputs)),
    )


def _check_discovered(perturbations: dict[str, jax.Array], path: str) -> None:
    """Refuses a layer of the real trace that the discovery trace did not see."""
    if path not in perturbations:
        raise CaptureError(
            f"Layer '{path}' ran in the differentiated pass but not in the shape-discovery pass: "
            "loss_fn must call the same layers every time it is traced."
        )


def capture_layer(
    session: Session,
    path: str,
    spec: LayerSpec,
    inputs: Any,
    call: Callable[[], jax.Array],
) -> jax.Array:
    """Runs one captured layer call: records it and perturbs its output.

    Args:
      session: the active session (the adapter checked it is active).
      path: the layer's key, its module path joined with ``"/"``.
      spec: what the layer computes.
      inputs: the layer input.
      call: runs the layer itself and returns its output.

    Returns:
      The layer output plus the layer's zero perturbation (``"perturb"`` mode),
      or the plain output (``"discover"`` mode).
    """
    if path in session.skip:
        return call()
    if path in session.layers:
        raise CaptureError(
            f"Layer '{path}' is applied more than once in one forward pass (shared weights, or "
            "two models whose layers have the same path). Its statistics would mix the "
            "applications, so capture refuses it; give each application its own layer."
        )
    if not _at_session_trace(session):
        raise CaptureError(
            f"Layer '{path}' was called inside a nested JAX transformation within loss_fn "
            "(jax.vmap / jax.checkpoint / lax.scan, nn.scan / nn.vmap / nn.remat, nnx.vmap / "
            "nnx.scan / nnx.remat, ...). Capture only supports layers that run at the top level "
            "of loss_fn's trace."
        )
    if jnp.issubdtype(jnp.result_type(inputs), jnp.complexfloating):
        raise CaptureError(
            f"Layer '{path}' has complex inputs ({jnp.result_type(inputs)}); capture refuses complex dtypes."
        )
    spec.check_inputs(path, inputs)
    outputs = call()
    if jnp.issubdtype(outputs.dtype, jnp.complexfloating):
        raise CaptureError(
            f"Layer '{path}' has complex outputs ({outputs.dtype}); capture refuses complex dtypes."
        )
    if session.mode == "discover":
        session.layers[path] = _abstract_record(spec, inputs, outputs)
        return outputs
    assert session.perturbations is not None
    _check_discovered(session.perturbations, path)
    session.layers[path] = _LayerRecord(spec, inputs, outputs)
    return outputs + session.perturbations[path]


#: Scale entries below this magnitude give ``x̂ = 0`` (see :func:`capture_scale_shift`).
_SMALLEST_SCALE = 1e-6


def capture_scale_shift(
    session: Session,
    path: str,
    spec: ScaleShiftSpec,
    call: Callable[[], jax.Array],
    scale: jax.Array | None,
    bias: jax.Array | None,
) -> jax.Array:
    """Runs one normalisation layer call: records its normalised input and perturbs its output.

    The layer computes ``outputs = x̂ ⊙ scale + bias``; ``x̂ = (outputs − bias) / scale`` is
    recorded as the statistics' ``inputs`` (0 where ``|scale| < 1e-6``). Unlike a dense layer,
    a normalisation applied more than once, or inside a nested transformation, is not refused:
    its parameters simply keep the minibatch statistics of the methods' fallback (discovery
    notes it in ``session.uncaptured`` and the real trace skips it).

    Args:
      session: the active session.
      path: the layer's key.
      spec: its feature axes.
      call: runs the layer and returns its output.
      scale: the layer's scale (shaped like the feature axes), or ``None``.
      bias: the layer's bias, or ``None``.

    Returns:
      The output plus the layer's zero perturbation (``"perturb"`` mode), or the plain output.
    """
    if path in session.skip:
        return call()
    if session.mode == "discover":
        if not _at_session_trace(session):
            session.uncaptured[path] = "it runs inside a nested transformation"
        elif path in session.layers:
            session.uncaptured[path] = "it is applied more than once"
    outputs = call()
    if session.mode == "discover":
        if path not in session.uncaptured:  # (x̂ is shaped like the output)
            session.layers[path] = _abstract_record(spec, outputs, outputs)
        return outputs
    assert session.perturbations is not None
    _check_discovered(session.perturbations, path)
    dtype = accumulation_dtype(outputs)
    shifted = outputs.astype(dtype)
    if bias is not None:
        shifted = shifted - jnp.asarray(bias).astype(dtype)
    normalised = shifted
    if scale is not None:
        s = jnp.asarray(scale).astype(dtype)
        usable = jnp.abs(s) >= _SMALLEST_SCALE
        normalised = jnp.where(usable, shifted / jnp.where(usable, s, 1), 0)
    session.layers[path] = _LayerRecord(spec, normalised, outputs)
    return outputs + session.perturbations[path]


def capture_normalisation(
    session: Session,
    path: str,
    module: Any,
    inputs: Any,
    parameters: dict[str, Any],
    call: Callable[[], jax.Array],
) -> jax.Array:
    """A normalisation layer's call, for both adapters: its scale and shift captured
    (:func:`capture_scale_shift`) when they span the input's trailing axes
    (``_layer_specs.scale_shift_spec``), else the layer just runs.

    Args:
      session: the active session.
      path: the layer's key.
      module: the layer (its ``feature_axes``, or ``axis`` for ``BatchNorm``, is read;
        ``GroupNorm`` has neither and normalises per channel of the last axis).
      inputs: the layer input.
      parameters: ``{"scale": ..., "bias": ...}``, the ones the layer has (``None`` values
        when a parameter the layer should have cannot be read).
      call: runs the layer.

    Returns:
      The layer output (perturbed when captured).
    """
    spec = None
    if inputs is not None and all(v is not None for v in parameters.values()):
        spec = scale_shift_spec(
            tuple(jnp.shape(inputs)),
            getattr(module, "feature_axes", getattr(module, "axis", -1)),
            tuple(tuple(jnp.shape(v)) for v in parameters.values()),
        )
    if spec is None:
        return call()
    return capture_scale_shift(
        session, path, spec, call, parameters.get("scale"), parameters.get("bias")
    )


def capture_attend(
    session: Session, path: str, query: Any, call: Callable[[], jax.Array]
) -> jax.Array:
    """Runs the ``attend`` call of the embedding at ``path`` (a tied output head,
    ``logits = query @ embeddingᵀ``): records it and perturbs the logits.

    The table then gets gradient from two maps with transposed roles; the statistics combine
    them into one dense map over more positions (see ``_TiedView``). An ``attend`` applied more
    than once, or inside a nested transformation, leaves the table without statistics (the
    methods' fallback), as does a query whose leading axis is not the batch.

    Args:
      session: the active session.
      path: the table's key.
      query: the ``attend`` input ``(N, ..., D)``.
      call: runs ``attend`` and returns the logits.

    Returns:
      The logits, plus their zero perturbation in ``"perturb"`` mode.
    """
    if path in session.skip:
        return call()
    if session.mode == "discover":
        session.tied.add(path)
        if not _at_session_trace(session):
            session.uncaptured[path] = "its attend runs inside a nested transformation"
        elif path in session.attends:
            session.uncaptured[path] = "its attend is applied more than once"
        elif len(jnp.shape(query)) < 2:
            session.uncaptured[path] = "its attend query has no batch axis"
    logits = call()
    if session.mode == "discover":
        session.attends[path] = _abstract_record(None, query, logits)
        return logits
    assert session.attend_perturbations is not None
    _check_discovered(session.attend_perturbations, path)
    session.attends[path] = _LayerRecord(None, query, logits)
    return logits + session.attend_perturbations[path]


def register_predictions(likelihood: Likelihood, predictions: jax.Array) -> jax.Array:
    """Registers a predictive distribution; returns the predictions the loss must use.

    Called by the helpers of :mod:`sofim_optax.curvature.losses`, which compute their loss
    from the returned array. Outside a capture and a prediction probe it returns
    ``predictions`` unchanged. In a capture with ``fisher="sampled"`` it records them (to
    draw targets from). Under a prediction probe (:func:`probe_predictions`, used by the
    Gauss-Newton products of :mod:`sofim_optax.curvature.quadratic_forms`) it records them
    and returns ``predictions + ε`` for the probe's zero perturbation ``ε``, so that
    derivatives of the loss with respect to ``ε`` are derivatives with respect to the
    predictions.

    Args:
      likelihood: the distribution family.
      predictions: logits (categorical, Bernoulli) or means (Gaussian), with the
        batch on axis 0.

    Returns:
      ``predictions``, or ``predictions + ε`` under a prediction probe.
    """
    probe = _PROBE.get()
    if probe is not None:
        predictions = probe.register(likelihood, predictions)
    session = _ACTIVE.get()
    if session is None or session.fisher != "sampled":
        return predictions
    if not _at_session_trace(session):
        raise CaptureError(
            f"A {likelihood.name} loss helper was called inside a nested JAX transformation "
            "within loss_fn; fisher='sampled' needs it at the top level of loss_fn."
        )
    recorded = predictions
    if session.mode == "discover":
        recorded = jax.ShapeDtypeStruct(jnp.shape(predictions), jnp.result_type(predictions))
    session.registrations.append(_Registration(likelihood, recorded))
    return predictions


@dataclasses.dataclass
class PredictionProbe:
    """The registered predictions of one run of a loss, optionally perturbed.

    Attributes:
      perturbations: ``None`` to only record (shape discovery), or one array per
        registration, in call order, added to the predictions the helpers return.
      likelihoods: the registered likelihoods, in call order.
      predictions: the registered (unperturbed) predictions, in call order.
      trace: the JAX trace the loss runs at; a helper called inside a nested
        transformation of the loss (a ``vmap`` over examples, a ``scan``) is refused,
        because one perturbation would then be shared by every mapped call.
    """

    perturbations: list[jax.Array] | None
    likelihoods: list[Likelihood] = dataclasses.field(default_factory=list)
    predictions: list[jax.Array] = dataclasses.field(default_factory=list)
    trace: Any = None

    def register(self, likelihood: Likelihood, predictions: jax.Array) -> jax.Array:
        if jex_core.get_opaque_trace_state() != self.trace:
            raise CaptureError(
                f"A {likelihood.name} loss helper was called inside a nested JAX transformation "
                "(jax.vmap, lax.scan, nn.scan, ...) within obj_fn; the Gauss-Newton products "
                "need each helper called once on the whole batch, at the top level of obj_fn."
            )
        k = len(self.predictions)
        self.likelihoods.append(likelihood)
        self.predictions.append(predictions)
        if self.perturbations is None:
            return predictions
        if k >= len(self.perturbations):
            raise CaptureError(
                "obj_fn registered more predictions than when its shapes were discovered: "
                "it must call the same loss helpers every time it is traced."
            )
        eps = self.perturbations[k]
        if jnp.shape(eps) != jnp.shape(predictions):
            raise CaptureError(
                f"obj_fn's {likelihood.name} predictions changed shape between traces "
                f"({jnp.shape(eps)} -> {jnp.shape(predictions)})."
            )
        # (under an explicit mesh, in the predictions' sharding)
        eps = distributed.keep_shardings(eps.astype(jnp.result_type(predictions)), predictions)
        return predictions + eps


_PROBE: contextvars.ContextVar[PredictionProbe | None] = contextvars.ContextVar(
    "sofim_optax_prediction_probe", default=None
)


@contextlib.contextmanager
def probe_predictions(perturbations: list[jax.Array] | None) -> Iterator[PredictionProbe]:
    """Runs a loss under a :class:`PredictionProbe` (see :func:`register_predictions`)."""
    probe = PredictionProbe(perturbations, trace=jex_core.get_opaque_trace_state())
    token = _PROBE.set(probe)
    try:
        yield probe
    finally:
        _PROBE.reset(token)


# ---------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------


def _split_output(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                "has_aux=True requires loss_fn to return a pair (loss, aux), got "
                f"{type(out).__name__}."
            )
        return out[0], out[1]
    return out, None


def _check_scalar_loss(loss: Any) -> None:
    shape, dtype = jnp.shape(loss), jnp.result_type(loss)
    if shape != ():
        raise TypeError(
            f"loss_fn must return a scalar loss (as for jax.value_and_grad); got shape {shape}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a real floating-point loss; got dtype {dtype}.")


def _sampled_nll(
    registrations: list[_Registration], rng: jax.Array, fisher_batch_size: int | None
) -> jax.Array:
    """Sum over examples (and registered losses) of the NLL of sampled targets."""
    total = jnp.zeros((), jnp.float32)
    for i, reg in enumerate(registrations):
        preds = reg.predictions
        if fisher_batch_size is not None:
            preds = preds[:fisher_batch_size]
        targets = lax.stop_gradient(
            reg.likelihood.sample(jax.random.fold_in(rng, i), lax.stop_gradient(preds))
        )
        total = total + jnp.sum(reg.likelihood.per_example_loss(preds, targets))
    return total


@dataclasses.dataclass(frozen=True)
class _CapturedView:
    """The contract's views of one captured layer call (a :class:`LayerStats` view).

    The deferred statistics hold ``(layer input, layer output, cotangent at the output)``;
    each field keeps the first ``batch`` examples (``fisher_batch_size``), takes the spec's
    rows (the patches of a convolution), casts to ``dtype``, and the output gradients are
    multiplied by ``grad_scale`` (``N`` for a batch-mean loss, so that they are per-example
    gradients).
    """

    spec: LayerSpec
    batch: int | None
    grad_scale: int
    dtype: Any

    @property
    def layer_kind(self) -> str:
        return self.spec.layer_kind

    def _cut(self, a: jax.Array) -> jax.Array:
        return a if self.batch is None else a[: self.batch]

    def inputs(self, arrays: tuple[Any, ...]) -> jax.Array:
        return self.spec.input_rows(self._cut(arrays[0])).astype(self.dtype)

    def outputs(self, arrays: tuple[Any, ...]) -> jax.Array:
        x = self._cut(arrays[0])
        return self.spec.output_rows(self._cut(arrays[1]), x).astype(self.dtype)

    def input_square_mean(self, arrays: tuple[Any, ...]) -> jax.Array:
        """``(d_in,)``, the mean over all rows of the squared inputs (an embedding's token
        frequencies, without forming its one-hot rows)."""
        shortcut = getattr(self.spec, "input_square_mean", None)
        if shortcut is not None:
            return shortcut(self._cut(arrays[0]), self.dtype)
        return square_mean(self.inputs(arrays))

    def output_grads(self, arrays: tuple[Any, ...]) -> jax.Array:
        x = self._cut(arrays[0])
        g = self.spec.output_rows(self._cut(arrays[2]), x).astype(self.dtype)
        return g if self.grad_scale == 1 else g * jnp.asarray(self.grad_scale, self.dtype)


def _layer_stats(
    spec: LayerSpec,
    inputs: jax.Array,
    outputs: jax.Array,
    cotangent: jax.Array,
    scale: Literal["batch", "one"],
    fisher_batch_size: int | None,
) -> LayerStats:
    view = _CapturedView(
        spec=spec,
        batch=fisher_batch_size,
        grad_scale=int(inputs.shape[0]) if scale == "batch" else 1,
        dtype=jnp.dtype(accumulation_dtype(inputs, outputs)),
    )
    return LayerStats.deferred(view, (inputs, outputs, cotangent))


def _positions(a: jax.Array) -> jax.Array:
    """``(N, T, d)`` rows of an ``(N, ..., d)`` array (``T = 1`` for ``(N, d)``)."""
    return a.reshape(a.shape[0], -1, a.shape[-1])


@dataclasses.dataclass(frozen=True)
class _TiedView:
    """The statistics of an embedding table that is also the output head (``attend``).

    The table ``E (V, D)`` gets gradient from two maps. The lookup ``y = onehot(id) @ E`` is
    the dense map of the contract with inputs ``onehot(id)`` and output gradients ``g_y``; the
    head ``logits = h @ Eᵀ`` has ``E`` in transposed roles: its gradient ``Σ_t g_logits,t h_tᵀ``
    has the same form with the logits' gradients ``g_logits (V)`` as "inputs" and the query
    ``h (D)`` as "output gradients". So the table's per-example gradient is exactly
    ``Σ_t a_t g_tᵀ`` over the positions of both uses, and its statistics are those of one dense
    map applied at ``T + T'`` positions: ``inputs (N, T + T', V)`` = the one-hot rows followed by
    the per-example logit gradients, ``output_grads (N, T + T', D)`` = the lookup's per-example
    output gradients followed by the queries. (Kronecker factors built from them sum the two
    uses' factors, as for a layer shared over positions.) There is no pre-activation for the
    head's positions in this orientation, so ``outputs`` is ``None`` (K-BFGS leaves such a table
    to its fallback). Arrays: ``(ids, lookup output, its cotangent, query, logits, their
    cotangent)``.
    """

    spec: EmbedSpec
    batch: int | None
    grad_scale: int
    dtype: Any
    layer_kind = "tied_embedding"

    def _cut(self, a: jax.Array) -> jax.Array:
        return a if self.batch is None else a[: self.batch]

    def _scaled(self, a: jax.Array) -> jax.Array:
        a = _positions(self._cut(a)).astype(self.dtype)
        return a if self.grad_scale == 1 else a * jnp.asarray(self.grad_scale, self.dtype)

    def _one_hot(self, ids: jax.Array) -> jax.Array:
        return _positions(self.spec.input_rows(self._cut(ids))).astype(self.dtype)

    def inputs(self, arrays: tuple[Any, ...]) -> jax.Array:
        return jnp.concatenate([self._one_hot(arrays[0]), self._scaled(arrays[5])], axis=1)

    def output_grads(self, arrays: tuple[Any, ...]) -> jax.Array:
        query = _positions(self._cut(arrays[3])).astype(self.dtype)
        return jnp.concatenate([self._scaled(arrays[2]), query], axis=1)

    def outputs(self, arrays: tuple[Any, ...]) -> None:
        del arrays

    def input_square_mean(self, arrays: tuple[Any, ...]) -> jax.Array:
        """``(V,)``: the mean over all ``N (T + T')`` rows of the squared inputs, from the token
        counts and the squared logit gradients (no one-hot rows formed)."""
        ids = self.spec._ids(self._cut(arrays[0]))
        lookups = ids.size
        logit_grads = self._scaled(arrays[5])
        rows = lookups + logit_grads.shape[0] * logit_grads.shape[1]
        counts = self.spec.input_square_mean(ids, self.dtype) * lookups
        return (counts + jnp.sum(jnp.square(logit_grads), axis=(0, 1))) / rows


def _tied_stats(
    spec: EmbedSpec,
    lookup: tuple[jax.Array, jax.Array, jax.Array],
    attend: tuple[jax.Array, jax.Array, jax.Array],
    scale: Literal["batch", "one"],
    fisher_batch_size: int | None,
) -> LayerStats:
    ids, query = lookup[0], attend[0]
    view = _TiedView(
        spec=spec,
        batch=fisher_batch_size,
        grad_scale=int(ids.shape[0]) if scale == "batch" else 1,
        dtype=jnp.dtype(accumulation_dtype(query, lookup[1])),
    )
    return LayerStats.deferred(view, (*lookup, *attend))


def _check_lookup_batches(session: Session) -> None:
    """Refuses an embedding lookup whose ids do not have the batch as their leading axis.

    Position embeddings are often looked up once for the whole batch (``embed(jnp.arange(T))``
    or ids of shape ``(1, T)``); every other layer's statistics are per example, but those
    rows would be read as examples, and their gradients would mix the whole batch. The batch
    size is that of the registered predictions, else the commonest leading size of the other
    captured layers.
    """
    sizes = [int(r.predictions.shape[0]) for r in session.registrations]
    if not sizes:
        sizes = [
            int(rec.inputs.shape[0])
            for rec in session.layers.values()
            if not isinstance(rec.spec, EmbedSpec)
        ]
    if not sizes:
        return
    batch = max(set(sizes), key=sizes.count)
    for path, rec in session.layers.items():
        if isinstance(rec.spec, EmbedSpec) and rec.inputs.shape[0] != batch:
            raise CaptureError(
                f"Embedding '{path}' looks up ids of shape {tuple(rec.inputs.shape)}, whose "
                f"leading axis is not the batch (N = {batch} elsewhere in the model): a table "
                "looked up once for the whole batch (positions, e.g. embed(jnp.arange(T))) "
                "would have its rows read as examples. Look up ids of shape (N, ...), e.g. "
                "jnp.broadcast_to(jnp.arange(T), (N, T)), or hold the table as a plain "
                "parameter (self.param), which the methods' fallback preconditions."
            )


def _resolve_tied(discovery: Session) -> set[str]:
    """Which tables used by ``attend`` get statistics (both uses, ``_TiedView``); the others
    lose their records, are skipped by the real trace, and are logged."""
    kept = set()
    for path in sorted(discovery.tied):
        lookup, attend = discovery.layers.get(path), discovery.attends.get(path)
        why = discovery.uncaptured.pop(path, None)
        if why is None and lookup is None:
            why = "it has no lookup in this loss"
        if why is None and attend.inputs.shape[0] != lookup.inputs.shape[0]:
            why = "its attend query's leading axis is not the lookup's batch"
        if why is None:
            kept.add(path)
            logger.info(
                "sofim_optax.curvature: embedding %r is also the output head (attend); its "
                "statistics combine both uses (the head's positions in transposed roles)",
                path,
            )
            continue
        discovery.layers.pop(path, None)
        discovery.attends.pop(path, None)
        logger.info(
            "sofim_optax.curvature: embedding %r is also used by attend (a tied output head) "
            "but gets no statistics because %s, so the methods give it their fallback",
            path,
            why,
        )
    return kept


def _discover(
    run: Callable[[Any], tuple[Any, Any]], primal: Any, fisher: FisherType, has_aux: bool
) -> Session:
    """The discovery trace (shapes only, :func:`jax.eval_shape`): the session it filled."""
    discovery = Session("discover", fisher)

    def discover(p: Any) -> jax.Array:
        with _activate(discovery):
            out, _ = run(p)
        loss, _ = _split_output(out, has_aux)
        _check_scalar_loss(loss)
        return loss

    jax.eval_shape(discover, primal)
    return discovery


def kernel_output_axes(
    run: Callable[[Any], tuple[Any, Any]], primal: Any, *, has_aux: bool
) -> dict[str, int]:
    """Shared implementation of the adapters' ``kernel_output_axes``: ``{path: number of
    feature axes}`` of every captured dense map over several axes, from one shape-only
    trace."""
    session = _discover(run, primal, "empirical", has_aux)
    return {
        path: rec.spec.n_features
        for path, rec in session.layers.items()
        if isinstance(rec.spec, (DenseGeneralSpec, EinsumSpec))
    }


#: The keyword options both adapters take and hand over unchanged to :func:`value_grad_and_stats`.
CAPTURE_OPTIONS = ("has_aux", "fisher", "rng", "fisher_batch_size", "loss_reduction")


def capture_options(namespace: dict[str, Any]) -> dict[str, Any]:
    """The :data:`CAPTURE_OPTIONS` found in an adapter's ``locals()``."""
    return {name: namespace[name] for name in CAPTURE_OPTIONS}


def value_grad_and_stats(
    run: Callable[[Any], tuple[Any, Any]],
    primal: Any,
    *,
    has_aux: bool,
    fisher: FisherType,
    rng: jax.Array | None,
    fisher_batch_size: int | None,
    loss_reduction: LossReduction,
) -> tuple[Any, Any, LayerStatsDict, Any]:
    """Shared implementation of the adapters' ``value_grad_and_stats``.

    Args:
      run: ``run(primal) -> (loss_fn_output, extra)``; runs the user's loss with
        the adapter's interception installed. ``extra`` is adapter data that is
        returned from the differentiated trace (e.g. NNX state updates).
      primal: what is differentiated (the parameters).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      fisher: ``"empirical"`` or ``"sampled"``.
      rng: PRNG key for ``fisher="sampled"``.
      fisher_batch_size: keep the statistics of the first this-many examples.
      loss_reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``(value, grads, layer_stats, extra)``.
    """
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}.")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    if fisher == "sampled" and rng is None:
        raise ValueError(
            "fisher='sampled' draws targets from the model and needs rng=<a PRNG key>."
        )
    if fisher_batch_size is not None and (
        isinstance(fisher_batch_size, bool)
        or not isinstance(fisher_batch_size, int)
        or fisher_batch_size < 1
    ):
        raise ValueError(
            f"fisher_batch_size must be a positive int or None, got {fisher_batch_size!r}."
        )

    # 1. Discovery: shapes only.
    discovery = _discover(run, primal, fisher, has_aux)
    tied = _resolve_tied(discovery)
    for path, why in sorted(discovery.uncaptured.items()):
        discovery.layers.pop(path, None)
        logger.info(
            "sofim_optax.curvature: normalisation %r gets no statistics because %s; the "
            "methods' diagonal fallback uses minibatch gradients for its scale and bias",
            path,
            why,
        )
    logger.debug(
        "sofim_optax.curvature: capturing %d layers: %s",
        len(discovery.layers),
        ", ".join(
            f"{path!r} ({type(rec.spec).__name__})" for path, rec in discovery.layers.items()
        ),
    )

    _check_lookup_batches(discovery)
    if fisher == "sampled" and not discovery.registrations:
        raise CaptureError(
            "fisher='sampled' needs to know the model's predictive distribution: compute the loss with "
            "sofim_optax.curvature.losses.softmax_cross_entropy / sigmoid_binary_cross_entropy / "
            "squared_error inside loss_fn."
        )
    if fisher_batch_size is not None:
        for path, rec in discovery.layers.items():
            if rec.inputs.shape[0] < fisher_batch_size:
                raise ValueError(
                    f"fisher_batch_size={fisher_batch_size} exceeds the batch size {rec.inputs.shape[0]} "
                    f"of layer '{path}'."
                )
        for reg in discovery.registrations:
            if reg.predictions.shape[0] < fisher_batch_size:
                raise ValueError(
                    f"fisher_batch_size={fisher_batch_size} exceeds the batch size "
                    f"{reg.predictions.shape[0]} of the registered {reg.likelihood.name} predictions."
                )

    def zeros(records: dict[str, _LayerRecord]) -> dict[str, jax.Array]:
        return {path: jnp.zeros(r.outputs.shape, r.outputs.dtype) for path, r in records.items()}

    perturbations = (zeros(discovery.layers), zeros(discovery.attends))

    # 2. One forward pass, differentiated with respect to params and perturbations.
    def forward(p: Any, perts: tuple[dict, dict]) -> tuple[Any, tuple[Any, Any, tuple]]:
        skip = frozenset((discovery.tied - tied) | set(discovery.uncaptured))
        session = Session(
            "perturb", fisher, perturbations=perts[0], attend_perturbations=perts[1], skip=skip
        )
        with _activate(session):
            out, extra = run(p)
        loss, aux = _split_output(out, has_aux)
        missing = (set(perts[0]) - set(session.layers)) | (set(perts[1]) - set(session.attends))
        if missing:
            raise CaptureError(
                f"Layers {sorted(missing)} ran in the shape-discovery pass but not in the differentiated "
                "pass: loss_fn must call the same layers every time it is traced."
            )
        records = tuple(
            {path: (rec.inputs, rec.outputs) for path, rec in kept.items()}
            for kept in (session.layers, session.attends)
        )
        if fisher == "sampled":
            assert rng is not None
            primal_out: Any = (loss, _sampled_nll(session.registrations, rng, fisher_batch_size))
        else:
            primal_out = loss
        return primal_out, (aux, extra, records)

    primal_out, vjp_fn, (aux, extra, records) = jax.vjp(
        forward, primal, perturbations, has_aux=True
    )

    if fisher == "sampled":
        loss, nll = primal_out
        grads, _ = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(nll)))
        _, pert_grads = vjp_fn((jnp.zeros_like(loss), jnp.ones_like(nll)))
        scale: Literal["batch", "one"] = "one"
    else:
        loss = primal_out
        grads, pert_grads = vjp_fn(jnp.ones_like(loss))
        scale = "batch" if loss_reduction == "mean" else "one"

    stats: LayerStatsDict = {}
    for path, (inputs, outputs) in records[0].items():
        spec = discovery.layers[path].spec
        if path in tied:
            attend = (*records[1][path], pert_grads[1][path])
            lookup = (inputs, outputs, pert_grads[0][path])
            stats[path] = _tied_stats(spec, lookup, attend, scale, fisher_batch_size)
        else:
            stats[path] = _layer_stats(
                spec, inputs, outputs, pert_grads[0][path], scale, fisher_batch_size
            )
    value = (loss, aux) if has_aux else loss
    return value, grads, stats, extra
