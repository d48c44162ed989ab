r"""KPSVD family on the Fashion-MNIST autoencoder: training loss against steps and wall time, and
per-step cost over KFAC's.

Contenders (all ``sofim_optax`` unless noted, same initial parameters, same minibatch order
from :func:`experiments.benchmarks.kfac_jax_runner.batch_indices`):

* ``kfac`` — :func:`sofim_optax.kfac` (``inverse="eigh"``), the baseline of the cost ratios;
* ``kpsvd`` — :func:`sofim_optax.kpsvd` (rank 1, power SVD);
* ``deflation`` — :func:`sofim_optax.kpsvd_deflation` (rank 2, deflated power SVD);
* ``kfac_corrected`` — :func:`sofim_optax.kfac_corrected` (``A⊗G`` + best Kronecker correction);
* ``lanczos`` — :func:`sofim_optax.kpsvd_lanczos` (rank 2, restarted Golub–Kahan–Lanczos);
* ``adam`` — ``optax.adam`` (first-order reference).

Problem: the deep autoencoder (``experiments.models.Autoencoder``, encoder widths
``--encoder``, default 1000-500-250-30) with the sigmoid cross-entropy summed over pixels
(registered, so the sampled Fisher can be used; ``--fisher``, default ``sampled`` as the paper's
Fisher sub-batches) plus ``½·1e-5·Σ‖W‖²``, batch ``--batch-size`` (default 1000), built by
:func:`experiments.benchmarks.problems.autoencoder_problem`. Every second-order method uses momentum
0.9, EMA 0.95, ``--stats-period`` (default 1) and ``--inverse-period`` (default 20), the same for
all, and the library's defaults otherwise (``tol=1e-5``, ``max_iters=100``, ``indefinite="abs"``,
Lanczos ``krylov_dim=4``).

**Tuning** (written here, the same rule for everyone): every point of the method's grid in
:data:`GRIDS` (:data:`QUICK_GRIDS` with ``--quick``) is trained for ``--tune-steps`` steps from
the same initial parameters on the same minibatches; the selected point is the one with the
lowest mean minibatch loss over the last ``--select-last`` steps (a diverged or non-finite run
scores ``inf``; ties go to the first point in grid order). The learning-rate/damping grid is
shared by the five Kronecker methods. Then every method trains ``--steps`` steps at its point.

**Per-step cost**: the whole jitted train step (capture with
``curvature.linen.value_grad_and_stats`` + update + apply; ``value_and_grad`` for Adam) of
every contender, warmed up past its first inverse refresh, timed in ``--rounds`` interleaved
rounds of ``--block-steps`` steps each (a multiple of ``--inverse-period``, so refreshes are
included in proportion) on one fixed batch, KFAC first in every round; reported: the median
seconds per step and its ratio to KFAC's median from the same rounds (the paper reports
1.0–1.9× per epoch on GPU, with both periods at 100). The wall-time axis of every curve is
``steps × (median interleaved step time)``; the raw sequential times are in the JSON too.

Outputs under ``--out``: ``results.json``, ``table.md`` (also printed) and ``curves.png``.

Example (a few minutes; the figures of docs/benchmarks.md use the defaults)::

    python -m experiments.benchmarks.kpsvd --quick --out runs/benchmark_kpsvd_quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import sofim_optax
from experiments import datasets, harness, reporting, timing
from experiments.benchmarks.curves import fmt, jsonable, loss_at_time, mean_last, smoothed
from experiments.benchmarks.kfac_cost import training_step_timer
from experiments.benchmarks.problems import (
    EMA,
    MOMENTUM,
    Problem,
    autoencoder_problem,
    full_loss,
    injected,
    jitted_step,
    layer_widths,
    set_hparams,
    train_run,
)
from experiments.registry import OPTIMIZERS, grid_points

__all__ = [
    "METHODS",
    "GRIDS",
    "QUICK_GRIDS",
    "make_tx",
    "train_step_for",
    "step_times",
    "tune_and_train",
    "main",
]

METHODS = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "adam")
LABELS = {
    "kfac": "KFAC",
    "kpsvd": "KPSVD",
    "deflation": "Deflation",
    "kfac_corrected": "KFAC-corrected",
    "lanczos": "Lanczos",
    "adam": "Adam",
}
COLORS = {
    "kfac": "tab:red",
    "kpsvd": "tab:green",
    "deflation": "tab:purple",
    "kfac_corrected": "tab:blue",
    "lanczos": "black",
    "adam": "tab:orange",
}
_SECOND_ORDER = {"learning_rate": [0.1, 0.3], "damping": [10.0, 100.0]}
#: Tuning grids. The damping lives on the scale of the Fisher of a loss summed over 784 pixels
#: (see experiments.benchmarks.kfac.GRIDS), hence 10–100.
GRIDS: dict[str, dict[str, list[float]]] = {
    **{m: _SECOND_ORDER for m in METHODS if m != "adam"},
    "adam": {"learning_rate": [3e-4, 1e-3, 3e-3]},
}
QUICK_GRIDS: dict[str, dict[str, list[float]]] = {
    **{m: {"learning_rate": [0.1, 0.3], "damping": [100.0]} for m in METHODS if m != "adam"},
    "adam": {"learning_rate": [1e-3, 3e-3]},
}
#: The registry entry of each method (its train step needs what the entry declares).
REGISTRY_NAMES = {
    "kfac": "kfac",
    "kpsvd": "kpsvd",
    "deflation": "kpsvd_deflation",
    "kfac_corrected": "kfac_corrected",
    "lanczos": "kpsvd_lanczos",
    "adam": "adam",
}
_ALIASES = {
    "kfac": sofim_optax.kfac,
    "kpsvd": sofim_optax.kpsvd,
    "deflation": sofim_optax.kpsvd_deflation,
    "kfac_corrected": sofim_optax.kfac_corrected,
    "lanczos": sofim_optax.kpsvd_lanczos,
}


def make_tx(
    method: str, stats_period: int = 1, inverse_period: int = 20
) -> optax.GradientTransformation:
    """The method's alias with ``learning_rate`` (and ``damping``) injected: one compiled step
    serves every grid point (:func:`experiments.benchmarks.problems.set_hparams`)."""
    if method == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    hyperparameters = dict(learning_rate=0.1, momentum=MOMENTUM, damping=100.0, ema=EMA)
    if method == "kfac":
        hyperparameters["inverse"] = "eigh"
    return injected(
        _ALIASES[method],
        **hyperparameters,
        stats_period=stats_period,
        inverse_period=inverse_period,
    )


_CACHE: dict[tuple, tuple[optax.GradientTransformation, Callable]] = {}


def train_step_for(
    problem: Problem,
    method: str,
    fisher: str = "sampled",
    stats_period: int = 1,
    inverse_period: int = 20,
    seed: int = 0,
) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, jitted step)``, cached so that timing, tuning and training share one compilation."""
    key = (id(problem), method, fisher, stats_period, inverse_period, seed)
    if key not in _CACHE:
        tx = make_tx(method, stats_period, inverse_period)
        needs = OPTIMIZERS[REGISTRY_NAMES[method]].needs
        _CACHE[key] = (tx, jitted_step(problem, tx, needs=needs, fisher=fisher, seed=seed))
    return _CACHE[key]


def step_times(
    problem: Problem,
    methods: Sequence[str],
    rounds: int,
    block_steps: int,
    fisher: str,
    stats_period: int,
    inverse_period: int,
    hparams: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """Median seconds per step of every method in interleaved rounds (KFAC first), and ratios to KFAC's."""
    if block_steps % inverse_period:
        raise ValueError(
            f"block_steps={block_steps} must be a multiple of inverse_period={inverse_period}"
        )
    names = ["kfac"] + [m for m in methods if m != "kfac"]
    runners: dict[str, Callable[[], float]] = {}
    for m in names:
        tx, step = train_step_for(problem, m, fisher, stats_period, inverse_period)
        timer = training_step_timer(
            problem, tx, step, warmup_steps=inverse_period + 1, **hparams[m]
        )
        runners[m] = lambda t=timer: t.seconds_per_step(block_steps)
    return {
        **timing.compare(runners, rounds=rounds, baseline="kfac"),
        "block_steps": block_steps,
    }


def tune_and_train(
    problem: Problem,
    x_train: np.ndarray,
    args: argparse.Namespace,
    grids: Mapping[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    k = args.select_last
    out: dict[str, Any] = {"tuning": {}, "runs": {}}
    for m in args.methods:
        tx, step = train_step_for(
            problem, m, args.fisher, args.stats_period, args.inverse_period, args.seed
        )
        state0 = tx.init(problem.params)
        scores = []
        points = grid_points(grids[m])
        for hp in points:
            r = train_run(
                step,
                problem.params,
                set_hparams(state0, **hp),
                x_train,
                args.tune_steps,
                args.batch_size,
                args.seed,
            )
            scores.append(mean_last(r["losses"], k))
            say(f"  tune {m} {hp}: mean of last {k} = {scores[-1]:.3f}")
        best = int(np.argmin(scores))
        out["tuning"][m] = {
            "grid": [{"hparams": p, "score": s} for p, s in zip(points, scores)],
            "best": points[best],
        }
        r = train_run(
            step,
            problem.params,
            set_hparams(state0, **points[best]),
            x_train,
            args.steps,
            args.batch_size,
            args.seed,
        )
        r["final_loss_eval"] = full_loss(problem, r.pop("params"), x_train[: args.eval_examples])
        r["hparams"] = points[best]
        out["runs"][m] = r
        say(
            f"-> {m} {points[best]}: last-{k} mean {mean_last(r['losses'], k):.3f}, "
            f"{1e3 * r['mean_step_time']:.0f} ms/step (sequential)"
        )
    return out


def report(res: Mapping[str, Any], args: argparse.Namespace) -> str:
    k, steps = args.select_last, args.steps
    timing = res["step_time"]
    runs = res["train"]["runs"]
    t_eq = (
        min(timing["times"][m] * steps for m in runs if m != "adam")
        if any(m != "adam" for m in runs)
        else None
    )
    lines = [
        f"Autoencoder {'-'.join(map(str, [784, *args.encoder]))}-…-784 on Fashion-MNIST "
        f"({res['n_train']} training images), batch {args.batch_size}, {args.fisher} Fisher, "
        f"stats_period {args.stats_period}, inverse_period {args.inverse_period}; "
        f"{steps} steps after tuning {args.tune_steps} steps per grid point. "
        f"Step times: median of {timing['rounds']} interleaved rounds of "
        f"{timing['block_steps']} steps, KFAC first in each round, on a shared (loaded) CPU.\n",
        f"| method | hyperparameters (selected) | ms per step (interleaved median) | × KFAC | "
        f"loss after {steps} steps (mean of last {k}) | "
        f"loss on {min(args.eval_examples, res['n_train'])} train images, end | "
        f"loss at {fmt(t_eq, 1)} s (KFAC-family's earliest end) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        if m not in runs:
            continue
        r = runs[m]
        st = timing["times"][m]
        hp = ", ".join(f"{a}={b:g}" for a, b in r["hparams"].items())
        at_t = loss_at_time(r["losses"], st, t_eq, k) if t_eq else math.nan
        lines.append(
            f"| {LABELS[m]} | {hp} | {1e3 * st:.0f} | {timing['ratios'][m]:.2f} | "
            f"{fmt(mean_last(r['losses'], k), 3)} | {fmt(r['final_loss_eval'], 3)} | {fmt(at_t, 3)} |"
        )
    lines += [
        "",
        f"Tuning (score = mean minibatch loss over the last {k} of {args.tune_steps} steps; lowest wins):",
        "",
        "| method | point | score |",
        "|---|---|---:|",
    ]
    for m, t in res["train"]["tuning"].items():
        for g in t["grid"]:
            mark = " **(selected)**" if g["hparams"] == t["best"] else ""
            lines.append(
                f"| {LABELS[m]} | {', '.join(f'{a}={b:g}' for a, b in g['hparams'].items())}{mark} "
                f"| {fmt(g['score'], 3)} |"
            )
    return "\n".join(lines)


def plot(res: Mapping[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = args.select_last
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, r in res["train"]["runs"].items():
        sm = smoothed(r["losses"], k)
        steps = np.arange(1, len(sm) + 1)
        style = "--" if m == "adam" else "-"
        axes[0].plot(steps, sm, style, color=COLORS[m], label=LABELS[m])
        axes[1].plot(
            steps * res["step_time"]["times"][m], sm, style, color=COLORS[m], label=LABELS[m]
        )
    for ax, xl in zip(axes, ("step", "wall time (s) = steps × interleaved median step time")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"training loss (mean of last {k} minibatches)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Autoencoder {args.encoder} on Fashion-MNIST, batch {args.batch_size} (CPU, shared/loaded)",
        fontsize=10,
    )
    reporting.save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--out", default="runs/benchmark_kpsvd")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--encoder",
        type=layer_widths,
        default=(1000, 500, 250, 30),
        help="encoder widths, e.g. 256,64,16",
    )
    p.add_argument(
        "--train-examples", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument(
        "--eval-examples", type=int, default=10000, help="images for the end-of-run loss"
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ",".join(METHODS),
    )
    p.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled")
    p.add_argument("--steps", type=int, default=300, help="training steps of the final runs")
    p.add_argument("--tune-steps", type=int, default=50)
    p.add_argument("--select-last", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument(
        "--block-steps",
        type=int,
        default=20,
        help="steps per timed block (multiple of --inverse-period)",
    )
    p.add_argument("--stats-period", type=int, default=1)
    p.add_argument("--inverse-period", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="smaller grids (QUICK_GRIDS)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}")
    if "kfac" not in args.methods:
        args.methods.insert(0, "kfac")  # the baseline of the ratios
    if args.block_steps % args.inverse_period:
        p.error("--block-steps must be a multiple of --inverse-period")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(text: str) -> None:
        print(text, flush=True)

    ds = datasets.to_float_arrays(
        datasets.load_fashion_mnist(args.data_dir, download=False), flatten=True
    )
    x_train = ds.x_train[: args.train_examples] if args.train_examples else ds.x_train
    problem = autoencoder_problem(args.batch_size, encoder=args.encoder, x=x_train, seed=args.seed)
    grids = QUICK_GRIDS if args.quick else GRIDS
    res: dict[str, Any] = {
        "args": vars(args) | {"encoder": list(args.encoder)},
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "sofim_optax": sofim_optax.__version__,
        },
        "device": (
            f"{jax.default_backend()}, {os.cpu_count()} CPUs "
            "(shared with other jobs: timings under load)"
        ),
        "grids": grids,
        "n_train": len(x_train),
    }
    say(f"## Tuning and training ({res['device']})")
    res["train"] = tune_and_train(problem, x_train, args, grids, say)
    say("## Per-step time (interleaved rounds)")
    hps = {m: res["train"]["tuning"][m]["best"] for m in args.methods}
    res["step_time"] = step_times(
        problem,
        args.methods,
        args.rounds,
        args.block_steps,
        args.fisher,
        args.stats_period,
        args.inverse_period,
        hps,
    )
    (out / "results.json").write_text(
        json.dumps(jsonable(res), indent=1)
    )  # before reporting, in case it fails
    table = report(res, args)
    say(table)
    res["total_time_s"] = time.perf_counter() - t0
    cmd = (
        "python -m experiments.benchmarks.kpsvd "
        + " ".join(
            f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in vars(args).items()
            if k not in ("out", "data_dir", "quick") and v is not None
        )
        + (" --quick" if args.quick else "")
    )
    (out / "table.md").write_text(f"# KPSVD family benchmark\n\n`{cmd}`\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(jsonable(res), indent=1))
    plot(res, args, out / "curves.png")
    say(f"wrote {out}/results.json, table.md, curves.png in {res['total_time_s'] / 60:.1f} min")
    return res


if __name__ == "__main__":
    main()
