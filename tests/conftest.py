"""Shared pytest set-up: hypothesis profiles.

``HYPOTHESIS_PROFILE`` picks one (default ``dev``):

- ``dev``: few examples, random seeds, for quick local runs.
- ``ci``: more examples, derandomized (the same examples on every run, so CI is
  reproducible), and failures print the blob that replays them.

A test that needs a different example count sets it with ``@settings``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
