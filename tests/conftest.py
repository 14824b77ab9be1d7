"""Test-wide setup. Runs before any test module imports jax: 8 CPU devices for mesh tests.

No jax import here: the FHE suite (tests/fhe, run in .venv-fhe) shares this file.
"""

import os
import re

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
assert re.search(r"device_count=\d+", os.environ["XLA_FLAGS"])
