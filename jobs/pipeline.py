"""`lmflow-ray pipeline ...` as a Ray job (every stage runs on the cluster the job was submitted to):

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline_demo.yaml --no-serve
"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
