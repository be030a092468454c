from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=15, deadline=None)
settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Any vmap that falls back to torch's per-example loop warns, and warnings are errors.
torch._C._functorch._set_vmap_fallback_warning_enabled(True)  # type: ignore[attr-defined]
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
