"""An example of a recipe of your own: start from a shipped config and change a few fields.

Copy this file anywhere and run it by path (shipped configs are run by name):
  python -m simclr_jax.train --config=configs/my_recipe.py --workdir=workdirs/my_recipe
Fields can still be overridden on the command line, e.g. --config.epochs=8.
This one trains the Fashion-MNIST recipe at twice the width for 8 epochs (about 4x the compute).
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.model.base_width = 32
    config.epochs = 8
    return config
