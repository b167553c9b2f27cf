"""What a model and a schedule need to know about a dataset's split, without TensorFlow.

`DatasetInfo` is what `sources.dataset_info` reads from TFDS or a folder at run time;
`published_info` gives the same for the datasets of the shipped recipes from their published
sizes, for programs that build a step without the dataset (or TensorFlow) at hand: the TPU
compile check and the GPU check.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a schedule need to know about one split of a dataset.

    `image_shape` is `(height, width, channels)`; height and width are None for datasets whose
    images vary in size (e.g. `imagenet2012`).
    """

    name: str
    num_examples: int
    num_classes: int
    image_shape: tuple[int | None, int | None, int]


# Training-split sizes, classes and image shapes as published (TFDS catalogue). Height and width
# None: images vary in size.
PUBLISHED_SPLITS = {
    ("imagenet2012", "train"): (1_281_167, 1000, (None, None, 3)),
    ("cifar10", "train"): (50_000, 10, (32, 32, 3)),
    ("cifar100", "train"): (50_000, 100, (32, 32, 3)),
    ("stl10", "unlabelled"): (100_000, 10, (96, 96, 3)),
    ("fashion_mnist", "train"): (60_000, 10, (28, 28, 1)),
}


def published_info(name: str, split: str) -> DatasetInfo | None:
    """Split ``split`` of dataset ``name`` as published (:data:`PUBLISHED_SPLITS`); None for a
    split without published figures here."""
    published = PUBLISHED_SPLITS.get((name, split))
    return None if published is None else DatasetInfo(name, *published)
