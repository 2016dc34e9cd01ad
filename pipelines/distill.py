#!/usr/bin/env python
"""Distil a RoPE-scaled student from its native-RoPE teacher on Ray Train (LinearARD).

The entry point for ``python pipelines/distill.py`` and ``ray job submit -- python pipelines/distill.py``;
the code and its usage are in ``linearard_ray.commands.distill`` (also ``linearard-ray distill``).
"""

import sys

from linearard_ray.commands.distill import main

if __name__ == "__main__":
    sys.exit(main())
