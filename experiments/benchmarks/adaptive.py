"""The adaptive step on the deep autoencoder: our adaptive methods against the optimizers a
JAX user would pick instead, at equal steps and at equal wall time.

Commands (CPU; the training part runs one contender per process, pinned to a core, so two
processes use a 2-core machine; the timing part must run alone on a quiet machine)::

    python -m experiments.benchmarks.adaptive train --out runs/adaptive --contenders kfac_adaptive,adam
    python -m experiments.benchmarks.adaptive time  --out runs/adaptive
    python -m experiments.benchmarks.adaptive report --out runs/adaptive

``time`` may also be split over two processes pinned to one core each, each with its own
SGD-momentum baseline (``--contenders`` picks what it times, ``--cost-for`` the methods of
its fixed-against-adaptive table, ``--tag`` names its ``timing_TAG.json``); ``report``
merges the files. A contender ``name:arg=value;arg=value`` is one of ours with changed
defaults (or a peer at a fixed point, not tuned).

or ``... all --out runs/adaptive`` for the three in sequence in one process. ``--quick``
(20 steps, one timing round) is a smoke run.

The problem is Martens & Grosse's deep autoencoder (784-1000-500-250-30 and mirrored, ReLU,
sigmoid cross-entropy summed over the 784 pixels, plus ``½·1e-5·Σ‖W‖²`` over the kernels),
on all 60 000 Fashion-MNIST training images, batch 1000, with the same initial parameters
and the same minibatch order for every contender
(:func:`experiments.benchmarks.kfac_jax_runner.batch_indices`).

Contenders:

* **ours, adaptive, untuned**: every ``<method>_adaptive`` of :data:`OURS` at the library's
  defaults (the registry entries, with ``l2_regularization=1e-5``; the layer-wise methods'
  statistics from the sampled Fisher);
* **kfac-jax 0.0.8 adaptive** (Martens & Grosse's quadratic model and Levenberg-Marquardt
  damping, in its own pinned environment), initial damping tuned over ``{1, 10, 100}``;
* **peers, tuned**: optax Adam, optax's ``contrib.muon``, Shampoo (``precondition-opt``) and
  PSGD-Kron (``psgd-jax``), each over its registry grid (``experiments.registry``) for
  ``--tune-steps`` steps (selection: lowest mean minibatch loss over the last 10 steps).

Reported (``report``): the training loss (mean minibatch loss over the 10 steps ending there)
after 50, 100 and 300 steps, and at equal wall time, where each contender's time axis is its
steps times its median per-step time from the ``time`` part (interleaved rounds of 20 steps,
the contenders in turn, kfac-jax through its server process); the peers train ``--steps``
times ``--peer-step-factor`` steps so that their curves reach as far in time. The ``time``
part also measures the extra cost of the adaptive step: each method fixed (its registry
autoencoder defaults) against adaptive with ``damping_period`` 5 (the default) and 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OURS = (
    "kfac_adaptive",
    "kpsvd_adaptive",
    "kpsvd_deflation_adaptive",
    "kfac_corrected_adaptive",
    "kpsvd_lanczos_adaptive",
    "mbf_adaptive",
    "kbfgs_adaptive",
    "kbfgs_l_adaptive",
    "sofim_adaptive",
)
PEERS = ("adam", "muon", "shampoo", "psgd_kron")
KFAC_JAX = "kfac_jax_adaptive"
KFAC_JAX_DAMPINGS = (1.0, 10.0, 100.0)
REPORT_STEPS = (50, 100, 300)
SELECT_LAST = 10
BATCH = 1000


def _say(text: str) -> None:
    print(text, flush=True)


def _data(data_dir: str | None) -> np.ndarray:
    from experiments import datasets

    ds = datasets.to_float_arrays(
        datasets.load_fashion_mnist(data_dir, download=False), flatten=True
    )
    return ds.x_train


def _problem(x_train: np.ndarray, seed: int):
    from experiments.benchmarks.problems import autoencoder_problem

    return autoencoder_problem(BATCH, x=x_train, seed=seed)


def _step_for(problem, name: str, **overrides: Any) -> tuple[Any, Callable]:
    """``(tx, jitted step)`` of registry optimizer ``name`` at its autoencoder defaults."""
    from experiments.benchmarks.problems import L2_REG, jitted_step
    from experiments.registry import OPTIMIZERS, make_optimizer

    spec = OPTIMIZERS[name]
    if spec.l2_argument:
        overrides.setdefault(spec.l2_argument, L2_REG)
    _, tx, used = make_optimizer(name, "autoencoder", **overrides)
    step = jitted_step(problem, tx, needs=spec.needs, fisher=used.get("fisher", "empirical"))
    return tx, step


def _variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"kfac_adaptive:inverse=cholesky"`` -> ``("kfac_adaptive", {"inverse": "cholesky"})``:
    one of :data:`OURS` with changed defaults (numbers are parsed as JSON)."""
    base, _, rest = name.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return base, overrides


def _mean_last(losses: Sequence[float], end: int, k: int = SELECT_LAST) -> float:
    window = [v for v in losses[max(0, end - k) : end]]
    return float(np.mean(window)) if window and np.all(np.isfinite(window)) else float("nan")


def _train_ours(problem, x_train, name, steps, seed, **overrides) -> dict[str, Any]:
    from experiments.benchmarks.problems import train_run

    tx, step = _step_for(problem, name, **overrides)
    r = train_run(step, problem.params, tx.init(problem.params), x_train, steps, BATCH, seed)
    r.pop("params")
    return r


def _train(args: argparse.Namespace) -> None:
    from experiments.registry import grid_points

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train = _data(args.data_dir)
    problem = _problem(x_train, args.seed)
    names = args.contenders.split(",") if args.contenders else [*OURS, KFAC_JAX, *PEERS]
    for name in names:
        path = out / f"train_{name}.json"
        if path.exists() and not args.overwrite:
            _say(f"{name}: {path} exists, skipped")
            continue
        t0 = time.perf_counter()
        if name == KFAC_JAX:
            result = _train_kfac_jax(args, x_train, problem)
        elif name in PEERS:
            from experiments.registry import OPTIMIZERS

            grid = grid_points(OPTIMIZERS[name].grid)
            tuning = []
            for point in grid:
                r = _train_ours(problem, x_train, name, args.tune_steps, args.seed, **point)
                score = _mean_last(r["losses"], args.tune_steps)
                tuning.append({"hparams": point, "score": score})
                _say(f"  {name} {point}: {score:.2f}")
            finite = [t for t in tuning if np.isfinite(t["score"])]
            best = min(finite, key=lambda t: t["score"])["hparams"] if finite else grid[0]
            steps = args.steps * args.peer_step_factor
            result = _train_ours(problem, x_train, name, steps, args.seed, **best)
            result.update(hparams=best, tuning=tuning)
        else:
            base, overrides = _variant(name)
            result = _train_ours(problem, x_train, base, args.steps, args.seed, **overrides)
            result["hparams"] = overrides
        result["name"] = name
        result["train_seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(result))
        last = result["losses"][-1]
        _say(f"{name}: {len(result['losses'])} steps, last loss {last:.2f} -> {path}")


def _kfac_jax_python(args):
    from experiments.benchmarks.kfac_jax_env import ensure_kfac_jax_venv

    return ensure_kfac_jax_venv(Path(args.kfac_jax_venv), _say)


def _train_kfac_jax(args, x_train, problem) -> dict[str, Any]:
    import tempfile

    from experiments.benchmarks.kfac_jax_env import export_npz, run_kfac_jax_train, runner_config

    python = _kfac_jax_python(args)
    with tempfile.TemporaryDirectory(prefix="adaptive_kfacjax_") as tmp:
        workdir = Path(tmp)
        data = workdir / "data.npz"
        export_npz(data, x_train, problem.params)
        runs = [
            {"name": f"d{d}", "mode": "adaptive", "steps": args.tune_steps, "damping": d}
            for d in KFAC_JAX_DAMPINGS
        ]
        tuned = run_kfac_jax_train(
            python,
            workdir,
            data,
            runner_config(runs, batch_size=BATCH, seed=args.seed, eval=False),
            "tune",
            _say,
        )
        tuning = [
            {"hparams": {"damping": d}, "score": _mean_last(r["losses"], args.tune_steps)}
            for d, r in zip(KFAC_JAX_DAMPINGS, tuned["runs"])
        ]
        finite = [t for t in tuning if np.isfinite(t["score"])]
        best = min(finite, key=lambda t: t["score"])["hparams"]
        final = run_kfac_jax_train(
            python,
            workdir,
            data,
            runner_config(
                [{"name": "final", "mode": "adaptive", "steps": args.steps, **best}],
                batch_size=BATCH,
                seed=args.seed,
                eval=False,
            ),
            "final",
            _say,
        )
    r = final["runs"][0]
    return {
        "losses": r["losses"],
        "time_log": r["time_log"],
        "mean_step_time": r["mean_step_time"],
        "first_step_time": r["first_step_time"],
        "hparams": best,
        "tuning": tuning,
        "library": final.get("library"),
        "jax": final.get("jax"),
    }


def _time(args: argparse.Namespace) -> None:
    """Interleaved per-step times: every trained contender at its final configuration, and
    each method fixed against adaptive with damping_period 5 and 1."""
    import tempfile

    from experiments import timing
    from experiments.benchmarks.kfac_jax_env import KfacJaxServer, export_npz, runner_config
    from experiments.benchmarks.problems import jitted_step

    out = Path(args.out)
    x_train = _data(args.data_dir)
    problem = _problem(x_train, args.seed)
    trained = {p.stem[len("train_") :]: json.loads(p.read_text()) for p in out.glob("train_*.json")}
    block = args.block_steps
    runners: dict[str, Callable[[], float]] = {}

    # Warm-up: the compilation and one step; every timed block of `block` steps then holds
    # the same number of refreshes (one per 20 steps for every method at its defaults).
    def add(label: str, name: str, **overrides: Any) -> None:
        tx, step = _step_for(problem, name, **overrides)
        timer = _timer(problem, tx, step, warmup=2)
        runners[label] = lambda t=timer: t.seconds_per_step(block)

    def add_fixed(label: str, name: str) -> None:
        tx, needs = _fixed_twin(name)
        step = jitted_step(problem, tx, needs=needs, fisher="sampled" if needs else "empirical")
        timer = _timer(problem, tx, step, warmup=2)
        runners[label] = lambda t=timer: t.seconds_per_step(block)

    # (every contender trains on the same fixed batch from the initial parameters while it is
    # timed; at the tuned or adaptive settings none diverges, so no step is a skipped one)
    add("sgdm", "sgdm", learning_rate=1e-4)
    variants = [n for n in trained if ":" in n]
    wanted = set(args.contenders.split(",")) if args.contenders else None
    for name in [n for n in (*OURS, *PEERS) if n in trained or args.all_methods] + variants:
        if wanted is None or name in wanted:
            base, _ = _variant(name)
            add(name, base, **trained.get(name, {}).get("hparams", {}))
    cost_for = args.cost_for.split(",") if args.cost_for else list(OURS)
    for name in cost_for if args.adaptive_cost else ():
        add(f"{name} damping_period=1", name, damping_period=1)
        add_fixed(f"{name} fixed", name)
    server = None
    with tempfile.TemporaryDirectory(prefix="adaptive_time_") as tmp:
        if KFAC_JAX in trained and (wanted is None or KFAC_JAX in wanted):
            workdir = Path(tmp)
            data = workdir / "data.npz"
            export_npz(data, x_train, problem.params)
            runs = [{"name": KFAC_JAX, "mode": "adaptive", **trained[KFAC_JAX]["hparams"]}]
            server = KfacJaxServer(
                _kfac_jax_python(args),
                workdir,
                data,
                runner_config(runs, batch_size=BATCH, seed=args.seed, warmup_steps=2),
            )
            runners[KFAC_JAX] = lambda: server.time_steps(KFAC_JAX, block)
        try:
            result = timing.compare(runners, rounds=args.rounds, baseline="sgdm")
        finally:
            if server is not None:
                server.close()
    result["block_steps"] = block
    result["machine"] = _machine()
    (out / f"timing{('_' + args.tag) if args.tag else ''}.json").write_text(json.dumps(result))
    for label, t in result["times"].items():
        _say(f"{label}: {1e3 * t:.0f} ms/step, {result['ratios'][label]:.2f}x SGD-m")


def _fixed_twin(name: str) -> tuple[Any, tuple[str, ...]]:
    """The method of adaptive alias ``name`` at the same defaults with a fixed damping (1.0)
    and a small fixed learning rate: ``(chain(scale_by_*, scale(-1e-4)), needs)``, the step
    the adaptive one is priced against."""
    import optax

    import sofim_optax
    from experiments.registry import OPTIMIZERS

    alias = getattr(sofim_optax, name)
    method = alias.scale_by
    defaults = {
        k: p.default
        for k, p in inspect.signature(alias).parameters.items()
        if k in inspect.signature(method).parameters
    }
    if alias.feeds_damping:
        defaults["damping"] = 1.0
    needs = tuple(n for n in OPTIMIZERS[name].needs if n != "obj_fn")
    return optax.chain(method(**defaults), optax.scale(-1e-4)), needs


def _timer(problem, tx, step, warmup):
    from experiments import timing
    from experiments.benchmarks.problems import copy_tree

    params = copy_tree(problem.params)
    state = copy_tree(tx.init(params))  # (the step donates its inputs: no shared buffers)

    def advance(params, opt_state, index):
        params, opt_state, _ = step(params, opt_state, np.int32(index), *problem.batch)
        return params, opt_state, index + 1

    return timing.StepTimer(advance, (params, state, 0), warmup_steps=warmup)


def _machine() -> str:
    import jax

    return (
        f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"taskset {sorted(os.sched_getaffinity(0))}, {time.strftime('%Y-%m-%d')}"
    )


def _label(name: str) -> str:
    from experiments.registry import OPTIMIZERS

    if name == KFAC_JAX:
        return "kfac-jax adaptive"
    base, overrides = _variant(name)
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return OPTIMIZERS[base].label + (f" [{extra}]" if extra else "")


def _report(args: argparse.Namespace) -> str:
    out = Path(args.out)
    trained = {p.stem[len("train_") :]: json.loads(p.read_text()) for p in out.glob("train_*.json")}
    times: dict[str, float] = {}
    for path in sorted(out.glob("timing*.json")):  # (one file per timing process)
        for label, t in json.loads(path.read_text())["times"].items():
            times.setdefault(label, t)
    order = [n for n in (*OURS, KFAC_JAX, *PEERS) if n in trained]
    order[1:1] = sorted(n for n in trained if ":" in n)
    step_time = {n: times.get(n) or trained[n]["mean_step_time"] for n in order}
    budgets = [float(b) for b in args.budgets.split(",")]
    lines = [
        "| optimizer | hyperparameters | ms/step | "
        + " | ".join(f"loss @ {s} steps" for s in REPORT_STEPS)
        + " | "
        + " | ".join(f"loss @ {b:g} s" for b in budgets)
        + " |",
        "|---|---|---:|" + "---:|" * (len(REPORT_STEPS) + len(budgets)),
    ]
    for n in order:
        r = trained[n]
        losses = r["losses"]
        at_steps = [
            f"{_mean_last(losses, s):.1f}" if len(losses) >= s else "—" for s in REPORT_STEPS
        ]
        at_time = []
        for b in budgets:
            k = int(b / step_time[n])
            at_time.append(f"{_mean_last(losses, k):.1f}" if 0 < k <= len(losses) else "—")
        hp = ", ".join(f"{k}={v}" for k, v in r.get("hparams", {}).items()) or "defaults"
        lines.append(
            f"| {_label(n)} | {hp} | {1e3 * step_time[n]:.0f} | "
            + " | ".join(at_steps)
            + " | "
            + " | ".join(at_time)
            + " |"
        )
    table = "\n".join(lines)
    cost = _cost_table(times)
    text = table + ("\n\n" + cost if cost else "")
    (out / "table.md").write_text(text + "\n")
    _plot(out, trained, order, step_time)
    _say(text)
    return text


def _cost_table(times: dict[str, float]) -> str:
    rows = []
    for name in OURS:
        f, a5, a1 = (
            times.get(f"{name} fixed"),
            times.get(name),
            times.get(f"{name} damping_period=1"),
        )
        if f and a5 and a1:
            five, one = f"{1e3 * a5:.0f} ({a5 / f:.2f}x)", f"{1e3 * a1:.0f} ({a1 / f:.2f}x)"
            rows.append(f"| {name} | {1e3 * f:.0f} | {five} | {one} |")
    if not rows:
        return ""
    head = [
        "| method | fixed step (ms) | adaptive, damping_period=5 (ms, x fixed) | damping_period=1 |",
        "|---|---:|---:|---:|",
    ]
    return "\n".join(head + rows)


def _plot(out: Path, trained, order, step_time) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.registry import OPTIMIZERS

    fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in order:
        losses = np.asarray(trained[n]["losses"], float)
        k = SELECT_LAST
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        x = np.arange(k, len(losses) + 1)
        color = None if n == KFAC_JAX or ":" in n else OPTIMIZERS[n].color
        style = "--" if n in PEERS or n == KFAC_JAX else "-"
        ax_steps.plot(x, smooth, style, color=color, label=_label(n))
        ax_time.plot(x * step_time[n], smooth, style, color=color, label=_label(n))
    for ax, xlabel in ((ax_steps, "step"), (ax_time, "seconds (steps × median step time)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (mean of 10 minibatches)")
        ax.set_yscale("log")
        ax.set_ylim(top=450)
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=7, ncol=2)
    fig.suptitle("Deep autoencoder, Fashion-MNIST, batch 1000")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.benchmarks.kfac_jax_env import default_kfac_jax_venv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["train", "time", "report", "all"])
    p.add_argument("--out", default="runs/adaptive")
    p.add_argument("--contenders", default="", help="comma-separated (train, time); default: all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tune-steps", type=int, default=50)
    p.add_argument("--peer-step-factor", type=int, default=3)
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budgets", default="30,60,120", help="wall-time budgets in seconds")
    p.add_argument("--no-adaptive-cost", dest="adaptive_cost", action="store_false")
    p.add_argument("--all-methods", action="store_true", help="time untrained contenders too")
    p.add_argument("--cost-for", default="", help="methods of the fixed-vs-adaptive table")
    p.add_argument("--tag", default="", help="time: write timing_TAG.json (one per process)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--kfac-jax-venv", default=str(default_kfac_jax_venv()))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.tune_steps, args.rounds, args.peer_step_factor = 20, 10, 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    from sofim_optax import cpu_runtime

    cpu_runtime.configure_cpu_runtime()
    if args.part in ("train", "all"):
        _train(args)
    if args.part in ("time", "all"):
        _time(args)
    if args.part in ("report", "all"):
        _report(args)


if __name__ == "__main__":
    main(sys.argv[1:])
