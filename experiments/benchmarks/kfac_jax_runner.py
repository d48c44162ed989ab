"""Train or time the deep autoencoder with kfac-jax, for the side-by-side benchmark.

This file runs inside its own pinned virtual environment (kfac-jax 0.0.8 needs
jax 0.9.x, older than the jax sofim_optax is tested with), so it imports only
numpy, jax and (lazily, inside the functions that need it) kfac_jax: never
sofim_optax, flax or anything else in experiments/. ``experiments/benchmarks/kfac.py``
creates that environment, writes the data and the config, runs this script and
reads its output. The parent imports :func:`batch_indices` from here (it needs
only numpy), so both sides draw exactly the same minibatches in the same order.

Usage (done for you by experiments/benchmarks/kfac.py)::

    <venv>/bin/python experiments/kfac_jax_runner.py train CONFIG.json DATA.npz OUT.json
    <venv>/bin/python experiments/kfac_jax_runner.py serve CONFIG.json DATA.npz

``DATA.npz`` holds ``x_train`` (N, 784) float32 in [0, 1] and the initial
parameters ``w0, b0, w1, b1, ...`` (kernels ``(d_in, d_out)``, as Flax stores
them). ``CONFIG.json`` holds the shared settings ``batch_size``, ``l2_reg``,
``ema``, ``inverse_period``, ``estimation_mode``, ``seed``, ``log_every``,
``eval_examples`` and a list ``runs`` of ``{"name", "mode", "steps", ...}``:

* ``mode="fixed"``: kfac-jax with fixed ``learning_rate``, ``momentum`` and
  ``damping`` (passed to ``Optimizer.step``, so one compilation serves every
  run of the list);
* ``mode="adaptive"``: kfac-jax's adaptive learning rate, momentum and damping
  (Martens & Grosse's quadratic model and Levenberg-Marquardt rule), starting
  from ``damping``;
* ``mode="sgdm"``: plain SGD with heavy-ball momentum written in jax (no
  kfac_jax), a same-jax-version baseline for the timings.

``train`` runs each entry for ``steps`` steps from the initial parameters and
writes, per run, the loss of every step (the minibatch loss before the update,
L2 term included), the wall time at every ``log_every``-th step (compilation
excluded: the first step is timed separately) and the loss over the first
``eval_examples`` training images at the end.

``serve`` builds and compiles every entry of ``runs``, prints one JSON line
``{"ready": true, ...}``, then answers JSON lines ``{"name": NAME, "steps": K}``
read on stdin by running K more training steps of that entry and printing
``{"name": NAME, "seconds": S}``; ``{"cmd": "quit"}`` ends it. The parent uses it to
interleave kfac-jax's timing rounds with its own in one benchmark run.

The model is the same autoencoder as ``experiments.models.Autoencoder``:
Dense layers of the given widths, ReLU between them, a linear code layer,
output logits; the loss is the sigmoid cross-entropy summed over pixels and
averaged over examples, plus ``l2_reg/2 ‖W‖²`` over the kernels (kfac-jax wants
the L2 term in the loss and told to it through ``l2_reg``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np


def batch_indices(num_examples: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Minibatch indices, forever: each epoch a fresh ``default_rng(seed).permutation``.

    One generator ``np.random.default_rng(seed)`` is created once; at the start of every
    epoch it draws ``permutation(num_examples)`` and the epoch's batches are consecutive
    slices of it (a last partial batch is dropped). The benchmark's own training loop
    uses this very function, so both libraries see the same batches in the same order.
    """
    order = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} > number of examples {num_examples}")
    while True:
        perm = order.permutation(num_examples)
        for i in range(per_epoch):
            yield perm[i * batch_size : (i + 1) * batch_size]


def forward(params, x):
    h = x
    n = len(params)
    for i, (w, b) in enumerate(params):
        h = jnp.dot(h, w) + b
        # ReLU everywhere except at the code layer (the middle) and the output.
        if i != n - 1 and i != n // 2 - 1:
            h = jax.nn.relu(h)
    return h


def data_loss(logits, x):
    """Sigmoid cross-entropy summed over pixels, averaged over examples."""
    per_example = jnp.sum(
        jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=-1
    )
    return jnp.mean(per_example)


def make_loss(l2_reg, register=True):
    def loss_fn(params, batch):
        logits = forward(params, batch)
        if register:
            import kfac_jax

            kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        l2 = sum(jnp.sum(w * w) for w, _ in params)
        return data_loss(logits, batch) + 0.5 * l2_reg * l2

    return loss_fn


def load(data_path: str):
    arrays = np.load(data_path)
    x_train = np.ascontiguousarray(arrays["x_train"], dtype=np.float32)
    n_layers = len([k for k in arrays.files if k.startswith("w")])
    params = [(jnp.asarray(arrays[f"w{i}"]), jnp.asarray(arrays[f"b{i}"])) for i in range(n_layers)]
    return x_train, params


class Contender:
    """One kfac-jax (or SGD-momentum) training run that can be advanced step by step."""

    def __init__(self, config: dict, run: dict, x_train: np.ndarray, params0, cache: dict):
        self.run = run
        self.mode = run["mode"]
        self.x_train = x_train
        self.batches = batch_indices(len(x_train), config["batch_size"], config["seed"])
        self.step_index = 0
        # kfac-jax donates its parameter buffers, so every run gets its own copy.
        params0 = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params0)
        self.params = params0
        self.rng = jax.random.PRNGKey(config["seed"])
        l2_reg = config["l2_reg"]
        if self.mode == "sgdm":
            loss_fn = make_loss(l2_reg, register=False)
            key = ("sgdm",)
            if key not in cache:

                @jax.jit
                def sgdm_step(params, velocity, batch, lr, mu):
                    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
                    velocity = jax.tree_util.tree_map(lambda v, g: mu * v + g, velocity, grads)
                    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
                    return params, velocity, loss

                cache[key] = sgdm_step
            self._sgdm_step = cache[key]
            self.state = jax.tree_util.tree_map(jnp.zeros_like, params0)
            self.hyper = (jnp.float32(run["learning_rate"]), jnp.float32(run["momentum"]))
            return

        import kfac_jax

        adaptive = self.mode == "adaptive"
        if self.mode not in ("fixed", "adaptive"):
            raise ValueError(f"unknown mode {self.mode!r}")
        # One Optimizer per mode: in fixed mode the hyperparameters are step arguments and in
        # adaptive mode the damping lives in the state, so every run of a mode shares one
        # compilation.
        key = ("kfac", self.mode)
        if key not in cache:
            kwargs = dict(
                value_and_grad_func=jax.value_and_grad(make_loss(l2_reg)),
                l2_reg=l2_reg,
                use_adaptive_learning_rate=adaptive,
                use_adaptive_momentum=adaptive,
                use_adaptive_damping=adaptive,
                initial_damping=run["damping"] if adaptive else None,
                curvature_ema=config["ema"],
                inverse_update_period=config["inverse_period"],
                estimation_mode=config["estimation_mode"],
                multi_device=False,
                num_burnin_steps=0,
            )
            cache[key] = kfac_jax.Optimizer(**kwargs)
        self.optimizer = cache[key]
        self.rng, init_rng = jax.random.split(self.rng)
        first = self.x_train[: config["batch_size"]]
        self.state = self.optimizer.init(params0, init_rng, jnp.asarray(first))
        if adaptive:
            self.state.damping = jnp.asarray(run["damping"], self.state.damping.dtype)
            self.step_kwargs = {}
        else:
            self.step_kwargs = dict(
                learning_rate=jnp.asarray(run["learning_rate"], jnp.float32),
                momentum=jnp.asarray(run["momentum"], jnp.float32),
                damping=jnp.asarray(run["damping"], jnp.float32),
            )

    def step(self):
        """One training step; returns the minibatch loss (a device scalar, not synced)."""
        batch = jnp.asarray(self.x_train[next(self.batches)])
        if self.mode == "sgdm":
            self.params, self.state, loss = self._sgdm_step(
                self.params, self.state, batch, *self.hyper
            )
        else:
            self.rng, step_rng = jax.random.split(self.rng)
            self.params, self.state, stats = self.optimizer.step(
                self.params,
                self.state,
                step_rng,
                batch=batch,
                global_step_int=self.step_index,
                **self.step_kwargs,
            )
            loss = stats["loss"]
        self.step_index += 1
        return loss

    def block(self):
        jax.block_until_ready(self.params)


def full_loss(params, x, l2_reg, chunk=1000):
    f = jax.jit(lambda p, xb: data_loss(forward(p, xb), xb) * xb.shape[0])
    total = sum(float(f(params, jnp.asarray(x[i : i + chunk]))) for i in range(0, len(x), chunk))
    l2 = float(sum(jnp.sum(w * w) for w, _ in params))
    return total / len(x) + 0.5 * l2_reg * l2


def library_version() -> str:
    try:
        import kfac_jax

        return f"kfac-jax {kfac_jax.__version__}"
    except ImportError:  # pragma: no cover - only in a venv without kfac_jax
        return "kfac-jax (not installed)"


def train(config_path: str, data_path: str, out_path: str) -> None:
    config = json.loads(open(config_path).read())
    x_train, params0 = load(data_path)
    cache: dict = {}
    results = []
    log_every = config.get("log_every", 10)
    eval_x = x_train[: config.get("eval_examples", 10000)]
    for run in config["runs"]:
        contender = Contender(config, run, x_train, params0, cache)
        steps = run["steps"]
        t0 = time.perf_counter()
        losses = [contender.step()]
        contender.block()
        first_step_time = (
            time.perf_counter() - t0
        )  # includes compilation on the first run of a mode
        times = [(1, 0.0)]
        wall = 0.0
        t_block = time.perf_counter()
        for step in range(1, steps):
            losses.append(contender.step())
            if (step + 1) % log_every == 0 or step == steps - 1:
                contender.block()
                now = time.perf_counter()
                wall += now - t_block
                t_block = now
                times.append((step + 1, wall))
        losses = [float(l) for l in losses]
        results.append(
            {
                **run,
                "first_step_time": first_step_time,
                "mean_step_time": wall / max(1, steps - 1),
                "losses": losses,
                "time_log": times,
                "final_full_loss": full_loss(contender.params, eval_x, config["l2_reg"])
                if config.get("eval", True)
                else None,
            }
        )
        print(
            json.dumps(
                {
                    "done": run["name"],
                    "mean_step_time": results[-1]["mean_step_time"],
                    "last_loss": losses[-1],
                }
            ),
            flush=True,
        )
    with open(out_path, "w") as f:
        json.dump({"library": library_version(), "jax": jax.__version__, "runs": results}, f)


def serve(config_path: str, data_path: str) -> None:
    config = json.loads(open(config_path).read())
    x_train, params0 = load(data_path)
    cache: dict = {}
    contenders = {}
    compile_times = {}
    for run in config["runs"]:
        c = Contender(config, run, x_train, params0, cache)
        t0 = time.perf_counter()
        # Warm up past the first inverse refresh and one damping adaptation so that every
        # compiled variant of the step exists before timing starts.
        for _ in range(config.get("warmup_steps", config["inverse_period"] + 1)):
            c.step()
        c.block()
        compile_times[run["name"]] = time.perf_counter() - t0
        contenders[run["name"]] = c
    print(
        json.dumps(
            {
                "ready": True,
                "library": library_version(),
                "jax": jax.__version__,
                "warmup_times": compile_times,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        c = contenders[cmd["name"]]
        c.block()
        t0 = time.perf_counter()
        for _ in range(cmd["steps"]):
            c.step()
        c.block()
        print(json.dumps({"name": cmd["name"], "seconds": time.perf_counter() - t0}), flush=True)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "serve":
        serve(*argv[1:3])
    elif argv and argv[0] == "train":
        train(*argv[1:4])
    elif len(argv) == 3:  # the original form: CONFIG DATA OUT
        train(*argv)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
