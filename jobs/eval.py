"""`lmflow-ray eval ...` as a Ray job:

    ray job submit --working-dir . -- python jobs/eval.py --model M --data F --out REPORT
"""

from _entry import run

if __name__ == "__main__":
    run("eval")
