"""Test set-up: 8 CPU devices, configured before any JAX backend exists.

XLA reads device-count settings once, when the first backend starts; setting them later is
silently ignored. pytest imports conftest before any test module, so this is the place.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Drops every compiled program after each test module.

  Each XLA CPU executable maps its kernels' code and data as regions of their own: after
  tests/test_engine.py alone the process held 10,417 mappings, 1,163 after
  `jax.clear_caches()`. Kept for the whole suite they passed Linux's default limit of
  65,530 mappings per process, and the compiler segfaulted. Modules share few programs, so
  little compiles twice.
  """
  yield
  jax.clear_caches()
