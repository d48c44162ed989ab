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

    python -m experiments.benchmark_step_time --models mlp,cnn --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import models, tasks

CONTENDERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgdm": lambda: optax.sgd(0.05, momentum=0.9),
    "sofim (global)": lambda: sofim_optax.sofim(0.5, rho=0.5),
    "sofim (per_tensor)": lambda: sofim_optax.sofim(0.5, rho=0.5, scope="per_tensor"),
    "sofim (mini_block 1024)": lambda: sofim_optax.sofim(0.5, rho=0.5, scope="mini_block", block_size=1024),
    "adam": lambda: optax.adam(1e-3),
}


def _time_steps(step: Callable, carry: tuple, steps: int) -> tuple[float, tuple]:
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(steps):
        carry = step(*carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / steps, carry


def benchmark_model(model_name: str, batch_size: int, rounds: int, steps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((batch_size, 28, 28, 1), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    model = models.make_model(model_name)
    params = model.init(jax.random.PRNGKey(seed), x[:1])
    grads = jax.grad(lambda p: tasks.cross_entropy_loss(model.apply(p, x), y))(params)

    train_steps, update_steps, carries_train, carries_update = {}, {}, {}, {}
    for name, make in CONTENDERS.items():
        tx = make()

        def train_step(p, s, tx=tx):
            loss, g = jax.value_and_grad(lambda q: tasks.cross_entropy_loss(model.apply(q, x), y))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        def update_step(p, s, tx=tx):
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        train_steps[name] = jax.jit(train_step, donate_argnums=())
        update_steps[name] = jax.jit(update_step)
        carries_train[name] = (params, tx.init(params))
        carries_update[name] = (params, tx.init(params))
        # Compile and warm up.
        _, carries_train[name] = _time_steps(train_steps[name], carries_train[name], 3)
        _, carries_update[name] = _time_steps(update_steps[name], carries_update[name], 3)

    times = {name: {"train step": [], "update only": []} for name in CONTENDERS}
    for _ in range(rounds):
        for name in CONTENDERS:
            t, carries_train[name] = _time_steps(train_steps[name], carries_train[name], steps)
            times[name]["train step"].append(t)
            t, carries_update[name] = _time_steps(update_steps[name], carries_update[name], steps * 4)
            times[name]["update only"].append(t)
    return {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (update-only blocks use 4x)")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {args.batch_size}; "
          f"median of {args.rounds} interleaved rounds")
    print("| model | optimizer | train step (ms) | ratio to SGD-m | update only (ms) | ratio to SGD-m |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        res = benchmark_model(model_name, args.batch_size, args.rounds, args.steps)
        base = res["sgdm"]
        for name, r in res.items():
            print(f"| {model_name} | {name} | {1e3 * r['train step']:.3f} | {r['train step'] / base['train step']:.3f} | "
                  f"{1e3 * r['update only']:.4f} | {r['update only'] / base['update only']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
