"""Repository-wide pytest set-up: 8 simulated CPU devices before JAX starts.

``tests/conftest.py`` holds the strict settings; this file only makes sure the
device count is set before the package's doctests import JAX.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
