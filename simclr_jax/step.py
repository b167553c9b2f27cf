"""The SimCLR training step: a pure function, and its ``jax.jit`` wrapper over a data mesh.

A batch is ``{"views": [B, 2, H, W, C] float32, "label": [B] int32}``: each example's two
augmented views side by side, so that a pair never straddles devices. The step flattens it to
``[2B, H, W, C]`` with the views of image ``k`` at rows ``2k`` and ``2k + 1`` (the layout
:func:`simclr_jax.losses.nt_xent` expects), runs the model in training mode, and optimises the
contrastive loss on ``z`` (NT-Xent, or SupCon on the batch's labels: ``objective``) plus the
online probe's cross-entropy on ``stop_gradient(h)`` (plus, with a
:class:`simclr_jax.reconstruction.HybridObjective`, the reconstruction terms). With multi-crop
the batch also holds ``"small_views": [B, S, h, w, C]``, and :func:`multi_crop_loss` replaces the
contrastive loss.

``loss_and_gradients`` and ``train_step`` are pure: they see the global batch and know nothing of
devices. ``jit_train_step`` compiles ``train_step`` for a mesh.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from simclr_jax import kernels, losses, parallel, reconstruction
from simclr_jax.models.decoder import SAMPLE_RNG

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# The model's ``sample`` RNG key is the step key folded with this (the ``dropout`` key is the step
# key itself), so the two streams are independent.
_SAMPLE_KEY_FOLD = 1


class TrainState(train_state.TrainState):
    """Flax train state plus the batch-norm running statistics."""

    batch_stats: Any


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    image_shape: tuple[int, int, int],
) -> TrainState:
    """Initialises ``model`` on an ``[1, H, W, C]`` input and wraps it with optimiser ``tx``."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(key, dummy)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )


def flatten_views(views: jax.Array) -> jax.Array:
    """``[B, 2, H, W, C]`` -> ``[2B, H, W, C]``, the two views of image k at rows 2k and 2k+1."""
    return views.reshape((-1, *views.shape[2:]))


def probe_loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and top-1 accuracy of the probe over the labelled examples.

    Examples labelled ``-1`` (unlabelled splits such as STL-10's) are left out; a batch without
    any label gives zero loss and zero accuracy.
    """
    logits = logits.astype(jnp.float32)
    labelled = labels >= 0
    count = jnp.maximum(labelled.sum(), 1)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    correct = jnp.argmax(logits, axis=-1) == labels
    return (cross_entropy * labelled).sum() / count, (correct & labelled).sum() / count


def apply_in_training(
    state: TrainState, params: Any, images: jax.Array, key: jax.Array | None = None
) -> tuple[Any, Any]:
    """``state``'s model with ``params`` on ``images`` in training mode: its outputs and the
    updated batch statistics. ``key`` (when given) feeds the ``dropout`` stream and, folded, the
    ``sample`` stream."""
    rngs = (
        {}
        if key is None
        else {"dropout": key, SAMPLE_RNG: jax.random.fold_in(key, _SAMPLE_KEY_FOLD)}
    )
    outputs, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs=rngs,
    )
    return outputs, updates["batch_stats"]


def loss_and_gradients(
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    *,
    temperature: float,
    loss_block_size: int = 0,
    objective: str = "nt_xent",
    hybrid: reconstruction.HybridObjective | None = None,
) -> tuple[tuple[jax.Array, dict[str, Any]], Any]:
    """``((loss, aux), grads)`` of the SimCLR objective at ``state.params`` on a (global) batch.

    ``loss_block_size`` > 0 computes the contrastive loss that many anchors at a time (same value
    and gradients, memory ``O(block * 2B)`` instead of ``O((2B)^2)``; see :func:`losses.nt_xent`).

    The loss is the paper-scale contrastive loss on ``z`` (``objective``: ``"nt_xent"``, or
    ``"supcon"``, :func:`losses.supcon` with the batch's labels, both views of an example sharing
    its label) plus the probe's cross-entropy; the probe sees ``stop_gradient(h)``, so neither
    term changes the other's parameters. ``aux`` holds the model outputs, the updated batch-norm
    statistics and the loss terms. With ``hybrid``, its λ·MSE (+ β·KL) is added and its
    unweighted terms are in ``aux["hybrid_terms"]``; the model's ``sample`` RNG stream gets a key
    derived from ``key``.
    """
    images = flatten_views(batch["views"])
    labels = jnp.repeat(batch["label"], 2)

    def loss_fn(params):
        outputs, batch_stats = apply_in_training(state, params, images, key)
        if "small_views" in batch:
            contrastive_loss = multi_crop_loss(state, params, outputs["z"], batch, key, temperature)
        else:
            contrastive_loss = losses.contrastive_loss(
                outputs["z"], labels, temperature, objective=objective, block_size=loss_block_size
            )
        probe_loss, probe_accuracy = probe_loss_and_accuracy(outputs["logits"], labels)
        loss = contrastive_loss + probe_loss
        hybrid_terms = {}
        if hybrid is not None:
            hybrid_loss, hybrid_terms = hybrid.loss(outputs, images, batch)
            loss = loss + hybrid_loss
        aux = {
            "outputs": outputs,
            "batch_stats": batch_stats,
            "contrastive_loss": contrastive_loss,
            "probe_loss": probe_loss,
            "probe_accuracy": probe_accuracy,
            "hybrid_terms": hybrid_terms,
        }
        return loss, aux

    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


def multi_crop_loss(
    state: TrainState,
    params: Any,
    z: jax.Array,
    batch: Batch,
    key: jax.Array,
    temperature: float,
) -> jax.Array:
    """Multi-crop's contrastive loss: the large views' projections ``z`` ``[2B, d]`` together
    with those of ``batch["small_views"]`` ``[B, S, h, w, C]``, by
    :func:`losses.multi_crop_nt_xent` (each small view an anchor whose positives are its image's
    two large views).

    The small views run through the model in a second call with the same ``params``, in training
    mode: batch norm normalises them with their own batch statistics (one resolution per call,
    as the usual multi-crop implementations do), and the running statistics this call computes
    are discarded: the state keeps those of the large views, the resolution the encoder is
    evaluated at. Every metric other than the loss is computed on the large views only.
    """
    small_views = batch["small_views"]
    small_outputs, _ = apply_in_training(state, params, flatten_views(small_views), key)
    z = jnp.concatenate([z, small_outputs["z"].astype(z.dtype)])
    return losses.multi_crop_nt_xent(z, temperature, small_views.shape[1])


def train_step(
    state: TrainState,
    batch: Batch,
    key: jax.Array,
    *,
    temperature: float,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    loss_block_size: int = 0,
    objective: str = "nt_xent",
    hybrid: reconstruction.HybridObjective | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimisation step on a (global) batch; returns the new state and scalar metrics.

    ``key`` feeds the model's ``dropout`` RNG stream (unused by the standard SimCLR model); derive
    it per step, e.g. ``jax.random.fold_in(base_key, step)``. Whatever the ``objective``, the
    loss is logged as ``contrastive_loss`` and the contrastive metrics are NT-Xent's (each view's
    other view against the other images').
    """
    (loss, aux), grads = loss_and_gradients(
        state,
        batch,
        key,
        temperature=temperature,
        loss_block_size=loss_block_size,
        objective=objective,
        hybrid=hybrid,
    )
    new_state = state.apply_gradients(grads=grads, batch_stats=aux["batch_stats"])
    metrics = {
        "loss": loss,
        "contrastive_loss": aux["contrastive_loss"],
        **losses.contrastive_metrics(aux["outputs"]["z"], temperature, loss_block_size),
        "probe_loss": aux["probe_loss"],
        "probe_accuracy": aux["probe_accuracy"],
        **aux["hybrid_terms"],
        "learning_rate": learning_rate_fn(state.step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_state.params),
    }
    return new_state, metrics


def jit_train_step(
    mesh: Mesh,
    *,
    temperature: float,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    loss_block_size: int = 0,
    objective: str = "nt_xent",
    hybrid: reconstruction.HybridObjective | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """:func:`train_step` compiled for ``mesh``: state replicated and donated, batch sharded.

    The global batch must split evenly over the mesh (see
    :func:`simclr_jax.parallel.check_global_batch_size`). Batch-norm statistics and negatives are
    global: the compiler inserts the cross-device reductions.
    """
    step = functools.partial(
        train_step,
        temperature=temperature,
        learning_rate_fn=learning_rate_fn,
        loss_block_size=loss_block_size,
        objective=objective,
        hybrid=hybrid,
    )
    replicated = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, parallel.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=kernels.compiler_options(mesh),
    )


def embed_step(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
    """The model in inference mode (running BN statistics): ``h``, ``z`` and probe logits."""
    return state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )


def jit_embed_step(mesh: Mesh) -> Callable[[TrainState, jax.Array], dict[str, jax.Array]]:
    """:func:`embed_step` compiled for ``mesh``: images sharded on axis 0, outputs likewise."""
    return jax.jit(
        embed_step,
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=parallel.batch_sharded(mesh),
        compiler_options=kernels.compiler_options(mesh),
    )
