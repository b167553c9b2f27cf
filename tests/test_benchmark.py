"""The train-step benchmark's command line, on a tiny ResNet (compiling is most of the time)."""

import json

import jax
import numpy as np
import pytest

from simclr_jax import benchmark, compile_check, configs, cpu, kernels, optim, parallel, step
from simclr_jax.cpu import extension

TINY = [
    "--model=resnet18",
    "--width=4",
    "--image-size=16",
    "--channels=1",
    "--batch=8",
    "--steps=2",
    "--warmup=1",
    "--devices=1",  # one device compiles far faster than the eight fake ones
]


def _record(capsys, argv: list[str]) -> dict:
    """The one JSON line ``main(argv)`` prints."""
    benchmark.main(argv)
    (line,) = capsys.readouterr().out.splitlines()
    return json.loads(line)


def test_one_json_line_and_the_models_flops_whatever_conv_impl(capsys):
    xla = _record(capsys, [*TINY, "--conv-impl=xla"])
    subpixel = _record(capsys, [*TINY, "--conv-impl=subpixel_input_grads"])
    auto = _record(capsys, TINY)
    bfloat16 = _record(capsys, [*TINY, "--conv-precision=bfloat16"])
    # Over two devices the step's work is the same: one count, made on one CPU device.
    two_devices = _record(capsys, [*TINY, "--conv-impl=xla", "--devices=2"])
    for record in (xla, subpixel, auto, bfloat16):
        assert record["views_per_s"] > 0 and record["median_step_s"] > 0
        assert record["batch"] == 8 and record["base_width"] == 4 and record["channels"] == 1
        assert record["stem"] == "cifar" and record["devices"] == 1
        assert "input_pairs_per_s" not in record  # no recipe, no input pipeline
    assert subpixel["conv_impl_resolved"] == "subpixel_input_grads"
    assert xla["flops_per_step"] > 0
    assert two_devices["devices"] == 2
    assert two_devices["flops_per_step"] == xla["flops_per_step"]
    assert xla["conv_impl_resolved"] == "xla"
    # One CPU device (--devices=1): oneDNN's kernels, or the phases where they cannot be built.
    one_device = "onednn" if extension.unavailable_reason() is None else "subpixel_input_grads"
    assert auto["conv_impl_resolved"] == one_device
    # Without oneDNN's bfloat16 convolutions (no AVX-512): its batch norms, XLA's convolutions.
    if one_device == "onednn" and not extension.bfloat16_convolutions():
        assert bfloat16["conv_impl_resolved"] == "onednn_batch_norm+bfloat16"
    else:
        assert bfloat16["conv_impl_resolved"] == f"{one_device}+bfloat16"
    assert (auto["conv_precision"], bfloat16["conv_precision"]) == ("float32", "bfloat16")
    assert subpixel["flops_per_step"] == auto["flops_per_step"] == xla["flops_per_step"]
    assert bfloat16["flops_per_step"] == xla["flops_per_step"]
    assert subpixel["compiler_options"] == cpu.compiler_options()
    assert subpixel["backend"] == "cpu"
    peak = subpixel["matmul_peak_flops_per_s"]
    assert subpixel["utilisation"] == pytest.approx(
        subpixel["flops_per_step"] / subpixel["median_step_s"] / peak,
        rel=1e-2,  # the record rounds the median step time
    )


def _flops_compiled_on_the_first_device(setup: benchmark.StepSetup, conv_impl: str) -> float:
    """XLA's count for ``setup``'s step compiled (not run) with ``conv_impl``'s layers on the first
    device, from real arrays: built here from the step's parts, not by the benchmark."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    model = benchmark._model(setup, kernels.for_mesh(conv_impl, mesh))
    tx = optim.create_optimizer(setup.optimizer, 0.1, weight_decay=1e-6)
    shape = (setup.image_size, setup.image_size, setup.channels)
    state = step.create_train_state(model, tx, jax.random.key(0), shape)
    batch = parallel.host_batch_to_global(
        {
            "views": np.zeros((setup.batch, 2, *shape), np.float32),
            "label": np.zeros(setup.batch, np.int32),
        },
        mesh,
    )
    train_step = step.jit_train_step(mesh, temperature=0.5, learning_rate_fn=lambda _: 0.1)
    compiled = train_step.lower(state, batch, jax.random.key(1)).compile()
    return compile_check.compiled_flops(compiled)


def test_the_flops_are_xla_convolutions_on_one_cpu_device_whatever_is_timed():
    """The count behind flops_per_step is the step at the global batch on one CPU device, with
    XLA's convolutions, which XLA counts; custom-call convolutions (oneDNN's here, cuDNN's on a
    GPU) are left out of XLA's cost analysis, and a count over several devices adds each device's
    copy of the replicated work."""
    setup = benchmark.StepSetup(base_width=4, image_size=16, channels=1, batch=8)
    xla = _flops_compiled_on_the_first_device(setup, "xla")
    assert benchmark.step_flops(setup) == xla > 0
    # The timed devices and layers do not change it.
    timed = benchmark.benchmark_step(setup, steps=1, warmup=0, devices=2)
    assert timed["devices"] == 2 and timed["flops_per_step"] == xla
    if extension.unavailable_reason() is None:
        # oneDNN's convolutions are custom calls: XLA counts only the rest of the step.
        assert _flops_compiled_on_the_first_device(setup, "onednn") < xla / 2


def test_flags_override_the_recipe_and_the_input_pipeline_is_timed(capsys, fashion_mnist_data_dir):
    record = _record(
        capsys,
        [
            "--config=tiny",  # a shipped config, by name
            f"--data-dir={fashion_mnist_data_dir}",
            "--batch=16",
            "--config.model.conv_impl=xla",
            "--steps=1",
            "--warmup=0",
            "--devices=1",
        ],
    )
    assert record["config"] == "tiny"
    assert record["batch"] == 16  # tiny.py says 32
    assert record["conv_impl"] == record["conv_impl_resolved"] == "xla"  # tiny.py says "auto"
    # The rest is the recipe's: its model, optimiser and the dataset's image shape.
    assert (record["base_width"], record["projection_dim"], record["optimizer"]) == (4, 16, "lars")
    assert (record["image_size"], record["channels"], record["temperature"]) == (16, 1, 0.5)
    assert record["input_pairs_per_s"] > 0
    assert record["input_headroom"] == pytest.approx(
        2 * record["input_pairs_per_s"] / record["views_per_s"], rel=1e-2
    )


def test_config_without_input_and_flag_errors(capsys, fashion_mnist_data_dir):
    argv = [
        f"--config={configs.config_path('tiny')}",  # a config file, by path
        f"--data-dir={fashion_mnist_data_dir}",
        "--no-input",
    ]
    with pytest.raises(SystemExit):
        benchmark.main([*argv, "--channels=3"])
    assert "--channels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main([*TINY, "--measure-data-wait"])
    assert "--measure-data-wait needs --config" in capsys.readouterr().err
    args = benchmark._parse_args([*argv, "--width=8", "--dtype=bfloat16", "--model=resnet34"])
    config = benchmark.config_with_overrides(args)
    assert (config.model.base_width, config.model.dtype, config.model.depth) == (
        8,
        "bfloat16",
        34,
    )
    assert config.global_batch_size == 32 and config.data_dir == fashion_mnist_data_dir
    # --config.FIELD=VALUE overrides the recipe, and an explicit model flag overrides both.
    args = benchmark._parse_args(
        [*argv, "--config.model.conv_impl=xla", "--config.model.base_width=8"]
    )
    assert args.overrides == ["model.conv_impl=xla", "model.base_width=8"]
    config = benchmark.config_with_overrides(args)
    assert (config.model.conv_impl, config.model.base_width) == ("xla", 8)
    args = benchmark._parse_args([*argv, "--config.model.conv_impl=xla", "--conv-impl=onednn"])
    assert benchmark.config_with_overrides(args).model.conv_impl == "onednn"
    args = benchmark._parse_args([*argv, "--conv-precision=bfloat16"])
    config = benchmark.config_with_overrides(args)
    assert config.model.conv_precision == "bfloat16"
    assert benchmark.setup_from_config(config).conv_precision == "bfloat16"
    with pytest.raises(SystemExit):
        benchmark.main([*TINY, "--config.model.conv_impl=xla"])
    assert "--config.FIELD=VALUE needs --config" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"no config 'no_such_recipe'.*tiny"):
        benchmark.main(["--config=no_such_recipe", "--no-input"])


def test_a_bad_config_override_is_one_error_line_naming_the_field(monkeypatch):
    def benchmarked(*args, **kwargs):
        raise AssertionError("the bad override was accepted and the benchmark went on")

    monkeypatch.setattr(benchmark, "setup_from_config", benchmarked)
    monkeypatch.setattr(benchmark, "benchmark_step", benchmarked)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--config=tiny", "--config.model.no_such_field=1", "--no-input"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "no_such_field" in message


def test_data_wait_fraction_leaves_out_the_first_interval(monkeypatch, capsys):
    """The short training run: evaluation off, its terminal output kept off stdout, and the
    mean over the logged intervals after the first (which holds compilation)."""
    from simclr_jax import trainer
    from simclr_jax.configs import tiny

    seen = {}

    def train(config, workdir):
        seen.update(config.to_dict())
        print("progress line")
        lines = [{"step": s, "data_wait_fraction": f} for s, f in [(2, 0.9), (4, 0.1), (6, 0.3)]]
        with open(f"{workdir}/metrics.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)

    monkeypatch.setattr(trainer, "train_and_evaluate", train)
    result = benchmark.measure_data_wait(tiny.get_config(), steps=12)
    assert result == {"data_wait_fraction": pytest.approx(0.2), "data_wait_steps": 12}
    assert seen["num_train_steps"] == 12 and seen["log_every_steps"] == 2
    assert not seen["evaluate_at_end"] and not seen["compute_baselines"]
    assert seen["eval_every_steps"] == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "progress line" in captured.err


def test_the_recipes_objective_and_small_views_are_timed(capsys, fashion_mnist_data_dir):
    argv = [
        "--config=tiny",
        f"--data-dir={fashion_mnist_data_dir}",
        "--no-input",
        "--config.model.conv_impl=xla",
        "--steps=1",
        "--warmup=0",
        "--devices=1",
    ]
    plain = _record(capsys, argv)
    supcon = _record(capsys, [*argv, "--config.objective=supcon"])
    multi_crop = _record(
        capsys,
        [*argv, "--config.augment.num_small_crops=2", "--config.augment.small_crop_size=8"],
    )
    assert (plain["objective"], plain["num_small_crops"]) == ("nt_xent", 0)
    assert supcon["objective"] == "supcon"
    assert (multi_crop["num_small_crops"], multi_crop["small_crop_size"]) == (2, 8)
    # Two 8-px views beside two 16-px ones: a quarter more pixels, about as much more work.
    assert 1.15 < multi_crop["flops_per_step"] / plain["flops_per_step"] < 1.3
