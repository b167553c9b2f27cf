"""The contrastive losses (SimCLR's NT-Xent, supervised SupCon), the metrics logged with them, and
SimCLRv2's distillation loss (:func:`distillation_loss`, on class logits instead of projections).

Every function takes the projections ``z`` of a whole batch, shape ``[2N, d]``, with the two views
of image ``k`` on rows ``2k`` and ``2k + 1``: for NT-Xent the positive of row ``i`` is row
``i ^ 1`` and all other rows are negatives; SupCon adds the rows of the same class as positives.
:func:`multi_crop_nt_xent` takes the small views of multi-crop as further rows after those.
The functions are plain ``jnp`` code: called under ``jax.jit`` on a batch-sharded global array
they see the global batch, so the negatives are global and the gradient is the one of a
single-device computation (the compiler inserts the gathers).

The arithmetic is float32 whatever the input dtype (e.g. bfloat16 projections), with the
similarity matmul at full float32 precision and a log-sum-exp for the normaliser.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Floor on the squared row norm before normalising, as ``tf.math.l2_normalize``: zero rows stay
# zero (similarity 0 with everything) instead of producing NaN values or gradients.
_SQUARED_NORM_EPS = 1e-12

# The values of ``config.objective``: the contrastive loss :func:`contrastive_loss` computes.
OBJECTIVES = ("nt_xent", "supcon")
UNLABELLED = -1  # the label of a row without a class (e.g. STL-10's ``unlabelled`` split)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm; zero rows stay zero (no NaN values or gradients)."""
    squared_norms = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norms, _SQUARED_NORM_EPS))


def _check_projections(z: jax.Array, temperature: float, views_per_image: int = 2) -> None:
    """Raises ValueError, at trace time, unless ``z`` is 2-D with a non-zero multiple of
    ``views_per_image`` rows."""
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D [{views_per_image}N, d], got shape {z.shape}.")
    if z.shape[0] < views_per_image or z.shape[0] % views_per_image:
        raise ValueError(
            f"z must have {views_per_image}·N rows (N >= 1 images, {views_per_image} views "
            f"each), got {z.shape[0]}."
        )
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")


def _similarities(anchors: jax.Array, z: jax.Array, temperature: float) -> jax.Array:
    """``[b, 2N]`` float32 ``anchors @ z.T / temperature`` of unit rows, at full precision."""
    return jnp.matmul(anchors, z.T, precision=jax.lax.Precision.HIGHEST) / temperature


def _similarity_logits(z: jax.Array, temperature: float) -> jax.Array:
    """Returns the ``[2N, 2N]`` float32 matrix ``cos(z_i, z_j) / temperature`` (self included)."""
    _check_projections(z, temperature)
    z = l2_normalize(z.astype(jnp.float32))
    return _similarities(z, z, temperature)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"block_size must be a non-negative int (0 = dense), got {block_size!r}.")


def _per_anchor_blocks(
    row_fn: Callable[[jax.Array, jax.Array], Any],
    z: jax.Array,
    temperature: float,
    block_size: int,
) -> Any:
    """``row_fn(logits, rows)`` over blocks of ``block_size`` anchors, concatenated over rows.

    ``logits`` is a block's ``[block_size, 2N]`` similarity rows against all 2N columns and
    ``rows`` their global indices; ``row_fn`` returns per-row arrays ``[block_size, ...]``. The
    blocks run one after another (``lax.map``) and each is rematerialised in the backward pass
    (``jax.checkpoint``), so neither pass holds more than one block of logits: memory
    ``O(block_size * 2N)`` instead of ``O((2N)^2)``. The last block is padded with zero rows whose
    outputs are dropped, so any block size works.
    """
    _check_projections(z, temperature)
    z = l2_normalize(z.astype(jnp.float32))
    num_rows, dim = z.shape
    num_blocks = -(-num_rows // block_size)
    padded = jnp.pad(z, ((0, num_blocks * block_size - num_rows), (0, 0)))
    anchor_blocks = padded.reshape(num_blocks, block_size, dim)
    block_starts = jnp.arange(num_blocks) * block_size

    @jax.checkpoint
    def one_block(block: tuple[jax.Array, jax.Array]) -> Any:
        anchors, block_start = block
        rows = block_start + jnp.arange(block_size)
        return row_fn(_similarities(anchors, z, temperature), rows)

    per_block = jax.lax.map(one_block, (anchor_blocks, block_starts))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:num_rows], per_block)


def _per_anchor_nt_xent(logits: jax.Array, rows: jax.Array) -> jax.Array:
    """``log sum_{j != i} exp(logits[i, j]) - logits[i, i ^ 1]`` for each row ``i`` of a block.

    ``rows`` are the block's global row indices; indices past the last row (padding) give
    finite values that the caller drops.
    """
    num_columns = logits.shape[1]
    not_self = jnp.arange(num_columns)[None, :] != rows[:, None]
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, where=not_self)
    positives = jnp.minimum(rows ^ 1, num_columns - 1)
    positive_logits = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
    return log_normaliser - positive_logits


def nt_xent(z: jax.Array, temperature: float, block_size: int = 0) -> jax.Array:
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
      block_size: 0 builds the whole ``[2N, 2N]`` similarity matrix at once (fastest for small
        batches). A positive value computes the same loss and gradients ``block_size`` anchors at
        a time, forward and backward, holding only ``[block_size, 2N]`` logits: for batches
        whose similarity matrix does not fit in device memory. Any positive value works (the
        last block is padded).

    Returns:
      A float32 scalar.
    """
    _check_block_size(block_size)
    if block_size:
        return jnp.mean(_per_anchor_blocks(_per_anchor_nt_xent, z, temperature, block_size))
    logits = _similarity_logits(z, temperature)
    num_rows = logits.shape[0]
    rows = jnp.arange(num_rows)
    positive_logits = logits[rows, rows ^ 1]
    not_self = ~jnp.eye(num_rows, dtype=bool)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, where=not_self)
    return jnp.mean(log_normaliser - positive_logits)


def _check_labels(labels: jax.Array, z: jax.Array) -> None:
    """Raises ValueError, at trace time, unless ``labels`` is one integer per row of ``z``."""
    if labels.shape != z.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integers of shape [2N] = ({z.shape[0]},), one per row of z, got "
            f"{labels.dtype} {labels.shape}."
        )


def _per_anchor_supcon(logits: jax.Array, rows: jax.Array, labels: jax.Array) -> jax.Array:
    """``log sum_{a != i} exp(logits[i, a]) - mean_{p in P(i)} logits[i, p]`` per row of a block.

    ``P(i)`` is row ``i ^ 1`` plus, when ``labels[i] >= 0``, every other row with that label.
    Indices past the last row (padding) give finite values that the caller drops.
    """
    num_columns = logits.shape[1]
    columns = jnp.arange(num_columns)[None, :]
    anchor_labels = labels[jnp.minimum(rows, num_columns - 1)][:, None]
    not_self = columns != rows[:, None]
    same_class = (labels[None, :] == anchor_labels) & (anchor_labels != UNLABELLED)
    positive = not_self & (same_class | (columns == (rows ^ 1)[:, None]))
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, where=not_self)
    num_positives = jnp.maximum(jnp.sum(positive, axis=-1), 1)  # >= 1 except in padding
    mean_positive_logit = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / num_positives
    return log_normaliser - mean_positive_logit


def supcon(z: jax.Array, labels: jax.Array, temperature: float, block_size: int = 0) -> jax.Array:
    """Supervised contrastive loss (Khosla et al., 2020, ``L_out``): the mean over all 2N anchors.

    For anchor ``i`` with positives ``P(i)`` the loss is
    ``-1/|P(i)| sum_{p in P(i)} log softmax_a(sim(i, a) / temperature)[p]``, the softmax running
    over the 2N - 1 other rows of the (global) batch, ``sim`` the cosine similarity. ``P(i)`` is
    every other row with anchor ``i``'s label, its other view included.

    Rows labelled ``-1`` (:data:`UNLABELLED`) have one positive, their other view, and are never
    another row's positive: an unlabelled anchor gets its NT-Xent term, and a batch without labels
    gets exactly :func:`nt_xent`, as does a batch where every image has a class of its own
    (NT-Xent is SupCon with one class per image). Both views of an image carry its label.

    Args:
      z: projections ``[2N, d]`` laid out as for :func:`nt_xent`; any float dtype.
      labels: ``[2N]`` integers, the class of each row (``-1``: none).
      temperature: the softmax temperature ``tau > 0``.
      block_size: as for :func:`nt_xent`: 0 = the whole ``[2N, 2N]`` similarity matrix at once,
        otherwise the same loss and gradients ``block_size`` anchors at a time.

    Returns:
      A float32 scalar.
    """
    _check_block_size(block_size)
    _check_labels(labels, z)

    def per_anchor(logits: jax.Array, rows: jax.Array) -> jax.Array:
        return _per_anchor_supcon(logits, rows, labels)

    if block_size:
        return jnp.mean(_per_anchor_blocks(per_anchor, z, temperature, block_size))
    logits = _similarity_logits(z, temperature)
    return jnp.mean(per_anchor(logits, jnp.arange(logits.shape[0])))


def contrastive_loss(
    z: jax.Array,
    labels: jax.Array,
    temperature: float,
    *,
    objective: str = "nt_xent",
    block_size: int = 0,
) -> jax.Array:
    """The loss ``objective`` names (one of :data:`OBJECTIVES`): :func:`nt_xent`, which ignores
    ``labels``, or :func:`supcon`."""
    if objective == "nt_xent":
        return nt_xent(z, temperature, block_size)
    if objective == "supcon":
        return supcon(z, labels, temperature, block_size)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")


def _per_anchor_cross_view(logits: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each anchor row: (positive is the top other-view row, entropy over other-view rows)."""
    num_anchors, num_columns = logits.shape
    # Column 2k + v holds view v of image k; keep, for each anchor, the view it is not.
    by_view = logits.reshape(num_anchors, num_columns // 2, 2)
    cross_view_logits = jnp.take_along_axis(by_view, (1 - rows % 2)[:, None, None], axis=2)[..., 0]
    correct = jnp.argmax(cross_view_logits, axis=-1) == rows // 2
    log_probs = jax.nn.log_softmax(cross_view_logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return correct, entropy


def contrastive_metrics(
    z: jax.Array, temperature: float, block_size: int = 0
) -> dict[str, jax.Array]:
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
      block_size: as for :func:`nt_xent`: 0 = the whole similarity matrix at once, otherwise
        ``block_size`` anchors at a time.

    Returns:
      A dict of float32 scalars.
    """
    _check_block_size(block_size)
    if block_size:
        correct, entropy = _per_anchor_blocks(_per_anchor_cross_view, z, temperature, block_size)
    else:
        logits = _similarity_logits(z, temperature)
        correct, entropy = _per_anchor_cross_view(logits, jnp.arange(logits.shape[0]))
    return {
        "contrastive_accuracy": jnp.mean(correct).astype(jnp.float32),
        "contrastive_entropy": jnp.mean(entropy),
    }


def multi_crop_nt_xent(z: jax.Array, temperature: float, num_small_crops: int) -> jax.Array:
    """NT-Xent generalised to multi-crop (Caron et al., SwAV, 2020): 2 large + S small views.

    Layout of ``z`` (``[(2 + S)·N, d]``, S = ``num_small_crops``): rows ``0 .. 2N - 1`` are the
    large views exactly as for :func:`nt_xent` (image ``k`` on rows ``2k`` and ``2k + 1``); row
    ``2N + S·k + s`` is small view ``s`` of image ``k``. Every row is an anchor:

    - Large anchor ``i`` of image ``k``: one positive, the other large view ``i ^ 1``.
    - Small anchor ``i`` of image ``k``: two positives, the two large views of image ``k``
      (small views are never each other's positives, nor the large views').
    - Negatives of any anchor: every view, large or small, of every other image.
    - The normaliser of anchor ``i`` sums ``exp(sim(i, j) / temperature)`` over its positives
      and negatives only: the anchor itself and its image's views that are not its positives
      (for a large anchor its image's small views, for a small anchor its image's other small
      views) are left out.

    With ``P(i)`` the positives and ``A(i)`` the positives and negatives of anchor ``i``,
    ``loss_i = mean_{p in P(i)} [log sum_{j in A(i)} exp(sim(i, j) / τ) - sim(i, p) / τ]``, and
    the loss is the mean of ``loss_i`` over all ``(2 + S)·N`` anchors (each anchor weighs the
    same, a small one's two terms being averaged). ``sim`` is the cosine similarity.

    With S = 0 this is :func:`nt_xent` exactly (``A(i)`` is every other row). Computed densely,
    in float32 at full precision: the ``[(2 + S)N, (2 + S)N]`` logits are held at once (there is
    no blockwise form).

    Args:
      z: projections laid out as above; any float dtype.
      temperature: the softmax temperature ``tau > 0``.
      num_small_crops: S, the small views per image (>= 0).

    Returns:
      A float32 scalar.
    """
    if not isinstance(num_small_crops, int) or num_small_crops < 0:
        raise ValueError(f"num_small_crops must be a non-negative int, got {num_small_crops!r}.")
    _check_projections(z, temperature, views_per_image=2 + num_small_crops)
    num_images = z.shape[0] // (2 + num_small_crops)
    z = l2_normalize(z.astype(jnp.float32))
    logits = _similarities(z, z, temperature)
    rows = jnp.arange(z.shape[0])
    large = rows < 2 * num_images
    image = jnp.where(large, rows // 2, (rows - 2 * num_images) // max(num_small_crops, 1))
    same_image = image[:, None] == image[None, :]
    positive = same_image & large[None, :] & (rows[:, None] != rows[None, :])
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, where=positive | ~same_image)
    positive_logits = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / positive.sum(axis=-1)
    return jnp.mean(log_normaliser - positive_logits)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """SimCLRv2's distillation loss (Chen et al. 2020, §3), the mean over the batch of
    ``-sum_y P_T(y|x; τ) log P_S(y|x; τ)`` with ``P(y|x; τ) = softmax(logits / τ)``.

    The teacher's probabilities are soft targets: no gradient flows into ``teacher_logits``.
    Computed in float32 with ``log_softmax`` (stable for large logits or small τ); it is smallest,
    with zero gradient, where the student's logits equal the teacher's up to a constant per row.

    Args:
      student_logits: ``[N, C]``, any float dtype.
      teacher_logits: ``[N, C]``, any float dtype.
      temperature: τ > 0 (the paper uses 1).

    Returns:
      A float32 scalar.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both be [N, C], got {student_logits.shape} and "
            f"{teacher_logits.shape}."
        )
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    targets = jax.nn.softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1
    )
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))
