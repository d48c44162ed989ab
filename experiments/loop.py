"""The training loop of the experiments: one model, one optimizer, one task, epoch by epoch.

:func:`train` runs one model with one optimizer on one :class:`~experiments.tasks.Task`
(``"classification"``: softmax cross-entropy, test loss and accuracy; ``"autoencoder"``:
sigmoid cross-entropy summed over pixels and averaged over the batch, or half the squared
error for real-valued data, optional L2 term, training and test loss). Every step is the
train step of :func:`experiments.step.make_train_step` with what the optimizer's registry
entry needs, jitted and compiled before the clock starts; ``wall_time`` counts training
steps only, not evaluation, checkpoints or compilation. Models with ``BatchNorm`` are
supported: every variable collection other than ``params`` (``batch_stats``) is carried as
mutable model state.

Reproducibility and resuming: the batch order of epoch ``e`` is drawn from
``numpy.random.default_rng([seed, e])`` and the key of step ``t`` (sampled Fisher) is
``fold_in(PRNGKey(seed), t)``, so a run restored from the checkpoint written at the end of an
epoch (:mod:`experiments.checkpoint`) continues exactly as the uninterrupted run would have:
same parameters, same numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sofim_optax.curvature.linen
from experiments.checkpoint import CheckpointMismatch, fingerprint, load_checkpoint, save_checkpoint
from experiments.registry import OPTIMIZERS, make_optimizer
from experiments.step import make_train_step
from experiments.tasks import Task, batch_of

__all__ = ["EpochMetrics", "RunResult", "train", "data_parallel_mesh"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EpochMetrics:
    """Metrics after one epoch.

    ``train_loss`` is the mean of the epoch's minibatch losses (data term, at
    the parameters of each step); ``test_accuracy`` is ``None`` for an
    autoencoder. ``wall_time`` counts training steps only (not evaluation,
    checkpoints or compilation), cumulated over epochs.
    """

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float | None
    wall_time: float
    mean_step_time: float
    steps: int = 0


@dataclasses.dataclass
class RunResult:
    optimizer: str
    label: str
    hparams: dict[str, Any]
    seed: int
    compile_time: float
    epochs: list[EpochMetrics]
    task: str = "classification"
    model: str = ""
    batch_size: int = 0
    tuned: str = "no"  # "defaults" (tuned defaults, no override), "grid" (picked by --grid), "no"
    resumed_from_epoch: int = 0
    diverged: bool = False
    # The final parameters and model state (not written to JSON).
    params: Any = dataclasses.field(default=None, repr=False, compare=False)
    model_state: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("params", "model_state")
        }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _batches(num_examples: int, batch_size: int, seed: int, epoch: int):
    """Index arrays of the epoch's minibatches (the last partial batch is dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def _split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def _call_model(
    model: nn.Module, params: Any, model_state: Mapping[str, Any], x: jax.Array, train: bool
):
    """Applies the model; returns (outputs, new model state)."""
    variables = {"params": params, **model_state}
    kwargs = {"train": train} if _takes_train(model) else {}
    if train and model_state:
        out, new_state = model.apply(variables, x, mutable=list(model_state), **kwargs)
        return out, dict(new_state)
    return model.apply(variables, x, **kwargs), dict(model_state)


def _takes_train(model: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False


def _kernel_output_axes(model: Any, params: Any, model_state: Any, x: Any) -> dict[str, int]:
    """The ``kernel_output_axes`` of the model's ``DenseGeneral`` layers (one shape-only trace)."""

    def outputs(p):
        out, _ = _call_model(model, p, model_state, jnp.asarray(x), train=True)
        return jnp.sum(out)

    return sofim_optax.curvature.linen.kernel_output_axes(outputs, params)


def data_parallel_mesh(devices: int | None, batch_size: int) -> jax.sharding.Mesh | None:
    """The ``("data",)`` mesh of the first ``devices`` local devices (``None``: all of them),
    or ``None`` for one device. Its axis is ``Auto``: XLA propagates the batch's sharding
    through any model. The batch must split evenly."""
    n = jax.local_device_count() if devices is None else devices
    if not 1 <= n <= jax.local_device_count():
        raise ValueError(
            f"devices={n}: this process sees {jax.local_device_count()} local devices (on CPU, "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N)"
        )
    if n == 1:
        return None
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} does not split over {n} devices evenly")
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices()[:n]
    )


def train(
    model: nn.Module,
    optimizer: str,
    data: Sequence[np.ndarray | None],
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    hparams: Mapping[str, Any] | None = None,
    progress: bool = True,
    eval_batch_size: int = 2000,
    task: Task | str = "classification",
    model_name: str = "",
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    on_epoch_end: Callable[[RunResult], None] | None = None,
    stop_on_divergence: bool = True,
    devices: int | None = 1,
) -> RunResult:
    """Trains ``model`` with ``optimizer`` and evaluates on the test set after every epoch.

    Args:
      model: a Flax linen module mapping a batch to logits (classification) or
        reconstruction logits/means of the flattened input (autoencoder). If
        its ``__call__`` takes ``train``, it gets ``train=True`` in training
        steps and ``False`` in evaluation; variable collections other than
        ``params`` (``batch_stats``) are updated as mutable state.
      optimizer: a key of :data:`experiments.registry.OPTIMIZERS`.
      data: ``(x_train, y_train, x_test, y_test)``: float32 inputs and int
        labels (``y_*`` ignored, may be ``None``, for an autoencoder).
      epochs: number of passes over the training set (the last partial batch
        of each pass is dropped).
      batch_size: examples per step.
      seed: seeds the initialisation, the batch order and the step keys.
      hparams: overrides of the optimizer's default hyperparameters (and of
        the loop options :data:`experiments.registry.LOOP_OPTIONS`).
      progress: show a tqdm progress bar with the live loss.
      eval_batch_size: examples per evaluation call.
      task: a :class:`Task` or its kind.
      model_name: recorded in the result and the checkpoint fingerprint.
      checkpoint: a file written at the end of every epoch; with ``resume``
        an existing one (from the same configuration, else
        :class:`CheckpointMismatch`) is restored and training continues from
        its epoch.
      on_epoch_end: called with the result so far after every epoch (the CLIs
        write the JSON there).
      stop_on_divergence: stop after an epoch whose training loss is not finite.
      devices: data-parallel over this many local devices (``None``: all of them; default
        1): every batch split over a ``("data",)`` mesh (:func:`data_parallel_mesh`),
        parameters and optimizer state replicated, the step traced under ``jax.set_mesh``
        so that the methods' refreshes are split over the devices too.

    Returns:
      A :class:`RunResult` with one :class:`EpochMetrics` per epoch.
    """
    mesh = data_parallel_mesh(devices, batch_size)
    arguments = dict(
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        hparams=hparams,
        progress=progress,
        eval_batch_size=eval_batch_size,
        task=task,
        model_name=model_name,
        checkpoint=checkpoint,
        resume=resume,
        on_epoch_end=on_epoch_end,
        stop_on_divergence=stop_on_divergence,
    )
    if mesh is None:
        return _train(**arguments, rows=_same, replicated=_same)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        return _train(
            **arguments,
            rows=lambda tree: jax.device_put(tree, rows),
            replicated=lambda tree: jax.device_put(tree, whole),
        )


def _same(tree: Any) -> Any:
    return tree


def _train(
    model: nn.Module,
    optimizer: str,
    data: Sequence[np.ndarray | None],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    hparams: Mapping[str, Any] | None,
    progress: bool,
    eval_batch_size: int,
    task: Task | str,
    model_name: str,
    checkpoint: str | os.PathLike | None,
    resume: bool,
    on_epoch_end: Callable[[RunResult], None] | None,
    stop_on_divergence: bool,
    rows: Callable[[Any], Any],
    replicated: Callable[[Any], Any],
) -> RunResult:
    """:func:`train`'s body; ``rows`` places a batch, ``replicated`` everything else."""
    from tqdm.auto import tqdm  # optional dependency of the experiments

    task = Task(task) if isinstance(task, str) else task
    hparams = dict(hparams or {})
    spec = OPTIMIZERS[optimizer] if optimizer in OPTIMIZERS else None
    if spec is not None and spec.l2_argument and task.l2:
        hparams.setdefault(spec.l2_argument, task.l2)  # the curvature of the task's L2 term
    x_train, y_train, x_test, y_test = data
    if task.kind == "autoencoder":
        y_train = y_test = None
    elif y_train is None or y_test is None:
        raise ValueError("a classification task needs labels y_train and y_test")

    variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(x_train[:1]))
    params, model_state = _split_variables(variables)
    if spec is not None and "layer_stats" in spec.needs and "kernel_output_axes" not in hparams:
        # Dense maps over several axes (attention's projections) read as such by every method.
        axes = _kernel_output_axes(model, params, model_state, x_train[:2])
        if axes:
            hparams["kernel_output_axes"] = axes
    spec, tx, used = make_optimizer(optimizer, task.kind, **hparams)
    needs_previous_batch = "previous_batch_stats" in spec.needs
    params, model_state = replicated((params, model_state))
    opt_state = tx.init(params)
    base_key = jax.random.PRNGKey(seed)

    def objective_and_state(p, state, batch):
        out, new_state = _call_model(model, p, state, batch[0], train=True)
        loss = task.data_loss(out, batch)
        objective = loss
        if task.l2:
            squares = sum(jnp.sum(jnp.square(w)) for w in jax.tree_util.tree_leaves(p))
            objective = objective + 0.5 * task.l2 * squares
        return objective, (loss, new_state)

    # The step's inputs are (model state, batch): the statistics passes see the same state.
    step_fn = make_train_step(
        objective_and_state,
        tx,
        needs=spec.needs,
        fisher=used.get("fisher", "empirical"),
        fisher_batch_size=used.get("fisher_batch_size"),
        has_aux=True,
    )

    def train_step(p, state, opt_state, batch, prev_batch, step):
        previous = None if prev_batch is None else (state, prev_batch)
        out = step_fn(
            p, opt_state, (state, batch), previous, rng=jax.random.fold_in(base_key, step)
        )
        loss, new_state = out.aux
        return out.params, new_state, out.opt_state, loss

    @jax.jit
    def eval_batch(p, state, batch):
        out, _ = _call_model(model, p, state, batch[0], train=False)
        return task.eval_sums(out, batch)

    def evaluate(p, state):
        total_loss, correct = 0.0, 0
        for start in range(0, len(x_test), eval_batch_size):
            loss, hits = eval_batch(
                p,
                state,
                replicated(batch_of(x_test, y_test, slice(start, start + eval_batch_size))),
            )
            total_loss += float(loss)
            correct += int(hits)
        acc = correct / len(x_test) if task.kind == "classification" else None
        return total_loss / len(x_test), acc

    steps_per_epoch = len(x_train) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x_train)} training examples")

    # Compiled before the first timed epoch (the first step of a method that
    # needs the previous batch has none: a second program), and only if an
    # epoch is left to run.
    jitted = jax.jit(train_step)
    compiled: dict[str, Any] = {}

    def compile_steps() -> float:
        example = rows(batch_of(x_train, y_train, slice(0, batch_size)))
        t0 = time.perf_counter()
        step0 = jnp.asarray(0, jnp.int32)
        compiled["first"] = jitted.lower(
            params, model_state, opt_state, example, None, step0
        ).compile()
        if needs_previous_batch:
            compiled["next"] = jitted.lower(
                params, model_state, opt_state, example, example, step0
            ).compile()
        return time.perf_counter() - t0

    result = RunResult(
        optimizer,
        spec.label,
        used,
        seed,
        0.0,
        [],
        task=task.kind,
        model=model_name,
        batch_size=batch_size,
        tuned="defaults" if task.kind in spec.tuned and not hparams else "no",
    )
    config = {
        "optimizer": optimizer,
        "hparams": used,
        "seed": seed,
        "batch_size": batch_size,
        "task": dataclasses.asdict(task),
        "model": model_name or type(model).__name__,
        "n_train": len(x_train),
        "n_test": len(x_test),
    }
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    start_epoch, global_step, wall, prev_idx = 1, 0, 0.0, None
    if ckpt_path is not None and resume and ckpt_path.exists():
        (params, model_state, opt_state), meta, extra_arrays = load_checkpoint(
            ckpt_path, (params, model_state, opt_state)
        )
        if meta.get("fingerprint") != fingerprint(config):
            raise CheckpointMismatch(
                f"{ckpt_path}: written by a different configuration ({meta.get('config')}); "
                "delete it or choose another output folder"
            )
        params, model_state, opt_state = replicated((params, model_state, opt_state))
        result.epochs = [EpochMetrics(**e) for e in meta["history"]]
        start_epoch, global_step, wall = meta["epoch"] + 1, meta["step"], meta["wall"]
        prev_idx = extra_arrays.get("prev_idx")
        result.resumed_from_epoch = meta["epoch"]
        logger.info("%s: resumed from %s at epoch %d", optimizer, ckpt_path, meta["epoch"])

    for epoch in range(start_epoch, epochs + 1):
        if not compiled:
            result.compile_time = compile_steps()
        compiled_first, compiled_next = compiled["first"], compiled.get("next")
        losses = []
        bar = tqdm(
            _batches(len(x_train), batch_size, seed, epoch),
            total=steps_per_epoch,
            desc=f"{spec.label} epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
        )
        t_start = time.perf_counter()
        for i, idx in enumerate(bar):
            batch = rows(batch_of(x_train, y_train, idx))
            step = jnp.asarray(global_step, jnp.int32)
            if prev_idx is None:
                params, model_state, opt_state, loss = compiled_first(
                    params, model_state, opt_state, batch, None, step
                )
            else:
                prev = rows(batch_of(x_train, y_train, prev_idx))
                params, model_state, opt_state, loss = compiled_next(
                    params, model_state, opt_state, batch, prev, step
                )
            if needs_previous_batch:
                prev_idx = idx
            global_step += 1
            losses.append(loss)
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        jax.block_until_ready(params)
        epoch_time = time.perf_counter() - t_start
        wall += epoch_time
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss, test_acc = evaluate(params, model_state)
        result.epochs.append(
            EpochMetrics(
                epoch,
                train_loss,
                test_loss,
                test_acc,
                wall,
                epoch_time / max(1, len(losses)),
                global_step,
            )
        )
        diverged = not math.isfinite(train_loss)
        if ckpt_path is not None and not diverged:
            meta = {
                "config": config,
                "fingerprint": fingerprint(config),
                "epoch": epoch,
                "step": global_step,
                "wall": wall,
                "history": [dataclasses.asdict(e) for e in result.epochs],
            }
            extras = {"prev_idx": prev_idx} if prev_idx is not None else {}
            save_checkpoint(ckpt_path, (params, model_state, opt_state), meta, extras)
        if on_epoch_end is not None:
            on_epoch_end(result)
        if diverged and stop_on_divergence:
            result.diverged = True
            break
    result.params, result.model_state = params, model_state
    return result
