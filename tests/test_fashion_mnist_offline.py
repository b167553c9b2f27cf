"""Tests for building TFDS `fashion_mnist` from local IDX files, without any network access."""

import collections
import gzip
import os
import socket
import struct
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import fashion_mnist_offline as fmo

SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_FILES_PRESENT = all(
    os.path.isfile(os.path.join(fmo.DEBIAN_FASHION_MNIST_DIR, name))
    for names in SOURCE_FILES.values()
    for name in names
)
requires_debian_files = pytest.mark.skipif(
    not DEBIAN_FILES_PRESENT,
    reason=f"Debian package dataset-fashion-mnist not installed ({fmo.DEBIAN_FASHION_MNIST_DIR})",
)

# First labels of each split, as published with upstream Fashion-MNIST.
FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Makes every socket lookup/connection fail; returns the list of attempts, to assert empty.

    Attempts are recorded as well as refused, so one made in a background thread (where the
    exception would not reach the test) is still caught.
    """
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"network access attempted in a test: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def _write_idx_gz(path, array: np.ndarray, type_code: int, dtype: str) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(dtype).tobytes())


def _decoded_source(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = SOURCE_FILES[split]
    directory = fmo.DEBIAN_FASHION_MNIST_DIR
    return (
        fmo.read_idx_gz(os.path.join(directory, images)),
        fmo.read_idx_gz(os.path.join(directory, labels)),
    )


@pytest.fixture(scope="module")
def prepared_data_dir(tmp_path_factory) -> str:
    """A data_dir where `ensure_fashion_mnist` prepared the dataset, with sockets forbidden."""
    if not DEBIAN_FILES_PRESENT:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        attempts = _forbid_network(monkeypatch)
        fmo.ensure_fashion_mnist(data_dir)
    assert attempts == []
    return data_dir


# --- IDX decoding ---------------------------------------------------------------------------


def test_read_idx_gz_round_trips_uint8_and_big_endian_int32(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx_gz(tmp_path / "u8.gz", images, 0x08, ">u1")
    decoded = fmo.read_idx_gz(tmp_path / "u8.gz")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)

    values = np.array([[1, -2, 70000], [-(2**31), 2**31 - 1, 0]], dtype=np.int32)
    _write_idx_gz(tmp_path / "i32.gz", values, 0x0C, ">i4")
    decoded = fmo.read_idx_gz(tmp_path / "i32.gz")
    assert decoded.dtype == np.int32 and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, values)


def test_read_idx_gz_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(ValueError, match="bad magic number 12340801"):
        fmo.read_idx_gz(path)


def test_read_idx_gz_rejects_truncated_payload(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 2]) + struct.pack(">II", 3, 3) + bytes(8))
    with pytest.raises(ValueError, match=r"needs 9 bytes of data, found 8"):
        fmo.read_idx_gz(path)


def test_read_idx_gz_rejects_non_gzip_file(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match="not a valid gzip file"):
        fmo.read_idx_gz(path)


@requires_debian_files
def test_debian_files_decode_to_upstream_fashion_mnist():
    for split, first_labels, size in [
        ("train", FIRST_TRAIN_LABELS, 60_000),
        ("test", FIRST_TEST_LABELS, 10_000),
    ]:
        images, labels = _decoded_source(split)
        assert images.shape == (size, 28, 28) and images.dtype == np.uint8
        assert labels.tolist()[:10] == first_labels
        np.testing.assert_array_equal(np.bincount(labels), [size // 10] * 10)


# --- The builder matches the official one -------------------------------------------------


@requires_debian_files
def test_examples_equal_official_generate_examples(tmp_path):
    """Same keys and records as the official builder fed the same (decompressed) files."""
    official = tfds.builder("fashion_mnist", data_dir=str(tmp_path / "official"))
    offline = fmo.OfflineFashionMNIST(data_dir=str(tmp_path / "offline"))
    for split, (images_name, labels_name) in SOURCE_FILES.items():
        raw_paths = []
        for name in (images_name, labels_name):
            raw_path = tmp_path / name.removesuffix(".gz")
            with gzip.open(os.path.join(fmo.DEBIAN_FASHION_MNIST_DIR, name), "rb") as f:
                raw_path.write_bytes(f.read())
            raw_paths.append(str(raw_path))
        num_examples = 60_000 if split == "train" else 10_000
        expected = list(official._generate_examples(num_examples, *raw_paths))
        generators = {g.name: g.gen_kwargs for g in offline._split_generators(dl_manager=None)}
        actual = list(offline._generate_examples(**generators[split]))

        assert [key for key, _ in actual] == [key for key, _ in expected]
        for field in ("image", "label"):
            got = np.stack([record[field] for _, record in actual])
            want = np.stack([record[field] for _, record in expected])
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        assert actual[0][1]["image"].shape == (28, 28, 1)


@requires_debian_files
def test_split_generators_never_download(tmp_path):
    class RefusingDownloadManager:
        def __getattr__(self, name):
            raise AssertionError(f"download manager used: {name}")

    builder = fmo.OfflineFashionMNIST(data_dir=str(tmp_path))
    generators = builder._split_generators(RefusingDownloadManager())
    assert sorted(g.name for g in generators) == ["test", "train"]


def test_builder_identity_matches_official_and_keeps_registration(tmp_path):
    offline = fmo.OfflineFashionMNIST(data_dir=str(tmp_path))
    official = tfds.builder("fashion_mnist", data_dir=str(tmp_path))
    assert type(official) is tfds.image_classification.FashionMNIST
    assert offline.name == official.name == "fashion_mnist"
    assert offline.version == official.version
    assert offline.data_dir == official.data_dir


# --- The prepared dataset -----------------------------------------------------------------


def test_prepared_dataset_matches_official_metadata(prepared_data_dir, tmp_path):
    official_info = tfds.builder("fashion_mnist", data_dir=str(tmp_path)).info
    prepared = tfds.builder("fashion_mnist", data_dir=prepared_data_dir)
    assert type(prepared) is tfds.image_classification.FashionMNIST
    assert prepared.is_prepared()
    info = prepared.info
    assert info.version == official_info.version
    assert info.features.to_json() == official_info.features.to_json()
    assert info.features["label"].names == official_info.features["label"].names
    assert info.features["image"].shape == (28, 28, 1)
    assert info.features["image"].dtype == np.uint8
    assert info.supervised_keys == official_info.supervised_keys
    assert info.description == official_info.description
    assert info.citation == official_info.citation
    assert {name: split.num_examples for name, split in info.splits.items()} == {
        "train": 60_000,
        "test": 10_000,
    }


def test_prepared_splits_are_balanced(prepared_data_dir):
    for split, per_class in [("train", 6_000), ("test", 1_000)]:
        ds = tfds.load(
            "fashion_mnist",
            split=split,
            data_dir=prepared_data_dir,
            download=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        labels = np.concatenate([batch["label"] for batch in tfds.as_numpy(ds.batch(10_000))])
        assert labels.shape == (10 * per_class,)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)


def test_load_reads_exactly_the_source_test_split(prepared_data_dir):
    ds = tfds.load("fashion_mnist", split="test", data_dir=prepared_data_dir, download=False).batch(
        10_000
    )
    (loaded,) = tfds.as_numpy(ds)
    assert loaded["image"].shape == (10_000, 28, 28, 1)
    assert loaded["image"].dtype == np.uint8
    images, labels = _decoded_source("test")

    def pairs(images, labels):
        return collections.Counter(
            zip((im.tobytes() for im in images), labels.tolist(), strict=True)
        )

    assert pairs(loaded["image"][..., 0], loaded["label"]) == pairs(images, labels)

    # Spot values, independent of the on-disk (key-hash shuffled) order.
    first = next(i for i, im in enumerate(loaded["image"]) if np.array_equal(im[..., 0], images[0]))
    assert loaded["label"][first] == FIRST_TEST_LABELS[0]
    assert int(loaded["image"][first].sum()) == int(images[0].sum())


# --- ensure_fashion_mnist / prepare_fashion_mnist_offline ----------------------------------


def test_ensure_again_is_a_fast_no_op_without_network(prepared_data_dir, monkeypatch):
    version_dir = os.path.join(prepared_data_dir, "fashion_mnist", "3.0.1")
    before = {
        name: os.stat(os.path.join(version_dir, name)).st_mtime_ns
        for name in os.listdir(version_dir)
    }
    attempts = _forbid_network(monkeypatch)
    start = time.perf_counter()
    fmo.ensure_fashion_mnist(prepared_data_dir)
    assert time.perf_counter() - start < 5.0
    assert attempts == []
    after = {
        name: os.stat(os.path.join(version_dir, name)).st_mtime_ns
        for name in os.listdir(version_dir)
    }
    assert after == before


def test_prepare_offline_when_prepared_returns_the_builder(prepared_data_dir):
    builder = fmo.prepare_fashion_mnist_offline(prepared_data_dir)
    assert isinstance(builder, tfds.image_classification.FashionMNIST)
    assert builder.is_prepared()
    assert builder.info.splits["test"].num_examples == 10_000


def test_prepare_offline_missing_source_names_files_and_fix(tmp_path):
    source_dir = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError) as excinfo:
        fmo.prepare_fashion_mnist_offline(str(tmp_path / "data"), source_dir=str(source_dir))
    message = str(excinfo.value)
    for names in SOURCE_FILES.values():
        for name in names:
            assert str(source_dir / name) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "network access" in message
    assert not (tmp_path / "data" / "fashion_mnist").exists()


def test_prepare_offline_names_only_the_missing_file(tmp_path):
    source_dir = tmp_path / "partial"
    source_dir.mkdir()
    for names in SOURCE_FILES.values():
        for name in names:
            (source_dir / name).touch()
    (source_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz") as excinfo:
        fmo.prepare_fashion_mnist_offline(str(tmp_path / "data"), source_dir=str(source_dir))
    assert "train-images" not in str(excinfo.value)


def test_ensure_without_files_or_network_raises_the_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(fmo, "download_host_reachable", lambda: False)
    with pytest.raises(
        FileNotFoundError, match=r"unreachable.*apt-get install dataset-fashion-mnist"
    ):
        fmo.ensure_fashion_mnist(str(tmp_path), source_dir=str(tmp_path / "absent"))


def test_ensure_without_files_downloads_with_official_builder(tmp_path, monkeypatch):
    calls = []

    class RecordingBuilder:
        def download_and_prepare(self):
            calls.append("download_and_prepare")

    def fake_builder(name, data_dir):
        calls.append((name, data_dir))
        return RecordingBuilder()

    monkeypatch.setattr(fmo, "download_host_reachable", lambda: True)
    monkeypatch.setattr(tfds, "builder", fake_builder)
    fmo.ensure_fashion_mnist(str(tmp_path), source_dir=str(tmp_path / "absent"))
    assert calls == [("fashion_mnist", str(tmp_path)), "download_and_prepare"]


# --- Reachability check -------------------------------------------------------------------


def test_download_host_reachable_is_bounded_by_its_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(5.0)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert fmo.download_host_reachable(timeout_s=0.2) is False
    assert time.perf_counter() - start < 2.0


def test_download_host_reachable_reports_connection_outcome(monkeypatch):
    targets = []

    class FakeConnection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def connect(address, timeout):
        targets.append(address)
        return FakeConnection()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert fmo.download_host_reachable(timeout_s=1.0) is True
    assert targets == [("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)]

    def refuse(address, timeout):
        raise ConnectionRefusedError

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert fmo.download_host_reachable(timeout_s=1.0) is False
