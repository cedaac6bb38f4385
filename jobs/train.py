"""Entry point for `ray job submit ... -- python jobs/train.py KIND --config F [--set k=v]`.

KIND: finetune, reward-model, dpo, raft, ppo or iterative-dpo.

Inside a Ray job RAY_ADDRESS is set, so the run joins the submitting cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds lmflow_ray/

from lmflow_ray.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("finetune", "reward-model", "dpo", "raft", "ppo", "iterative-dpo"):
        sys.exit("usage: python jobs/train.py {finetune|reward-model|dpo|raft|ppo|iterative-dpo} --config F [--set k=v ...]")
    sys.exit(main(sys.argv[1:]))
