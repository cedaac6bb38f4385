"""`lmflow-ray reward-model ...` as a Ray job:

    ray job submit --working-dir . -- python jobs/reward_model.py --config F [--set KEY=VALUE ...]
"""

from _entry import run

if __name__ == "__main__":
    run("reward-model")
