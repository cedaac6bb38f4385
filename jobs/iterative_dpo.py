"""`lmflow-ray iterative-dpo ...` as a Ray job:

    ray job submit --working-dir . -- python jobs/iterative_dpo.py --config F [--set KEY=VALUE ...]
"""

from _entry import run

if __name__ == "__main__":
    run("iterative-dpo")
