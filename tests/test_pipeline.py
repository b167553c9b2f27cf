"""Tests of the tf.data pipelines on mocked TFDS data, a tiny prepared TFDS dataset and folders."""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import fashion_mnist_offline, pipeline
from simclr_jax.data.augment import AugmentConfig

MOCK_TRAIN_SIZE = 10
TINY_SPLIT_SIZES = {"train": 13, "test": 7}
TINY_SIDE = 8

# Every random op disabled and a full-image crop: each view is exactly the input image.
IDENTITY_AUGMENT = AugmentConfig(
    image_size=TINY_SIDE,
    crop_area_range=(1.0, 1.0),
    crop_aspect_range=(1.0, 1.0),
    flip_prob=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
)


class TinyIndexedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Example i of a split has label i and a constant image of value i + 1 (0 marks padding)."""

    name = "tiny_indexed_images"
    VERSION = tfds.core.Version("1.0.0")
    IMAGE_SHAPE = (TINY_SIDE, TINY_SIDE, 3)

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
                "label": tfds.features.ClassLabel(num_classes=max(TINY_SPLIT_SIZES.values())),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(n) for split, n in TINY_SPLIT_SIZES.items()}

    def _generate_examples(self, num_examples):
        for i in range(num_examples):
            yield i, {"image": np.full(self._image_shape(i), i + 1, np.uint8), "label": i}

    def _image_shape(self, index):
        del index
        return self.IMAGE_SHAPE


class TinyVariedImages(TinyIndexedImages, skip_registration=True):
    """As `TinyIndexedImages`, but example i's image is 6 + i % 5 pixels high, one more wide."""

    name = "tiny_varied_images"
    IMAGE_SHAPE = (None, None, 3)

    def _image_shape(self, index):
        side = 6 + index % 5
        return (side, side + 1, 3)


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared `tiny_indexed_images` (found by name from files)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyIndexedImages(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def varied_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared `tiny_varied_images` (images of several sizes)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_varied"))
    TinyVariedImages(data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def cifar10_metadata_dir(tmp_path_factory):
    """CIFAR-10's real features with a `train` split of MOCK_TRAIN_SIZE examples, no data."""
    data_dir = str(tmp_path_factory.mktemp("mock_metadata"))
    builder = tfds.builder("cifar10", data_dir=data_dir)
    split = tfds.core.SplitInfo(
        name="train", shard_lengths=[MOCK_TRAIN_SIZE], num_bytes=0, filename_template=None
    )
    builder.info.set_splits(tfds.core.SplitDict([split]))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    return data_dir


@pytest.fixture
def mock_cifar10(cifar10_metadata_dir):
    """Random CIFAR-10-shaped examples whose count matches the metadata's `train` split."""
    with tfds.testing.mock_data(
        num_examples=MOCK_TRAIN_SIZE,
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=cifar10_metadata_dir,
    ):
        yield


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(batches, expected):
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert batch.keys() == reference.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[key])


def cifar10_stream(**kwargs):
    defaults = dict(
        host_batch_size=4,
        augment_config=AugmentConfig(image_size=16),
        seed=0,
        process_index=0,
        process_count=1,
    )
    return pipeline.pretrain_batches("cifar10", "train", **(defaults | kwargs))


def masked_labels(batches):
    return np.concatenate([b["label"][b["mask"]] for b in batches])


def test_dataset_info_reads_tfds_metadata(tiny_data_dir):
    info = pipeline.dataset_info("tiny_indexed_images", "train[:4]", data_dir=tiny_data_dir)
    assert info == pipeline.DatasetInfo(
        name="tiny_indexed_images",
        num_examples=4,
        num_classes=max(TINY_SPLIT_SIZES.values()),
        image_shape=(TINY_SIDE, TINY_SIDE, 3),
    )


def test_dataset_info_under_mock_data(mock_cifar10):
    assert pipeline.dataset_info("cifar10", "train") == pipeline.DatasetInfo(
        name="cifar10", num_examples=MOCK_TRAIN_SIZE, num_classes=10, image_shape=(32, 32, 3)
    )


def test_pretrain_batches_shapes_dtypes_and_ranges(mock_cifar10):
    for batch in take(cifar10_stream(), 3):
        assert batch.keys() == {"views", "label"}
        assert batch["views"].dtype == np.float32
        assert batch["views"].shape == (4, 2, 16, 16, 3)
        assert batch["views"].min() >= 0.0 and batch["views"].max() <= 1.0
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
        # The two views of every example are different augmentations.
        differences = np.abs(batch["views"][:, 0] - batch["views"][:, 1]).reshape(4, -1)
        assert np.all(differences.max(axis=1) > 1e-3)


def test_pretrain_stream_is_deterministic_and_resumable(mock_cifar10):
    reference = take(cifar10_stream(), 8)
    assert_same_batches(take(cifar10_stream(), 5), reference[:5])
    # Step 3 starts at stream position 12: inside the second epoch of 10 examples.
    assert_same_batches(take(cifar10_stream(start_step=3), 5), reference[3:8])
    assert_same_batches(take(cifar10_stream(cache=False), 8), reference)
    other_seed = take(cifar10_stream(seed=1), 2)
    assert not np.array_equal(other_seed[0]["views"], reference[0]["views"])


def test_each_pretraining_epoch_is_a_fresh_permutation_of_intact_examples(tiny_data_dir):
    size = TINY_SPLIT_SIZES["train"]
    batches = take(
        pipeline.pretrain_batches(
            "tiny_indexed_images",
            "train",
            host_batch_size=4,
            augment_config=IDENTITY_AUGMENT,
            seed=3,
            data_dir=tiny_data_dir,
            process_index=0,
            process_count=1,
        ),
        size,  # 4 * size positions: exactly 4 epochs.
    )
    labels = np.concatenate([b["label"] for b in batches]).reshape(4, size)
    for epoch in labels:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(size))
    assert len({tuple(epoch) for epoch in labels}) > 1
    # Every view is its own example's image: labels and images stay paired through shuffling.
    for batch in batches:
        expected = (batch["label"] + 1)[:, None, None, None, None] / 255.0
        np.testing.assert_allclose(batch["views"], np.broadcast_to(expected, batch["views"].shape))


def tiny_eval(data_dir, split="train", **kwargs):
    defaults = dict(host_batch_size=4, image_size=TINY_SIDE, process_index=0, process_count=1)
    return list(
        pipeline.eval_batches(
            "tiny_indexed_images", split, data_dir=data_dir, **(defaults | kwargs)
        )
    )


def test_eval_batches_pad_the_last_batch_with_masked_rows(tiny_data_dir):
    size = TINY_SPLIT_SIZES["train"]
    batches = tiny_eval(tiny_data_dir)
    assert len(batches) == pipeline.num_batches(size, 4) == 4
    for batch in batches:
        assert batch["image"].shape == (4, TINY_SIDE, TINY_SIDE, 3)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["mask"].dtype == bool
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == size
    np.testing.assert_array_equal(np.sort(masked_labels(batches)), np.arange(size))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    expected = (labels[mask] + 1)[:, None, None, None] / 255.0
    np.testing.assert_allclose(images[mask], np.broadcast_to(expected, images[mask].shape))
    assert np.all(images[~mask] == 0.0) and np.all(labels[~mask] == -1)


def test_eval_center_crop_resizes(tiny_data_dir):
    batches = tiny_eval(tiny_data_dir, split="test", image_size=3, center_crop_fraction=0.5)
    assert [b["image"].shape for b in batches] == [(4, 3, 3, 3)] * 2
    assert masked_labels(batches).size == TINY_SPLIT_SIZES["test"]


def test_process_slices_are_disjoint_and_cover_the_split(tiny_data_dir):
    size = TINY_SPLIT_SIZES["train"]
    per_process = [tiny_eval(tiny_data_dir, process_index=i, process_count=2) for i in range(2)]
    # Same number of batches on every process (lock-step), enough for the larger slice of 7.
    assert [len(batches) for batches in per_process] == [2, 2]
    first, second = (set(masked_labels(batches).tolist()) for batches in per_process)
    assert first.isdisjoint(second)
    assert first | second == set(range(size))
    assert sum(masked_labels(batches).size for batches in per_process) == size
    # Pretraining reads the same slice on each process.
    for index, slice_labels in enumerate((first, second)):
        stream = pipeline.pretrain_batches(
            "tiny_indexed_images",
            "train",
            host_batch_size=4,
            augment_config=IDENTITY_AUGMENT,
            seed=0,
            data_dir=tiny_data_dir,
            process_index=index,
            process_count=2,
        )
        seen = np.concatenate([b["label"] for b in take(stream, 4)])
        assert set(seen.tolist()) == slice_labels


def write_png(path, value, shape=(6, 5, 3)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = tf.constant(np.full(shape, value, np.uint8))
    tf.io.write_file(str(path), tf.io.encode_png(image))


@pytest.fixture
def image_folder(tmp_path):
    """train: 3 cats, 2 dogs, 2 unlabelled (one stored as grayscale); test: 1 dog only."""
    train = tmp_path / "train"
    for i in range(3):
        write_png(train / "cat" / f"c{i}.png", 10 + i)
    write_png(train / "dog" / "d0.png", 20)
    write_png(train / "dog" / "d1.PNG", 21)
    write_png(train / "u0.png", 30)
    write_png(train / "u1.png", 31, shape=(6, 5, 1))
    (train / "notes.txt").write_text("not an image")
    write_png(tmp_path / "test" / "dog" / "d9.png", 29)
    return str(tmp_path)


def test_image_folder_metadata_and_labels(image_folder):
    info = pipeline.dataset_info("image_folder", "train", dataset_dir=image_folder)
    assert info == pipeline.DatasetInfo(
        name="image_folder", num_examples=7, num_classes=2, image_shape=(6, 5, 3)
    )
    batches = list(
        pipeline.eval_batches(
            "image_folder",
            "train",
            host_batch_size=4,
            image_size=5,
            dataset_dir=image_folder,
            process_index=0,
            process_count=1,
        )
    )
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask]
    values = np.round(np.concatenate([b["image"] for b in batches])[mask] * 255)
    expected_label = {10: 0, 11: 0, 12: 0, 20: 1, 21: 1, 30: -1, 31: -1}
    assert mask.sum() == 7
    assert sorted(values[:, 0, 0, 0].tolist()) == sorted(expected_label)
    for label, image in zip(labels, values, strict=True):
        assert np.all(image == image[0, 0, 0])  # Constant, grayscale replicated to 3 channels.
        assert expected_label[int(image[0, 0, 0])] == label
    # The test split has no cat folder, yet its dogs keep label 1.
    test_batch = next(
        pipeline.eval_batches(
            "image_folder",
            "test",
            host_batch_size=2,
            image_size=6,
            dataset_dir=image_folder,
            process_count=1,
        )
    )
    assert test_batch["label"].tolist() == [1, -1] and test_batch["mask"].tolist() == [True, False]
    views = next(
        pipeline.pretrain_batches(
            "image_folder",
            "train",
            host_batch_size=2,
            augment_config=AugmentConfig(image_size=4),
            seed=0,
            dataset_dir=image_folder,
            process_count=1,
        )
    )["views"]
    assert views.shape == (2, 2, 4, 4, 3)


def test_image_folder_rejects_images_of_another_size(tmp_path):
    write_png(tmp_path / "train" / "a.png", 1)
    write_png(tmp_path / "train" / "b.png", 2, shape=(7, 5, 3))
    batches = pipeline.eval_batches(
        "image_folder",
        "train",
        host_batch_size=2,
        image_size=6,
        dataset_dir=str(tmp_path),
        process_count=1,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"b\.png"):
        list(batches)


def test_image_folder_names_every_unreadable_or_odd_sized_file_before_reading(tmp_path):
    train = tmp_path / "train"
    for name in ("a", "b", "c", "d"):
        write_png(train / "shirt" / f"{name}.png", 1)
    write_png(train / "shirt" / "e.png", 2, shape=(7, 5, 3))
    (train / "shirt" / "b.png").write_bytes(b"not an image at all")
    data = (train / "shirt" / "c.png").read_bytes()
    (train / "shirt" / "c.png").write_bytes(data[:-8] + bytes(8))  # damaged last chunk
    with pytest.raises(ValueError) as error:
        pipeline.dataset_info("image_folder", "train", dataset_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"image folder {train}: 2 unreadable file(s): {train}/shirt/b.png (")
    assert f"{train}/shirt/c.png (" in message
    first = f"the size of the first image {train}/shirt/a.png"
    assert f"1 image(s) not 6x5 (height x width, {first})" in message
    assert f"{train}/shirt/e.png is 7x5" in message
    assert "\n" not in message and message.endswith("Fix, resize or remove them.")


def test_unknown_dataset_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"'cifar_10'.*Did you mean 'cifar10'"):
        pipeline.dataset_info("cifar_10", "train")


def test_unknown_split_lists_available_splits(tiny_data_dir, image_folder):
    with pytest.raises(ValueError, match=r"'tran'.*Available splits: test, train"):
        pipeline.dataset_info("tiny_indexed_images", "tran", data_dir=tiny_data_dir)
    with pytest.raises(ValueError, match=r"'val'.*Available splits: test, train"):
        pipeline.dataset_info("image_folder", "val", dataset_dir=image_folder)


def test_dataset_without_image_and_label_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"imdb_reviews.*not an image-classification dataset"):
        pipeline.prepare_dataset("imdb_reviews", data_dir=str(tmp_path))


def forbid_download(monkeypatch):
    def download(self, *args, **kwargs):
        raise AssertionError(f"download_and_prepare called for {self.name}")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)


def test_unprepared_dataset_without_network_fails_fast_with_the_fix(tmp_path, monkeypatch):
    forbid_download(monkeypatch)
    monkeypatch.setattr(fashion_mnist_offline, "download_host_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="cifar10") as error:
        pipeline.prepare_dataset("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert str(tmp_path) in str(error.value) and "TFDS_DATA_DIR" in str(error.value)
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        pipeline.dataset_info("cifar10", "train", data_dir=str(tmp_path))


def test_prepare_dataset_downloads_only_what_is_missing(
    tmp_path, tiny_data_dir, image_folder, monkeypatch
):
    downloaded, built_offline = [], []
    monkeypatch.setattr(
        tfds.core.DatasetBuilder,
        "download_and_prepare",
        lambda self, *args, **kwargs: downloaded.append(self.name),
    )
    monkeypatch.setattr(fashion_mnist_offline, "download_host_reachable", lambda: True)
    monkeypatch.setattr(fashion_mnist_offline, "ensure_fashion_mnist", built_offline.append)
    pipeline.prepare_dataset("tiny_indexed_images", data_dir=tiny_data_dir)
    pipeline.prepare_dataset("image_folder", dataset_dir=image_folder)
    with pytest.raises(FileNotFoundError, match="missing"):
        pipeline.prepare_dataset("image_folder", dataset_dir=str(tmp_path / "missing"))
    assert downloaded == [] and built_offline == []
    pipeline.prepare_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert built_offline == [str(tmp_path)] and downloaded == []
    pipeline.prepare_dataset("cifar10", data_dir=str(tmp_path))
    assert downloaded == ["cifar10"]


def test_num_batches():
    assert [pipeline.num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        pipeline.num_batches(3, 0)


def test_split_labels_are_in_split_order(tiny_data_dir):
    labels = pipeline.split_labels("tiny_indexed_images", "train", data_dir=tiny_data_dir)
    np.testing.assert_array_equal(labels, masked_labels(tiny_eval(tiny_data_dir)))
    assert labels.dtype == np.int32


def test_examples_at_returns_the_requested_examples_in_order(tiny_data_dir):
    indices = np.array([5, 0, 12, 5])
    images = pipeline.examples_at(
        "tiny_indexed_images", "train", indices, image_size=TINY_SIDE, data_dir=tiny_data_dir
    )
    assert images.shape == (4, TINY_SIDE, TINY_SIDE, 3)
    labels = pipeline.split_labels("tiny_indexed_images", "train", data_dir=tiny_data_dir)
    np.testing.assert_allclose(images[:, 0, 0, 0], (labels[indices] + 1) / 255.0, rtol=1e-6)


@pytest.mark.parametrize("process_count", [1, 2])
def test_labelled_batches_cycle_over_exactly_the_subset(tiny_data_dir, process_count):
    indices = np.array([1, 3, 4, 8, 9, 12])
    batch_size = 3 if process_count == 1 else 1
    seen = []
    for process_index in range(process_count):
        stream = pipeline.labelled_batches(
            "tiny_indexed_images",
            "train",
            indices,
            host_batch_size=batch_size,
            image_size=TINY_SIDE,
            seed=0,
            data_dir=tiny_data_dir,
            process_index=process_index,
            process_count=process_count,
        )
        # Two epochs of this process's share of the six examples.
        for batch in take(stream, 2 * len(indices) // (batch_size * process_count)):
            assert batch["image"].shape == (batch_size, TINY_SIDE, TINY_SIDE, 3)
            # A crop of a constant image is constant, with the value of its example.
            np.testing.assert_allclose(
                batch["image"][:, 0, 0, 0], (batch["label"] + 1) / 255.0, rtol=1e-5
            )
            seen.append(batch["label"])
    labels = pipeline.split_labels("tiny_indexed_images", "train", data_dir=tiny_data_dir)
    # Every chosen example exactly twice, nothing else.
    np.testing.assert_array_equal(
        np.sort(np.concatenate(seen)), np.sort(np.repeat(labels[indices], 2))
    )


def test_labelled_batches_reject_positions_outside_the_split(tiny_data_dir):
    with pytest.raises(ValueError, match="positions in"):
        pipeline.labelled_batches(
            "tiny_indexed_images",
            "train",
            np.array([0, 13]),
            host_batch_size=2,
            image_size=TINY_SIDE,
            seed=0,
            data_dir=tiny_data_dir,
        )


def test_pretrain_batches_can_carry_the_input_image_at_the_view_size(tiny_data_dir):
    def stream(**kwargs):
        return pipeline.pretrain_batches(
            "tiny_indexed_images",
            "train",
            host_batch_size=4,
            augment_config=AugmentConfig(image_size=6, blur_prob=0.0),
            seed=3,
            process_index=0,
            process_count=1,
            data_dir=tiny_data_dir,
            **kwargs,
        )

    with_image = take(stream(with_input_image=True), 4)
    without = take(stream(), 4)
    for batch, reference in zip(with_image, without, strict=True):
        assert batch.keys() == {"views", "label", "image"}
        np.testing.assert_array_equal(batch["views"], reference["views"])
        np.testing.assert_array_equal(batch["label"], reference["label"])
        assert batch["image"].shape == (4, 6, 6, 3) and batch["image"].dtype == np.float32
        # Example i is the constant image i + 1: resizing keeps the constant.
        expected = (batch["label"] + 1)[:, None, None, None] / 255.0
        np.testing.assert_allclose(batch["image"], np.broadcast_to(expected, (4, 6, 6, 3)), 1e-5)


def test_images_of_several_sizes_are_augmented_one_by_one_and_resumably(varied_data_dir):
    assert pipeline.dataset_info(
        "tiny_varied_images", "train", data_dir=varied_data_dir
    ).image_shape == (None, None, 3)

    def stream(**kwargs):
        return pipeline.pretrain_batches(
            "tiny_varied_images",
            "train",
            host_batch_size=4,
            augment_config=AugmentConfig(image_size=5, color_jitter_prob=0.0, grayscale_prob=0.0),
            seed=2,
            process_index=0,
            process_count=1,
            data_dir=varied_data_dir,
            **kwargs,
        )

    reference = take(stream(), 6)
    for batch in reference:
        assert batch["views"].shape == (4, 2, 5, 5, 3)
        # Crops of a constant image stay that constant: each view is its own example's.
        expected = (batch["label"] + 1)[:, None, None, None, None] / 255.0
        np.testing.assert_allclose(
            batch["views"], np.broadcast_to(expected, (4, 2, 5, 5, 3)), atol=1e-5
        )
    assert_same_batches(take(stream(start_step=4), 2), reference[4:6])


def test_multi_crop_batches_add_small_views_and_leave_the_views_unchanged(mock_cifar10):
    config = AugmentConfig(image_size=16, num_small_crops=3, small_crop_size=8)
    batches = take(cifar10_stream(augment_config=config), 2)
    for batch, plain in zip(batches, take(cifar10_stream(), 2), strict=True):
        assert batch.keys() == {"views", "label", "small_views"}
        small = batch["small_views"]
        assert small.dtype == np.float32 and small.shape == (4, 3, 8, 8, 3)
        assert small.min() >= 0.0 and small.max() <= 1.0
        # Every small view of every example is its own crop.
        assert len({view.tobytes() for view in small.reshape(12, -1)}) == 12
        np.testing.assert_array_equal(batch["views"], plain["views"])
        np.testing.assert_array_equal(batch["label"], plain["label"])


def test_multi_crop_on_images_of_several_sizes(varied_data_dir):
    config = AugmentConfig(
        image_size=5,
        num_small_crops=2,
        small_crop_size=3,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
    )
    stream = pipeline.pretrain_batches(
        "tiny_varied_images",
        "train",
        host_batch_size=4,
        augment_config=config,
        seed=2,
        process_index=0,
        process_count=1,
        data_dir=varied_data_dir,
    )
    for batch in take(stream, 3):
        assert batch["small_views"].shape == (4, 2, 3, 3, 3)
        # Crops of a constant image stay that constant: each small view is its own example's.
        expected = (batch["label"] + 1)[:, None, None, None, None] / 255.0
        np.testing.assert_allclose(
            batch["small_views"], np.broadcast_to(expected, (4, 2, 3, 3, 3)), atol=1e-5
        )
