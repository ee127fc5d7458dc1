"""Test set-up: 8 CPU devices, configured before any JAX backend exists.

XLA reads device-count settings once, when the first backend starts; setting them later is
silently ignored. pytest imports conftest before any test module, so this is the place.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
