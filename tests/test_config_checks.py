"""Every numeric config field is checked before a run starts: a value out of range is one line
naming the field and the value."""

import json
import math
import re

import pytest

from simclr_jax import config_checks, configs, encoder, evaluate, trainer
from simclr_jax.configs import tiny


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_learning_rate", -1.0),  # would train in the wrong direction
        ("base_learning_rate", math.inf),
        ("image_size", 3),
        ("image_size", -16),
        ("global_batch_size", 0),
        ("global_batch_size", -4),
        ("eval_batch_size", 0),
        ("objective", "simclr"),
        ("objective", "SupCon"),
        ("temperature", 0.0),
        ("temperature", math.nan),
        ("epochs", 0.0),
        ("warmup_epochs", -1.0),
        ("weight_decay", -1e-4),
        ("momentum", 1.0),
        ("loss_block_size", -1),
        ("eval_center_crop", 1.5),
        ("shuffle_buffer", 0),
        ("augment.crop_area_min", 0.0),
        ("augment.flip_prob", 1.5),
        ("augment.rotation_degrees", -10.0),
        ("augment.num_small_crops", -1),
        ("augment.small_crop_size", 4),
        ("augment.small_crop_area", (0.14, 0.05)),
        ("augment.small_crop_area", (0.0, 0.14)),
        ("model.depth", 19),
        ("model.base_width", 0),
        ("model.width_multiplier", 0.0),
        ("model.projection_dim", 0),
        ("model.sk_ratio", -0.0625),
        ("model.se_ratio", math.nan),
        ("hybrid.reconstruction_weight", -1.0),
        ("log_every_steps", 0),
        ("checkpoint_every_steps", 0),
        ("keep_checkpoints", 0),
        ("eval_every_steps", -1),
        ("linear_probe_holdout_fraction", 1.0),
        ("linear_probe_patience", 0),
        ("evaluation.knn_ks", (20, 0)),
        ("evaluation.knn_temperature", 0.0),
        ("evaluation.finetune.fractions", (0.0, 1.0)),
        ("evaluation.linear_sgd.epochs", -1.0),
        ("distillation.label_fraction", 0.0),
        ("distillation.label_fraction", 1.5),
        ("distillation.temperature", 0.0),
        ("distillation.alpha", 1.5),
        ("distillation.student_depth", 19),
        ("distillation.batch_size", 0),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_the_field_and_value(field, value):
    config = tiny.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError) as error:
        config_checks.check_config(config)
    message = str(error.value)
    assert re.fullmatch(
        rf"config field {re.escape(field)} = .+ is invalid: it must be .+\.", message
    )
    assert f"= {value!r} is" in message
    assert "\n" not in message


@pytest.mark.parametrize("split", ["unlabelled", "unlabelled[:10%]"])
def test_supcon_on_an_unlabelled_split_is_one_line_naming_objective_and_split(split):
    config = configs.load("stl10_resnet18")
    config_checks.check_config(config)  # NT-Xent on the unlabelled split is the recipe
    config.objective = "supcon"
    config.train_split = split
    with pytest.raises(ValueError) as error:
        config_checks.check_config(config)
    message = str(error.value)
    assert message.startswith("config field objective = 'supcon' is invalid with train_split")
    assert repr(split) in message and "\n" not in message
    config.train_split = "train"  # labelled: accepted
    config_checks.check_config(config)


@pytest.mark.parametrize("name", configs.names())
def test_every_shipped_config_passes(name):
    config_checks.check_config(configs.load(name))


def test_every_entry_point_checks_the_config_once_in_one_line(tmp_path, monkeypatch):
    checked = []
    check_config = config_checks.check_config
    monkeypatch.setattr(
        config_checks, "check_config", lambda config: checked.append(1) or check_config(config)
    )
    config = tiny.get_config()
    config.base_learning_rate = -1.0
    written = tmp_path / "written"  # what evaluation and the encoder API read
    written.mkdir()
    (written / "config.json").write_text(json.dumps(config.to_dict()))
    workdir = tmp_path / "run"
    for entry_point in (
        lambda: trainer.train_and_evaluate(config, str(workdir)),
        lambda: evaluate.run_protocols(str(written)),
        lambda: encoder.from_checkpoint(str(written)),
    ):
        checked.clear()
        with pytest.raises(ValueError) as error:
            entry_point()
        assert str(error.value) == (
            "config field base_learning_rate = -1.0 is invalid: it must be a finite number above 0."
        )
        assert checked == [1]
    assert not workdir.exists()  # refused before the workdir is touched


@pytest.mark.parametrize(
    ("fields", "field", "value", "expected"),
    [
        ({"loss_block_size": 8}, "loss_block_size", 8, "0 with augment.num_small_crops = 2"),
        ({"hybrid.decoder": "ae"}, "hybrid.decoder", "ae", "'none' with augment.num_small_crops"),
        ({"objective": "supcon"}, "objective", "supcon", "'nt_xent' with augment.num_small_crops"),
        ({"augment.small_crop_size": 24}, "augment.small_crop_size", 24, r"\[8, 16\]"),
        # tiny's 16 px views: 0 derives round(3/7 · 16) = 7, below 8.
        ({}, "augment.small_crop_size", 0, r"\[8, 16\].*0 derives 7 from 16"),
    ],
)
def test_multi_crop_conflicts_are_one_line_naming_the_field_and_value(
    fields, field, value, expected
):
    config = tiny.get_config()  # image_size 16
    config.update_from_flattened_dict({"augment.num_small_crops": 2, **fields})
    with pytest.raises(ValueError) as error:
        config_checks.check_config(config)
    message = str(error.value)
    assert message.startswith(f"config field {field} = {value!r} is invalid: it must be ")
    assert re.search(expected, message) and "\n" not in message
    config.augment.num_small_crops = 0  # plain SimCLR: none of these matter
    config_checks.check_config(config)


def test_multi_crop_small_side_is_checked_against_the_dataset_side():
    config = tiny.get_config()
    config.update_from_flattened_dict({"image_size": 0, "augment.num_small_crops": 2})
    config_checks.check_config(config)  # the views' side is not known yet
    config_checks.check_multi_crop(config, 28)  # 0 derives 12 from 28
    assert config_checks.small_crop_size(config, 224) == 96  # SwAV's sizes
    with pytest.raises(ValueError, match=r"small_crop_size = 0 .*0 derives 7 from 16\.$"):
        config_checks.check_multi_crop(config, 16)
