"""The default config and the recipes, shipped with the package; :func:`load` reads one.

A config is a Python file whose ``get_config()`` returns an ``ml_collections.ConfigDict``. The
modules here are selected by name (``fashion_mnist``), any other file by its path
(``path/to/my_recipe.py``); a user's recipe starts from ``simclr_jax.configs.default`` (or a recipe
here) and changes a few fields. ``default.py`` documents every field.
"""

import importlib.util
import os
import pathlib

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
    """The configs shipped with the package, by name."""
    return sorted(path.stem for path in _HERE.glob("*.py") if not path.stem.startswith("_"))


def config_path(name_or_path: str) -> str:
    """The file of the config ``name_or_path``: a shipped config's name, or a path to a file.

    Raises:
      ValueError: neither a shipped config nor an existing file (the message lists the names).
    """
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    name = name_or_path.removesuffix(".py")
    if name in names():
        return str(_HERE / f"{name}.py")
    raise ValueError(
        f"no config {name_or_path!r}: give a file's path or one of {', '.join(names())}."
    )


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the config ``name_or_path`` (see :func:`config_path`)."""
    path = config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(
        f"simclr_jax_config_{pathlib.Path(path).stem}", path
    )
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{path} has no get_config() function.")
    return module.get_config()
