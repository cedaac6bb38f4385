"""What every `jobs/KIND.py` does: run `lmflow-ray KIND ARGS...` inside a Ray job.

`ray job submit --working-dir .` unpacks this checkout as the job's working directory; the
entry puts it on sys.path (so `lmflow_ray` imports from the submitted code even where the
cluster's nodes have no install of their own) and runs the CLI in the driver process. Ray sets
RAY_ADDRESS for the job, so the run joins the cluster it was submitted to. Errors in the
configuration end the job FAILED with the CLI's one-line message in the job's logs.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str) -> None:
    sys.path.insert(0, str(ROOT))
    from lmflow_ray.cli import main

    sys.exit(main([kind, *sys.argv[1:]]))
