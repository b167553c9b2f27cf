"""Fashion-MNIST hybrid VAE: NT-Xent + λ·MSE + β·KL with a variational head on h (SPEC §7).

As `fashion_mnist_hybrid`, but h is mapped to μ and log σ² of a Gaussian posterior, a
reparameterised sample is decoded, and β·KL(q ‖ N(0, I)) is added.
Run:   python -m simclr_jax.train --config=fashion_mnist_vae \\
         --workdir=workdirs/fashion_mnist_vae
Writes reconstructions.png (inputs above their reconstructions of μ) in the workdir.
Expect: docs/hybrid.md (measured against plain fashion_mnist at 2 epochs).
"""

from simclr_jax.configs import fashion_mnist_hybrid


def get_config():
    config = fashion_mnist_hybrid.get_config()
    config.hybrid.decoder = "vae"
    config.hybrid.kl_weight = 1e-3
    config.hybrid.latent_dim = 64
    return config
