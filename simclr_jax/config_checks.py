"""The ranges of a run config's numeric fields (and its choices), checked before a run starts.

:func:`check_config` is called by :class:`simclr_jax.experiment.Experiment`, which every command
builds first (the trainer before it touches the workdir): a value out of range (a negative
learning rate, a 3-pixel image, a batch of 0, an unknown objective) is one error line naming the
field and the value, instead of a run that trains in the wrong direction or fails deep inside a
library.
``simclr_jax/configs/default.py`` documents what each field means.
"""

import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from simclr_jax.losses import OBJECTIVES
from simclr_jax.models.resnet import DEPTHS

MIN_IMAGE_SIZE = 8  # below this, crops and the ResNet's strides leave nothing to learn from


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _probability(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _fraction(value: Any) -> bool:
    return _number(value) and 0 < value <= 1


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: _integer(value) and value >= low


def _each(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A tuple (or list) whose every element passes ``check``."""
    return lambda values: isinstance(values, tuple | list) and all(map(check, values))


_AT_LEAST_1 = (_int_at_least(1), "an integer of at least 1")
_AT_LEAST_0 = (_int_at_least(0), "an integer of at least 0")
_POSITIVE = (_positive, "a finite number above 0")
_NON_NEGATIVE = (_non_negative, "a finite number of at least 0")
_PROBABILITY = (_probability, "a probability, in [0, 1]")

# field -> (check, what the value must be)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "image_size": (
        lambda v: _integer(v) and (v == 0 or v >= MIN_IMAGE_SIZE),
        f"0 (the dataset's own side) or an integer of at least {MIN_IMAGE_SIZE}",
    ),
    "eval_center_crop": (lambda v: v == 0 or _fraction(v), "0 (no crop) or in (0, 1]"),
    "shuffle_buffer": _AT_LEAST_1,
    "augment.crop_area_min": (_fraction, "in (0, 1]"),
    "augment.flip_prob": _PROBABILITY,
    "augment.color_jitter_strength": _NON_NEGATIVE,
    "augment.color_jitter_prob": _PROBABILITY,
    "augment.grayscale_prob": _PROBABILITY,
    "augment.blur_prob": _PROBABILITY,
    "augment.rotation_degrees": (lambda v: _number(v) and 0 <= v <= 180, "in [0, 180]"),
    "augment.num_small_crops": _AT_LEAST_0,
    "augment.small_crop_size": (
        lambda v: _integer(v) and (v == 0 or v >= MIN_IMAGE_SIZE),
        f"0 (derived from the view size) or an integer of at least {MIN_IMAGE_SIZE}",
    ),
    "augment.small_crop_area": (
        lambda v: _each(_fraction)(v) and len(v) == 2 and v[0] <= v[1],
        "(low, high) area fractions with 0 < low <= high <= 1",
    ),
    "model.depth": (lambda v: v in DEPTHS, f"one of {', '.join(map(str, DEPTHS))}"),
    "model.width_multiplier": _POSITIVE,
    "model.base_width": _AT_LEAST_1,
    "model.sk_ratio": (_non_negative, "a finite number of at least 0 (0 = off)"),
    "model.se_ratio": (_non_negative, "a finite number of at least 0 (0 = off)"),
    "model.projection_layers": _AT_LEAST_1,
    "model.projection_dim": _AT_LEAST_1,
    "model.projection_hidden_dim": _AT_LEAST_0,
    "objective": (lambda v: v in OBJECTIVES, f"one of {', '.join(map(repr, OBJECTIVES))}"),
    "temperature": _POSITIVE,
    "loss_block_size": _AT_LEAST_0,
    "hybrid.reconstruction_weight": _NON_NEGATIVE,
    "hybrid.kl_weight": _NON_NEGATIVE,
    "hybrid.decoder_channels": _AT_LEAST_1,
    "hybrid.latent_dim": _AT_LEAST_1,
    "base_learning_rate": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "global_batch_size": _AT_LEAST_1,
    "epochs": _POSITIVE,
    "warmup_epochs": _NON_NEGATIVE,
    "num_train_steps": (_integer, "an integer (at most 0: derived from epochs)"),
    "seed": (_integer, "an integer"),
    "log_every_steps": _AT_LEAST_1,
    "checkpoint_every_steps": _AT_LEAST_1,
    "keep_checkpoints": _AT_LEAST_1,
    "eval_every_steps": _AT_LEAST_0,
    "eval_batch_size": _AT_LEAST_1,
    "linear_probe_holdout_fraction": (lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    "linear_probe_patience": _AT_LEAST_1,
    "evaluation.seed": (_integer, "an integer"),
    "evaluation.knn_ks": (_each(_int_at_least(1)), "integers of at least 1"),
    "evaluation.knn_temperature": _POSITIVE,
    "evaluation.label_budgets": (_each(_int_at_least(1)), "integers of at least 1"),
    "evaluation.linear_sgd.epochs": _POSITIVE,
    "evaluation.linear_sgd.batch_size": _AT_LEAST_1,
    "evaluation.linear_sgd.base_learning_rate": _POSITIVE,
    "evaluation.finetune.fractions": (_each(_fraction), "fractions in (0, 1]"),
    "evaluation.finetune.epochs": (_each(_positive), "finite numbers above 0"),
    "evaluation.finetune.batch_size": _AT_LEAST_1,
    "evaluation.finetune.base_learning_rate": _POSITIVE,
    "evaluation.finetune.head_layers": _AT_LEAST_0,
    "evaluation.embedding_points": (_int_at_least(2), "an integer of at least 2"),
    "evaluation.retrieval_queries": _AT_LEAST_1,
    "evaluation.retrieval_k": _AT_LEAST_1,
    "evaluation.view_pairs": _AT_LEAST_1,
    "distillation.label_fraction": (_fraction, "in (0, 1]"),
    "distillation.teacher_epochs": _POSITIVE,
    "distillation.teacher_batch_size": _AT_LEAST_1,
    "distillation.teacher_base_learning_rate": _POSITIVE,
    "distillation.teacher_head_layers": _AT_LEAST_0,
    "distillation.temperature": _POSITIVE,
    "distillation.alpha": _PROBABILITY,
    "distillation.student_depth": (
        lambda v: v == 0 or v in DEPTHS,
        f"0 (the teacher's) or one of {', '.join(map(str, DEPTHS))}",
    ),
    "distillation.student_width_multiplier": (
        _non_negative,
        "a finite number of at least 0 (0 = the teacher's)",
    ),
    "distillation.student_base_width": _AT_LEAST_0,
    "distillation.epochs": _POSITIVE,
    "distillation.batch_size": _AT_LEAST_1,
    "distillation.base_learning_rate": _POSITIVE,
}


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of :data:`RULES` in ``config``, then that a supervised objective has
    labels to learn from.

    Raises:
      ValueError: the first field out of range, naming it, its value and the range.
    """
    for name, (check, expected) in RULES.items():
        value = _field(config, name)
        if not check(value):
            raise ValueError(f"config field {name} = {value!r} is invalid: it must be {expected}.")
    if config.objective == "supcon" and _known_unlabelled(config.dataset, config.train_split):
        raise ValueError(
            f"config field objective = 'supcon' is invalid with train_split = "
            f"{config.train_split!r} of {config.dataset}: that split has no labels (all -1); "
            "pretrain on a labelled split or use objective = 'nt_xent'."
        )
    check_multi_crop(config, config.image_size)


def _known_unlabelled(dataset: str, split: str) -> bool:
    """Whether ``split`` of ``dataset`` is known, from its name alone, to hold no labels."""
    return dataset == "stl10" and re.fullmatch(r"unlabelled(\[.*\])?", split) is not None


def small_crop_size(config: ml_collections.ConfigDict, image_size: int) -> int:
    """The side of multi-crop's small views for large views of ``image_size`` pixels:
    ``augment.small_crop_size``, or when 0, round(3/7 of ``image_size``) (SwAV's 96 for 224)."""
    return config.augment.small_crop_size or round(3 * image_size / 7)


def check_multi_crop(config: ml_collections.ConfigDict, image_size: int) -> None:
    """With ``augment.num_small_crops`` > 0, the fields multi-crop cannot work with, and the small
    views' side against the large views' ``image_size`` (0 = not known yet: not checked).

    Raises:
      ValueError: one line naming the field, its value and what it must be.
    """
    num_small = config.augment.num_small_crops
    if not num_small:
        return
    with_small = f"with augment.num_small_crops = {num_small}"
    problems = {
        "loss_block_size": (
            config.loss_block_size != 0,
            f"0 {with_small} (the multi-crop loss is dense only)",
        ),
        "hybrid.decoder": (config.hybrid.decoder != "none", f"'none' {with_small}"),
        "objective": (config.objective != "nt_xent", f"'nt_xent' {with_small}"),
    }
    if image_size:
        side = small_crop_size(config, image_size)
        explicit = config.augment.small_crop_size
        derived = "" if explicit else f"; 0 derives {side} from {image_size}"
        problems["augment.small_crop_size"] = (
            not MIN_IMAGE_SIZE <= side <= image_size,
            f"a side in [{MIN_IMAGE_SIZE}, {image_size}] (the view size) {with_small}{derived}",
        )
    for name, (invalid, expected) in problems.items():
        if invalid:
            value = _field(config, name)
            raise ValueError(f"config field {name} = {value!r} is invalid: it must be {expected}.")
