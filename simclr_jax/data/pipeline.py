"""tf.data input pipelines: endless, resumable SimCLR pretraining batches and one-pass evaluation.

Each process reads its own slice of the split (see `sources`) and yields host batches of NumPy
arrays, which the trainer assembles into global arrays. TensorFlow runs on the CPU only
(importing `augment` hides every GPU from it).

Pretraining stream (`pretrain_batches`): the slice is read epoch after epoch, each epoch shuffled
with its own seed, derived from (seed, process index, epoch). When the dataset's images share one
size, each batch is augmented at once (`augment.simclr_views_batch`) with a seed derived from
(seed, process index, step); otherwise each example is augmented on its own
(`augment.simclr_views`) with a seed derived from (seed, process index, the example's position
in this process's endless stream). Either way the stream is a pure function of its
arguments: thread scheduling cannot change it, and a stream started at step k skips the records
before step k (at most one epoch of reading, no augmentation) and then yields exactly what a
stream started at step 0 yields from its k-th batch on. The shuffle buffer bounds how far an
epoch is mixed: with a buffer at least as large as the slice, each epoch is a uniform random
permutation. With `cache`, the slice is decoded once and kept in memory.

Evaluation stream (`eval_batches`): one pass in order. Every process yields the same number of
batches, `num_batches(ceil(num_examples / process_count), host_batch_size)`, padding its last
batch(es) with masked rows (zero image, label -1, mask False), so processes stay in lock-step and
every example is evaluated exactly once across processes.
"""

from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from simclr_jax.data.augment import (
    AugmentConfig,
    eval_preprocess,
    linear_eval_augment,
    simclr_views,
    simclr_views_batch,
    small_views,
    small_views_batch,
)
from simclr_jax.data.metadata import DatasetInfo
from simclr_jax.data.sources import UNLABELLED, dataset_info, open_source, prepare_dataset

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "eval_batches",
    "examples_at",
    "labelled_batches",
    "num_batches",
    "prepare_dataset",
    "pretrain_batches",
    "split_labels",
]

DEFAULT_SHUFFLE_BUFFER = 50_000
# Sub-streams of randomness derived from the user's seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
# Multi-crop's small views: folded into the key of a batch (or example), so that the large views
# are the same with or without small crops.
_SMALL_VIEWS_STREAM = 1


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches needed to cover `num_examples` when the last batch may be partial (padded)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def pretrain_batches(
    name: str,
    split: str,
    *,
    host_batch_size: int,
    augment_config: AugmentConfig,
    seed: int,
    start_step: int = 0,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
    cache: bool = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    process_index: int | None = None,
    process_count: int | None = None,
    with_input_image: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches `{"views": float32 [b, 2, S, S, C], "label": int32 [b]}` of this process.

    `views[i]` are two independent SimCLR augmentations of one example (values in [0, 1]);
    `label` is its class (-1 when unlabelled). Batches are full (`b = host_batch_size`); the
    stream restarted with `start_step=k` continues exactly where step k of the original left
    off. `cache` keeps the decoded slice in memory: right for small datasets, not ImageNet.
    The process index and count default to JAX's. `with_input_image` adds `"image": float32
    [b, S, S, C]`, the un-augmented example resized to the view size (as `eval_preprocess`
    does), e.g. as a reconstruction target; the views are the same with or without it.
    With multi-crop (`augment_config.num_small_crops` = n > 0) the batch also holds
    `"small_views": float32 [b, n, s, s, C]` (`augment.small_views_batch`, `s` =
    `augment_config.small_crop_size`), drawn from their own seed: `views` are the same with or
    without them.
    """
    if host_batch_size <= 0:
        raise ValueError(f"host_batch_size must be positive, got {host_batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    if shuffle_buffer <= 0:
        raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
    process_index, process_count = _process(process_index, process_count)
    source = open_source(
        name,
        split,
        process_index=process_index,
        process_count=process_count,
        data_dir=data_dir,
        dataset_dir=dataset_dir,
    )

    def decode(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": source.decode_image(record["image"]), "label": record["label"]}

    records = source.records
    if cache:  # Decoded once, then kept in memory.
        records = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
    slice_size = _slice_size(records, name, split)
    if slice_size == 0:
        raise ValueError(
            f"Process {process_index}'s slice of split {split!r} of {name!r} is empty; "
            "use fewer processes or a larger split."
        )
    start_position = start_step * host_batch_size
    first_epoch, offset = divmod(start_position, slice_size)
    process_key = tf.random.experimental.stateless_fold_in(
        tf.constant([0, seed], tf.int64), process_index
    )
    shuffle_key = tf.random.experimental.stateless_fold_in(process_key, _SHUFFLE_STREAM)
    augment_key = tf.random.experimental.stateless_fold_in(process_key, _AUGMENT_STREAM)
    buffer_size = min(shuffle_buffer, slice_size)

    def shuffled_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
        epoch_seed = tf.random.stateless_uniform(
            [], epoch_key, minval=None, maxval=None, dtype=tf.int64
        )
        return records.shuffle(buffer_size, seed=epoch_seed, reshuffle_each_iteration=False)

    def add_input_image(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        input_image = eval_preprocess(example["image"], augment_config.image_size)
        return {**example, "input_image": input_image}

    def with_views(
        examples: dict[str, tf.Tensor], key: tf.Tensor, views_fn, small_views_fn
    ) -> dict[str, tf.Tensor]:
        views = views_fn(examples["image"], key, augment_config)
        out = {"views": views, "label": examples["label"]}
        if with_input_image:
            out["image"] = examples["input_image"]
        if augment_config.num_small_crops:
            small_key = tf.random.experimental.stateless_fold_in(key, _SMALL_VIEWS_STREAM)
            out["small_views"] = small_views_fn(examples["image"], small_key, augment_config)
        return out

    def augment_batch(step: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        step_key = tf.random.experimental.stateless_fold_in(augment_key, step)
        return with_views(batch, step_key, simclr_views_batch, small_views_batch)

    def augment_example(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example_key = tf.random.experimental.stateless_fold_in(augment_key, position)
        return with_views(example, example_key, simclr_views, small_views)

    examples = tf.data.Dataset.counter(first_epoch).flat_map(shuffled_epoch).skip(offset)
    if not cache:
        examples = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    if with_input_image:
        examples = examples.map(add_input_image, num_parallel_calls=tf.data.AUTOTUNE)
    height, width, _ = source.info.image_shape
    if height is not None and width is not None:
        # Images of one size: augment whole batches, in far fewer ops than one by one.
        batches = (
            examples.batch(host_batch_size, drop_remainder=True)
            .enumerate(start=start_step)
            .map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        )
        return _as_numpy(batches)
    examples = examples.enumerate(start=start_position).map(
        augment_example, num_parallel_calls=tf.data.AUTOTUNE
    )
    return _host_batches(examples, host_batch_size)


def eval_batches(
    name: str,
    split: str,
    *,
    host_batch_size: int,
    image_size: int,
    center_crop_fraction: float | None = None,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass of `{"image": float32 [b, S, S, C], "label": int32 [b], "mask": bool [b]}`.

    Examples come in split order, preprocessed by `augment.eval_preprocess`; rows with
    `mask=False` are padding and must be ignored. Every process yields the same number of full
    batches (see the module docstring), and each example of the split appears in exactly one
    process's stream, exactly once.
    """
    if host_batch_size <= 0:
        raise ValueError(f"host_batch_size must be positive, got {host_batch_size}")
    process_index, process_count = _process(process_index, process_count)
    source = open_source(
        name,
        split,
        process_index=process_index,
        process_count=process_count,
        data_dir=data_dir,
        dataset_dir=dataset_dir,
    )
    slice_size = _slice_size(source.records, name, split)
    largest_slice = num_batches(source.info.num_examples, process_count)
    if slice_size > largest_slice:
        raise ValueError(
            f"Split {split!r} of {name!r} has {source.info.num_examples} examples in its "
            f"metadata, but this process's slice of it holds {slice_size} (more than "
            f"{largest_slice}); the dataset's files and metadata disagree."
        )
    padded_size = num_batches(largest_slice, host_batch_size) * host_batch_size

    def preprocess(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = eval_preprocess(
            source.decode_image(record["image"]), image_size, center_crop_fraction
        )
        return {"image": image, "label": record["label"], "mask": tf.constant(True)}

    examples = source.records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    padding_row = {
        "image": tf.zeros([image_size, image_size, source.info.image_shape[-1]], tf.float32),
        "label": tf.constant(UNLABELLED, tf.int32),
        "mask": tf.constant(False),
    }
    padding = tf.data.Dataset.from_tensors(padding_row).repeat(padded_size - slice_size)
    return _host_batches(examples.concatenate(padding), host_batch_size)


def split_labels(
    name: str, split: str, *, data_dir: str | None = None, dataset_dir: str | None = None
) -> np.ndarray:
    """The labels ``int32 [num_examples]`` of the whole split, in split order (no image decoded)."""
    source = open_source(
        name, split, process_index=0, process_count=1, data_dir=data_dir, dataset_dir=dataset_dir
    )
    labels = source.records.map(lambda record: record["label"]).batch(65536)
    return np.concatenate([np.zeros(0, np.int32), *labels.as_numpy_iterator()]).astype(np.int32)


def _records_at(source, indices: np.ndarray) -> tf.data.Dataset:
    """The records at positions ``indices`` of the whole split ``source``, in split order."""
    indices = np.asarray(indices)
    num_examples = source.info.num_examples
    if indices.size == 0 or indices.min() < 0 or indices.max() >= num_examples:
        raise ValueError(
            f"indices must be a non-empty selection of positions in [0, {num_examples}) "
            f"of the split, got {indices.size} indices."
        )
    selected = np.zeros(num_examples, bool)
    selected[indices] = True
    selected = tf.constant(selected)
    return (
        source.records.enumerate()
        .filter(lambda position, _: selected[position])
        .map(lambda _, record: record)
    )


def labelled_batches(
    name: str,
    split: str,
    indices: np.ndarray,
    *,
    host_batch_size: int,
    image_size: int,
    seed: int,
    labelled: np.ndarray | None = None,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``{"image": float32 [b, S, S, C], "label": int32 [b]}`` of a labelled subset.

    For supervised training on the examples at ``indices`` of the split (label budgets, fine-
    tuning, distillation): each image is augmented with random crop + resize and flip
    (:func:`augment.linear_eval_augment`), seeded by its position in the stream. Each process
    takes its own share of the subset and reshuffles it every epoch (buffer = the whole share).
    With ``labelled`` (positions in the split), only those examples keep their label; the others
    are labelled -1 (``UNLABELLED``), as a distillation student's unlabelled images are.
    """
    if host_batch_size <= 0:
        raise ValueError(f"host_batch_size must be positive, got {host_batch_size}")
    process_index, process_count = _process(process_index, process_count)
    source = open_source(
        name, split, process_index=0, process_count=1, data_dir=data_dir, dataset_dir=dataset_dir
    )
    share = len(np.unique(indices)[process_index::process_count])
    if share == 0:
        raise ValueError(f"{len(indices)} examples cannot feed {process_count} processes.")
    records = _records_at(source, indices)
    if labelled is not None:
        keep = tf.data.Dataset.from_tensor_slices(np.isin(np.unique(indices), labelled))

        def drop_label(record: dict[str, tf.Tensor], kept: tf.Tensor) -> dict[str, tf.Tensor]:
            unlabelled = tf.cast(UNLABELLED, record["label"].dtype)
            return {**record, "label": tf.where(kept, record["label"], unlabelled)}

        records = tf.data.Dataset.zip((records, keep)).map(drop_label)
    records = records.shard(process_count, process_index).cache()
    key = tf.random.experimental.stateless_fold_in(tf.constant([0, seed], tf.int64), process_index)
    augment_key = tf.random.experimental.stateless_fold_in(key, _AUGMENT_STREAM)

    def augment(position: tf.Tensor, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        example_key = tf.random.experimental.stateless_fold_in(augment_key, position)
        image = linear_eval_augment(source.decode_image(record["image"]), example_key, image_size)
        return {"image": image, "label": record["label"]}

    examples = (
        records.shuffle(share, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .enumerate()
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    )
    return _host_batches(examples, host_batch_size)


def examples_at(
    name: str,
    split: str,
    indices: np.ndarray,
    *,
    image_size: int,
    center_crop_fraction: float | None = None,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
) -> np.ndarray:
    """Evaluation-preprocessed images ``float32 [len(indices), S, S, C]`` at ``indices``, in the
    order given (e.g. to show the neighbours of a query)."""
    source = open_source(
        name, split, process_index=0, process_count=1, data_dir=data_dir, dataset_dir=dataset_dir
    )
    indices = np.asarray(indices)
    unique = np.unique(indices)
    images = _records_at(source, unique).map(
        lambda record: eval_preprocess(
            source.decode_image(record["image"]), image_size, center_crop_fraction
        )
    )
    stacked = np.stack(list(images.as_numpy_iterator()))
    return stacked[np.searchsorted(unique, indices)]


def _host_batches(
    examples: tf.data.Dataset, host_batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Full batches of ``examples`` as NumPy, prefetched, in an order fixed by the input alone."""
    return _as_numpy(examples.batch(host_batch_size, drop_remainder=True))


def _as_numpy(batches: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """``batches`` as NumPy, prefetched, in an order fixed by the input alone."""
    stream = batches.prefetch(tf.data.AUTOTUNE)
    return stream.with_options(_deterministic_options()).as_numpy_iterator()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """The given process index and count, defaulting to JAX's."""
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def _slice_size(records: tf.data.Dataset, name: str, split: str) -> int:
    """Number of records in this process's slice, which sources always know."""
    size = int(records.cardinality())
    if size < 0:
        raise ValueError(f"The size of this process's slice of {name!r} {split!r} is unknown.")
    return size


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options
