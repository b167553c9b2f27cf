"""Experiment: what it checks when it is built, and that it does not check the same images twice."""

import os

import PIL.Image
import pytest

from simclr_jax import parallel
from simclr_jax.configs import tiny
from simclr_jax.experiment import Experiment


@pytest.fixture
def image_folder(tmp_path):
    """train/: 3 shirts and 2 trousers, 16x16 gray PNG files."""
    names = ["shirt/a", "shirt/b", "shirt/c", "trousers/d", "trousers/e"]
    for shade, name in enumerate(names):
        path = tmp_path / "train" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("L", (16, 16), color=10 * shade).save(path)
    return tmp_path


@pytest.fixture
def config(image_folder):
    """The tiny config on the image folder, its only split read for training and evaluation."""
    config = tiny.get_config()
    config.dataset = "image_folder"
    config.dataset_dir = str(image_folder)
    config.train_split = config.probe_train_split = config.eval_split = "train"
    return config


@pytest.fixture
def opened(monkeypatch):
    """The paths PIL opens, in order."""
    paths = []
    open_image = PIL.Image.open

    def counting_open(path, *args, **kwargs):
        paths.append(os.fspath(path))
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return paths


def test_images_are_checked_once_per_process_until_a_file_changes(config, image_folder, opened):
    mesh = parallel.data_mesh()
    images = sorted(str(p) for p in (image_folder / "train").rglob("*.png"))

    Experiment(config, mesh)  # the split is read for training, probing and evaluation
    assert sorted(opened) == images  # each image once
    opened.clear()
    Experiment(config, mesh)  # as evaluation after training, in the same process
    assert opened == []

    damaged = image_folder / "train" / "shirt" / "b.png"
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[:40])
    with pytest.raises(ValueError) as error:
        Experiment(config, mesh)
    assert str(damaged) in str(error.value) and "\n" not in str(error.value)
    assert str(damaged) in opened
    opened.clear()
    with pytest.raises(ValueError, match="1 unreadable file"):  # a failed check is not kept
        Experiment(config, mesh)
    assert sorted(opened) == images

    damaged.write_bytes(intact)
    opened.clear()
    Experiment(config, mesh)
    assert sorted(opened) == images
    opened.clear()
    Experiment(config, mesh)
    assert opened == []


def test_an_added_file_is_checked(config, image_folder, opened):
    mesh = parallel.data_mesh()
    Experiment(config, mesh)
    added = image_folder / "train" / "shirt" / "f.png"
    PIL.Image.new("L", (8, 8)).save(added)
    opened.clear()
    with pytest.raises(ValueError, match=r"1 image\(s\) not 16x16") as error:
        Experiment(config, mesh)
    assert f"{added} is 8x8" in str(error.value)
    assert str(added) in opened


def test_without_check_images_no_image_is_opened(config, opened):
    experiment = Experiment(config, parallel.data_mesh(), check_images=False)
    assert opened == []
    assert experiment.image_shape == (16, 16, 1)
