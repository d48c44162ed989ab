"""Per-step time of optimizers against SGD with momentum, measured in one run.

The machines this runs on are noisy, so the script never reports an absolute
time alone: it alternates rounds of each optimizer (SGD-momentum first in every
round), takes the median time per step of each, and prints the ratio to
SGD-momentum's median from the same run. Two things are timed:

* ``train step``: forward, backward, optimizer update and parameter update, one
  jitted function, as a user's train step would be;
* ``update only``: ``tx.update`` plus ``optax.apply_updates`` on the model's
  parameter pytree with a fixed gradient, which isolates the optimizer's cost.

Usage::

    python -m experiments.benchmarks.step_time --models mlp,cnn --rounds 15
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import harness, models, tasks, timing
from experiments.registry import OPTIMIZERS
from experiments.step import make_train_step

#: name: (its registry entry, the optimizer).
CONTENDERS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "sgdm": ("sgdm", lambda: optax.sgd(0.05, momentum=0.9)),
    "sofim (global)": ("sofim", lambda: sofim_optax.sofim(0.5, damping=0.5)),
    "sofim (per_tensor)": (
        "sofim",
        lambda: sofim_optax.sofim(0.5, damping=0.5, scope="per_tensor"),
    ),
    "sofim (mini_block 1024)": (
        "sofim",
        lambda: sofim_optax.sofim(0.5, damping=0.5, scope="mini_block", block_size=1024),
    ),
    "adam": ("adam", lambda: optax.adam(1e-3)),
}


def benchmark_model(
    model_name: str, batch_size: int, rounds: int, steps: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Median seconds per step of every contender's train step and update alone, interleaved."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((batch_size, 28, 28, 1), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    model = models.make_model(model_name)
    params = model.init(jax.random.PRNGKey(seed), x[:1])

    def loss_fn(p):
        return tasks.cross_entropy_loss(model.apply(p, x), y)

    grads = jax.grad(loss_fn)(params)

    timers: dict[tuple[str, str], timing.StepTimer] = {}
    for name, (entry, make) in CONTENDERS.items():
        tx = make()
        train_step = make_train_step(loss_fn, tx, needs=OPTIMIZERS[entry].needs)

        def train(p, s, train_step=train_step):
            out = train_step(p, s, ())
            return out.params, out.opt_state

        def update_only(p, s, tx=tx):
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        # Compiled and warmed up (3 steps) when made.
        timers[name, "train step"] = timing.StepTimer(
            jax.jit(train), (params, tx.init(params)), warmup_steps=3
        )
        timers[name, "update only"] = timing.StepTimer(
            jax.jit(update_only), (params, tx.init(params)), warmup_steps=3
        )

    blocks = {"train step": steps, "update only": steps * 4}
    samples = timing.interleaved_rounds(
        {key: lambda t=t, n=blocks[key[1]]: t.seconds_per_step(n) for key, t in timers.items()},
        rounds=rounds,
    )
    times = timing.medians(samples)
    return {name: {kind: times[name, kind] for kind in blocks} for name in CONTENDERS}


def main(argv: list[str] | None = None) -> None:
    parser = harness.script_parser(__doc__)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--steps", type=int, default=20, help="steps per timed block (update-only blocks use 4x)"
    )
    args = parser.parse_args(argv)

    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"batch {args.batch_size}; median of {args.rounds} interleaved rounds"
    )
    print(
        "| model | optimizer | train step (ms) | ratio to SGD-m | update only (ms) | ratio to SGD-m |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        res = benchmark_model(model_name, args.batch_size, args.rounds, args.steps)
        base = res["sgdm"]
        for name, r in res.items():
            print(
                f"| {model_name} | {name} | {1e3 * r['train step']:.3f} "
                f"| {r['train step'] / base['train step']:.3f} "
                f"| {1e3 * r['update only']:.4f} | {r['update only'] / base['update only']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
