"""SimCLRv2's distillation with unlabelled data (Chen et al. 2020, §3): a teacher labels every
image with soft targets, and a student trained from random init learns them.

The teacher is a pretraining run's network fine-tuned on a class-balanced fraction of the labels
(:func:`simclr_jax.evaluation.protocols.train_classifier`, as the ``finetune`` protocol does). The
student is a :class:`~simclr_jax.evaluation.supervised.Classifier` on a ResNet of the teacher's
size (self-distillation) or another, trained on every image of the probe-train split with
crop+flip views, Nesterov SGD and a cosine decay; the teacher's logits on the same views are
computed, in inference mode, inside the student's jitted, batch-sharded step. The loss is
:func:`simclr_jax.losses.distillation_loss`, plus, when ``distillation.alpha < 1``, the
cross-entropy on the teacher's labelled examples. ``config.distillation`` holds the settings and
``python -m simclr_jax.distill`` is the command line.
"""

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from simclr_jax import encoder, jsonio, kernels, losses, parallel, reporting, step, workdir_lock
from simclr_jax.evaluation import protocols, subsets, supervised
from simclr_jax.experiment import Experiment, build_model

RESULTS_FILE = "distill_results.json"


def distillation_step(
    state: step.TrainState,
    teacher_variables: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    teacher_apply: Callable[..., jax.Array],
    temperature: float,
    alpha: float,
) -> tuple[step.TrainState, dict[str, jax.Array]]:
    """One SGD step of the student ``state`` on ``alpha · distillation + (1 - alpha) · CE``.

    The teacher (``teacher_apply`` with ``teacher_variables``) runs in inference mode on the
    same ``batch["image"]`` and is not trained; the cross-entropy counts only the rows whose
    ``batch["label"]`` is not -1. Metrics: ``loss``, ``distillation_loss`` and
    ``teacher_agreement`` (the fraction of rows where student and teacher pick the same class).
    """
    teacher_logits = jax.lax.stop_gradient(
        teacher_apply(teacher_variables, batch["image"], train=False)
    )

    def loss_fn(params):
        logits, batch_stats = step.apply_in_training(state, params, batch["image"])
        distillation = losses.distillation_loss(logits, teacher_logits, temperature)
        cross_entropy, _ = step.probe_loss_and_accuracy(logits, batch["label"])
        loss = alpha * distillation + (1 - alpha) * cross_entropy
        agreement = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        metrics = {
            "loss": loss,
            "distillation_loss": distillation,
            "teacher_agreement": agreement.astype(jnp.float32),
        }
        return loss, (batch_stats, metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


@functools.cache
def jit_distillation_step(
    mesh: Mesh, teacher_apply: Callable[..., jax.Array], temperature: float, alpha: float
):
    """:func:`distillation_step` compiled for ``mesh``: states replicated, the batch sharded on
    its first axis, the student's state donated."""
    replicated = parallel.replicated(mesh)
    return jax.jit(
        functools.partial(
            distillation_step, teacher_apply=teacher_apply, temperature=temperature, alpha=alpha
        ),
        in_shardings=(replicated, replicated, parallel.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=kernels.compiler_options(mesh),
    )


def student_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with its model replaced by the student's (``distillation.student_*``; 0 keeps
    the teacher's value)."""
    student = config.copy_and_resolve_references()
    settings = config.distillation
    student.model.depth = settings.student_depth or config.model.depth
    student.model.width_multiplier = (
        settings.student_width_multiplier or config.model.width_multiplier
    )
    student.model.base_width = settings.student_base_width or config.model.base_width
    return student


def student_classifier(experiment: Experiment) -> supervised.Classifier:
    """The student: a linear classifier on ``h`` of the ResNet ``distillation.student_*``
    describe, with the experiment's kernels."""
    model = build_model(
        student_config(experiment.config), experiment.num_classes, experiment.layers
    )
    return supervised.classifier_for(model, experiment.num_classes)


def train_student(
    state: step.TrainState,
    teacher: step.TrainState,
    batches: Iterator[dict[str, np.ndarray]],
    steps: int,
    mesh: Mesh,
    *,
    temperature: float,
    alpha: float,
    log_every_steps: int = 0,
) -> tuple[step.TrainState, dict[str, float]]:
    """Trains the student ``state`` for ``steps`` batches on the ``teacher``'s soft targets;
    returns it and the last step's metrics. Prints progress every ``log_every_steps`` (0: never)."""
    state = jax.device_put(state, parallel.replicated(mesh))
    teacher_variables = jax.device_put(
        {"params": teacher.params, "batch_stats": teacher.batch_stats}, parallel.replicated(mesh)
    )
    train = jit_distillation_step(mesh, teacher.apply_fn, temperature, alpha)
    started, metrics = time.perf_counter(), {}
    for done in range(1, steps + 1):
        state, metrics = train(
            state, teacher_variables, parallel.host_batch_to_global(next(batches), mesh)
        )
        logged = log_every_steps and (done % log_every_steps == 0 or done == steps)
        if logged and jax.process_index() == 0:
            elapsed = reporting.format_duration(time.perf_counter() - started)
            print(
                f"student step {done}/{steps}: loss {float(metrics['loss']):.4f}, teacher "
                f"agreement {float(metrics['teacher_agreement']):.1%}, {elapsed}",
                flush=True,
            )
    return state, {name: float(value) for name, value in metrics.items()}


def distill(
    teacher_workdir: str,
    workdir: str,
    overrides: dict[str, Any] | None = None,
    checkpoint: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes a teacher from the run in ``teacher_workdir`` and distils it into a student.

    ``teacher_workdir`` is only read: its ``config.json`` and checkpoint ``checkpoint`` (default:
    the latest). ``overrides`` maps flattened config field names (``"distillation.epochs"``) to
    values replacing the run's. Writes ``WORKDIR/config.json`` and ``WORKDIR/distill_results.json``
    (the returned dict: both networks' accuracies on the eval split, the label count, steps and
    seconds), holding ``WORKDIR/lock`` meanwhile.

    Raises:
      ValueError, OSError: a bad config, a teacher workdir without a run or a checkpoint.
      simclr_jax.workdir_lock.WorkdirError: ``workdir`` is in use or cannot be created.
    """
    started = time.perf_counter()
    teacher_workdir, workdir = os.path.abspath(teacher_workdir), os.path.abspath(workdir)
    if teacher_workdir == workdir:
        raise ValueError(
            f"--workdir must differ from --teacher_workdir ({workdir}): the teacher's run is "
            "only read."
        )
    config = encoder.read_run_config(teacher_workdir)
    try:
        config.update_from_flattened_dict(overrides or {})
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"invalid config override: {error}") from None
    settings = config.distillation
    mesh = parallel.data_mesh()
    experiment = Experiment(config, mesh)  # checks the config first
    for name, size in (
        ("eval_batch_size", config.eval_batch_size),
        ("distillation.teacher_batch_size", settings.teacher_batch_size),
        ("distillation.batch_size", settings.batch_size),
    ):
        parallel.check_global_batch_size(size, mesh, name)
    state = encoder.restore_state(experiment, teacher_workdir, checkpoint)
    student = student_classifier(experiment)
    student_model = student_config(config).model
    run = protocols.Run(experiment, state)
    seed = config.evaluation.seed
    with workdir_lock.hold_on_first_process(workdir):
        if jax.process_index() == 0:
            jsonio.write_json(os.path.join(workdir, "config.json"), config.to_dict())
            print(
                f"teacher: step {int(state.step)} of {teacher_workdir}, fine-tuned on "
                f"{settings.label_fraction:.1%} of the labels",
                flush=True,
            )
        labelled = subsets.fraction_subset(run.train_labels, settings.label_fraction, seed)
        teacher_result, teacher = protocols.train_classifier(
            run,
            labelled,
            epochs=settings.teacher_epochs,
            batch_size=settings.teacher_batch_size,
            base_learning_rate=settings.teacher_base_learning_rate,
            frozen_encoder=False,
            head_layers=settings.teacher_head_layers,
            pretrained=True,
        )
        if jax.process_index() == 0:
            print(
                f"teacher: top-1 {teacher_result['top1']:.1%} after {teacher_result['steps']} "
                f"steps ({reporting.format_duration(teacher_result['seconds'])})",
                flush=True,
            )

        images = np.arange(len(run.train_labels))
        steps = supervised.num_steps(len(images), settings.epochs, settings.batch_size)
        student_state = supervised.initial_state(
            student,
            jax.random.key(config.seed),
            experiment.image_shape,
            supervised.cosine_learning_rate(
                settings.base_learning_rate, settings.batch_size, steps
            ),
        )
        student_started = time.perf_counter()
        student_state, metrics = train_student(
            student_state,
            teacher,
            run.labelled_batches(images, settings.batch_size, seed, labelled=labelled),
            steps,
            mesh,
            temperature=settings.temperature,
            alpha=settings.alpha,
            log_every_steps=config.log_every_steps,
        )
        student_result = {
            **supervised.score(student_state, experiment.eval_batches(config.eval_split), mesh),
            **metrics,
            "steps": steps,
            "seconds": time.perf_counter() - student_started,
            "model": {
                name: student_model[name] for name in ("depth", "width_multiplier", "base_width")
            },
        }
        results = {
            "teacher_workdir": teacher_workdir,
            "teacher_checkpoint_step": int(state.step),
            "label_fraction": settings.label_fraction,
            "num_labels": len(labelled),
            "num_images": len(images),
            "temperature": settings.temperature,
            "alpha": settings.alpha,
            "teacher_top1": teacher_result["top1"],
            "student_top1": student_result["top1"],
            "teacher": teacher_result,
            "student": student_result,
            "steps": teacher_result["steps"] + steps,
            "seconds": time.perf_counter() - started,
        }
        if jax.process_index() == 0:
            jsonio.write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results


def results_table(results: dict[str, Any]) -> str:
    """Teacher and student side by side (top-1, top-5, what each trained on), then the time."""
    model = results["student"]["model"]
    table = [
        ("network", "top-1", "top-5", "trained on", "steps"),
        (
            "teacher (fine-tuned)",
            reporting.percent(results["teacher"]["top1"]),
            reporting.percent(results["teacher"].get("top5")),
            f"{results['num_labels']} labels ({results['label_fraction']:.1%})",
            str(results["teacher"]["steps"]),
        ),
        (
            f"student (ResNet-{model['depth']}, from scratch)",
            reporting.percent(results["student"]["top1"]),
            reporting.percent(results["student"].get("top5")),
            f"{results['num_images']} images, τ = {results['temperature']:g}",
            str(results["student"]["steps"]),
        ),
    ]
    return f"{reporting.text_table(table)}\n{reporting.format_duration(results['seconds'])} in all"
