"""Fashion-MNIST for TFDS without a download: build it from local IDX files.

The default dataset is TFDS `fashion_mnist`. Its official builder downloads four IDX archives and,
on a machine without network access, retries for minutes before failing. Debian's package
`dataset-fashion-mnist` ships the same images and labels under `/usr/share/datasets/fashion-mnist`.
`OfflineFashionMNIST` decodes those files and writes exactly what the official builder writes
(same name, version, features, splits and example keys), so a plain
`tfds.load("fashion_mnist", data_dir=...)` then reads it as if it had been downloaded.

`ensure_fashion_mnist` is the one call a trainer needs: it reuses prepared data, otherwise prefers
the local files, and only downloads when the download host answers within a few seconds.
"""

import gzip
import os
import socket
import threading
import urllib.parse

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Split name -> (images file, labels file, number of examples), as published upstream.
_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IMAGE_SIDE = 28

# IDX element type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_REACHABILITY_TIMEOUT_S = 3.0


def read_idx_gz(path: str | os.PathLike) -> np.ndarray:
    """Decodes a gzip-compressed IDX file (the MNIST file format) into an array.

    The header is validated (two zero bytes, a known element type, the dimension count, and a
    payload of exactly the announced size), so a truncated or foreign file fails loudly instead
    of yielding garbage. Elements are returned in native byte order.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path} is not a valid gzip file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0x0000 followed by a type code and the number of dimensions)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: IDX header announces {ndim} dimensions but is truncated.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected_bytes:
        raise ValueError(
            f"{path}: IDX shape {shape} needs {expected_bytes} bytes of data, "
            f"found {len(raw) - header_size}."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _missing_source_files(source_dir: str) -> list[str]:
    """Paths of the four Fashion-MNIST IDX files that are absent from `source_dir`."""
    names = [name for images, labels, _ in _SPLITS.values() for name in (images, labels)]
    paths = [os.path.join(source_dir, name) for name in names]
    return [path for path in paths if not os.path.isfile(path)]


def _source_not_found_error(missing: list[str], reason: str = "") -> FileNotFoundError:
    """The error raised when Fashion-MNIST can be neither built locally nor downloaded."""
    return FileNotFoundError(
        "Fashion-MNIST source files not found: "
        + ", ".join(missing)
        + f".{reason} Fix: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them"
        f" under {DEBIAN_FASHION_MNIST_DIR}), or run once with network access so TFDS downloads"
        " `fashion_mnist` itself."
    )


class OfflineFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
    """The official `fashion_mnist` builder, reading local IDX files instead of downloading.

    It inherits the official `_info` and `VERSION`, keeps the name `fashion_mnist` (so data lands
    in `data_dir/fashion_mnist/<version>/`) and numbers examples by their position in the files,
    as the official builder does, so the prepared records are the same. It is not registered:
    `tfds.builder("fashion_mnist")` still returns the official builder.
    """

    name = "fashion_mnist"

    def __init__(self, *, source_dir: str = DEBIAN_FASHION_MNIST_DIR, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local: nothing to download or extract.
        return [
            tfds.core.SplitGenerator(
                name=split,
                gen_kwargs=dict(
                    images_path=os.path.join(self._source_dir, images),
                    labels_path=os.path.join(self._source_dir, labels),
                    num_examples=num_examples,
                ),
            )
            for split, (images, labels, num_examples) in _SPLITS.items()
        ]

    def _generate_examples(self, images_path, labels_path, num_examples):
        images = read_idx_gz(images_path)
        labels = read_idx_gz(labels_path)
        if images.shape != (num_examples, _IMAGE_SIDE, _IMAGE_SIDE) or images.dtype != np.uint8:
            raise ValueError(
                f"{images_path}: expected {num_examples} uint8 images of "
                f"{_IMAGE_SIDE}x{_IMAGE_SIDE}, got {images.dtype} array of shape {images.shape}."
            )
        if labels.shape != (num_examples,) or labels.dtype != np.uint8:
            raise ValueError(
                f"{labels_path}: expected {num_examples} uint8 labels, "
                f"got {labels.dtype} array of shape {labels.shape}."
            )
        examples = zip(images[..., None], labels.astype(np.int64), strict=True)
        # Keys are positions in the files, as in the official builder: same keys, same shuffle.
        for index, (image, label) in enumerate(examples):
            yield index, {"image": image, "label": label}


def prepare_fashion_mnist_offline(
    data_dir: str | None = None, source_dir: str = DEBIAN_FASHION_MNIST_DIR
) -> tfds.core.DatasetBuilder:
    """Prepares TFDS `fashion_mnist` in `data_dir` from the IDX files in `source_dir`.

    `data_dir=None` means TFDS's default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).
    Does nothing when the dataset is already prepared there. Raises `FileNotFoundError`, naming
    the missing files and how to get them, when it must prepare but the files are absent.
    """
    builder = OfflineFashionMNIST(data_dir=data_dir, source_dir=source_dir)
    if not builder.is_prepared():
        missing = _missing_source_files(source_dir)
        if missing:
            raise _source_not_found_error(missing)
        builder.download_and_prepare()
    return builder


def download_host_reachable(timeout_s: float = _REACHABILITY_TIMEOUT_S) -> bool:
    """Whether the official Fashion-MNIST download host accepts a connection within `timeout_s`.

    The lookup and connection run in a daemon thread, so even a resolver that hangs cannot
    delay the answer beyond `timeout_s`; a refused connection answers at once.
    """
    url = urllib.parse.urlsplit(tfds.image_classification.FashionMNIST.URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout_s)
    return bool(outcome) and outcome[0]


def ensure_fashion_mnist(
    data_dir: str | None = None, source_dir: str = DEBIAN_FASHION_MNIST_DIR
) -> None:
    """Makes TFDS `fashion_mnist` loadable from `data_dir`, never stalling on an unreachable host.

    In order: reuse data already prepared there; else build it from the local IDX files in
    `source_dir`; else, if the download host answers within a few seconds, let the official
    builder download it; else raise `FileNotFoundError` saying how to get the files.
    """
    if OfflineFashionMNIST(data_dir=data_dir, source_dir=source_dir).is_prepared():
        return
    missing = _missing_source_files(source_dir)
    if not missing:
        prepare_fashion_mnist_offline(data_dir, source_dir)
    elif download_host_reachable():
        tfds.builder("fashion_mnist", data_dir=data_dir).download_and_prepare()
    else:
        raise _source_not_found_error(
            missing, reason=" The download host is unreachable, so TFDS cannot download them."
        )
