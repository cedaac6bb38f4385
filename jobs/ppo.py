"""`lmflow-ray ppo ...` as a Ray job:

    ray job submit --working-dir . -- python jobs/ppo.py --config F [--set KEY=VALUE ...]
"""

from _entry import run

if __name__ == "__main__":
    run("ppo")
