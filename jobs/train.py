"""Train any model config on the Ray cluster (or a local Ray when RAY_ADDRESS is unset).

    ray job submit --working-dir . -- python jobs/train.py --config configs/recipes/dolg_efficientnet_b5.yaml
Rerunning the same command (same run.name and run.output_dir) resumes from the latest checkpoint.
"""

from ray_landmark.cli import job_parser, load_job_config, run_job
from ray_landmark.config_base import ConfigError
from ray_landmark.runtime import init_ray
from ray_landmark.train.trainer import fit


def main(default_config: str | None = None, doc: str = __doc__, arch: str | None = None) -> None:
    args = job_parser(doc, default_config).parse_args()
    cfg = load_job_config(args)
    if arch and (cfg.model is None or cfg.model.arch != arch):
        raise ConfigError(f"{args.config}: model.arch must be '{arch}' for this job; use jobs/train.py for others")
    init_ray()
    result = fit(cfg)
    print(f"[train] finished {cfg.run.name}: {result.metrics}; final checkpoint {result.checkpoint.path}")


if __name__ == "__main__":
    run_job(main)
