"""Entry point for `ray job submit ... -- python jobs/finetune.py --config configs/X.yaml [--set k=v]`.

Inside a Ray job RAY_ADDRESS is set, so the run joins the submitting cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds lmflow_ray/

from lmflow_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
