#!/usr/bin/env python
"""Sweep distillation settings with Ray Tune (each trial one Ray Train run) and record it in MLflow.

The entry point for ``python pipelines/tune.py`` and ``ray job submit -- python pipelines/tune.py``;
the code and its usage are in ``linearard_ray.commands.tune`` (also ``linearard-ray tune``).
"""

import sys

from linearard_ray.commands.tune import main

if __name__ == "__main__":
    sys.exit(main())
