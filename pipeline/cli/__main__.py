"""`python -m pipeline.cli`: the same as `glm-infill`."""

import sys

from pipeline.cli import entry

sys.exit(entry())
