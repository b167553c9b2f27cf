"""The --config flag shared by the command lines: names and paths, overrides, one-line errors."""

import subprocess
import sys

import pytest

from simclr_jax import cli, configs
from simclr_jax.configs import tiny


def test_names_become_the_shipped_files_and_paths_stay_paths(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("from simclr_jax.configs import tiny\nget_config = tiny.get_config\n")
    argv = ["prog", "--config=tiny", "--config.seed=3", "--config", str(recipe)]
    assert cli.resolve_config_argument(argv) == [
        "prog",
        f"--config={configs.config_path('tiny')}",
        "--config.seed=3",
        "--config",
        str(recipe),
    ]
    with pytest.raises(ValueError, match="no config 'tinny'"):
        cli.resolve_config_argument(["prog", "--config=tinny"])


def test_overrides_are_typed_like_the_command_line():
    config = tiny.get_config()
    cli.apply_config_overrides(
        config, ["model.base_width=8", "temperature=0.3", "model.conv_impl=xla", "cache=False"]
    )
    assert (config.model.base_width, config.temperature) == (8, 0.3)
    assert (config.model.conv_impl, config.cache) == ("xla", False)
    with pytest.raises(ValueError, match=r"model\.no_such_field"):
        cli.apply_config_overrides(config, ["model.no_such_field=1"])
    with pytest.raises(ValueError, match=r"'model\.depth=deep'"):
        cli.apply_config_overrides(config, ["model.depth=deep"])
    with pytest.raises(ValueError, match="not FIELD=VALUE"):
        cli.apply_config_overrides(config, ["model.depth"])


def test_train_names_an_unknown_config_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclr_jax.train",
            "--config=fashon_mnist",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "no config 'fashon_mnist'" in line and "fashion_mnist" in line
