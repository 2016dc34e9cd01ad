"""The command-line programs, one module each: ``distill``, ``preprocess``, ``evaluate``, ``tune``,
``sample_teacher``. Each has ``main(argv=None, prog=...) -> exit status``; ``pipelines/<name>.py``
and the ``linearard-ray <name>`` console script both call it.
"""

import os

# Tokenizers' own thread pool fights Ray's worker processes for the same cores (and warns after
# every fork); the pipelines tokenise in Ray Data actors instead.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMMANDS = ("distill", "preprocess", "evaluate", "tune", "sample-teacher")
