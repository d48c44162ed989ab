"""Every method against its FLOP floor: ms per step, × SGD-m, the cost model's floor, measured / floor.

For each model and method (library defaults, and the same with amortised periods) the script

1. compiles the whole jitted train step (gradient, statistics, optimizer, parameter update;
   K-BFGS's previous-batch pass included) and compares XLA's ``cost_analysis()`` with the
   cost model's view of the compiled step (:mod:`experiments.benchmarks.cost_model`);
2. times it in interleaved rounds, SGD-momentum first in every round, each block a multiple
   of the method's refresh period so that refreshes are in proportion;
3. prints the table: ms per step, × SGD-m, the floor (the model's amortised MACs over
   SGD-m's, i.e. the time the step would take at SGD-m's rate of multiply-adds),
   measured / floor, and the memory floor: the same with the preconditioning taking the
   longer of its MACs and the time to read the curvature state it uses on every step at the
   machine's streaming rate (:func:`~experiments.benchmarks.cost_model.memory_floor`; the
   rate is a jitted sum over a 256 MB array, timed in the same interleaved rounds).

A ratio near 1 means the step runs its algorithm's arithmetic as fast as SGD-m runs its
own; above 1, time goes to something the arithmetic does not explain (small or memory-bound
kernels, LAPACK calls, loops). Usage::

    taskset -c 1 python -m experiments.benchmarks.floor --models autoencoder,cnn,mlp
    # and any other settings, as extra rows:
    taskset -c 1 python -m experiments.benchmarks.floor --models cnn --methods sgdm,mbf \
        --variant mbf:stats_period=50,dense_block_size=32
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import harness, models, timing
from experiments.benchmarks import cost_model
from experiments.benchmarks.problems import Problem, autoencoder_problem, cnn_problem
from experiments.registry import OPTIMIZERS
from experiments.step import make_train_step
from sofim_optax.curvature import losses

#: The methods timed, in table order (registry names; cost_model.METHODS has their costs).
METHODS = (
    "sgdm",
    "adam",
    "sofim",
    "kfac",
    "kpsvd",
    "kpsvd_deflation",
    "kfac_corrected",
    "kpsvd_lanczos",
    "mbf",
    "kbfgs",
    "kbfgs_l",
    "adahessian",
    "kfac_adaptive",
)

#: The streaming-rate probe: a jitted sum over this many float32 (256 MB), timed with the rest.
STREAM_FLOATS = 1 << 26
STREAM = "streaming read"

#: Methods with refresh periods, and the amortised periods timed besides their defaults.
AMORTISED = {"stats_period": 10, "inverse_period": 100}
PERIODIC = {"kfac", "kpsvd", "kpsvd_deflation", "kfac_corrected", "kpsvd_lanczos", "mbf"}
PERIODIC |= {f"{name}_adaptive" for name in PERIODIC}
#: The Fisher each method's statistics use here (the registry's loop default; every adaptive
#: entry of a layer-wise method samples it).
SAMPLED = {"kfac", "kpsvd", "kpsvd_deflation", "kfac_corrected", "kpsvd_lanczos"}
SAMPLED |= {f"{name}_adaptive" for name in (*SAMPLED, "mbf", "kbfgs", "kbfgs_l")}


def mlp_problem(batch_size: int = 128, seed: int = 0) -> Problem:
    """The classification MLP of the main job on random 28×28 images."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    return Problem(
        "mlp",
        models.make_model("mlp"),
        lambda logits, x, y: losses.softmax_cross_entropy(logits, y),
        (x, y),
    )


PROBLEMS = {"autoencoder": autoencoder_problem, "cnn": cnn_problem, "mlp": mlp_problem}


def make_tx(name: str, hparams: dict[str, Any]) -> optax.GradientTransformation:
    """The method with its library defaults, a learning rate small enough never to diverge
    on the fixed batch, and ``hparams``."""
    if name == "sgdm":
        return optax.sgd(1e-4, momentum=0.9)
    if name == "adam":
        return optax.adam(1e-5)
    if name.endswith("_adaptive"):  # no learning rate: the quadratic model picks it
        return getattr(sofim_optax, name)(**hparams)
    alias = cost_model.METHODS[name][0]
    return alias(learning_rate=1e-5, **hparams)


def jitted_step(problem: Problem, name: str, tx: optax.GradientTransformation):
    """``step(params, state, index) -> (params, state, index + 1)`` on the problem's batch,
    with the previous-batch pass (the same batch, passed again) for K-BFGS."""
    needs = OPTIMIZERS[name].needs
    fisher = "sampled" if name in SAMPLED else "empirical"
    train_step = make_train_step(problem.loss_fn, tx, needs=needs, fisher=fisher)
    key = jax.random.PRNGKey(12345)

    def step(params, state, index, batch, previous):
        out = train_step(params, state, batch, previous, rng=jax.random.fold_in(key, index))
        return out.params, out.opt_state, index + 1

    compiled = jax.jit(step, donate_argnums=(0, 1))
    previous = tuple(jnp.array(b, copy=True) for b in problem.batch)
    return compiled, fisher, previous


def xla_macs(compiled, *args) -> float:
    analysis = compiled.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax
        analysis = analysis[0]
    return float(analysis["flops"]) / 2


def state_field(state: Any, name: str) -> Any:
    """The first attribute ``name`` met in a nested optimizer state (named tuples, tuples
    and dicts, depth first), or ``None``."""
    if hasattr(state, name):
        return getattr(state, name)
    children = state.values() if isinstance(state, dict) else state
    for child in children if isinstance(state, (dict, tuple)) else ():
        found = state_field(child, name)
        if found is not None:
            return found
    return None


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"mbf:stats_period=50,dense_block_size=32"`` → ``("mbf", label, hparams)``."""
    name, _, settings = text.partition(":")
    items = [f"{name}.{item}" for item in settings.split(",") if item]
    hparams = harness.parse_overrides(items).get(name, {})
    return name, " ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults", hparams


def run_model(
    problem: Problem,
    methods: Sequence[str],
    rounds: int,
    extra: Sequence[tuple[str, str, dict[str, Any]]] = (),
) -> list[dict[str, Any]]:
    layers = cost_model.captured_layers(problem.loss_fn, problem.params, *problem.batch)
    variants = []
    for name in methods:
        variants.append((name, "defaults", {}))
        if name in PERIODIC:
            variants.append((name, "amortised", dict(AMORTISED)))
        variants += [v for v in extra if v[0] == name]
    rows, runners = [], {}
    for name, label, hparams in variants:
        tx = make_tx(name, hparams)
        step, fisher, previous = jitted_step(problem, name, tx)
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), problem.params)
        state = tx.init(params)
        args = (params, state, jnp.int32(0), problem.batch, previous)
        xla = xla_macs(step, *args)
        period = hparams.get("inverse_period") or _default(name, "inverse_period") or 1
        block = int(max(period, 10))
        timer = timing.StepTimer(
            lambda p, s, i, step=step, prev=previous: step(p, s, i, problem.batch, prev),
            (params, state, jnp.int32(0)),
            warmup_steps=2,
        )
        key = f"{name} ({label})"
        print(f"  compiled {problem.name} {key}", file=sys.stderr, flush=True)
        runners[key] = lambda t=timer, n=block: t.seconds_per_step(n)
        rows.append(
            dict(
                key=key,
                name=name,
                label=label,
                hparams=hparams,
                fisher=fisher,
                xla=xla,
                timer=timer,
                state_floats=cost_model.tree_floats(state),
            )
        )
    stream = jnp.ones((STREAM_FLOATS,), jnp.float32)
    read = timing.call_timer(jax.jit(jnp.sum), (stream,))
    runners[STREAM] = lambda: read.seconds_per_step(10)
    result = timing.compare(runners, rounds=rounds, baseline="sgdm (defaults)")
    bytes_per_second = 4.0 * STREAM_FLOATS / result["times"][STREAM]
    sgdm_seconds = result["times"]["sgdm (defaults)"]
    base_macs = cost_model.step_cost("sgdm", layers).total
    out = []
    for row in rows:
        iterations = state_field(row["timer"].carry[1], "solver_iterations")
        iterations = None if iterations is None else np.asarray(iterations)
        measured = {"solver_iterations": iterations}
        cost = cost_model.step_cost(
            row["name"], layers, fisher=row["fisher"], hparams=row["hparams"], measured=measured
        )
        ratio = result["ratios"][row["key"]]
        floor = cost.total / base_macs
        memory_floor = (
            cost_model.memory_floor(cost, base_macs / sgdm_seconds, bytes_per_second) / sgdm_seconds
        )
        out.append(
            dict(
                model=problem.name,
                method=row["name"],
                periods=row["label"],
                ms=1e3 * result["times"][row["key"]],
                x_sgdm=ratio,
                floor=floor,
                measured_over_floor=ratio / floor,
                memory_floor=memory_floor,
                measured_over_memory_floor=ratio / memory_floor,
                streaming_gb_per_s=bytes_per_second / 1e9,
                xla_over_model=row["xla"] / cost.xla_view,
                components={k: v / 1e9 for k, v in cost.amortised.items()},
                state_mb_measured=4 * row["state_floats"] / 2**20,
                state_mb_model=4 * cost.state_floats / 2**20,
                solver_iterations=None
                if iterations is None
                else float(np.mean(iterations[iterations > 0]))
                if np.any(iterations > 0)
                else 0.0,
            )
        )
    return out


def _default(name: str, argument: str) -> Any:
    alias = (
        getattr(sofim_optax, name) if name.endswith("_adaptive") else cost_model.METHODS[name][0]
    )
    return cost_model._defaults(alias, {}).get(argument) if alias is not None else None


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | method | periods | ms/step | × SGD-m | floor (× SGD-m) | measured / floor "
        "| memory floor | measured / memory floor | XLA / model | solver iters "
        "| state MB (model / actual) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        iters = "" if r["solver_iterations"] is None else f"{r['solver_iterations']:.1f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['periods']} | {r['ms']:.1f} | "
            f"{r['x_sgdm']:.2f} | {r['floor']:.2f} | {r['measured_over_floor']:.2f} | "
            f"{r['memory_floor']:.2f} | {r['measured_over_memory_floor']:.2f} | "
            f"{r['xla_over_model']:.2f} | {iters} | "
            f"{r['state_mb_model']:.0f} / {r['state_mb_measured']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="autoencoder,cnn,mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="METHOD:PARAM=VALUE,...",
        help="also time METHOD with these hyperparameters (repeatable)",
    )
    parser.add_argument("--out", default="runs/floor")
    args = parser.parse_args(argv)
    sofim_optax.configure_cpu_runtime()
    extra = [parse_variant(v) for v in args.variant]
    methods = [m for m in args.methods.split(",") if m]
    methods += [name for name, _, _ in extra if name not in methods]
    if methods[0] != "sgdm":
        methods = ["sgdm"] + [m for m in methods if m != "sgdm"]
    print(f"jax {jax.__version__} on {jax.default_backend()}; median of {args.rounds} rounds")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for model in [m for m in args.models.split(",") if m]:
        rows += run_model(PROBLEMS[model](), methods, args.rounds, extra)
        (out_dir / "floor.json").write_text(json.dumps(rows, indent=1, default=float))
        print(table([r for r in rows if r["model"] == rows[-1]["model"]]), flush=True)
    (out_dir / "floor.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
