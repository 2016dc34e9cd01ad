#!/usr/bin/env python
"""Tokenize raw text into the token blocks training streams (Ray Data, parquet + manifest.json).

The entry point for ``python pipelines/preprocess.py`` and ``ray job submit -- python pipelines/preprocess.py``;
the code and its usage are in ``linearard_ray.commands.preprocess`` (also ``linearard-ray preprocess``).
"""

import sys

from linearard_ray.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
