"""The evaluation protocols, on a pretraining run's state: one path for every evaluation.

Each protocol takes a :class:`Run` and returns a JSON-serialisable dict (accuracies are
fractions in [0, 1]). ``python -m simclr_jax.evaluate`` runs :data:`PROTOCOLS` on a restored run;
the trainer calls :func:`end_of_run` after pretraining and :func:`monitor` during it.
:func:`summary_rows` turns results into the terminal table's rows. Sizes (epochs, batch sizes,
label budgets, k, ...) come from ``config.evaluation`` (``simclr_jax/configs/default.py``).
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from simclr_jax import encoder as encoder_lib
from simclr_jax import experiment as experiment_lib
from simclr_jax import jsonio, parallel, plots, reporting, step, visualize
from simclr_jax.data import pipeline
from simclr_jax.evaluation import knn, linear_probe, subsets, supervised
from simclr_jax.evaluation.features import extract_features


@dataclasses.dataclass
class Run:
    """A pretraining run's state to evaluate: its experiment (config, data, model, mesh), its
    state on the experiment's mesh, and its workdir (the results go to ``WORKDIR/eval``; None
    for evaluations that write no files)."""

    experiment: experiment_lib.Experiment
    state: step.TrainState
    workdir: str | None = None
    _features: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def config(self):
        return self.experiment.config

    @property
    def mesh(self) -> Mesh:
        return self.experiment.mesh

    @property
    def output_dir(self) -> str:
        if self.workdir is None:
            raise ValueError("this evaluation writes files, and its run has no workdir.")
        path = os.path.join(self.workdir, "eval")
        os.makedirs(path, exist_ok=True)
        return path

    def features(self, split: str) -> dict[str, np.ndarray]:
        """``{"h", "logits", "label"}`` of every example of ``split`` (extracted once, then
        reused)."""
        if split not in self._features:
            self._features[split] = extract_features(
                step.jit_embed_step(self.mesh),
                self.state,
                self.experiment.eval_batches(split),
                self.mesh,
                ("h", "logits"),
            )
        return self._features[split]

    @property
    def train(self) -> dict[str, np.ndarray]:
        return self.features(self.config.probe_train_split)

    @property
    def test(self) -> dict[str, np.ndarray]:
        return self.features(self.config.eval_split)

    def labelled_batches(
        self, indices: np.ndarray, batch_size: int, seed: int, labelled: np.ndarray | None = None
    ):
        """Crop+flip batches of the probe-train examples at ``indices`` (this process's part);
        with ``labelled``, only the examples at those positions keep their labels (others -1)."""
        return pipeline.labelled_batches(
            self.config.dataset,
            self.config.probe_train_split,
            indices,
            host_batch_size=batch_size // jax.process_count(),
            image_size=self.experiment.image_size,
            seed=seed,
            labelled=labelled,
            **self.experiment.data_kwargs,
        )

    @functools.cached_property
    def train_labels(self) -> np.ndarray:
        return pipeline.split_labels(
            self.config.dataset, self.config.probe_train_split, **self.experiment.data_kwargs
        )


def _logistic_regression(run: Run, train, test, key: str = "h") -> dict[str, Any]:
    """The L-BFGS linear probe on ``train[key]``, scored on ``test[key]`` (ℓ2 chosen on a
    held-out part of ``train``)."""
    return linear_probe.linear_probe_accuracy(
        train[key],
        train["label"],
        test[key],
        test["label"],
        num_classes=run.experiment.num_classes,
        holdout_fraction=run.config.linear_probe_holdout_fraction,
        patience=run.config.linear_probe_patience,
        seed=run.config.evaluation.seed,
    )


def linear(run: Run) -> dict[str, Any]:
    """Linear evaluation on frozen ``h``: (a) L-BFGS logistic regression on extracted features
    (ℓ2 chosen on held-out train examples), (b) the paper's SGD linear head on crop+flip views."""
    lbfgs = _logistic_regression(run, run.train, run.test)
    settings = run.config.evaluation.linear_sgd
    indices = subsets.fraction_subset(run.train_labels, 1.0, run.config.evaluation.seed)
    sgd, _ = train_classifier(
        run,
        indices,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        base_learning_rate=settings.base_learning_rate,
        frozen_encoder=True,
        head_layers=0,
        pretrained=True,
    )
    return {"lbfgs": lbfgs, "sgd": sgd}


def _knn(
    run: Run, votes: list[knn.Vote], train=None, test=None, key: str = "h"
) -> dict[knn.Vote, float]:
    """kNN top-1 of each vote rule ``(k, temperature)`` on ``test[key]`` against ``train[key]``
    (default: the run's ``h``), from one similarity pass."""
    train, test = train or run.train, test or run.test
    return knn.knn_accuracies(
        train[key],
        train["label"],
        test[key],
        test["label"],
        num_classes=run.experiment.num_classes,
        votes=votes,
    )


def _weighted_votes(run: Run) -> list[knn.Vote]:
    """The weighted vote ``(k, evaluation.knn_temperature)`` at each of ``evaluation.knn_ks``."""
    evaluation = run.config.evaluation
    return [(k, evaluation.knn_temperature) for k in evaluation.knn_ks]


def knn_protocol(run: Run) -> dict[str, Any]:
    """kNN on cosine similarity of ``h``: each k with majority and exp(sim / T) votes."""
    votes = [
        (k, temperature)
        for k in run.config.evaluation.knn_ks
        for temperature in (None, run.config.evaluation.knn_temperature)
    ]
    return {
        f"k={k} " + ("majority" if temperature is None else f"T={temperature:g}"): accuracy
        for (k, temperature), accuracy in _knn(run, votes).items()
    }


def label_budget(run: Run) -> dict[str, Any]:
    """The L-BFGS linear probe fit on ``n`` labelled train examples per class, for each budget
    (ℓ2 chosen on a held-out part of those ``n``, never on test)."""
    seed = run.config.evaluation.seed
    budgets = run.config.evaluation.label_budgets
    train = run.train
    chosen = {n: subsets.per_class_subset(train["label"], n, seed) for n in budgets}
    results = {}
    for n, indices in chosen.items():
        results[str(n)] = linear_probe.linear_probe_accuracy(
            train["h"][indices],
            train["label"][indices],
            run.test["h"],
            run.test["label"],
            num_classes=run.experiment.num_classes,
            # ℓ2 is chosen on labelled examples only: at least one of each class is held out.
            holdout_fraction=max(run.config.linear_probe_holdout_fraction, 1 / n),
            patience=run.config.linear_probe_patience,
            seed=seed,
        )
        results[str(n)]["num_labels"] = len(indices)
    return results


def finetune(run: Run) -> dict[str, Any]:
    """Fine-tuning the whole network on class-balanced label fractions, and (optionally) the same
    network trained from scratch on the same examples with the same schedule."""
    settings = run.config.evaluation.finetune
    if len(settings.fractions) != len(settings.epochs):
        raise ValueError(
            f"evaluation.finetune.fractions {tuple(settings.fractions)} and .epochs "
            f"{tuple(settings.epochs)} must have one entry each."
        )
    results = {}
    for fraction, epochs in zip(settings.fractions, settings.epochs, strict=True):
        indices = subsets.fraction_subset(run.train_labels, fraction, run.config.evaluation.seed)
        train = functools.partial(
            train_classifier,
            run,
            indices,
            epochs=epochs,
            batch_size=settings.batch_size,
            base_learning_rate=settings.base_learning_rate,
            frozen_encoder=False,
            head_layers=settings.head_layers,
        )
        entry = {"num_labels": len(indices), "pretrained": train(pretrained=True)[0]}
        if settings.from_scratch:
            entry["scratch"] = train(pretrained=False)[0]
        results[f"{fraction:g}"] = entry
    return results


def train_classifier(
    run: Run,
    indices: np.ndarray,
    *,
    epochs: float,
    batch_size: int,
    base_learning_rate: float,
    frozen_encoder: bool,
    head_layers: int,
    pretrained: bool,
) -> tuple[dict[str, Any], step.TrainState]:
    """Trains a :class:`supervised.Classifier` on the examples at ``indices`` of the probe-train
    split (crop+flip, Nesterov SGD, cosine decay) and scores it on the eval split.

    The classifier sits on the run's encoder and first ``head_layers`` projection-head layers,
    which start from the run's values (``pretrained``) or at random. Returns ``{"top1", "top5",
    "train_loss", "steps", "seconds"}`` and the trained state (a fine-tuned teacher, say)."""
    parallel.check_global_batch_size(batch_size, run.mesh, "evaluation batch size")
    seed = run.config.evaluation.seed
    steps = supervised.num_steps(len(indices), epochs, batch_size)
    learning_rate = supervised.cosine_learning_rate(base_learning_rate, batch_size, steps)
    classifier = supervised.classifier_for(
        run.experiment.model,
        run.experiment.num_classes,
        head_layers=head_layers,
        frozen_encoder=frozen_encoder,
    )
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    state = supervised.initial_state(
        classifier,
        jax.random.key(seed),
        run.experiment.image_shape,
        learning_rate,
        pretrained=variables if pretrained else None,
    )
    started = time.perf_counter()
    result, state = supervised.train_and_score(
        state,
        run.labelled_batches(indices, batch_size, seed),
        steps,
        run.experiment.eval_batches(run.config.eval_split),
        run.mesh,
    )
    return {**result, "steps": steps, "seconds": time.perf_counter() - started}, state


def export(run: Run) -> dict[str, Any]:
    """Writes the encoder (no optimiser state) to ``WORKDIR/eval/encoder.msgpack``."""
    exported = encoder_lib.from_state(
        run.state, run.config, run.experiment.num_classes, run.experiment.image_shape
    )
    path = os.path.join(run.output_dir, "encoder.msgpack")
    if jax.process_index() == 0:
        encoder_lib.export_encoder(exported, path)
    return {"path": path}


PICTURES = {
    "training_curves": "training_curves.png",
    "quality_vs_time": "quality_vs_time.png",
    "embedding_map": "embedding_tsne.png",
    "augmented_views": "augmented_views.png",
    "retrieval": "retrieval.png",
}


def pictures(run: Run) -> dict[str, Any]:
    """PNG files in ``WORKDIR/eval``: training curves, accuracy against epochs (for a run that
    evaluated during training: :func:`simclr_jax.plots.save_quality_vs_time`), t-SNE of test
    ``h``, augmented view pairs, and test queries with their nearest train neighbours. Returns
    ``{picture: path}``."""
    settings = run.config.evaluation
    rng = np.random.default_rng(settings.seed)
    paths = {name: os.path.join(run.output_dir, file) for name, file in PICTURES.items()}
    test, train = run.test, run.train  # extraction is collective: every process takes part
    if jax.process_index() != 0:
        return paths  # the first process draws

    metrics = os.path.join(run.workdir, "metrics.jsonl")
    records = plots.read_metrics(metrics) if os.path.isfile(metrics) else []
    if records:
        plots.save_training_curves(records, paths["training_curves"])
    else:
        del paths["training_curves"]
    results_path = os.path.join(run.workdir, "results.json")
    results = jsonio.read_json(results_path) if os.path.isfile(results_path) else {}
    if plots.quality_series(records, results):
        plots.save_quality_vs_time(records, results, paths["quality_vs_time"])
    else:
        del paths["quality_vs_time"]

    shown = np.sort(rng.choice(len(test["h"]), min(settings.embedding_points, len(test["h"]))))
    points = plots.embedding_2d(test["h"][shown], seed=settings.seed)
    plots.save_embedding_map(points, test["label"][shown], paths["embedding_map"])

    views = next(
        pipeline.pretrain_batches(
            run.config.dataset,
            run.config.train_split,
            host_batch_size=settings.view_pairs,
            augment_config=experiment_lib.augment_config(run.config, run.experiment.image_size),
            seed=settings.seed,
            cache=False,
            shuffle_buffer=1024,
            process_index=0,
            process_count=1,
            **run.experiment.data_kwargs,
        )
    )["views"]
    columns = 2 * int(np.ceil(np.sqrt(settings.view_pairs)))  # pairs side by side
    rows = -(-2 * settings.view_pairs // columns)
    cells = views.reshape(-1, *views.shape[2:])
    cells = np.concatenate([cells, np.ones((rows * columns - len(cells), *cells.shape[1:]))])
    visualize.save_image_grid(
        paths["augmented_views"], cells.reshape(rows, columns, *cells.shape[1:]), scale=3
    )

    queries = np.sort(rng.choice(len(test["h"]), settings.retrieval_queries, replace=False))
    neighbours = knn.nearest_neighbours(train["h"], test["h"][queries], settings.retrieval_k)
    read = functools.partial(
        pipeline.examples_at,
        run.config.dataset,
        image_size=run.experiment.image_size,
        center_crop_fraction=run.config.eval_center_crop or None,
        **run.experiment.data_kwargs,
    )
    query_images = read(run.config.eval_split, queries)
    neighbour_images = read(run.config.probe_train_split, neighbours.reshape(-1))
    grid = np.concatenate(
        [
            query_images[:, None],
            neighbour_images.reshape(*neighbours.shape, *neighbour_images.shape[1:]),
        ],
        axis=1,
    )
    visualize.save_image_grid(paths["retrieval"], grid, scale=3)
    return paths


def monitor(run: Run, *, linear: bool = False) -> dict[str, float]:
    """The evaluations for use during training, on the eval split: the online probe's top-1,
    weighted kNN (``evaluation.knn_temperature``) at each of ``evaluation.knn_ks`` and, with
    ``linear``, the L-BFGS linear probe (``linear_probe_top1``: a fit per ℓ2 value tried)."""
    test = run.test
    results = {
        "online_probe_top1": float(linear_probe.top_k_accuracy(test["logits"], test["label"], 1))
    }
    for (k, _), accuracy in _knn(run, _weighted_votes(run)).items():
        results[f"knn_k{k}_top1"] = accuracy
    if linear:
        results["linear_probe_top1"] = float(_logistic_regression(run, run.train, test)["top1"])
    return results


def baselines(run: Run) -> dict[str, float]:
    """What the representation must beat: the same L-BFGS probe and weighted kNN (each of
    ``evaluation.knn_ks``) on raw pixels and, with ``config.random_encoder_baseline``, the
    L-BFGS probe on a randomly initialised encoder of the same network."""
    config, mesh = run.config, run.mesh
    pixels = jax.jit(
        lambda _, images: {"pixels": images.reshape(images.shape[0], -1)},
        out_shardings=parallel.batch_sharded(mesh),
    )

    def raw_pixels(split: str) -> dict[str, np.ndarray]:
        return extract_features(pixels, None, run.experiment.eval_batches(split), mesh, ("pixels",))

    raw_train, raw_test = raw_pixels(config.probe_train_split), raw_pixels(config.eval_split)
    results = {
        "baseline_raw_pixels_top1": float(
            _logistic_regression(run, raw_train, raw_test, "pixels")["top1"]
        ),
    }
    for (k, _), accuracy in _knn(run, _weighted_votes(run), raw_train, raw_test, "pixels").items():
        results[f"baseline_raw_pixels_knn_k{k}_top1"] = accuracy
    if config.random_encoder_baseline:
        random_state = jax.device_put(
            run.experiment.initial_state(config.seed + 1), parallel.replicated(mesh)
        )
        random_encoder = Run(run.experiment, random_state)
        results["baseline_random_encoder_top1"] = float(
            _logistic_regression(random_encoder, random_encoder.train, random_encoder.test)["top1"]
        )
    return results


def end_of_run(run: Run) -> dict[str, float]:
    """What the trainer reports after pretraining: the L-BFGS linear probe on ``h``, the
    :func:`monitor` metrics and, with ``config.compute_baselines``, the :func:`baselines`."""
    results = monitor(run, linear=True)
    if run.config.compute_baselines:
        results.update(baselines(run))
    return results


PROTOCOLS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "linear": linear,
    "knn": knn_protocol,
    "label_budget": label_budget,
    "finetune": finetune,
    "pictures": pictures,
    "export": export,
}


def _top1_top5(entry: dict[str, Any]) -> tuple[str, str]:
    return reporting.percent(entry["top1"]), reporting.percent(entry.get("top5"))


def summary_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """``(protocol, setting, top-1, top-5)`` rows for the accuracies in ``results``."""
    rows = []
    if "linear" in results:
        for name, label in (("lbfgs", "logistic regression (L-BFGS)"), ("sgd", "SGD, crop+flip")):
            rows.append(("linear", label, *_top1_top5(results["linear"][name])))
    for name, accuracy in results.get("knn", {}).items():
        rows.append(("knn", name, reporting.percent(accuracy), ""))
    for n, entry in results.get("label_budget", {}).items():
        rows.append(("label_budget", f"{n}/class", *_top1_top5(entry)))
    for fraction, entry in results.get("finetune", {}).items():
        for start in ("pretrained", "scratch"):
            if start in entry:
                setting = f"{float(fraction):.0%} labels, {start}"
                rows.append(("finetune", setting, *_top1_top5(entry[start])))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table with a header, columns padded to their widest cell."""
    return reporting.text_table([("protocol", "setting", "top-1", "top-5"), *rows])
