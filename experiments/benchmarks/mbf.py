"""Mini-Block Fisher: per-step time and state size against SGD-momentum, and a CNN convergence race.

Three parts (``--parts step_time,convergence,layout``; the first two by default):

1. **step_time** — the whole jitted train step (capture with
   ``curvature.linen.value_grad_and_stats`` + ``mbf`` update + apply) over SGD-momentum's
   (``value_and_grad`` + ``optax.sgd(momentum=0.9)`` + apply), on

   * the deep autoencoder ``experiments.models.Autoencoder`` (784-1000-500-250-30 and mirror,
     ``--ae-encoder``), batch ``--ae-batch`` (1000), sigmoid cross-entropy summed over the 784
     pixels (mean over the batch);
   * ``experiments.models.SmallCNN``, batch ``--cnn-batch`` (128), softmax cross-entropy.

   Random inputs (timing does not depend on the data). Machines are noisy, so every figure is
   the median over ``--rounds`` interleaved rounds (SGD-momentum first in every round) divided
   by SGD-momentum's median from the same run. Three MBF step kinds are timed, each as its own
   jitted function with the periods' ``lax.cond`` in place: ``plain`` (neither statistics nor
   inverses: both periods huge, timed after step 0), ``stats`` (statistics every step, no
   inverse) and ``full`` (statistics and inverses every step). The per-step cost of a schedule
   ``(stats_period=S, inverse_period=I)`` with ``I`` a multiple of ``S`` is then
   ``plain + (stats − plain)/S + (full − stats)/I``; reported for "every step" (S = I = 1),
   the defaults (1, 20) and the amortised CNN-style schedule (10, 100). The size of the
   optimizer state (bytes of all its arrays) is reported against SGD-momentum's.

2. **convergence** — Fashion-MNIST (``/usr/share/datasets/fashion-mnist``), ``SmallCNN``,
   batch 128: MBF (amortised schedule ``stats_period=10, inverse_period=100``), SGD-momentum
   and Adam, each tuned on the grid in :data:`GRIDS` (every grid point trained for the same
   ``--epochs``; the selected point is the one that reaches ``--target`` test accuracy in the
   fewest epochs, ties and misses broken by the best final test accuracy). Reported for the
   selected points: epochs and wall time (training time only, compilation and evaluation
   excluded) to the target, and the final test accuracy. Wall times come from sequential runs
   on a possibly loaded machine; the interleaved ratios of part 1 are the reliable cost
   figures.

3. **layout** — the preconditioning product of one dense layer (``--layout-shape``, default
   ``785,1000``: the autoencoder's first layer with its bias row, in blocks of at most 32), in
   the library's layout (the gradient cut into ``(d_out·n_chunks, s)`` blocks, stacked with
   ``(n, s, s)`` inverses, one batched matrix-vector product, and back) against the
   alternative that skips the two transposes (inverses kept per layer as
   ``(n_chunks, s, s, d_out)``, the product a multiply-and-sum over the kernel's own rows).
   Interleaved rounds, ratio to the library's layout.

Usage (full size, slow on a 2-core CPU)::

    python -m experiments.benchmarks.mbf --out runs/benchmark_mbf

Quick run (what the figures of docs/benchmarks.md were measured with, see ``--help``)::

    python -m experiments.benchmarks.mbf --ae-batch 250 --rounds 5 --train-size 10000 --epochs 3 \\
        --target 0.80 --out runs/benchmark_mbf_quick
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import datasets, harness, models, timing
from experiments.registry import OPTIMIZERS
from experiments.step import make_train_step
from sofim_optax.curvature import losses
from sofim_optax.mini_blocks import DEFAULT_DENSE_BLOCK_SIZE

HUGE = 1 << 30

#: Tuning grids of the convergence part (learning rate; MBF also the damping).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "sgdm": [{"learning_rate": lr} for lr in (0.01, 0.03, 0.1)],
    "adam": [{"learning_rate": lr} for lr in (3e-4, 1e-3, 3e-3)],
    # A first quick run (10 000 images, 3 epochs) with lr (0.003, 0.01, 0.03) x damping (1e-3, 1e-2)
    # reached 0.80 only with lr 0.003 / damping 1e-2; damping 1e-3 (and lr 0.01 with 1e-2) killed the
    # network (test accuracy 0.10). Hence this grid, shifted to smaller lr and larger damping.
    "mbf": [
        {"learning_rate": lr, "damping": d} for lr in (0.001, 0.003, 0.01) for d in (1e-2, 1e-1)
    ],
}


def make_optimizer(
    name: str, hp: dict[str, Any], dense_block_size: Any = DEFAULT_DENSE_BLOCK_SIZE
) -> optax.GradientTransformation:
    if name == "sgdm":
        return optax.sgd(hp["learning_rate"], momentum=0.9)
    if name == "adam":
        return optax.adam(hp["learning_rate"])
    if name == "mbf":
        return sofim_optax.mbf(
            hp["learning_rate"],
            gradient_momentum=0.9,
            damping=hp.get("damping", 1e-3),
            stats_period=hp.get("stats_period", 10),
            inverse_period=hp.get("inverse_period", 100),
            dense_block_size=dense_block_size,
        )
    raise ValueError(name)


def state_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------
# Part 1: step time and state size.
# --------------------------------------------------------------------------------------


def _problem(name: str, args) -> tuple[Any, Callable, tuple]:
    rng = np.random.default_rng(0)
    if name == "autoencoder":
        model = models.Autoencoder(encoder=tuple(int(w) for w in args.ae_encoder.split(",")))
        x = jnp.asarray(rng.random((args.ae_batch, 784), dtype=np.float32))
        loss = lambda v, x: losses.sigmoid_binary_cross_entropy(model.apply(v, x), x)
        batch = (x,)
    else:
        model = models.SmallCNN()
        x = jnp.asarray(rng.random((args.cnn_batch, 28, 28, 1), dtype=np.float32))
        y = jnp.asarray(rng.integers(0, 10, args.cnn_batch), jnp.int32)
        loss = lambda v, x, y: losses.softmax_cross_entropy(model.apply(v, x), y)
        batch = (x, y)
    params = jax.jit(model.init)(jax.random.key(0), batch[0][:1])
    return params, loss, batch


def _with_statistics_kept_live(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` taking ``layer_stats`` and ignoring them, but keeping them live (adds ``0 ×`` their
    sum to the gradient) so that XLA does not drop the capture: the capture's cost alone."""

    def update(grads, state, params=None, *, layer_stats, **extra):
        del extra
        zero = 0.0 * sum(jnp.sum(v.output_grads) for v in layer_stats.values())
        return tx.update(jax.tree.map(lambda g: g + zero, grads), state, params)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def benchmark_step_time(name: str, args) -> dict[str, Any]:
    params, loss, batch = _problem(name, args)
    bs = args.dense_block_size
    mbf_needs = OPTIMIZERS["mbf"].needs
    kinds = {  # kind: (optimizer, what its step captures)
        "sgdm": (optax.sgd(0.01, momentum=0.9), OPTIMIZERS["sgdm"].needs),
        "sgdm + capture": (
            _with_statistics_kept_live(optax.sgd(0.01, momentum=0.9)),
            ("layer_stats",),
        ),
        "mbf plain": (
            sofim_optax.mbf(1e-3, stats_period=HUGE, inverse_period=HUGE, dense_block_size=bs),
            mbf_needs,
        ),
        "mbf stats": (
            sofim_optax.mbf(1e-3, stats_period=1, inverse_period=HUGE, dense_block_size=bs),
            mbf_needs,
        ),
        "mbf full": (
            sofim_optax.mbf(1e-3, stats_period=1, inverse_period=1, dense_block_size=bs),
            mbf_needs,
        ),
    }
    timers, sizes = {}, {}
    for kind, (tx, needs) in kinds.items():
        train_step = make_train_step(loss, tx, needs=needs)

        # The batch is carried (a closed-over batch would be constant-folded by XLA).
        def step(p, s, *batch, train_step=train_step):
            out = train_step(p, s, batch)
            return (out.params, out.opt_state) + tuple(batch)

        state = jax.jit(tx.init)(params)
        sizes[kind] = state_bytes(state)
        # Two warm-up steps: the compilation and step 0's refreshes.
        timers[kind] = timing.StepTimer(
            jax.jit(step, donate_argnums=(1,)), (params, state) + tuple(batch), warmup_steps=2
        )
        print(
            f"  [{name}] {kind}: compiled and warmed up in {timers[kind].warmup_seconds:.1f} s",
            flush=True,
        )
    times = timing.interleaved_rounds(
        {k: lambda t=t: t.seconds_per_step(args.steps) for k, t in timers.items()},
        rounds=args.rounds,
    )
    med = timing.medians(times)
    base = med["sgdm"]
    plain, stats_t, full = med["mbf plain"], med["mbf stats"], med["mbf full"]
    schedules = {}
    for s_period, i_period in [(1, 1), (1, 20), (10, 100)]:
        t = plain + (stats_t - plain) / s_period + (full - stats_t) / i_period
        schedules[f"stats {s_period}, inverse {i_period}"] = {"ms": 1e3 * t, "ratio": t / base}
    return {
        "model": name,
        "medians_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": {k: v / base for k, v in med.items()},
        "schedules": schedules,
        "state_bytes": {"sgdm": sizes["sgdm"], "mbf": sizes["mbf full"]},
        "param_bytes": state_bytes(params),
    }


# --------------------------------------------------------------------------------------
# Part 2: convergence on Fashion-MNIST.
# --------------------------------------------------------------------------------------


def train_cnn(name: str, hp: dict[str, Any], data, args, seed: int = 0) -> dict[str, Any]:
    model = models.SmallCNN()
    x_train, y_train, x_test, y_test = data
    tx = make_optimizer(name, hp, args.dense_block_size)
    params = jax.jit(model.init)(jax.random.key(seed), x_train[:1])
    state = jax.jit(tx.init)(params)
    loss = lambda v, x, y: losses.softmax_cross_entropy(model.apply(v, x), y)

    train_step = make_train_step(loss, tx, needs=OPTIMIZERS[name].needs)

    @jax.jit
    def step(p, s, x, y):
        out = train_step(p, s, (x, y))
        return out.params, out.opt_state, out.loss

    @jax.jit
    def accuracy(p, x, y):
        return jnp.sum(jnp.argmax(model.apply(p, x), -1) == y)

    def test_accuracy(p):
        hits = 0
        for i in range(0, len(x_test), 1000):
            hits += int(accuracy(p, x_test[i : i + 1000], y_test[i : i + 1000]))
        return hits / len(x_test)

    b = args.cnn_batch
    n_steps = len(x_train) // b
    rng = np.random.default_rng(seed)
    # Compile outside the timed region (one step on a copy is thrown away).
    jax.block_until_ready(step(params, jax.tree.map(jnp.copy, state), x_train[:b], y_train[:b]))
    accuracy(params, x_test[:1000], y_test[:1000])
    curve, wall, hit_epoch, hit_time, diverged = [], 0.0, None, None, False
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        start = time.perf_counter()
        for i in range(n_steps):
            idx = order[i * b : (i + 1) * b]
            params, state, value = step(params, state, x_train[idx], y_train[idx])
        jax.block_until_ready(params)
        wall += time.perf_counter() - start
        acc = test_accuracy(params)
        diverged = not np.isfinite(float(value))
        curve.append({"epoch": epoch, "wall_s": wall, "test_acc": acc, "last_loss": float(value)})
        if hit_epoch is None and acc >= args.target:
            hit_epoch, hit_time = epoch, wall
        if diverged:
            break
    return {
        "optimizer": name,
        "hp": hp,
        "curve": curve,
        "epochs_to_target": hit_epoch,
        "wall_to_target_s": hit_time,
        "final_acc": curve[-1]["test_acc"],
        "diverged": diverged,
    }


def grids_with_overrides(overrides: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """:data:`GRIDS`, with every optimizer named in ``overrides`` pinned to that one point.

    ``overrides`` comes from ``--set OPT.PARAM=VALUE`` (:func:`experiments.harness.parse_overrides`,
    the harness's own syntax); it reruns the points a quick grid selected at a larger size.
    """
    unknown = sorted(set(overrides) - set(GRIDS))
    if unknown:
        raise ValueError(f"--set names {unknown}; choose from {sorted(GRIDS)}")
    return {name: [overrides[name]] if name in overrides else grid for name, grid in GRIDS.items()}


def convergence(args) -> dict[str, Any]:
    ds = datasets.to_float_arrays(datasets.load_fashion_mnist(download=False))
    n = args.train_size or len(ds.x_train)
    data = (
        jnp.asarray(ds.x_train[:n]),
        jnp.asarray(ds.y_train[:n]),
        jnp.asarray(ds.x_test),
        jnp.asarray(ds.y_test),
    )
    grids = grids_with_overrides(harness.parse_overrides(args.set))
    results = {}
    for name in args.optimizers.split(","):
        runs = []
        for hp in grids[name]:
            r = train_cnn(name, hp, data, args)
            print(
                f"  {name} {hp}: epochs to {args.target:.2f}: {r['epochs_to_target']}, "
                f"final acc {r['final_acc']:.4f}, train time {r['curve'][-1]['wall_s']:.1f} s",
                flush=True,
            )
            runs.append(r)
        key = lambda r: (r["epochs_to_target"] is None, r["epochs_to_target"] or 0, -r["final_acc"])
        results[name] = {"selected": min(runs, key=key), "grid": runs}
    return results


def benchmark_layout(args) -> dict[str, Any]:
    """Part 3: the library's blocked product against the transpose-free per-layer layout."""
    from sofim_optax import layerwise, mini_blocks

    d_a, d_out = (int(v) for v in args.layout_shape.split(","))
    layer = layerwise.Layer("layer", 0, 1, (d_a - 1, d_out))
    blocking = mini_blocks.layer_blocking(layer, mini_blocks.DEFAULT_DENSE_BLOCK_SIZE)
    c, s = blocking.n_chunks, blocking.chunk
    key_inv, key_v = jax.random.split(jax.random.PRNGKey(0))
    stacked = jax.random.normal(key_inv, (d_out * c, s, s))  # block j·c + chunk
    per_layer = stacked.reshape(d_out, c, s, s).transpose(1, 2, 3, 0)  # (c, s, s, d_out)
    v = jax.random.normal(key_v, (d_a, d_out))

    @jax.jit
    def library(inverses, v):
        (blocks,) = blocking.blockify(v)
        return blocking.deblockify([jnp.einsum("bij,bj->bi", inverses, blocks)])

    @jax.jit
    def transpose_free(inverses, v):
        x = jnp.pad(v, ((0, blocking.padding), (0, 0))).reshape(c, s, d_out)
        return (inverses * x[:, None]).sum(axis=2).reshape(c * s, d_out)[:d_a]

    error = float(jnp.max(jnp.abs(library(stacked, v) - transpose_free(per_layer, v))))
    timers = {
        "library": timing.call_timer(library, (stacked, v)),
        "transpose_free": timing.call_timer(transpose_free, (per_layer, v)),
    }
    result = timing.compare(
        {name: (lambda t=t: t.seconds_per_step(args.steps)) for name, t in timers.items()},
        rounds=args.rounds,
        baseline="library",
    )
    return {
        "shape": (d_a, d_out),
        "block": s,
        "inverse_mb": stacked.size * 4 / 2**20,
        "max_abs_difference": error,
        "ms": {k: 1e3 * t for k, t in result["times"].items()},
        "ratios": result["ratios"],
    }


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = harness.script_parser(__doc__)
    parser.add_argument("--parts", default="step_time,convergence")
    parser.add_argument("--models", default="autoencoder,cnn", help="step_time models")
    parser.add_argument("--ae-encoder", default="1000,500,250,30")
    parser.add_argument("--ae-batch", type=int, default=1000)
    parser.add_argument("--cnn-batch", type=int, default=128)
    parser.add_argument(
        "--dense-block-size",
        type=lambda s: None if s == "none" else int(s),
        default=DEFAULT_DENSE_BLOCK_SIZE,
        help=f'MBF dense_block_size: an int (default {DEFAULT_DENSE_BLOCK_SIZE}, the library\'s) or "none"',
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--optimizers", default="sgdm,adam,mbf")
    parser.add_argument(
        "--train-size", type=int, default=0, help="training images used (0: all 60000)"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.88, help="test accuracy target")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPT.PARAM=VALUE",
        help="train OPT at this one point instead of its grid (repeatable), "
        "e.g. --set mbf.learning_rate=0.001 --set mbf.damping=0.01",
    )
    parser.add_argument(
        "--layout-shape", default="785,1000", help="layout part: d_a,d_out of the dense layer"
    )
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; dense_block_size={args.dense_block_size}",
        flush=True,
    )
    out: dict[str, Any] = {"args": vars(args)}
    if "step_time" in parts:
        out["step_time"] = []
        for name in args.models.split(","):
            r = benchmark_step_time(name, args)
            out["step_time"].append(r)
        print("\n| model | MBF schedule | ms/step | ratio to SGD-m |")
        print("|---|---|---:|---:|")
        for r in out["step_time"]:
            print(f"| {r['model']} | SGD-momentum | {r['medians_ms']['sgdm']:.1f} | 1.00 |")
            for sched, v in r["schedules"].items():
                print(f"| {r['model']} | {sched} | {v['ms']:.1f} | {v['ratio']:.2f} |")
        print("\n| model | step kind | median ms/step | ratio to SGD-m |")
        print("|---|---|---:|---:|")
        for r in out["step_time"]:
            for kind, ms in r["medians_ms"].items():
                print(f"| {r['model']} | {kind} | {ms:.1f} | {r['ratios'][kind]:.2f} |")
        print(
            "\n| model | parameters (MB) | SGD-m state (MB) | MBF state (MB) | MBF / SGD-m state |"
        )
        print("|---|---:|---:|---:|---:|")
        for r in out["step_time"]:
            s = r["state_bytes"]
            print(
                f"| {r['model']} | {r['param_bytes'] / 2**20:.1f} | {s['sgdm'] / 2**20:.1f} "
                f"| {s['mbf'] / 2**20:.1f} | {s['mbf'] / s['sgdm']:.1f} |"
            )
    if "convergence" in parts:
        out["convergence"] = convergence(args)
        print(
            f"\n| optimizer | selected hyperparameters | epochs to {args.target:.2f} "
            "| train time to target (s) | final test acc |"
        )
        print("|---|---|---:|---:|---:|")
        for name, r in out["convergence"].items():
            s = r["selected"]
            wall = "—" if s["wall_to_target_s"] is None else f"{s['wall_to_target_s']:.1f}"
            print(
                f"| {name} | {s['hp']} | {s['epochs_to_target'] or '—'} | {wall} | {s['final_acc']:.4f} |"
            )
    if "layout" in parts:
        r = out["layout"] = benchmark_layout(args)
        print(
            f"\n| layout ({r['shape'][0]}×{r['shape'][1]}, blocks of {r['block']}, "
            f"{r['inverse_mb']:.0f} MB of inverses) | ms | ratio to the library's |"
        )
        print("|---|---:|---:|")
        for name, ms in r["ms"].items():
            print(f"| {name} | {ms:.2f} | {r['ratios'][name]:.2f} |")
        print(f"(largest difference between the two products: {r['max_abs_difference']:.1e})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
