"""Where images come from: TFDS image-classification datasets or a folder of image files.

Both kinds of source are read the same way: a `Source` holds the metadata of the whole split
(`DatasetInfo`, taken from TFDS metadata or from the folder at run time) and one process's slice
of it as a `tf.data.Dataset` of still-encoded records `{"image": tf.string, "label": tf.int32}`,
plus the function that decodes a record's image. Decoding is left to the caller's parallel map,
so that skipping, caching and shuffling move small encoded records rather than pixels.

Datasets:
- any TFDS dataset with an `image` (`tfds.features.Image`) and a `label`
  (`tfds.features.ClassLabel`) feature: `fashion_mnist`, `cifar10`, `stl10` (its `unlabelled`
  split has label -1), `imagenet2012`, ... Call `prepare_dataset` once before reading it.
- `"image_folder"`: the user's folder `dataset_dir/<split>/<class>/*.png|jpg|jpeg`. Class indices
  follow the sorted class-folder names, gathered over all splits so that every split numbers the
  classes alike. Images placed directly in `dataset_dir/<split>/` are unlabelled (label -1).
  The first image of a split (in sorted path order) fixes its shape: every image must have the
  same height and width. Channels are converted to the first image's: grayscale stays 1
  channel, colour becomes RGB, alpha is dropped. `dataset_info` checks every image of the split
  first (so a run finds bad files before it trains): each file is opened with PIL, which reads
  its header (format and size) and, for PNG, checks every chunk's checksum, without decoding the
  pixels. Unreadable files and files of another size are reported in one error naming them. A
  split that passed is not checked again in the same process while none of its files is added,
  removed or changed (path, size, modification and change times). (A file that passes and still
  fails to decode, or a split read without the check, fails when read, naming the file.)

Per-process slices are contiguous and differ in size by at most one example: TFDS datasets use
`tfds.split_for_jax_process`; folders split their sorted file list the same way.
"""

import dataclasses
import difflib
import hashlib
import os
from collections.abc import Callable

import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import fashion_mnist_offline
from simclr_jax.data.metadata import DatasetInfo

IMAGE_FOLDER = "image_folder"
UNLABELLED = -1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Source:
    """One process's slice of a split, as encoded records, with the metadata of the whole split.

    `records` yields `{"image": tf.string, "label": tf.int32}` with a known cardinality;
    `decode_image` turns a record's `image` into a uint8 `[H, W, C]` tensor (graph-compatible).
    """

    info: DatasetInfo
    records: tf.data.Dataset
    decode_image: Callable[[tf.Tensor], tf.Tensor]


def dataset_info(
    name: str,
    split: str,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
    *,
    check_images: bool = True,
) -> DatasetInfo:
    """Metadata of `split` of dataset `name`, read at run time.

    For TFDS datasets, `data_dir` is the TFDS data directory (None: `$TFDS_DATA_DIR`, else
    `~/tensorflow_datasets`); the dataset must have been prepared (`prepare_dataset`). `split`
    may be any TFDS split expression (`"train"`, `"train[:10%]"`, ...). For `"image_folder"`,
    `dataset_dir` is the folder and `split` one of its subfolders; with `check_images` (for a
    caller about to read the images) every image of the split is checked first, once per process
    while the files stay the same, and a `ValueError` names the bad ones.
    """
    if name == IMAGE_FOLDER:
        return _FolderSplit.load(dataset_dir, split, check_images=check_images).info
    builder = _prepared_builder(name, data_dir)
    return _tfds_info(builder, name, split)


def prepare_dataset(name: str, data_dir: str | None = None, dataset_dir: str | None = None) -> None:
    """Makes sure TFDS dataset `name` can be read from `data_dir`, downloading only if possible.

    Already prepared: nothing to do. `fashion_mnist` is built offline from local files when
    available (see `fashion_mnist_offline.ensure_fashion_mnist`). Any other dataset is downloaded
    only when the network answers within seconds; otherwise a `FileNotFoundError` says how to
    provide it. `"image_folder"` needs no preparation; only `dataset_dir` is checked to exist.
    Raises `ValueError` for an unknown name (suggesting close ones) or a dataset without `image`
    and `label` features.
    """
    if name == IMAGE_FOLDER:
        _check_folder(dataset_dir)
        return
    builder = _tfds_builder(name, data_dir)
    if builder.is_prepared():
        return
    if name == "fashion_mnist":
        fashion_mnist_offline.ensure_fashion_mnist(data_dir)
    elif fashion_mnist_offline.download_host_reachable():
        builder.download_and_prepare()
    else:
        raise _not_prepared_error(
            builder, "The network is unreachable, so TFDS cannot download it."
        )


def open_source(
    name: str,
    split: str,
    *,
    process_index: int,
    process_count: int,
    data_dir: str | None = None,
    dataset_dir: str | None = None,
) -> Source:
    """The records of process `process_index`'s slice (one of `process_count`) of `split`."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, {process_count}), got {process_index} "
            f"(process_count={process_count})."
        )
    if name == IMAGE_FOLDER:
        return _FolderSplit.load(dataset_dir, split).source(process_index, process_count)
    builder = _prepared_builder(name, data_dir)
    info = _tfds_info(builder, name, split)
    process_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count
    )
    # Unshuffled files are read in a fixed order; caching is the caller's choice.
    read_config = tfds.ReadConfig(try_autocache=False)
    examples = builder.as_dataset(
        split=process_split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    records = examples.map(
        lambda example: {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
    )
    return Source(info, records, builder.info.features["image"].decode_example)


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name`, checked to be an image-classification dataset."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name, [*known, IMAGE_FOLDER], n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}: it is neither a TFDS dataset nor {IMAGE_FOLDER!r}.{hint}"
        ) from e
    features = builder.info.features
    has_image = "image" in features and isinstance(features["image"], tfds.features.Image)
    has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
    if not (has_image and has_label):
        raise ValueError(
            f"Dataset {name!r} is not an image-classification dataset: it needs an 'image' "
            f"(Image) and a 'label' (ClassLabel) feature, but has {sorted(features.keys())}."
        )
    return builder


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        raise _not_prepared_error(builder, "It must be prepared before it is read.")
    return builder


def _not_prepared_error(builder: tfds.core.DatasetBuilder, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"TFDS dataset {builder.name!r} is not prepared in {builder.data_dir}. {reason} "
        "Fix: run prepare_dataset once with network access (TFDS downloads and prepares it), or "
        "point data_dir (or the TFDS_DATA_DIR environment variable) to a directory holding a "
        "prepared copy."
    )


def _tfds_info(builder: tfds.core.DatasetBuilder, name: str, split: str) -> DatasetInfo:
    splits = builder.info.splits
    try:
        num_examples = splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Invalid split {split!r} for dataset {name!r} ({e}). "
            f"Available splits: {', '.join(sorted(splits.keys()))}."
        ) from e
    features = builder.info.features
    return DatasetInfo(
        name=name,
        num_examples=num_examples,
        num_classes=features["label"].num_classes,
        image_shape=tuple(features["image"].shape),
    )


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
    """The image files of one split of an image folder, in sorted order, with their labels."""

    info: DatasetInfo
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    @classmethod
    def load(
        cls, dataset_dir: str | None, split: str, check_images: bool = False
    ) -> "_FolderSplit":
        _check_folder(dataset_dir)
        splits = _subfolders(dataset_dir)
        if split not in splits:
            raise ValueError(
                f"Invalid split {split!r} for image folder {dataset_dir!r}. "
                f"Available splits: {', '.join(splits) or '(none: the folder has no subfolders)'}."
            )
        split_dir = os.path.join(dataset_dir, split)
        class_names = sorted({c for s in splits for c in _subfolders(os.path.join(dataset_dir, s))})
        files = [(path, UNLABELLED) for path in _image_files(split_dir)]
        for label, class_name in enumerate(class_names):
            class_dir = os.path.join(split_dir, class_name)
            if os.path.isdir(class_dir):
                files += [(path, label) for path in _image_files(class_dir)]
        if not files:
            raise ValueError(
                f"Split {split!r} of image folder {dataset_dir!r} holds no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images."
            )
        files.sort()
        paths, labels = zip(*files, strict=True)
        if check_images:
            _check_images(split_dir, paths)
        info = DatasetInfo(
            name=IMAGE_FOLDER,
            num_examples=len(paths),
            num_classes=len(class_names),
            image_shape=_first_image_shape(paths[0]),
        )
        return cls(info, paths, labels)

    def source(self, process_index: int, process_count: int) -> Source:
        """This process's contiguous slice of the files, as `tfds.even_splits` would cut it."""
        indices = np.array_split(np.arange(len(self.paths)), process_count)[process_index]
        paths = [self.paths[i] for i in indices]
        labels = np.array([self.labels[i] for i in indices], np.int32)
        records = tf.data.Dataset.from_tensor_slices({"image": paths, "label": labels})
        return Source(self.info, records, self._read_image)

    def _read_image(self, path: tf.Tensor) -> tf.Tensor:
        """Reads and decodes one file; fails, naming it, if its size differs from the split's."""
        height, width, channels = self.info.image_shape
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
        )
        same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
        check = tf.debugging.Assert(
            same_size,
            [
                f"Every image of an {IMAGE_FOLDER} split must be {height}x{width} (the size of "
                "its first image); resize this one:",
                path,
                tf.shape(image),
            ],
        )
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        return tf.ensure_shape(image, [height, width, channels])


def _check_folder(dataset_dir: str | None) -> None:
    if dataset_dir is None:
        raise ValueError(f"Dataset {IMAGE_FOLDER!r} needs dataset_dir, the folder to read.")
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"Image folder {dataset_dir!r} does not exist.")


def _subfolders(directory: str) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def _image_files(directory: str) -> list[str]:
    return sorted(
        e.path
        for e in os.scandir(directory)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _listed(items: list[str], limit: int = 3) -> str:
    """``items`` joined, the first ``limit`` of them, with how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# Split directory (absolute) -> fingerprint of the files of its last check that passed.
_CHECKED_SPLITS: dict[str, bytes] = {}


def _fingerprint(paths: tuple[str, ...]) -> bytes | None:
    """A digest of each file's path, size, modification and change times (a file replaced by
    a rename changes its change time), or None when a file cannot be found."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\n".encode())
    return digest.digest()


def _check_images(split_dir: str, paths: tuple[str, ...]) -> None:
    """:func:`_open_every_image`, unless the same files passed it already in this process."""
    key, fingerprint = os.path.abspath(split_dir), _fingerprint(paths)
    if fingerprint is not None and _CHECKED_SPLITS.get(key) == fingerprint:
        return
    _open_every_image(split_dir, paths)
    if fingerprint is not None:
        _CHECKED_SPLITS[key] = fingerprint


def _open_every_image(split_dir: str, paths: tuple[str, ...]) -> None:
    """Opens every image with PIL (its header; for PNG, every chunk's checksum) and raises one
    ValueError naming the files that cannot be read and those of another size than the first."""
    unreadable, other_size, expected = [], [], None
    for path in paths:
        try:
            with PIL.Image.open(path) as image:
                width, height = image.size
                image.verify()
        except Exception as error:  # PIL raises many types for damaged files
            reason = (
                "not an image file PIL can read"
                if isinstance(error, PIL.UnidentifiedImageError)
                else f"{type(error).__name__}: {error}"
            )
            unreadable.append(f"{path} ({reason})")
            continue
        if expected is None:
            expected = (height, width, path)
        elif (height, width) != expected[:2]:
            other_size.append(f"{path} is {height}x{width}")
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable file(s): {_listed(unreadable)}")
    if other_size:
        height, width, first = expected
        problems.append(
            f"{len(other_size)} image(s) not {height}x{width} (height x width, the size of the "
            f"first image {first}): {_listed(other_size)}"
        )
    if problems:
        raise ValueError(
            f"image folder {split_dir}: {'; '.join(problems)}. Fix, resize or remove them."
        )


def _first_image_shape(path: str) -> tuple[int, int, int]:
    """Height, width and channel count (1 for gray, else 3: alpha is dropped) of one image."""
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    height, width, channels = image.shape
    return height, width, (1 if channels <= 2 else 3)
