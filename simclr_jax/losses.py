"""The SimCLR contrastive objective (NT-Xent) and the contrastive metrics logged with it.

Every function takes the projections ``z`` of a whole batch, shape ``[2N, d]``, with the two views
of image ``k`` on rows ``2k`` and ``2k + 1``: the positive of row ``i`` is row ``i ^ 1``. All other
rows are negatives. The functions are plain ``jnp`` code: called under ``jax.jit`` on a
batch-sharded global array they see the global batch, so the negatives are global and the gradient
is the one of a single-device computation (the compiler inserts the gathers).

The arithmetic is float32 whatever the input dtype (e.g. bfloat16 projections), with the
similarity matmul at full float32 precision and a log-sum-exp for the normaliser.
"""

import jax
import jax.numpy as jnp

# Floor on the squared row norm before normalising, as ``tf.math.l2_normalize``: zero rows stay
# zero (similarity 0 with everything) instead of producing NaN values or gradients.
_SQUARED_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm; zero rows stay zero (no NaN values or gradients)."""
    squared_norms = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norms, _SQUARED_NORM_EPS))


def _similarity_logits(z: jax.Array, temperature: float) -> jax.Array:
    """Returns the ``[2N, 2N]`` float32 matrix ``cos(z_i, z_j) / temperature`` (self included).

    Raises ValueError, at trace time, unless ``z`` is 2-D with an even, non-zero number of rows.
    """
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D [2N, d], got shape {z.shape}.")
    if z.shape[0] < 2 or z.shape[0] % 2:
        raise ValueError(
            f"z must have an even number (>= 2) of rows, two views per image, got {z.shape[0]}."
        )
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    z = l2_normalize(z.astype(jnp.float32))
    similarity = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
    return similarity / temperature


def nt_xent(z: jax.Array, temperature: float) -> jax.Array:
    """NT-Xent loss at the paper's scale: the mean of the per-anchor loss over all 2N anchors.

    For anchor ``i`` the loss is ``-log softmax_j(sim(i, j) / temperature)`` at its positive
    ``j = i ^ 1``, the softmax running over the 2N - 1 other rows (self-similarity removed), with
    ``sim`` the cosine similarity (rows are L2-normalised first).

    Scale: this returns the paper's ``L = mean_i loss_i``. The official TensorFlow code optimises
    ``mean over images of (loss_a + loss_b)``, which is ``2 * L``; multiply by 2 to compare with
    its logged ``contrastive_loss``, or to give the loss the official weight against other terms.

    Args:
      z: projections ``[2N, d]``, the two views of each image on adjacent rows; any float dtype.
      temperature: the softmax temperature ``tau > 0``.

    Returns:
      A float32 scalar.
    """
    logits = _similarity_logits(z, temperature)
    num_rows = logits.shape[0]
    rows = jnp.arange(num_rows)
    positive_logits = logits[rows, rows ^ 1]
    not_self = ~jnp.eye(num_rows, dtype=bool)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, where=not_self)
    return jnp.mean(log_normaliser - positive_logits)


def contrastive_metrics(z: jax.Array, temperature: float) -> dict[str, jax.Array]:
    """Contrastive top-1 accuracy and entropy, as logged by the official SimCLR code.

    Each anchor is compared with the N rows of the OTHER view (its positive and the other
    images' opposite views), as in the official metrics computed on the cross-view logits:

    - ``contrastive_accuracy``: fraction of anchors whose most similar other-view row is their
      positive.
    - ``contrastive_entropy``: mean entropy (nats) of the softmax of ``sim / temperature`` over
      those N rows.

    The official code averages over the first view's anchors only; here both views' anchors are
    averaged (same expectation, less noise, symmetric in the two views).

    Args:
      z: projections ``[2N, d]`` laid out as for :func:`nt_xent`.
      temperature: the softmax temperature used by the loss.

    Returns:
      A dict of float32 scalars.
    """
    logits = _similarity_logits(z, temperature)
    num_rows = logits.shape[0]
    rows = jnp.arange(num_rows)
    # Column 2k + v holds view v of image k; keep, for each anchor, the view it is not.
    by_view = logits.reshape(num_rows, num_rows // 2, 2)
    cross_view_logits = jnp.take_along_axis(by_view, (1 - rows % 2)[:, None, None], axis=2)[..., 0]
    positive_index = rows // 2
    accuracy = jnp.mean(jnp.argmax(cross_view_logits, axis=-1) == positive_index)
    log_probs = jax.nn.log_softmax(cross_view_logits, axis=-1)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    return {
        "contrastive_accuracy": accuracy.astype(jnp.float32),
        "contrastive_entropy": entropy,
    }
