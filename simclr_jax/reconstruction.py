"""The reconstruction terms of the hybrid objective: NT-Xent + λ·MSE (+ β·KL for the VAE).

The model's reconstruction head (see :mod:`simclr_jax.models.decoder`) decodes each view's
representation h. The target is a config choice:

- ``"input"``: the un-augmented image the view was drawn from (resized to the view size), so the
  representation must keep what the augmentations destroy; the batch then carries an ``image``
  key ``[B, H, W, C]`` next to ``views``.
- ``"view"``: the augmented view itself, a plain autoencoder on the views.

The MSE is averaged over pixels and channels; the KL divergence of the variational head's
Gaussian posterior from N(0, I) is summed over latent dimensions and averaged over views, so β
trades nats per image against a per-pixel squared error.
"""

import dataclasses

import jax
import jax.numpy as jnp

TARGETS = ("input", "view")


def mean_squared_error(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over every element of ``(reconstruction - target)²``, in float32."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction shape {reconstruction.shape} differs from target shape {target.shape}"
        )
    difference = reconstruction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(difference))


def gaussian_kl(mu: jax.Array, log_var: jax.Array) -> jax.Array:
    """Mean over rows of KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)."""
    mu = mu.astype(jnp.float32)
    log_var = log_var.astype(jnp.float32)
    per_row = 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)
    return jnp.mean(per_row)


@dataclasses.dataclass(frozen=True)
class HybridObjective:
    """Weights and target of the reconstruction terms added to the SimCLR loss.

    Attributes:
      reconstruction_weight: λ, the weight of the MSE.
      kl_weight: β, the weight of the KL term; used only when the model outputs ``mu`` and
        ``log_var`` (the variational head).
      target: ``"input"`` or ``"view"`` (see the module docstring).
    """

    reconstruction_weight: float = 1.0
    kl_weight: float = 0.0
    target: str = "input"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"reconstruction target must be one of {TARGETS}, got {self.target!r}")
        for name in ("reconstruction_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def needs_input_image(self) -> bool:
        """Whether batches must carry the un-augmented ``image`` next to the views."""
        return self.target == "input"

    def loss(
        self, outputs: dict[str, jax.Array], views: jax.Array, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(λ·MSE + β·KL, {"reconstruction_loss": MSE[, "kl_divergence": KL]})``.

        ``outputs`` are the model's outputs on ``views`` (``[2B, H, W, C]``, the two views of
        image k at rows 2k and 2k + 1); ``batch`` is the step's batch, holding ``image`` when
        the target is the input.
        """
        if "reconstruction" not in outputs:
            raise ValueError("the hybrid objective needs a model with a reconstruction head")
        if self.needs_input_image:
            if "image" not in batch:
                raise ValueError(
                    'reconstruction target "input" needs batches with an "image" key '
                    "(pipeline.pretrain_batches(..., with_input_image=True))"
                )
            target = jnp.repeat(batch["image"], 2, axis=0)
        else:
            target = views
        reconstruction_loss = mean_squared_error(outputs["reconstruction"], target)
        terms = {"reconstruction_loss": reconstruction_loss}
        total = self.reconstruction_weight * reconstruction_loss
        if "mu" in outputs:
            terms["kl_divergence"] = gaussian_kl(outputs["mu"], outputs["log_var"])
            total = total + self.kl_weight * terms["kl_divergence"]
        return total, terms
