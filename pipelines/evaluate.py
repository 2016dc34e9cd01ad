#!/usr/bin/env python
"""Evaluate restoration and long context: the teacher, the RoPE-scaled (unrestored) student and the

The entry point for ``python pipelines/evaluate.py`` and ``ray job submit -- python pipelines/evaluate.py``;
the code and its usage are in ``linearard_ray.commands.evaluate`` (also ``linearard-ray evaluate``).
"""

import sys

from linearard_ray.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
