"""KFAC benchmark: capture cost, per-step time against SGD-momentum, and kfac-jax side by side.

Commands that produce the README figures (CPU; about 15–20 min on a 2-core machine)::

    python -m experiments.benchmarks.kfac --out runs/benchmark_kfac
    python -m experiments.benchmarks.kfac --quick --out runs/benchmark_kfac_quick   # smoke run, a few minutes

Useful while developing: ``--kfac-jax-venv /tmp/kfacjax_venv`` (reuse a ready environment),
``--parts capture,step_time`` (skip the training comparison), ``--no-kfac-jax``.

Machines are noisy, so no time is reported alone: every timing interleaves rounds of all
contenders (the baseline first in every round), takes the median over rounds and divides by
the baseline's median from the same run. Three parts:

1. **capture** — ``sofim_optax.curvature.linen.value_grad_and_stats`` (empirical and
   sampled Fisher) over plain ``jax.value_and_grad``, both jitted, on the deep autoencoder
   (784-1000-500-250-30-250-500-1000-784, batch 1000, sigmoid cross-entropy) and on
   ``SmallCNN`` (batch 128, softmax cross-entropy).
2. **step_time** — the whole jitted train step of KFAC (capture + ``kfac`` update + apply,
   ``inverse_period=20``) over SGD-momentum's (``value_and_grad`` + ``optax.sgd(momentum=0.9)``
   + apply), on both models. Each timed block is ``--block-steps`` (a multiple of 20) steps,
   so inverse refreshes are included in proportion. On the autoencoder the same rounds also
   time kfac-jax 0.0.8 (fixed and adaptive) and an SGD-momentum step written in plain jax,
   all three in kfac-jax's own pinned environment (jax 0.9.0), through a server process
   (``experiments/benchmarks/kfac_jax_runner.py serve``) that runs K steps on request, so kfac-jax's
   rounds interleave with ours.
3. **kfac_jax** — training on the real Fashion-MNIST training images with the autoencoder,
   L2 ``½·1e-5·Σ‖W‖²`` over kernels in the loss, batch 1000, the same initial parameters
   (our Flax initialisation, exported to kfac-jax) and the same minibatch order
   (:func:`experiments.benchmarks.kfac_jax_runner.batch_indices`) for every method. Contenders:
   our ``kfac`` with the sampled Fisher (the like-for-like comparison: kfac-jax's default
   estimator ``fisher_gradients`` samples too) and with the empirical Fisher (our default),
   kfac-jax with fixed learning rate / momentum / damping and with its adaptive ones, and
   SGD-momentum and Adam as references. Each is tuned on the small grid in :data:`GRIDS`
   for ``--tune-steps`` steps (selection: lowest mean minibatch loss over the last
   ``--select-last`` steps), then trained for ``--steps`` steps. Reported: the training loss
   (mean minibatch loss over the last ``--select-last`` steps; the minibatches are the same
   for everyone) after the same number of steps, the loss on the first 10 000 training
   images at the end, and the loss at the same wall time. The wall-time axis of every curve
   is ``steps × (its median amortised per-step time from part 2)``, so that the comparison
   at equal time rests on interleaved timings rather than on one noisy sequential run (the
   raw measured times are in the JSON too).

Our KFAC trains with ``inverse="cholesky"`` in part 3 (``--our-inverse``): it stores explicit
damped inverses as kfac-jax does, and with a fixed damping it gives the same iterates as the
default ``"eigh"`` at a lower cost per step (part 2 times both).

On CPU with jaxlib < 0.11, ``sofim_optax`` decomposes KFAC's factor stacks one matrix at a
time (``sofim_optax.cpu_runtime.map_stack``): jaxlib 0.10's batched LAPACK kernels can
deadlock XLA's CPU thread pool.

Outputs under ``--out``: ``results.json``, ``table.md`` (the markdown tables also printed)
and ``curves.png`` (training loss against steps and against wall time).

kfac-jax 0.0.8 needs jax 0.9.x (it fails with jax 0.9.2 and newer), so the script creates a
virtual environment with ``kfac-jax==0.0.8 jax==0.9.0 jaxlib==0.9.0`` at ``--kfac-jax-venv``
(default ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``sofim_optax/kfac-jax-0.0.8-venv``),
reusing it when it already imports kfac_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import optax

import sofim_optax
from experiments import datasets, harness
from experiments.benchmarks.curves import jsonable
from experiments.benchmarks.kfac_cost import (
    SGD_OLD_JAX,
    capture_cost,
    capture_table,
    step_contenders,
    step_table,
    step_times,
)
from experiments.benchmarks.kfac_jax_env import (
    KfacJaxServer,
    default_kfac_jax_venv,
    ensure_kfac_jax_venv,
    export_npz,
    runner_config,
)
from experiments.benchmarks.kfac_report import plot_curves, targets_summary
from experiments.benchmarks.kfac_training import (  # noqa: F401  (re-exported)
    GRIDS,
    KFAC_FAMILY,
    QUICK_GRIDS,
    compare_with_kfac_jax,
)
from experiments.benchmarks.problems import (
    INVERSE_PERIOD,
    MOMENTUM,
    autoencoder_problem,
    cnn_problem,
    vit_problem,
)

__all__ = ["GRIDS", "QUICK_GRIDS", "KFAC_FAMILY", "compare_with_kfac_jax", "main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--out", default="runs/benchmark_kfac")
    p.add_argument(
        "--parts",
        default="capture,step_time,kfac_jax",
        help="comma-separated subset of capture,step_time,kfac_jax",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: few rounds, steps and grid points"
    )
    p.add_argument(
        "--small-grids",
        action="store_true",
        help="tune on the quick grids (QUICK_GRIDS) at full length",
    )
    p.add_argument("--no-kfac-jax", action="store_true", help="leave kfac-jax out (no venv needed)")
    p.add_argument("--kfac-jax-venv", default=str(default_kfac_jax_venv()))
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's lookup)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capture-rounds", type=int, default=5)
    p.add_argument("--step-rounds", type=int, default=3)
    p.add_argument(
        "--block-steps",
        type=int,
        default=INVERSE_PERIOD,
        help="steps per timed block (a multiple of 20)",
    )
    p.add_argument(
        "--steps", type=int, default=120, help="training steps of the final runs (60 per epoch)"
    )
    p.add_argument("--tune-steps", type=int, default=25, help="training steps of each tuning run")
    p.add_argument(
        "--select-last", type=int, default=10, help="K: losses are averaged over the last K steps"
    )
    p.add_argument(
        "--our-inverse",
        default="cholesky",
        choices=("eigh", "cholesky"),
        help="inverse of our KFAC in the training comparison (same iterates, different cost)",
    )
    p.add_argument(
        "--no-empirical", action="store_true", help="skip our KFAC with the empirical Fisher"
    )
    p.add_argument(
        "--tune-empirical",
        action="store_true",
        help="tune our empirical-Fisher KFAC on its own grid (default: reuse the sampled one's point)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.capture_rounds = min(args.capture_rounds, 1)
        args.step_rounds = min(args.step_rounds, 1)
        args.steps = min(args.steps, 20)
        args.tune_steps = min(args.tune_steps, 10)
        args.select_last = min(args.select_last, 5)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - {"capture", "step_time", "kfac_jax"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    if args.block_steps % INVERSE_PERIOD:
        p.error(f"--block-steps must be a multiple of {INVERSE_PERIOD}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and returns everything it wrote to JSON."""
    args = _parse(argv)
    from sofim_optax import cpu_runtime

    return _main(args, cpu_runtime.sequential_decompositions())


def _main(args: argparse.Namespace, workaround: bool) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "versions": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "sofim_optax": sofim_optax.__version__,
        },
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs",
        "args": {k: v for k, v in vars(args).items()},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")},
        "sequential_factor_decompositions": workaround,
    }
    decomposed = "one matrix at a time (jaxlib<0.11 CPU work-around)" if workaround else "batched"
    md: list[str] = [
        f"jax {jax.__version__} on {results['device']}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')!r}; "
        f"KFAC factor stacks decomposed {decomposed}"
    ]

    def say(text: str) -> None:
        print(text, flush=True)

    say(md[0])
    t_start = time.perf_counter()
    part_times: dict[str, float] = {}
    use_kfac_jax = not args.no_kfac_jax and ("kfac_jax" in args.parts or "step_time" in args.parts)
    python = ensure_kfac_jax_venv(Path(args.kfac_jax_venv), say) if use_kfac_jax else None
    grids = QUICK_GRIDS if (args.quick or args.small_grids) else GRIDS
    results["grids"] = grids

    with tempfile.TemporaryDirectory(prefix="benchmark_kfac_") as tmp:
        workdir = Path(tmp)
        data_npz = workdir / "data.npz"
        ae = None
        x_train = None
        if "kfac_jax" in args.parts or ("step_time" in args.parts and use_kfac_jax):
            ds = datasets.to_float_arrays(
                datasets.load_fashion_mnist(args.data_dir, download=False), flatten=True
            )
            x_train = ds.x_train
        if x_train is not None:
            ae = autoencoder_problem(1000, x=x_train, seed=args.seed)
            if python is not None:
                export_npz(data_npz, x_train, ae.params)

        # 1. capture cost
        if "capture" in args.parts:
            t_part = time.perf_counter()
            say("\n## Capture cost")
            cap = {}
            for problem, batch in (
                (ae or autoencoder_problem(1000, seed=args.seed), 1000),
                (cnn_problem(128, args.seed), 128),
                (vit_problem(128, args.seed), 128),
            ):
                r = capture_cost(
                    problem,
                    rounds=args.capture_rounds,
                    calls=3 if problem.name == "autoencoder" else 10,
                )
                r["batch"] = batch
                cap[problem.name] = r
            results["capture"] = cap
            table = capture_table(cap)
            md += ["\n## Capture cost (median of interleaved rounds)\n", table]
            say(table)
            part_times["capture"] = time.perf_counter() - t_part

        # 2. per-step time
        step_res: dict[str, Any] = {}
        if "step_time" in args.parts:
            t_part = time.perf_counter()
            say("\n## Per-step time")
            problem = ae or autoencoder_problem(1000, seed=args.seed)
            names = step_contenders(args.our_inverse, quick=args.quick)
            external = {}
            server = None
            if python is not None and ae is not None:
                serve_runs = [
                    {
                        "name": "kfac-jax fixed",
                        "mode": "fixed",
                        "learning_rate": 1e-3,
                        "momentum": MOMENTUM,
                        "damping": 100.0,
                    },
                    {"name": "kfac-jax adaptive", "mode": "adaptive", "damping": 100.0},
                    {
                        "name": SGD_OLD_JAX,
                        "mode": "sgdm",
                        "learning_rate": 1e-4,
                        "momentum": MOMENTUM,
                    },
                ]
                server = KfacJaxServer(
                    python,
                    workdir,
                    data_npz,
                    runner_config(
                        serve_runs, batch_size=1000, seed=args.seed, warmup_steps=INVERSE_PERIOD + 1
                    ),
                )
                for run in serve_runs:
                    external[run["name"]] = lambda steps, n=run["name"]: server.time_steps(n, steps)
            try:
                r = step_times(
                    problem,
                    rounds=args.step_rounds,
                    block_steps=args.block_steps,
                    contenders=names,
                    external=external,
                )
            finally:
                if server is not None:
                    server.close()
            r["batch"] = 1000
            step_res["autoencoder"] = r
            r = step_times(
                cnn_problem(128, args.seed),
                rounds=args.step_rounds,
                block_steps=args.block_steps,
                contenders=[n for n in names if n != "Adam"],
            )
            r["batch"] = 128
            step_res["SmallCNN"] = r
            results["step_time"] = step_res
            table = step_table(step_res)
            md += [
                "\n## Per-step time (amortised over whole inverse periods; median of interleaved rounds)\n",
                table,
            ]
            say(table)
            part_times["step_time"] = time.perf_counter() - t_part

        # 3. training side by side with kfac-jax
        if "kfac_jax" in args.parts:
            t_part = time.perf_counter()
            assert ae is not None and x_train is not None
            cmp_res = compare_with_kfac_jax(
                args,
                ae,
                x_train,
                python,
                workdir,
                data_npz,
                grids,
                step_res.get("autoencoder"),
                say,
            )
            results["kfac_jax"] = cmp_res
            md += cmp_res.pop("_markdown")
            plot_curves(cmp_res, out / "curves.png")
            part_times["kfac_jax"] = time.perf_counter() - t_part

    summary = targets_summary(results, args.our_inverse)
    if summary:
        md += summary
        say("\n".join(summary))
    results["part_times_s"] = part_times

    results["total_time_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    (out / "table.md").write_text("\n".join(md) + "\n")
    say(
        f"\nwrote {out / 'results.json'}, {out / 'table.md'}"
        + (f", {out / 'curves.png'}" if "kfac_jax" in args.parts else "")
        + f" in {results['total_time_s'] / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in part_times.items())
        + ")"
    )
    return results


if __name__ == "__main__":
    main()
