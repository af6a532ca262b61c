"""Train any model config on the Ray cluster (or a local Ray when RAY_ADDRESS is unset).

    ray job submit --working-dir . -- python jobs/train.py --config configs/recipes/dolg_efficientnet_b5_step1.yaml
Rerunning the same command (same run.name and run.output_dir) resumes from the latest checkpoint; a rerun whose config
differs in more than epochs, workers, batch size and other resumable settings is refused, naming the keys (--restart
moves the old run aside and starts afresh).
"""

from ray_landmark.cli import run_job, train_job

if __name__ == "__main__":
    run_job(lambda: train_job(__doc__))
