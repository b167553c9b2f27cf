"""Fashion-MNIST distillation (SimCLRv2 §3), sized for a 2-core CPU: a `fashion_mnist` run's
network fine-tuned on 1% of the labels (600 images) teaches a ResNet-18 of the same size, trained
from scratch for 3 epochs on all 60,000 train images (labels unused).

Only the `distillation` fields below are used by `python -m simclr_jax.distill`; the data, model
and evaluation settings come from the teacher's run.
Run:   python -m simclr_jax.distill --teacher_workdir=workdirs/fashion_mnist \\
         --workdir=workdirs/distill_1pct
10%:   ... --workdir=workdirs/distill_10pct --config.distillation.label_fraction=0.1 \\
         --config.distillation.teacher_epochs=10
Expect: the README's "Distillation (SimCLRv2)" section (teacher and student at 1% and 10%, and
the time each run takes); the student's 703 steps are most of that time.
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    distillation = config.distillation
    distillation.label_fraction = 0.01
    # The teacher's schedule and τ were chosen on the validation split (README, Distillation):
    # a longer, faster fine-tuning gives a better teacher, and at τ = 1 its soft targets are
    # nearly flat.
    distillation.teacher_epochs = 30.0
    distillation.teacher_batch_size = 256
    distillation.teacher_base_learning_rate = 0.2
    distillation.temperature = 0.2
    distillation.alpha = 1.0
    distillation.student_depth = 0  # the teacher's ResNet-18, base width 16: self-distillation
    distillation.epochs = 3.0
    distillation.batch_size = 256
    distillation.base_learning_rate = 0.1
    return config
