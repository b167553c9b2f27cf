"""SimCLRv2 distillation: the loss against NumPy, the sharded step, and a tiny run end to end."""

import json

import cli_runs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import checkpointing, distillation, jsonio, losses, parallel
from simclr_jax.configs import tiny
from simclr_jax.evaluation import supervised
from simclr_jax.experiment import Experiment
from simclr_jax.models import SimCLR
from simclr_jax.models.heads import ProjectionHead


def _reference_distillation_loss(student, teacher, temperature):
    """``-mean_x sum_y softmax(t / τ)_y log softmax(s / τ)_y``, one row at a time, in float64."""
    total = 0.0
    for s, t in zip(np.float64(student), np.float64(teacher), strict=True):
        p = np.exp(t / temperature - np.max(t / temperature))
        p /= p.sum()
        log_q = s / temperature - np.max(s / temperature)
        log_q -= np.log(np.sum(np.exp(log_q)))
        total -= np.sum(p * log_q)
    return total / len(student)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0, 10.0])
def test_distillation_loss_matches_reference(temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(scale=3.0, size=(12, 7)).astype(np.float32)
    teacher = rng.normal(scale=3.0, size=(12, 7)).astype(np.float32)
    loss = losses.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        loss, _reference_distillation_loss(student, teacher, temperature), rtol=1e-5
    )
    # bfloat16 logits are computed in float32.
    low = losses.distillation_loss(
        jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16), temperature
    )
    assert low.dtype == jnp.float32


def test_distillation_loss_is_smallest_where_the_student_copies_the_teacher():
    rng = np.random.default_rng(1)
    teacher = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    shift = jnp.asarray(rng.normal(size=(6, 1)), jnp.float32)  # softmax ignores it
    grad = jax.grad(losses.distillation_loss, argnums=(0, 1))
    student_grad, teacher_grad = grad(teacher + shift, teacher, 2.0)
    np.testing.assert_allclose(student_grad, 0.0, atol=1e-6)
    assert not np.any(teacher_grad)  # the teacher's targets are fixed
    # There the loss is the teacher's entropy, below that of any other student.
    at_copy = losses.distillation_loss(teacher + shift, teacher, 2.0)
    elsewhere = losses.distillation_loss(teacher + 0.3 * jnp.roll(teacher, 1, 1), teacher, 2.0)
    assert float(at_copy) < float(elsewhere)


def test_a_one_hot_teacher_gives_the_ordinary_cross_entropy():
    rng = np.random.default_rng(2)
    student = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 8))
    teacher = 1e4 * jax.nn.one_hot(labels, 4)  # softmax(teacher) is one-hot in float32
    np.testing.assert_allclose(
        losses.distillation_loss(student, teacher, 1.0),
        optax.softmax_cross_entropy_with_integer_labels(student, labels).mean(),
        rtol=1e-6,
    )


class _TinyEncoder(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.width, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


def _classifier_state(width, seed, learning_rate=0.5):
    model = SimCLR(
        encoder=_TinyEncoder(width),
        projection_head=ProjectionHead(num_layers=2, output_dim=4),
        num_classes=3,
    )
    return supervised.initial_state(
        supervised.classifier_for(model, 3),
        jax.random.key(seed),
        (8, 8, 1),
        optax.constant_schedule(learning_rate),
    )


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_distillation_step_on_eight_devices_equals_one(alpha):
    teacher = _classifier_state(width=6, seed=1)
    # A teacher whose logits are not all zero (its classifier starts at zero).
    classifier = {**teacher.params["classifier"], "kernel": jnp.outer(jnp.ones(6), jnp.arange(3.0))}
    teacher = teacher.replace(params={**teacher.params, "classifier": classifier})
    rng = np.random.default_rng(3)
    batch = {
        "image": rng.uniform(size=(16, 8, 8, 1)).astype(np.float32),
        "label": np.where(np.arange(16) % 2, -1, rng.integers(0, 3, 16)).astype(np.int32),
    }
    teacher_variables = {"params": teacher.params, "batch_stats": teacher.batch_stats}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.data_mesh(devices)
        state = jax.device_put(_classifier_state(width=4, seed=0), parallel.replicated(mesh))
        train = distillation.jit_distillation_step(mesh, teacher.apply_fn, 1.0, alpha)
        for _ in range(2):
            state, metrics = train(
                state,
                jax.device_put(teacher_variables, parallel.replicated(mesh)),
                parallel.host_batch_to_global(batch, mesh),
            )
        results.append(jax.device_get((state.params, state.batch_stats, metrics)))
    (one, eight), initial = results, _classifier_state(width=4, seed=0)
    moved = one[0]["encoder"]["Conv_0"]["kernel"] - initial.params["encoder"]["Conv_0"]["kernel"]
    assert np.any(moved)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, eight)
    assert 0 <= one[2]["teacher_agreement"] <= 1 and np.isfinite(one[2]["loss"])


# The tiny run (train[:256], test[:100], 16 px, ResNet-18 at base width 4) distilled in seconds.
TINY = {
    "distillation.label_fraction": 0.25,
    "distillation.teacher_epochs": 4.0,
    "distillation.teacher_batch_size": 32,
    "distillation.teacher_base_learning_rate": 0.4,
    "distillation.epochs": 2.0,
    "distillation.batch_size": 32,
    "distillation.base_learning_rate": 0.4,
    "distillation.student_base_width": 2,
}


@pytest.fixture(scope="module")
def teacher_dir(fashion_mnist_data_dir, tmp_path_factory):
    """A tiny run's workdir: its config and a checkpoint of the initial state (what distillation
    reads; pretraining it would only make the test slower)."""
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    workdir = tmp_path_factory.mktemp("teacher")
    experiment = Experiment(config, parallel.data_mesh())
    jsonio.write_json(workdir / "config.json", config.to_dict())
    state = jax.device_put(
        experiment.initial_state(config.seed), parallel.replicated(experiment.mesh)
    )
    with checkpointing.Checkpointer(workdir / "checkpoints") as checkpointer:
        checkpointer.save(0, state, experiment.compatibility(), force=True)
    return workdir


def test_a_tiny_distillation_writes_its_results_and_reads_only_the_teacher(teacher_dir, tmp_path):
    before = sorted(p.relative_to(teacher_dir) for p in teacher_dir.rglob("*"))
    workdir = tmp_path / "student"
    results = distillation.distill(str(teacher_dir), str(workdir), TINY)
    stored = json.loads((workdir / distillation.RESULTS_FILE).read_text())
    assert stored == json.loads(json.dumps(results))
    assert json.loads((workdir / "config.json").read_text())["distillation"]["epochs"] == 2.0
    assert stored["num_labels"] == 64 and stored["num_images"] == 256
    assert stored["label_fraction"] == 0.25 and stored["temperature"] == 1.0
    assert stored["student"]["steps"] == 16 and stored["steps"] == 16 + stored["teacher"]["steps"]
    assert stored["student"]["model"] == {"depth": 18, "width_multiplier": 1.0, "base_width": 2}
    for network in ("teacher", "student"):
        assert 0 <= stored[f"{network}_top1"] <= 1 and stored[network]["seconds"] > 0
    assert sorted(p.relative_to(teacher_dir) for p in teacher_dir.rglob("*")) == before
    table = distillation.results_table(results)
    assert "teacher" in table and "student (ResNet-18, from scratch)" in table


def test_only_the_labelled_positions_keep_their_labels(fashion_mnist_data_dir):
    from simclr_jax.data import pipeline

    kept = np.array([1, 3, 6])
    batch = next(
        pipeline.labelled_batches(
            "fashion_mnist",
            "train",
            np.arange(8),
            host_batch_size=8,  # one epoch: each of the 8 images once
            image_size=16,
            seed=0,
            labelled=kept,
            data_dir=fashion_mnist_data_dir,
        )
    )
    labels = pipeline.split_labels("fashion_mnist", "train[:8]", data_dir=fashion_mnist_data_dir)
    assert np.sum(batch["label"] == -1) == 5
    assert sorted(batch["label"][batch["label"] >= 0]) == sorted(labels[kept])


def test_a_bad_distillation_field_is_one_line_naming_it_and_creates_no_workdir(
    teacher_dir, tmp_path
):
    workdir = tmp_path / "student"
    with pytest.raises(ValueError, match=r"distillation\.alpha = 1\.5 is invalid"):
        distillation.distill(str(teacher_dir), str(workdir), {"distillation.alpha": 1.5})
    assert not workdir.exists()


def test_distill_cli_without_a_teacher_run_is_one_line(tmp_path):
    result = cli_runs.run(
        "simclr_jax.distill", f"--teacher_workdir={tmp_path}", f"--workdir={tmp_path / 'out'}"
    )
    assert result.returncode == 1
    assert cli_runs.error_lines(result.stderr) == [
        f"error: {tmp_path / 'config.json'} does not exist; is {tmp_path} the workdir of a run?"
    ]
    assert not (tmp_path / "out").exists()
