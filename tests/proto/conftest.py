"""Hypothesis profiles for the sans-IO core tests.

The default hypothesis profile (100 examples per property) keeps the whole
``tests/proto`` run fast. For a deeper search, either run
``pytest tests/proto --hypothesis-profile=long`` (works when ``tests/proto`` is
named on the command line, so that this file is loaded before the option is
read) or set ``SANDBOX_PROTO_HYPOTHESIS_PROFILE=long`` (works from anywhere).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_profile = os.environ.get("SANDBOX_PROTO_HYPOTHESIS_PROFILE")
if _profile:
    settings.load_profile(_profile)
