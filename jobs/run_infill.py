"""`ray job submit --working-dir . -- python -m jobs.run_infill CONFIG.yaml [--set k=v ...]`.

The same entry point as `glm-infill run`: inside a Ray job, RAY_ADDRESS points the driver at
the cluster the job was submitted to.
"""

from __future__ import annotations

import sys

from pipeline.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
