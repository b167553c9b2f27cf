"""What a run derives from its config: the data, the model and its kernels, the optimiser's
schedule, the augmentation and the hybrid objective.

:class:`Experiment` is shared by the trainer, the evaluation command, the encoder API, the
benchmark and the input-throughput tool, so that each builds the same run from the same config.
The kernels are chosen for the platform of the run's mesh (:func:`simclr_jax.kernels.for_mesh`).
"""

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import config_checks, kernels, optim, reconstruction, step
from simclr_jax.data import augment, pipeline
from simclr_jax.models import XLA_LAYERS, Layers, SimCLR, decoder, simclr_resnet

_DECODERS = ("none", "ae", "vae")


def reconstruction_head(
    config: ml_collections.ConfigDict,
) -> decoder.AutoencoderHead | decoder.VariationalHead | None:
    """The reconstruction head ``config.hybrid.decoder`` names, or None for plain SimCLR."""
    hybrid = config.hybrid
    if hybrid.decoder not in _DECODERS:
        raise ValueError(f"hybrid.decoder must be one of {_DECODERS}, got {hybrid.decoder!r}")
    dtype = jnp.dtype(config.model.dtype)
    if hybrid.decoder == "ae":
        return decoder.AutoencoderHead(channels=hybrid.decoder_channels, dtype=dtype)
    if hybrid.decoder == "vae":
        return decoder.VariationalHead(
            latent_dim=hybrid.latent_dim, channels=hybrid.decoder_channels, dtype=dtype
        )
    return None


def hybrid_objective(config: ml_collections.ConfigDict) -> reconstruction.HybridObjective | None:
    """The reconstruction terms of ``config.hybrid``, or None when its decoder is off."""
    if reconstruction_head(config) is None:
        return None
    return reconstruction.HybridObjective(
        reconstruction_weight=config.hybrid.reconstruction_weight,
        kl_weight=config.hybrid.kl_weight,
        target=config.hybrid.target,
    )


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, layers: Layers = XLA_LAYERS
) -> SimCLR:
    """The SimCLR network that ``config.model`` describes, computing with ``layers``, with a probe
    over ``num_classes`` and the reconstruction head of ``config.hybrid`` (if any)."""
    return simclr_resnet(
        depth=config.model.depth,
        width_multiplier=config.model.width_multiplier,
        base_width=config.model.base_width,
        stem=config.model.stem,
        sk_ratio=config.model.sk_ratio,
        se_ratio=config.model.se_ratio,
        zero_init_residual=config.model.zero_init_residual,
        num_classes=num_classes,
        projection_layers=config.model.projection_layers,
        projection_dim=config.model.projection_dim,
        projection_hidden_dim=config.model.projection_hidden_dim or None,
        dtype=jnp.dtype(config.model.dtype),
        layers=layers,
        reconstruction_head=reconstruction_head(config),
    )


def augment_config(config: ml_collections.ConfigDict, image_size: int) -> augment.AugmentConfig:
    """The pretraining augmentation that ``config.augment`` describes, at ``image_size``."""
    return augment.AugmentConfig(
        image_size=image_size,
        crop_area_range=(config.augment.crop_area_min, 1.0),
        flip_prob=config.augment.flip_prob,
        color_jitter_strength=config.augment.color_jitter_strength,
        color_jitter_prob=config.augment.color_jitter_prob,
        grayscale_prob=config.augment.grayscale_prob,
        blur_prob=config.augment.blur_prob,
        brightness_mode=config.augment.brightness_mode,
        rotation_degrees=config.augment.rotation_degrees,
        num_small_crops=config.augment.num_small_crops,
        small_crop_size=config_checks.small_crop_size(config, image_size),
        small_crop_area_range=tuple(config.augment.small_crop_area),
    )


class Experiment:
    """Everything a run derives from its config, the dataset's metadata and its mesh.

    The config is checked first (:func:`simclr_jax.config_checks.check_config`, here only, for
    every command), then the dataset. With ``check_images`` (for a caller that reads the data:
    training, evaluation), every image of an image folder's splits is checked too, each split
    once per process while its files stay the same
    (:func:`simclr_jax.data.pipeline.dataset_info`); without it (restoring an encoder), only
    the first image of each split is read, for its shape. With ``dataset_info`` (a program
    compiled but never run: :mod:`simclr_jax.compile_check`), the dataset is neither prepared
    nor read, and every split takes that metadata.

    Attributes: ``config``, ``mesh``, the splits' ``train_info``/``probe_info``/``eval_info``,
    ``image_size``/``image_shape``, ``num_classes``, ``steps_per_epoch``, ``total_steps``,
    ``learning_rate_fn``, ``layers`` (the kernels chosen for the mesh's platform), ``model``
    and ``hybrid`` (the reconstruction terms, or None).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        *,
        check_images: bool = True,
        dataset_info: pipeline.DatasetInfo | None = None,
    ):
        config_checks.check_config(config)
        self.config = config
        self.mesh = mesh
        data_dir = config.data_dir or None
        dataset_dir = config.dataset_dir or None
        self.data_kwargs = {"data_dir": data_dir, "dataset_dir": dataset_dir}
        if dataset_info is None:
            pipeline.prepare_dataset(config.dataset, data_dir=data_dir, dataset_dir=dataset_dir)
        infos: dict[str, pipeline.DatasetInfo] = {}

        def info(split: str) -> pipeline.DatasetInfo:  # each split read once
            if dataset_info is not None:
                return dataset_info
            if split not in infos:
                infos[split] = pipeline.dataset_info(
                    config.dataset, split, check_images=check_images, **self.data_kwargs
                )
            return infos[split]

        self.train_info = info(config.train_split)
        self.probe_info = info(config.probe_train_split)
        self.eval_info = info(config.eval_split)
        height, _, channels = self.train_info.image_shape
        self.image_size = config.image_size or height
        if not self.image_size:
            raise ValueError(
                f"the images of {config.dataset} vary in size: set --config.image_size "
                "(e.g. 224) to the side the views are resized to."
            )
        self.image_shape = (self.image_size, self.image_size, channels)
        config_checks.check_multi_crop(config, self.image_size)
        self.num_classes = self.probe_info.num_classes
        batch = config.global_batch_size
        self.steps_per_epoch = optim.steps_per_epoch(self.train_info.num_examples, batch)
        self.total_steps = (
            config.num_train_steps
            if config.num_train_steps > 0
            else optim.total_steps(self.train_info.num_examples, config.epochs, batch)
        )
        self.learning_rate_fn = optim.warmup_cosine_schedule(
            peak_value=optim.scaled_learning_rate(
                config.base_learning_rate, batch, config.learning_rate_scaling
            ),
            warmup_steps=min(
                round(config.warmup_epochs * self.steps_per_epoch), self.total_steps - 1
            ),
            total_steps=self.total_steps,
        )
        self.layers = kernels.for_mesh(config.model.conv_impl, mesh, config.model.conv_precision)
        self.model = build_model(config, self.num_classes, self.layers)
        self.hybrid = hybrid_objective(config)

    def compatibility(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be restored into it (how convolutions
        are computed and how parameters start are not part of it: every ``conv_impl``,
        ``conv_precision`` and ``zero_init_residual`` has the same parameters)."""
        model = {
            k: v
            for k, v in self.config.model.to_dict().items()
            if k not in ("conv_impl", "conv_precision", "zero_init_residual")
        }
        # Recorded only when on, as the hybrid fields are: checkpoints written before these fields
        # stay compatible.
        for field in ("sk_ratio", "se_ratio", "projection_hidden_dim"):
            if not model[field]:
                del model[field]
        compatibility = {
            **model,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "optimizer": self.config.optimizer,
        }
        if self.hybrid is not None:  # recorded only when on: plain checkpoints stay compatible
            hybrid = self.config.hybrid
            compatibility["hybrid_decoder"] = hybrid.decoder
            compatibility["hybrid_decoder_channels"] = hybrid.decoder_channels
            if hybrid.decoder == "vae":
                compatibility["hybrid_latent_dim"] = hybrid.latent_dim
        return compatibility

    def resume_compatibility(self) -> dict[str, Any]:
        """What a checkpoint must share with this run for training to resume from it:
        :meth:`compatibility` and a loss other than NT-Xent (recorded only then, as the ratios
        are, so SimCLR's checkpoints stay valid), so that a run does not continue under another
        objective. Evaluation needs the parameters only: :meth:`compatibility`."""
        compatibility = self.compatibility()
        if self.config.objective != "nt_xent":
            compatibility["objective"] = self.config.objective
        return compatibility

    def initial_state(self, seed: int) -> step.TrainState:
        """A freshly initialised train state (on the host; the caller places it)."""
        tx = optim.create_optimizer(
            self.config.optimizer,
            self.learning_rate_fn,
            weight_decay=self.config.weight_decay,
            momentum=self.config.momentum,
        )
        return step.create_train_state(self.model, tx, jax.random.key(seed), self.image_shape)

    def pretrain_batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """This process's pretraining batches from step ``start_step`` on."""
        return pipeline.pretrain_batches(
            self.config.dataset,
            self.config.train_split,
            host_batch_size=self.config.global_batch_size // jax.process_count(),
            augment_config=augment_config(self.config, self.image_size),
            seed=self.config.seed,
            start_step=start_step,
            cache=self.config.cache,
            shuffle_buffer=self.config.shuffle_buffer,
            with_input_image=self.hybrid is not None and self.hybrid.needs_input_image,
            **self.data_kwargs,
        )

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """This process's evaluation batches of ``split`` (un-augmented images and labels)."""
        return pipeline.eval_batches(
            self.config.dataset,
            split,
            host_batch_size=self.config.eval_batch_size // jax.process_count(),
            image_size=self.image_size,
            center_crop_fraction=self.config.eval_center_crop or None,
            **self.data_kwargs,
        )

    def train_step(self) -> Callable[[step.TrainState, step.Batch, jax.Array], Any]:
        """The training step of this run, compiled for its mesh."""
        return step.jit_train_step(
            self.mesh,
            temperature=self.config.temperature,
            learning_rate_fn=self.learning_rate_fn,
            loss_block_size=self.config.loss_block_size,
            objective=self.config.objective,
            hybrid=self.hybrid,
        )
