"""Every field of a simclr_jax run, with its meaning; recipe configs override a few of them.

Run:  python -m simclr_jax.train --config=default --workdir=/tmp/simclr
Recipes (the other modules of `simclr_jax.configs`) start from `get_config()` here and state
their command and result.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- Data ------------------------------------------------------------------------------
    # A TFDS image-classification dataset name (fashion_mnist, cifar10, stl10, imagenet2012, ...)
    # or "image_folder" for the user's images under `dataset_dir/SPLIT/LABEL/*.png|jpg`.
    config.dataset = "fashion_mnist"
    config.dataset_dir = ""  # root of an image folder; only with dataset="image_folder"
    config.data_dir = ""  # TFDS data directory; "" = TFDS default (TFDS_DATA_DIR or ~/...)
    config.train_split = "train"  # pretraining split (stl10: "unlabelled")
    config.probe_train_split = "train"  # labelled split the linear probe and kNN are fit on
    config.eval_split = "test"  # split every accuracy is reported on
    config.image_size = 0  # side of the training views; 0 = the dataset's own side
    config.eval_center_crop = 0.0  # eval centre-crop fraction (ImageNet 0.875); 0 = none
    config.cache = True  # keep decoded images in memory (small datasets only)
    config.shuffle_buffer = 10_000

    # --- Augmentation (SimCLR §3) ---------------------------------------------------------
    config.augment = ml_collections.ConfigDict()
    config.augment.crop_area_min = 0.08  # random resized crop: area fraction ~ U[min, 1]
    config.augment.flip_prob = 0.5
    config.augment.color_jitter_strength = 1.0  # s: 1.0 ImageNet, 0.5 CIFAR-10
    config.augment.color_jitter_prob = 0.8
    config.augment.grayscale_prob = 0.2
    config.augment.blur_prob = 0.5  # 0 for 32 px datasets
    config.augment.brightness_mode = "multiplicative"  # SimCLRv2/TF2; "additive" = v1
    config.augment.rotation_degrees = 0.0  # > 0: rotate each view by U[-r, r]°, zero fill; 0 = off
    # Multi-crop (SwAV, Caron et al. 2020): this many extra small, low-resolution views of each
    # image, each an anchor whose positives are its image's two large views (README, Multi-crop).
    # 0 = plain SimCLR. Needs loss_block_size = 0 and hybrid.decoder = "none".
    config.augment.num_small_crops = 0
    # Side of the small views in pixels; 0 = round(3/7 of the large views' side), SwAV's 96 for
    # 224 (12 for 28, 14 for 32); must be 8 .. the large side.
    config.augment.small_crop_size = 0
    # The small crops' area fraction ~ U[low, high] (SwAV: (0.05, 0.14); its large crops use
    # crop_area_min = 0.14). Unlike the large crops, no 10%-of-the-image floor applies.
    config.augment.small_crop_area = (0.05, 0.14)

    # --- Model (SimCLR §4) ------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.depth = 50  # ResNet depth: 18, 34, 50, 101, 152, 200
    config.model.width_multiplier = 1.0
    config.model.base_width = 64  # channels of the first group before the multiplier
    config.model.stem = "imagenet"  # "imagenet" (7x7/2 + max-pool) or "cifar" (3x3/1)
    # SimCLRv2's architecture options, as in its official code (README "SK and SE"):
    # > 0: selective kernels in bottleneck blocks, plus the ResNet-D stem (imagenet stem only)
    # and average-pooled projection shortcuts. 0 = off; SimCLRv2's models use 0.0625.
    config.model.sk_ratio = 0.0
    # > 0: squeeze-and-excitation at the end of every residual branch, max(1, int(width·ratio))
    # hidden channels. 0 = off; SimCLRv2's published models (its README's table) vary SK only.
    config.model.se_ratio = 0.0
    # Start the last BN scale of every residual branch at 0 (the official code), so that each
    # block starts as its shortcut; False: at 1 (torchvision's default).
    config.model.zero_init_residual = True
    config.model.projection_layers = 2  # 2 = SimCLR v1, 3 = v2
    config.model.projection_dim = 128
    # Width of the projection head's hidden layers; 0 = the width of h (the official head).
    config.model.projection_hidden_dim = 0
    config.model.dtype = "float32"  # computation dtype of convolutions and dense layers
    # "auto": oneDNN's convolutions and the library's fused batch-norm kernels for a
    # single-device CPU program (the onednn extra), else strided convolutions' input gradients
    # per output phase on CPU; XLA's own convolutions on GPU/TPU. "xla", "subpixel_input_grads"
    # or "onednn" force one (simclr_jax.kernels; chosen for the platform the step is compiled for).
    config.model.conv_impl = "auto"
    # "bfloat16": convolutions round their operands to bfloat16 and sum the products in float32
    # (everything else stays in model.dtype). oneDNN computes these natively, faster than float32
    # on CPUs with bfloat16 instructions (AVX512-BF16, AMX); docs/cpu_performance.md.
    config.model.conv_precision = "float32"

    # --- Objective -------------------------------------------------------------------------
    # The contrastive loss: "nt_xent" (SimCLR, self-supervised) or "supcon" (supervised
    # contrastive, Khosla et al. 2020: every other view of the same class in the global batch is
    # a positive). "supcon" needs labels in train_split: a row labelled -1 keeps only its other
    # view as positive (NT-Xent for that anchor), so an all-unlabelled split would train plain
    # NT-Xent; STL-10's "unlabelled" split is refused. Logged as contrastive_loss either way.
    config.objective = "nt_xent"
    config.temperature = 0.1  # NT-Xent τ: 0.1 ImageNet, 0.5 CIFAR-10
    # > 0: NT-Xent and its metrics this many anchors at a time (same values; memory
    # block·2B·4 bytes instead of (2B)²·4 for the similarity matrix); 0 = the whole matrix at once.
    config.loss_block_size = 0

    # --- Hybrid objective (SPEC §7): NT-Xent + λ·MSE (+ β·KL), off by default ---------------
    config.hybrid = ml_collections.ConfigDict()
    config.hybrid.decoder = "none"  # "none" = plain SimCLR, "ae" = decoder on h, "vae" = μ, σ head
    config.hybrid.target = "input"  # reconstruct the un-augmented "input" or the augmented "view"
    config.hybrid.reconstruction_weight = 1.0  # λ; the MSE is averaged over pixels and channels
    config.hybrid.kl_weight = 1e-3  # β ("vae" only); the KL is summed over latent dimensions
    config.hybrid.decoder_channels = 32  # channels of the decoder's last map, ×2 per earlier map
    config.hybrid.latent_dim = 64  # "vae" only: width of μ and log σ²

    # --- Optimisation (SimCLR §5) -----------------------------------------------------------
    config.optimizer = "lars"  # "lars", "sgd" (Nesterov momentum) or "adamw"
    config.base_learning_rate = 0.3
    config.learning_rate_scaling = "linear"  # lr = base·B/256 ("linear") or base·√B ("sqrt")
    config.weight_decay = 1e-6
    config.momentum = 0.9
    config.global_batch_size = 4096  # images per step over all devices (2 views each)
    config.epochs = 100.0  # may be fractional
    config.warmup_epochs = 10.0  # linear warm-up length, in epochs (may be fractional)
    config.num_train_steps = -1  # > 0 overrides the step count derived from `epochs`

    # --- Loop, logging, checkpoints ---------------------------------------------------------
    config.seed = 0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.eval_every_steps = 0  # > 0: weighted kNN + online probe during training as well
    # With eval_every_steps: the L-BFGS linear probe at each of those evaluations too (a probe
    # fit per ℓ2 value tried); `python -m simclr_jax.evaluate --protocol=pictures` then draws
    # quality_vs_time.png.
    config.eval_linear_probe = False

    # --- Evaluation ---------------------------------------------------------------------------
    config.eval_batch_size = 1024
    config.linear_probe_holdout_fraction = 0.1  # part of the train split that picks the ℓ2
    config.linear_probe_patience = 2  # stop the ℓ2 path after this many values without gain
    config.compute_baselines = True  # raw-pixel linear probe and kNN, in the same run
    # With compute_baselines: also the linear probe on a randomly initialised encoder of the same
    # network (one more forward pass over the probe and eval splits).
    config.random_encoder_baseline = True
    # At the end of training: the linear probe, the online probe and weighted kNN at each
    # evaluation.knn_ks (the protocols below). False: train only, no accuracies in results.json.
    config.evaluate_at_end = True

    # --- Evaluation suite: python -m simclr_jax.evaluate (SimCLR §6) -----------------------------
    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.seed = 0  # fixes the label subsets, SGD streams and picture samples
    config.evaluation.knn_ks = (20, 200)  # kNN protocol: each k, majority and weighted votes
    config.evaluation.knn_temperature = 0.07  # T of the weighted vote exp(sim / T)
    config.evaluation.label_budgets = (10, 20, 50, 100, 200, 500)  # labels per class (L-BFGS)
    # Linear head on the frozen encoder, Nesterov SGD on crop+flip views (paper's ImageNet eval).
    config.evaluation.linear_sgd = ml_collections.ConfigDict()
    config.evaluation.linear_sgd.epochs = 90.0  # passes over the labelled split (may be < 1)
    config.evaluation.linear_sgd.batch_size = 4096  # global batch
    config.evaluation.linear_sgd.base_learning_rate = 0.1  # lr = base·B/256, cosine decay, no wd
    # Fine-tuning the whole network on class-balanced label fractions (paper Table 7), and the
    # same network trained from scratch on the same subset with the same schedule.
    config.evaluation.finetune = ml_collections.ConfigDict()
    config.evaluation.finetune.fractions = (0.01, 0.1, 1.0)  # of each class's labels
    config.evaluation.finetune.epochs = (60.0, 30.0, 30.0)  # one per fraction (paper 60, 30)
    config.evaluation.finetune.batch_size = 4096  # global batch
    config.evaluation.finetune.base_learning_rate = 0.05  # lr = base·B/256, cosine, no wd
    # Projection-head layers kept below the classifier (SimCLRv2 ft_proj_selector): 0 = from h.
    config.evaluation.finetune.head_layers = 0
    config.evaluation.finetune.from_scratch = True  # also train the randomly initialised net
    # Pictures.
    config.evaluation.embedding_points = 2000  # test points in the t-SNE map
    config.evaluation.retrieval_queries = 8  # test images in the retrieval grid
    config.evaluation.retrieval_k = 8  # train neighbours shown per query
    config.evaluation.view_pairs = 16  # augmented view pairs in the augmentation grid

    # --- Distillation (SimCLRv2 §3): python -m simclr_jax.distill ----------------------------
    # A teacher, the run's network fine-tuned on a class-balanced fraction of probe_train_split's
    # labels, gives soft targets softmax(logits / τ) on every image of that split; a student
    # trained from random init learns them (README, "Distillation (SimCLRv2)").
    config.distillation = ml_collections.ConfigDict()
    config.distillation.label_fraction = 0.01  # of each class's labels, for the teacher
    config.distillation.teacher_epochs = 60.0  # fine-tuning passes over those labels (paper 60)
    config.distillation.teacher_batch_size = 4096  # global batch
    config.distillation.teacher_base_learning_rate = 0.05  # lr = base·B/256, cosine, no wd
    config.distillation.teacher_head_layers = 0  # projection-head layers kept (as finetune's)
    config.distillation.temperature = 1.0  # τ of teacher and student softmax (paper: 1)
    # Weight of the distillation term; 1 - alpha weighs the cross-entropy on the teacher's
    # labelled examples (the other images have none). Paper: 1 (distillation alone) with few labels.
    config.distillation.alpha = 1.0
    # The student, a ResNet with a linear classifier on h, trained from random init: 0 = as the
    # teacher (self-distillation); e.g. student_depth = 18 for a smaller network.
    config.distillation.student_depth = 0
    config.distillation.student_width_multiplier = 0.0
    config.distillation.student_base_width = 0
    config.distillation.epochs = 100.0  # student passes over the whole split
    config.distillation.batch_size = 4096  # global batch
    config.distillation.base_learning_rate = 0.1  # lr = base·B/256, Nesterov SGD, cosine, no wd

    return config
