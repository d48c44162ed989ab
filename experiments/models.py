"""Flax (linen) models used by the experiment scripts.

Classifiers map a batch of images ``(N, H, W, C)`` (or flat ``(N, D)``
vectors, reshaped to square single-channel images where a model needs a grid)
to logits; autoencoders map ``(N, D)`` to reconstruction logits (or means)
of the same size. Weight layers are ``nn.Dense``, ``nn.Conv`` and (in the vision
transformer's attention) ``nn.DenseGeneral``, the layers whose statistics the
curvature-based optimizers capture; other parameters (normalisation scales and
offsets, the transformer's class token and position embeddings) get the optimizers'
documented fallback.

Normalisation in the residual and VGG nets (``norm=``):

* ``"batch"`` (default, as in the papers): ``nn.BatchNorm``; its running
  statistics live in the ``batch_stats`` collection, which
  :func:`experiments.loop.train` carries as mutable state
  (``train=True`` in training steps, running averages at evaluation);
* ``"group"``: ``nn.GroupNorm`` (no state; per-example, so the statistics the
  curvature methods capture are not mixed across the batch);
* ``"none"``: no normalisation (biases on the convolutions instead).

Registries: :data:`CLASSIFIERS` (``make_model``) and :data:`AUTOENCODERS`
(``make_autoencoder``); ``MODELS`` is kept as an alias of the classifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "MLP",
    "SmallCNN",
    "Autoencoder",
    "ResNet",
    "VGG",
    "ViT",
    "CLASSIFIERS",
    "MODELS",
    "AUTOENCODERS",
    "AUTOENCODER_SIZES",
    "make_model",
    "make_autoencoder",
]


def _as_image(x: jnp.ndarray) -> jnp.ndarray:
    """Flat ``(N, side*side)`` vectors become ``(N, side, side, 1)`` images; images pass through."""
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"cannot reshape flat inputs of size {x.shape[1]} to a square image")
        return x.reshape((x.shape[0], side, side, 1))
    if x.ndim == 3:
        return x[..., None]
    return x


class MLP(nn.Module):
    """A ReLU multilayer perceptron.

    ``Dense(h) -> relu`` for each hidden width, then ``Dense(num_classes)``.
    """

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """Two 3×3 convolutions with stride 2 (32 and 64 channels, ReLU), a hidden Dense(128), logits."""

    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _as_image(x)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class Autoencoder(nn.Module):
    """The deep autoencoder of the KFAC, K-BFGS and KPSVD papers (Hinton & Salakhutdinov 2006 sizes).

    ``encoder`` widths go down to the code (784-1000-500-250-30 for MNIST-like
    data), the decoder mirrors them back to ``output_dim``. ReLU after every
    layer except the code layer (linear, as in the K-BFGS code; Koroko et al.'s
    code puts a ReLU there too: ``code_activation=True``) and the output
    (logits for a sigmoid cross-entropy summed over pixels, or means for a
    squared error). Layers are named ``Dense_0`` … in order, so ``layer_stats``
    keys are those names.
    """

    encoder: Sequence[int] = (1000, 500, 250, 30)
    output_dim: int = 784
    code_activation: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        widths = list(self.encoder) + list(reversed(self.encoder[:-1])) + [self.output_dim]
        code_layer = len(self.encoder) - 1
        for i, width in enumerate(widths):
            x = nn.Dense(width)(x)
            if i == len(widths) - 1:
                break
            if i != code_layer or self.code_activation:
                x = nn.relu(x)
        return x


# ---------------------------------------------------------------------------
# Residual and VGG nets
# ---------------------------------------------------------------------------


def _norm(kind: str, train: bool, name: str | None = None) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    if kind == "group":
        return lambda x: nn.GroupNorm(num_groups=min(8, x.shape[-1]), name=name)(x)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class _BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016)."""

    features: int
    strides: int = 1
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = partial(
            nn.Conv, use_bias=self.norm == "none", kernel_init=nn.initializers.he_normal()
        )
        y = conv(self.features, (3, 3), strides=(self.strides, self.strides), padding="SAME")(x)
        y = nn.relu(_norm(self.norm, train)(y))
        y = conv(self.features, (3, 3), padding="SAME")(y)
        y = _norm(self.norm, train)(y)
        if x.shape[-1] != self.features or self.strides != 1:
            # Projection shortcut (option B of He et al.), a captured 1×1 conv.
            x = conv(self.features, (1, 1), strides=(self.strides, self.strides))(x)
            x = _norm(self.norm, train)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Residual nets for 32×32 inputs.

    ``stage_sizes=(3, 3, 3), widths=(16, 32, 64)`` is ResNet-20 and
    ``(5, 5, 5)`` ResNet-32 (He et al. 2016, CIFAR variant: a 3×3 stem and
    three stages, global average pooling). ``stage_sizes=(2, 2, 2, 2),
    widths=(64, 128, 256, 512)`` is ResNet-18 in its usual CIFAR form (3×3 stem
    of 64 channels, no max-pool). Shortcuts that change shape are 1×1
    convolutions (option B) rather than the zero-padding of option A, so that
    every weight sits in a captured layer.
    """

    stage_sizes: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _as_image(x)
        x = nn.Conv(
            self.widths[0],
            (3, 3),
            padding="SAME",
            use_bias=self.norm == "none",
            kernel_init=nn.initializers.he_normal(),
        )(x)
        x = nn.relu(_norm(self.norm, train)(x))
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = _BasicBlock(width, strides, self.norm)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


VGG_CONFIGS: dict[str, tuple] = {
    "11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-style net for 32×32 inputs: 3×3 convolutions (+ norm + ReLU), 2×2 max-pools, one Dense.

    ``config="16"`` is VGG-16's convolution stack with batch norm and no
    dropout (the setup of the MBF authors' CIFAR-100 runs); ``"11"`` is the
    lighter VGG-11. ``width`` scales every channel count.
    """

    config: str = "16"
    num_classes: int = 10
    norm: str = "batch"
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = _as_image(x)
        for item in VGG_CONFIGS[self.config]:
            if item == "M":
                if x.shape[1] >= 2:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.Conv(
                max(1, int(item * self.width)), (3, 3), padding="SAME", use_bias=self.norm == "none"
            )(x)
            x = nn.relu(_norm(self.norm, train)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class ViT(nn.Module):
    """A small vision transformer: non-overlapping patches, a class token, pre-norm blocks.

    The image is cut into ``patch × patch`` patches (7×7 on 28×28 images: 16 tokens), each
    flattened and mapped to ``width`` by a ``Dense`` (``patch_embed``); a learnt class token
    is prepended and learnt position embeddings added (17 tokens). Each of the ``depth``
    blocks is ``x + attention(LayerNorm(x))`` then ``x + MLP(LayerNorm(x))``, with
    ``nn.MultiHeadDotProductAttention`` (``heads`` heads; its query, key, value and output
    projections are ``DenseGeneral`` layers) and an MLP ``Dense(mlp_ratio·width) → GELU →
    Dense(width)``. The logits are a ``Dense`` of the class token after a final LayerNorm.

    Captured by the curvature methods: the patch embedding, the four projections of each
    attention, both MLP layers and the head. The class token, the position embeddings and the
    LayerNorm scales and biases take the methods' fallback.
    """

    patch: int = 7
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _as_image(x)
        n, h, w, c = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"ViT: image {h}x{w} is not a whole number of {p}x{p} patches")
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = nn.Dense(self.width, name="patch_embed")(x.reshape(n, -1, p * p * c))
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        x = x + pos
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"norm_attn_{i}")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"attn_{i}")(y)
            y = nn.LayerNorm(name=f"norm_mlp_{i}")(x)
            y = nn.gelu(nn.Dense(self.mlp_ratio * self.width, name=f"mlp_in_{i}")(y))
            x = x + nn.Dense(self.width, name=f"mlp_out_{i}")(y)
        x = nn.LayerNorm(name="norm_out")(x[:, 0])
        return nn.Dense(self.num_classes, name="head")(x)


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet20": partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64)),
    "resnet32": partial(ResNet, stage_sizes=(5, 5, 5), widths=(16, 32, 64)),
    "resnet18": partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "vgg16": partial(VGG, config="16"),
    "vgg11": partial(VGG, config="11"),
    "vit": ViT,
}
MODELS = CLASSIFIERS  # the name used before the autoencoders got their own registry

# (encoder widths down to the code, output size) of the papers' autoencoders.
AUTOENCODER_SIZES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist": ((1000, 500, 250, 30), 784),
    "fashion-mnist": ((1000, 500, 250, 30), 784),
    "faces": ((2000, 1000, 500, 30), 625),
    "curves": ((400, 200, 100, 50, 25, 6), 784),
}
AUTOENCODERS = ("paper", "small")


def make_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Returns the classifier registered under ``name`` (one of ``CLASSIFIERS``)."""
    try:
        factory = CLASSIFIERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CLASSIFIERS)}") from None
    return factory(num_classes=num_classes, **kwargs)


def make_autoencoder(name: str, dataset: str, input_dim: int | None = None) -> Autoencoder:
    """An autoencoder by name.

    ``"paper"``: the papers' autoencoder for ``dataset``; ``"small"``:
    256-128-64-16 mirrored (quick runs).
    """
    if name == "small":
        return Autoencoder(encoder=(256, 128, 64, 16), output_dim=input_dim or 784)
    if name != "paper":
        raise ValueError(f"unknown autoencoder {name!r}; choose one of {AUTOENCODERS}")
    try:
        encoder, out = AUTOENCODER_SIZES[dataset]
    except KeyError:
        raise ValueError(
            f"no paper autoencoder for {dataset!r}; known: {sorted(AUTOENCODER_SIZES)}"
        ) from None
    if input_dim is not None and input_dim != out:
        raise ValueError(
            f"the {dataset} autoencoder expects {out} inputs, the data have {input_dim}"
        )
    return Autoencoder(encoder=encoder, output_dim=out)
