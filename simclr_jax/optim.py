"""Optimisers, learning-rate schedule and step arithmetic for SimCLR training.

LARS follows the SimCLR paper and the official TensorFlow optimiser (classic momentum, learning
rate applied inside the momentum). Biases and normalisation parameters get neither weight decay
nor trust-ratio adaptation; which leaves those are is decided from the parameter path
(:func:`decay_and_adaptation_mask`), never from a regular expression over variable names.
"""

import math
from typing import Any

import jax
import optax

# Flax linen names the bias of Dense/Conv ``bias`` and the affine parameters of BatchNorm,
# LayerNorm and GroupNorm ``scale`` and ``bias``.
_EXCLUDED_LEAF_NAMES = frozenset({"bias", "scale"})
# The online probe of `simclr_jax.models.SimCLR`: as in the official code (`head_supervised`),
# it gets neither weight decay nor trust-ratio scaling, so it learns at the plain learning rate.
_EXCLUDED_MODULE_NAMES = frozenset({"linear_probe"})

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt")


def _key_name(key: Any) -> str | None:
    """The name in one step of a pytree path: a dict key or an attribute (None otherwise)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return None


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    """The name of a leaf: the last dict key or attribute on its path (None if it has none)."""
    return _key_name(path[-1]) if path else None


def decay_and_adaptation_mask(params: Any) -> Any:
    """Returns a tree of bools like ``params``: True where weight decay and LARS adaptation apply.

    Rule: a leaf whose own name (the last key of its path) is ``bias`` or ``scale`` is excluded;
    with Flax linen modules that is every bias and every normalisation scale/offset. So is every
    leaf inside a module named ``linear_probe`` (SimCLR's online probe, as in the official code).
    Everything else (conv and dense ``kernel`` leaves, embeddings) is included. Only whole keys
    are compared, so a module named e.g. ``bias_head`` does not exclude its kernel.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            _leaf_name(path) not in _EXCLUDED_LEAF_NAMES
            and not any(_key_name(key) in _EXCLUDED_MODULE_NAMES for key in path[:-1])
        ),
        params,
    )


def lars(
    learning_rate: float | optax.Schedule,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """LARS as in SimCLR, applied leaf by leaf (one leaf = one layer's kernel, bias, ...).

    With ``w`` a leaf, ``g`` its gradient and ``v`` its momentum buffer:

        g <- g + weight_decay * w                               (masked leaves only)
        trust = trust_coefficient * |w| / |g|, or 1 if |w| or |g| is 0  (1 on excluded leaves)
        v <- momentum * v + lr * trust * g
        w <- w - v            (Nesterov: w <- w - (momentum * v + lr * trust * g))

    The mask is :func:`decay_and_adaptation_mask`: biases and normalisation parameters are
    excluded from both the weight decay and the trust ratio.
    """
    return optax.lars(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=decay_and_adaptation_mask,
        trust_coefficient=trust_coefficient,
        trust_ratio_mask=decay_and_adaptation_mask,
        momentum=momentum,
        nesterov=nesterov,
    )


def create_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    weight_decay: float,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """Builds the optimiser ``name``; weight decay always skips biases and normalisation params.

    - ``"lars"``: :func:`lars` (the SimCLR pretraining optimiser).
    - ``"sgd"``: Nesterov momentum SGD, with ``weight_decay * w`` added to the gradient (the
      official code's L2 regularisation, as a gradient term).
    - ``"adamw"``: AdamW (decoupled weight decay).
    """
    if name == "lars":
        return lars(learning_rate, weight_decay=weight_decay, momentum=momentum)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_and_adaptation_mask),
            optax.sgd(learning_rate, momentum=momentum, nesterov=True),
        )
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_and_adaptation_mask)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def scaled_learning_rate(base: float, global_batch_size: int, scaling: str) -> float:
    """The peak learning rate for a global batch of ``global_batch_size`` images (not views).

    ``"linear"``: ``base * B / 256`` (SimCLR default, base 0.3); ``"sqrt"``: ``base * sqrt(B)``
    (better for small batches / long training, base 0.075).
    """
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if scaling == "linear":
        return base * global_batch_size / 256.0
    if scaling == "sqrt":
        return base * math.sqrt(global_batch_size)
    raise ValueError(f"Unknown learning-rate scaling {scaling!r}; choose one of {LR_SCALINGS}.")


def warmup_cosine_schedule(
    peak_value: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak_value`` at ``warmup_steps``, then cosine decay to 0.

    The cosine runs over the ``total_steps - warmup_steps`` remaining steps and stays at 0 after
    ``total_steps``. With ``warmup_steps == 0`` the schedule starts at ``peak_value``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})."
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_value,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Optimisation steps in one pass over ``num_examples`` images.

    Counts full batches only (a pipeline that drops the remainder), and at least 1.
    """
    if num_examples <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"num_examples ({num_examples}) and global_batch_size ({global_batch_size}) "
            "must be positive."
        )
    return max(1, num_examples // global_batch_size)


def total_steps(num_examples: int, epochs: float, global_batch_size: int) -> int:
    """Length of a run, as the official code: ``num_examples * epochs // global_batch_size + 1``
    (``epochs`` may be fractional)."""
    if num_examples <= 0 or epochs <= 0 or global_batch_size <= 0:
        raise ValueError(
            f"num_examples ({num_examples}), epochs ({epochs}) and global_batch_size "
            f"({global_batch_size}) must be positive."
        )
    return int(num_examples * epochs // global_batch_size) + 1
