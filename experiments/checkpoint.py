"""Checkpoints of a training run: one file, written atomically, restored into the run's structure.

A checkpoint holds the leaves of a pytree (parameters, model state, optimizer state; PRNG
keys as their raw data), a JSON ``meta`` record and a few extra numpy arrays, serialised with
``flax.serialization``'s msgpack. :func:`fingerprint` hashes a run's configuration so that a
checkpoint from a different configuration is refused (:class:`CheckpointMismatch`).

Why flax's msgpack and not ``orbax.checkpoint``: orbax is the better tool where its strengths
apply (asynchronous saves that overlap training, coordinated multi-host writes, each host
writing the shards of its sharded arrays, checkpoint managers with retention), and every
optimizer state of ``sofim_optax`` is tested to round-trip through its
``StandardCheckpointer`` for users who train that way. None of those strengths applies to
this harness: it trains on one process and one device with unsharded arrays, and saves once
per epoch a state of at most tens of megabytes, which a synchronous write handles in a
fraction of a second against epochs of seconds to minutes. What it needs, msgpack gives
with less: an atomic write (a temporary file in the same folder, then ``os.replace``), one
self-contained file per run that is easy to copy and delete, the metadata and extra arrays
in the same file, and arrays orbax refuses (zero-size arrays) stored like any other. Orbax
would add a dependency with its own native stack (tensorstore) to the experiments' install
and turn each checkpoint into a folder of files, for no gain here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CheckpointMismatch", "fingerprint", "save_checkpoint", "load_checkpoint"]


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with a different configuration."""


def fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of a JSON-able configuration (keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _leaf_to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def _leaf_from_numpy(value: np.ndarray, template: Any) -> Any:
    if isinstance(template, jax.Array) and jax.dtypes.issubdtype(
        template.dtype, jax.dtypes.prng_key
    ):
        return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(template))
    if isinstance(template, (jax.Array, np.ndarray)):
        return jnp.asarray(value, dtype=template.dtype)
    if isinstance(template, (bool, int, float, np.generic)):
        return type(template)(value)
    return jnp.asarray(value)


def save_checkpoint(
    path: Path, tree: Any, meta: Mapping[str, Any], extra: Mapping[str, np.ndarray]
) -> None:
    """Atomically writes ``tree``'s leaves, the JSON ``meta`` and ``extra`` arrays (flax msgpack)."""
    from flax import serialization

    leaves = jax.tree_util.tree_leaves(tree)
    payload = {
        "meta": json.dumps(meta, default=str),
        "leaves": {str(i): _leaf_to_numpy(leaf) for i, leaf in enumerate(leaves)},
        "extra": {k: np.asarray(v) for k, v in extra.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(serialization.msgpack_serialize(payload))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, template: Any) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``template``."""
    from flax import serialization

    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        meta = json.loads(payload["meta"])
        stored = payload["leaves"]
    except Exception as err:  # msgpack raises several types for a damaged file
        raise CheckpointMismatch(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"
        ) from err
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(stored) != len(leaves):
        raise CheckpointMismatch(
            f"{path}: holds {len(stored)} arrays, this run's state has {len(leaves)}"
        )
    restored = []
    for i, leaf in enumerate(leaves):
        value = np.asarray(stored[str(i)])
        if value.shape != np.shape(_leaf_to_numpy(leaf)):
            raise CheckpointMismatch(
                f"{path}: array {i} has shape {value.shape}, expected {np.shape(leaf)}"
            )
        restored.append(_leaf_from_numpy(value, leaf))
    return jax.tree_util.tree_unflatten(treedef, restored), meta, dict(payload.get("extra", {}))
