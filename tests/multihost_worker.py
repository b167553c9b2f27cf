"""One process of a multi-process test run (started by tests/test_multihost.py).

``python tests/multihost_worker.py MODE OUT PROCESS_ID NUM_PROCESSES PORT [ARGS]``; with
``NUM_PROCESSES > 1`` it joins the others through ``jax.distributed`` on ``localhost:PORT`` (CPU
collectives over gloo). Modes:

- ``step``: three ``step.jit_train_step`` steps of a tiny model on a fixed global batch, this
  process feeding its own slice; writes the losses and final parameters to ``OUT``.
- ``train DATA_DIR WORKDIR SIGTERM_AT``: ``trainer.train_and_evaluate`` of the tiny config; when
  ``SIGTERM_AT`` > 0 this process alone sends itself SIGTERM once that step is logged. Writes
  whether the run completed and the steps it checkpointed to ``OUT``.
"""

import json
import os
import signal
import sys

import jax
import numpy as np

GLOBAL_BATCH = 16
IMAGE_SHAPE = (4, 4, 1)


def _replicated_to_host(tree):
    """Host copy of a replicated pytree (not fully addressable across processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def run_steps(out: str) -> None:
    from tiny_model import TinySimCLR

    from simclr_jax import optim, parallel, step

    mesh = parallel.data_mesh()
    schedule = optim.warmup_cosine_schedule(peak_value=0.5, warmup_steps=1, total_steps=4)
    state = step.create_train_state(
        TinySimCLR(), optim.lars(schedule), jax.random.key(0), IMAGE_SHAPE
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    train = step.jit_train_step(mesh, temperature=0.5, learning_rate_fn=schedule)
    per_process = GLOBAL_BATCH // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    losses = []
    for i in range(3):
        rng = np.random.default_rng(i)
        global_batch = {
            "views": rng.random((GLOBAL_BATCH, 2, *IMAGE_SHAPE), dtype=np.float32),
            "label": rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32),
        }
        host_batch = {name: value[mine] for name, value in global_batch.items()}
        state, metrics = train(
            state, parallel.host_batch_to_global(host_batch, mesh), jax.random.key(i)
        )
        losses.append(float(_replicated_to_host(metrics["loss"])))
    params = jax.tree_util.tree_flatten_with_path(_replicated_to_host(state.params))[0]
    arrays = {jax.tree_util.keystr(path): leaf for path, leaf in params}
    np.savez(out, losses=np.array(losses), **arrays)


def run_trainer(out: str, data_dir: str, workdir: str, sigterm_at: int) -> None:
    from simclr_jax import reporting, trainer
    from simclr_jax.configs import tiny

    if sigterm_at > 0:
        write = reporting.MetricsLog.write

        def write_then_signal(self, step, metrics):
            record = write(self, step, metrics)
            if step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return record

        reporting.MetricsLog.write = write_then_signal
    config = tiny.get_config()
    config.data_dir = data_dir
    config.compute_baselines = False
    config.eval_batch_size = 32
    results = trainer.train_and_evaluate(config, workdir)
    steps = sorted(
        int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()
    )
    with open(out, "w") as f:
        json.dump({"completed": results is not None, "checkpoints": steps}, f)


def main() -> None:
    mode, out, process_id, num_processes, port, *args = sys.argv[1:]
    if int(num_processes) > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}",
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
    if mode == "step":
        run_steps(out)
    else:
        data_dir, workdir, sigterm_at = args
        run_trainer(out, data_dir, workdir, int(sigterm_at))


if __name__ == "__main__":
    main()
