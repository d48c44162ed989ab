"""Part 3 of the KFAC benchmark: training on Fashion-MNIST side by side with kfac-jax.

The grids, our contenders' runs and kfac-jax's (through its pinned environment), and the
comparison at equal steps and equal wall time; :mod:`experiments.benchmarks.kfac` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.curves import mean_last
from experiments.benchmarks.kfac_cost import (
    train_step_for,
)
from experiments.benchmarks.kfac_jax_env import (
    run_kfac_jax_train,
    runner_config,
)
from experiments.benchmarks.kfac_report import comparison_markdown
from experiments.benchmarks.problems import (
    MOMENTUM,
    Problem,
    full_loss,
    set_hparams,
    train_run,
)
from experiments.registry import grid_points

# Tuning grids (short horizon; selection = lowest mean minibatch loss over the last K steps).
# The damping λ lives on the scale of the Fisher of a loss summed over 784 pixels, which is
# hundreds of times larger than for a per-example loss of order one (Martens & Grosse start
# the autoencoders at λ = 150).
# ``None`` (our KFAC with the empirical Fisher, by default): no tuning of its own, it reuses the
# point chosen for the sampled Fisher (pass --tune-empirical to give it the same grid).
GRIDS: dict[str, dict[str, list[float]] | None] = {
    "kfac_sampled": {"learning_rate": [0.1, 0.3, 1.0], "damping": [10.0, 100.0, 1000.0]},
    "kfac_empirical": None,
    "kfac_jax_fixed": {"learning_rate": [0.1, 0.3, 1.0], "damping": [10.0, 100.0, 1000.0]},
    "kfac_jax_adaptive": {"damping": [1.0, 10.0, 100.0]},
    "sgdm": {"learning_rate": [3e-4, 1e-3, 3e-3]},
    "adam": {"learning_rate": [3e-4, 1e-3, 3e-3]},
}
QUICK_GRIDS: dict[str, dict[str, list[float]] | None] = {
    "kfac_sampled": {"learning_rate": [0.1, 0.3], "damping": [100.0]},
    "kfac_empirical": None,
    "kfac_jax_fixed": {"learning_rate": [0.1], "damping": [10.0, 100.0]},
    "kfac_jax_adaptive": {"damping": [10.0]},
    "sgdm": {"learning_rate": [1e-3]},
    "adam": {"learning_rate": [1e-3]},
}
KFAC_FAMILY = ("kfac_sampled", "kfac_empirical", "kfac_jax_fixed", "kfac_jax_adaptive")


def _our_runs(
    method: str,
    problem: Problem,
    x_train: np.ndarray,
    points: Sequence[Mapping[str, float]],
    steps: int,
    seed: int,
    inverse: str,
    say: Callable[[str], None],
    eval_x: np.ndarray | None = None,
    k: int = 10,
) -> list[dict[str, Any]]:
    """Runs our contender ``method`` once per hyperparameter point, sharing one compiled step."""
    if method.startswith("kfac"):
        tx, step = train_step_for(problem, inverse, method.split("_")[1])
    else:
        tx, step = train_step_for(problem, method)
    state0 = tx.init(problem.params)
    runs = []
    for hp in points:
        r = train_run(step, problem.params, set_hparams(state0, **hp), x_train, steps, 1000, seed)
        r["hparams"] = dict(hp)
        if eval_x is not None:
            r["final_full_loss"] = full_loss(problem, r["params"], eval_x)
        r.pop("params")
        say(
            f"  {method} {hp}: last-{k} mean {mean_last(r['losses'], k):.2f}, "
            f"{1e3 * r['mean_step_time']:.0f} ms/step"
        )
        runs.append(r)
    return runs


def _kfac_jax_points(
    method: str, points: Sequence[Mapping[str, float]], steps: int
) -> list[dict[str, Any]]:
    mode = method.split("_")[-1]
    runs = []
    for i, hp in enumerate(points):
        run = {"name": f"{method}_{i}", "mode": mode, "steps": steps, "damping": hp["damping"]}
        if mode == "fixed":
            run.update(learning_rate=hp["learning_rate"], momentum=MOMENTUM)
        runs.append(run)
    return runs


def compare_with_kfac_jax(
    args,
    ae: Problem,
    x_train: np.ndarray,
    python: Path | None,
    workdir: Path,
    data_npz: Path,
    grids: Mapping[str, Mapping[str, Sequence[float]]],
    step_res: Mapping[str, Any] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    k = args.select_last
    methods = ["kfac_sampled"] + ([] if args.no_empirical else ["kfac_empirical"])
    if python is not None:
        methods += ["kfac_jax_fixed", "kfac_jax_adaptive"]
    ref_methods = ["sgdm", "adam"]
    eval_x = x_train[:10000]
    res: dict[str, Any] = {
        "methods": {},
        "select_last": k,
        "steps": args.steps,
        "tune_steps": args.tune_steps,
    }

    # Per-step times for the wall-time axis (medians of part 2 when it ran).
    step_time_of: dict[str, float] = {}
    if step_res is not None:
        t = step_res["times"]
        step_time_of["kfac_sampled"] = t.get(f"KFAC ({args.our_inverse}, sampled)")
        step_time_of["kfac_empirical"] = t.get(f"KFAC ({args.our_inverse}, empirical)")
        step_time_of["kfac_jax_fixed"] = t.get("kfac-jax fixed")
        step_time_of["kfac_jax_adaptive"] = t.get("kfac-jax adaptive")
        step_time_of["sgdm"] = t.get("SGD-momentum")
        step_time_of["adam"] = t.get("Adam")

    # ---- tuning
    say(
        f"\n## Tuning ({args.tune_steps} steps per point; "
        f"selection: lowest mean loss over the last {k} steps)"
    )
    tuned: dict[str, dict[str, Any]] = {}
    for method in methods + ref_methods:
        grid = grids[method]
        if grid is None and method == "kfac_empirical" and args.tune_empirical:
            grid = grids["kfac_sampled"]
        if grid is None:
            src = "kfac_sampled"
            tuned[method] = {
                "grid": [],
                "best": tuned[src]["best"],
                "best_score": None,
                "reused_from": src,
                "mean_step_time": tuned[src]["mean_step_time"],
            }
            say(f"  -> {method}: reuses {src}'s {tuned[src]['best']} (not tuned separately)")
            continue
        points = grid_points(grid)
        if method.startswith("kfac_jax"):
            out = run_kfac_jax_train(
                python,
                workdir,
                data_npz,
                runner_config(
                    _kfac_jax_points(method, points, args.tune_steps),
                    batch_size=1000,
                    seed=args.seed,
                    eval=False,
                ),
                f"tune_{method}",
                say,
            )
            runs = [
                {"hparams": hp, "losses": r["losses"], "mean_step_time": r["mean_step_time"]}
                for hp, r in zip(points, out["runs"])
            ]
        else:
            runs = _our_runs(
                method, ae, x_train, points, args.tune_steps, args.seed, args.our_inverse, say, k=k
            )
        scores = [mean_last(r["losses"], k) for r in runs]
        best = int(np.argmin(scores))
        tuned[method] = {
            "grid": [{"hparams": r["hparams"], "score": s} for r, s in zip(runs, scores)],
            "best": runs[best]["hparams"],
            "best_score": scores[best],
            "mean_step_time": float(np.median([r["mean_step_time"] for r in runs])),
        }
        say(f"  -> {method}: {runs[best]['hparams']} (score {scores[best]:.2f})")
    res["tuning"] = tuned

    # ---- final runs
    say(f"\n## Final runs ({args.steps} steps)")
    for method in methods:
        hp = tuned[method]["best"]
        if method.startswith("kfac_jax"):
            out = run_kfac_jax_train(
                python,
                workdir,
                data_npz,
                runner_config(
                    _kfac_jax_points(method, [hp], args.steps), batch_size=1000, seed=args.seed
                ),
                f"final_{method}",
                say,
            )
            r = out["runs"][0]
            r = {
                "hparams": hp,
                "losses": r["losses"],
                "time_log": r["time_log"],
                "mean_step_time": r["mean_step_time"],
                "first_step_time": r["first_step_time"],
                "final_full_loss": r["final_full_loss"],
                "library": out["library"],
                "jax": out["jax"],
            }
        else:
            r = _our_runs(
                method, ae, x_train, [hp], args.steps, args.seed, args.our_inverse, say, eval_x, k=k
            )[0]
        res["methods"][method] = r
    # References get as many steps as fit in the fastest KFAC-family run's time (at most 4×).
    kfac_times = [step_time_of.get(m) or res["methods"][m]["mean_step_time"] for m in methods]
    for method in ref_methods:
        own = step_time_of.get(method) or tuned[method]["mean_step_time"]
        n_ref = int(
            min(4 * args.steps, max(args.steps, math.ceil(args.steps * min(kfac_times) / own) + k))
        )
        r = _our_runs(
            method,
            ae,
            x_train,
            [tuned[method]["best"]],
            n_ref,
            args.seed,
            args.our_inverse,
            say,
            eval_x,
            k=k,
        )[0]
        res["methods"][method] = r

    # Wall-time axes: steps × interleaved median per-step time (this run's own mean when absent).
    for method, r in res["methods"].items():
        t = step_time_of.get(method)
        r["step_time"] = t if t else r["mean_step_time"]
        r["step_time_source"] = (
            "interleaved median (part 2)" if t else "this run's mean (sequential)"
        )

    md = comparison_markdown(res, methods, ref_methods, k, say)
    res["_markdown"] = md
    return res
