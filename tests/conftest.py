"""Test setup: eight fake CPU devices, so multi-device behaviour is tested on any machine.

The flags must be set before JAX is first imported, which is why they live here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow only feeds data; keep it quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
