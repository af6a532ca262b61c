"""Train any model config on the Ray cluster (or a local Ray when RAY_ADDRESS is unset).

    ray job submit --working-dir . -- python jobs/train.py --config configs/recipes/dolg_efficientnet_b5_step1.yaml
Rerunning the same command (same run.name and run.output_dir) resumes from the latest checkpoint; a rerun whose config
differs in more than epochs, workers, batch size and other resumable settings is refused, naming the keys (--restart
moves the old run aside and starts afresh).
"""

from ray_landmark.cli import job_parser, load_job_config, run_job
from ray_landmark.runtime import init_ray
from ray_landmark.train.trainer import fit, load_training_data


def main() -> None:
    args = job_parser(__doc__, restart=True).parse_args()
    cfg = load_job_config(args)
    data = load_training_data(cfg, args.restart)  # before Ray starts: a wrong manifest URI fails at once
    init_ray()
    result = fit(cfg, data)
    print(f"[train] finished {cfg.run.name}; final checkpoint {result.checkpoint.path}")


if __name__ == "__main__":
    run_job(main)
