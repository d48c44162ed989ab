"""Per-device work and memory of KFAC, Mini-Block Fisher and Deflation on 1, 2, 4 and 8 devices.

On ``n`` simulated CPU devices (``--xla_force_host_platform_device_count``, set by this
script) each method's jitted train step runs data-parallel: the batch split over a
``("data",)`` mesh, parameters replicated, the step traced under ``jax.set_mesh``. For
every ``n`` the script reports, per device:

* **refresh MACs**: the multiply-adds of the refresh (every decomposition and per-matrix
  inverse that :func:`sofim_optax.distributed.map_stacks` runs) on the busiest device, counted
  from the step's jaxpr: inside the distributed refresh only the device's own branch counts;
  ``eigh`` costs ``4·d³`` and a Cholesky ``⅓·d³`` (the cost model's constants,
  :mod:`experiments.benchmarks.cost_model`), matrix products their ``M·N·K``. XLA's own
  ``cost_analysis()`` cannot give this figure: it does not count LAPACK calls, and it counts
  every branch of a ``lax.switch``;
* **step MACs**: XLA's ``cost_analysis()`` of the compiled per-device program (LAPACK calls
  excluded, both sides of every ``lax.cond`` counted): the gradient and the statistics,
  which XLA splits along the batch;
* **communication**: the all-reduce and all-gather instructions of the compiled per-device
  program and the bytes they return (each counted once, wherever it lies: the refresh's
  all-gather runs only on refresh steps);
* **state MB**: the bytes of the optimizer state one device holds, replicated, with
  :func:`sofim_optax.distributed.state_sharding` and with
  :func:`sofim_optax.partition_state`;

and the ratios to ``1/n`` of the one-device figures (target ≤ 1.2 for the refresh and the
sharded state). The devices share the machine's cores, so wall time says nothing here and
none is measured. Usage::

    python -m experiments.benchmarks.sharding                # both models, three methods
    python -m experiments.benchmarks.sharding --models cnn --devices 1,8 --out runs/sharding
    python -m experiments.benchmarks.sharding --variant kfac:max_factor_dim=1024
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its CPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sofim_optax  # noqa: E402
from experiments.benchmarks import cost_model, floor  # noqa: E402
from experiments.benchmarks.problems import autoencoder_problem, cnn_problem  # noqa: E402
from experiments.registry import OPTIMIZERS  # noqa: E402
from experiments.step import make_train_step  # noqa: E402
from sofim_optax import distributed  # noqa: E402

METHODS = ("kfac", "mbf", "kpsvd_deflation")
PROBLEMS = {"autoencoder": autoencoder_problem, "cnn": cnn_problem}
#: MACs per d³ of the LAPACK calls a refresh makes (the cost model's constants).
LAPACK_MACS = {"eigh": cost_model.EIGH_MACS, "cholesky": 1.0 / 3.0}
SPLIT_SCOPE = distributed.REFRESH_SCOPE + "_split"


def _subjaxprs(eqn) -> list[Any]:
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
                out.append(v.jaxpr)
            elif hasattr(v, "eqns"):
                out.append(v)
    return out


def _eqn_macs(eqn) -> float:
    name = eqn.primitive.name
    if name in LAPACK_MACS:
        shape = eqn.invars[0].aval.shape
        return LAPACK_MACS[name] * math.prod(shape[:-2]) * shape[-1] ** 3
    if name == "triangular_solve":  # a (…, m, m) triangle against (…, m, k): ½ m² k
        a, b = (v.aval.shape for v in eqn.invars)
        return 0.5 * math.prod(b[:-2]) * a[-1] ** 2 * (b[-1] * b[-2] / a[-1])
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return float(math.prod(eqn.outvars[0].aval.shape)) * math.prod(lhs[i] for i in contract)
    return 0.0


def refresh_macs(jaxpr, device: int, inside: bool = False) -> float:
    """MACs of the refresh work in ``jaxpr`` that ``device`` runs (see the module docstring):
    the busiest branch of an ordinary ``lax.cond`` (a refresh step), the device's own branch
    of the distributed refresh, scan bodies times their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        scope = str(eqn.source_info.name_stack)
        here = inside or distributed.REFRESH_SCOPE in scope
        subs = _subjaxprs(eqn)
        if eqn.primitive.name == "cond":
            if SPLIT_SCOPE in scope:
                total += refresh_macs(subs[device], device, here)
            else:
                total += max(refresh_macs(b, device, here) for b in subs)
            continue
        inner = sum(refresh_macs(s, device, here) for s in subs)
        if eqn.primitive.name == "scan":
            inner *= eqn.params["length"]
        total += inner + (_eqn_macs(eqn) if here else 0.0)
    return total


_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}


def collectives(hlo: str) -> dict[str, tuple[int, float]]:
    """``{"all-reduce": (instructions, bytes), "all-gather": ...}`` of compiled HLO text."""
    found = {"all-reduce": [0, 0.0], "all-gather": [0, 0.0]}
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) (all-reduce|all-gather)(?:-start)?\(", line)
        if not match:
            continue
        entry = found[match.group(2)]
        entry[0] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size = math.prod(int(d) for d in dims.split(",") if d)
            entry[1] += size * _DTYPE_BYTES.get(dtype, 4)
    return {k: (v[0], v[1]) for k, v in found.items()}


def _state_bytes(state: Any) -> float:
    """Bytes of ``state`` on the first device."""
    first = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            if shard.device == first:
                total += shard.data.nbytes
    return float(total)


def measure(
    problem_name: str, method: str, n: int, hparams: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One row: the method at its library defaults (as in :mod:`experiments.benchmarks.floor`)
    on ``n`` devices."""
    problem = PROBLEMS[problem_name]()
    fisher = "sampled" if method in floor.SAMPLED else "empirical"
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    tx = floor.make_tx(method, dict(hparams or {}))
    needs = OPTIMIZERS[method].needs
    train_step = make_train_step(problem.loss_fn, tx, needs=needs, fisher=fisher)

    def step(params, state, batch, key):
        out = train_step(params, state, batch, batch, rng=key)
        return out.params, out.opt_state

    settings = " ".join(f"{k}={v}" for k, v in (hparams or {}).items())
    label = f"{method} {settings}".strip()
    row: dict[str, Any] = {"model": problem_name, "method": label, "devices": n}
    with jax.set_mesh(mesh):
        batch = jax.device_put(problem.batch, NamedSharding(mesh, P("data")))
        params = jax.device_put(problem.params, NamedSharding(mesh, P()))
        key = jax.random.key(0)
        jaxpr = jax.make_jaxpr(step)(params, tx.init(params), batch, key).jaxpr
        row["refresh_macs"] = max(refresh_macs(jaxpr, d) for d in range(n))
        analysis = jax.jit(step).lower(params, tx.init(params), batch, key).compile()
        for kind, (count, size) in collectives(analysis.as_text()).items():
            row[f"{kind}_count"], row[f"{kind}_bytes"] = count, size
        costs = analysis.cost_analysis()
        costs = costs[0] if isinstance(costs, list) else costs
        row["step_macs"] = float(costs["flops"]) / 2
        state = tx.init(params)
        row["state_bytes_replicated"] = _state_bytes(state)
        row["state_bytes_sharded"] = _state_bytes(
            jax.device_put(state, distributed.state_sharding(state, mesh))
        )
        row["state_bytes_partitioned"] = _state_bytes(sofim_optax.partition_state(tx).init(params))
    return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``value / (one-device value / n)`` for the refresh, the step and both states."""
    one = {(r["model"], r["method"]): r for r in rows if r["devices"] == 1}
    for r in rows:
        base, n = one.get((r["model"], r["method"])), r["devices"]
        if base is None:
            continue
        for field, reference in (
            ("refresh_macs", "refresh_macs"),
            ("step_macs", "step_macs"),
            ("state_bytes_sharded", "state_bytes_replicated"),
            ("state_bytes_partitioned", "state_bytes_replicated"),
        ):
            r[f"{field}_vs_1/n"] = r[field] / (base[reference] / n) if base[reference] else 0.0
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| model | method | devices | refresh GMAC/device (×1/n) | step GMAC/device (×1/n) "
        "| all-reduce: ops, MB | all-gather: ops, MB "
        "| state MB/device: replicated | state_sharding (×1/n) | partition_state (×1/n) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:

        def pair(field, scale):
            ratio = r.get(f"{field}_vs_1/n")
            return f"{r[field] / scale:.3g} ({ratio:.2f})" if ratio is not None else "—"

        lines.append(
            f"| {r['model']} | {r['method']} | {r['devices']} "
            f"| {pair('refresh_macs', 1e9)} | {pair('step_macs', 1e9)} "
            f"| {r['all-reduce_count']}, {r['all-reduce_bytes'] / 1e6:.3g} "
            f"| {r['all-gather_count']}, {r['all-gather_bytes'] / 1e6:.3g} "
            f"| {r['state_bytes_replicated'] / 1e6:.3g} "
            f"| {pair('state_bytes_sharded', 1e6)} | {pair('state_bytes_partitioned', 1e6)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="autoencoder,cnn")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='extra rows, e.g. "kfac:max_factor_dim=1024" (repeatable)',
    )
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--out", type=Path, default=None, help="writes sharding.json/.md here")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(
            f"{max(counts)} devices asked, {jax.device_count()} visible: start Python with "
            f"XLA_FLAGS={_FLAG}={max(counts)} (this script sets 8 when the flag is absent)."
        )
    rows = []
    for model in args.models.split(","):
        runs = [(m, {}) for m in args.methods.split(",")]
        runs += [floor.parse_variant(v)[::2] for v in args.variant]
        for method, hparams in runs:
            for n in counts:
                rows.append(measure(model, method, n, hparams))
                print(json.dumps(rows[-1]), flush=True)
    rows = with_ratios(rows)
    text = table(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sharding.json").write_text(json.dumps(rows, indent=1))
        (args.out / "sharding.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
