"""Supervised training on top of the pretrained encoder: linear evaluation with SGD and
fine-tuning (SimCLR §6), and the same network trained from scratch.

:class:`Classifier` puts a linear layer (zero-initialised) on ``h``, or on the output of the first
``head_layers`` hidden layers of the projection head (SimCLRv2's ``ft_proj_selector``). With
``frozen_encoder`` the encoder runs in inference mode under ``stop_gradient`` and only the linear
layer is trained (the paper's linear evaluation); otherwise every layer is trained and batch-norm
statistics are updated (fine-tuning). Training is Nesterov SGD with a cosine decay to 0 and no
weight decay, jitted over the data mesh with the batch sharded as in :mod:`simclr_jax.step`.
"""

import functools
from collections.abc import Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from simclr_jax import kernels, parallel, step
from simclr_jax.evaluation import features as feature_extraction
from simclr_jax.evaluation.linear_probe import top_k_accuracy
from simclr_jax.models import SimCLR

_CLASSIFIER = "classifier"


class Classifier(nn.Module):
    """``logits = Dense(num_classes)(g_k(f(x)))``; ``g_k`` the first hidden layers of the head."""

    encoder: nn.Module
    projection_head: nn.Module
    num_classes: int
    frozen_encoder: bool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.frozen_encoder:
            h = jax.lax.stop_gradient(self.encoder(x, train=False))
            h = jax.lax.stop_gradient(self.projection_head(h, train=False))
        else:
            h = self.projection_head(self.encoder(x, train=train), train=train)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name=_CLASSIFIER)(
            h.astype(jnp.float32)
        )


def classifier_for(
    model: SimCLR, num_classes: int, *, head_layers: int = 0, frozen_encoder: bool = False
) -> Classifier:
    """A :class:`Classifier` on the encoder and head of the SimCLR ``model``."""
    return Classifier(
        encoder=model.encoder.clone(parent=None),
        projection_head=model.projection_head.clone(parent=None, keep_layers=head_layers),
        num_classes=num_classes,
        frozen_encoder=frozen_encoder,
    )


def _take_pretrained(initial: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
    """``initial`` with every subtree also in ``pretrained`` (encoder, kept head layers) replaced
    by it; the classifier and anything absent from ``pretrained`` keep their initial values."""
    if not isinstance(initial, dict):
        return pretrained
    return {
        name: _take_pretrained(value, pretrained[name]) if name in pretrained else value
        for name, value in initial.items()
    }


def initial_state(
    classifier: Classifier,
    key: jax.Array,
    image_shape: tuple[int, int, int],
    learning_rate: optax.Schedule,
    pretrained: dict[str, Any] | None = None,
) -> step.TrainState:
    """The classifier's state: pretrained variables (``{"params", "batch_stats"}`` of a SimCLR
    model) where they exist, else random (training from scratch); Nesterov SGD, momentum 0.9.
    With a frozen encoder only the classifier's parameters have optimiser state."""
    variables = jax.jit(functools.partial(classifier.init, train=False))(
        key, jnp.zeros((1, *image_shape), jnp.float32)
    )
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if pretrained is not None:
        pretrained = jax.device_get(pretrained)  # copies: training donates its state's buffers
        params = _take_pretrained(params, pretrained["params"])
        batch_stats = _take_pretrained(batch_stats, pretrained["batch_stats"])
    tx = optax.sgd(learning_rate, momentum=0.9, nesterov=True)
    if classifier.frozen_encoder:
        labels = {name: "train" if name == _CLASSIFIER else "frozen" for name in params}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return step.TrainState.create(
        apply_fn=classifier.apply, params=params, batch_stats=batch_stats, tx=tx
    )


def train_step(state: step.TrainState, batch: dict[str, jax.Array]):
    """One SGD step on the mean cross-entropy of a ``{"image", "label"}`` batch."""

    def loss_fn(params):
        logits, batch_stats = step.apply_in_training(state, params, batch["image"])
        loss, accuracy = step.probe_loss_and_accuracy(logits, batch["label"])
        return loss, (batch_stats, accuracy)

    (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "accuracy": accuracy}


@functools.cache
def _jit_train_step(mesh: Mesh):
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=kernels.compiler_options(mesh),
    )


@functools.cache
def _jit_logits(mesh: Mesh):
    def logits(state, images):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return {"logits": state.apply_fn(variables, images, train=False)}

    return jax.jit(
        logits,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=parallel.batch_sharded(mesh),
        compiler_options=kernels.compiler_options(mesh),
    )


def num_steps(num_examples: int, epochs: float, batch_size: int) -> int:
    """Steps for ``epochs`` passes over ``num_examples`` at ``batch_size`` (at least 1)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}.")
    return max(1, round(num_examples * epochs / batch_size))


def cosine_learning_rate(base: float, batch_size: int, steps: int) -> optax.Schedule:
    """``base · B / 256`` decayed to 0 over ``steps`` with a cosine, no warm-up (SimCLR §6)."""
    return optax.cosine_decay_schedule(base * batch_size / 256, decay_steps=steps)


def train(
    state: step.TrainState,
    train_batches: Iterator[dict[str, np.ndarray]],
    steps: int,
    mesh: Mesh,
) -> tuple[step.TrainState, dict[str, jax.Array]]:
    """Trains ``state`` for ``steps`` batches of ``train_batches`` (process-local ``{"image",
    "label"}``); returns the trained state (replicated on ``mesh``) and the last step's
    ``{"loss", "accuracy"}``."""
    state = jax.device_put(state, parallel.replicated(mesh))
    train_step_fn = _jit_train_step(mesh)
    metrics = {}
    for _ in range(steps):
        state, metrics = train_step_fn(
            state, parallel.host_batch_to_global(next(train_batches), mesh)
        )
    return state, metrics


def score(
    state: step.TrainState, eval_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh
) -> dict[str, float]:
    """The classifier's ``{"top1", "top5" (>= 5 classes)}`` on ``eval_batches`` (one pass)."""
    logits = feature_extraction.extract_features(
        _jit_logits(mesh), state, eval_batches, mesh, ("logits",)
    )
    result = {"top1": float(top_k_accuracy(logits["logits"], logits["label"], 1))}
    if logits["logits"].shape[-1] >= 5:
        result["top5"] = float(top_k_accuracy(logits["logits"], logits["label"], 5))
    return result


def train_and_score(
    state: step.TrainState,
    train_batches: Iterator[dict[str, np.ndarray]],
    steps: int,
    eval_batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
) -> tuple[dict[str, float], step.TrainState]:
    """:func:`train`, then :func:`score` on the eval split: ``{"top1", "top5" (>= 5 classes),
    "train_loss"}``, and the trained state."""
    state, metrics = train(state, train_batches, steps, mesh)
    return {**score(state, eval_batches, mesh), "train_loss": float(metrics["loss"])}, state
