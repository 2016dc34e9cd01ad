#!/usr/bin/env python
"""Sample a training corpus from the teacher: text for the KL terms that no dataset has to supply.

The entry point for ``python pipelines/sample_teacher.py`` and ``ray job submit -- python pipelines/sample_teacher.py``;
the code and its usage are in ``linearard_ray.commands.sample_teacher`` (also ``linearard-ray sample-teacher``).
"""

import sys

from linearard_ray.commands.sample_teacher import main

if __name__ == "__main__":
    sys.exit(main())
