"""`ray job submit --working-dir . -- python -m jobs.run_infill CONFIG.yaml [--set k=v ...]`.

The same entry point as `glm-infill run`: inside a Ray job, RAY_ADDRESS points the driver at
the cluster the job was submitted to.
"""

from __future__ import annotations

import sys

from pipeline.job import main_run

if __name__ == "__main__":
    sys.exit(main_run(sys.argv[1:]))
