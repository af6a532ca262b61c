"""Train a DOLG-EfficientNet (default: DOLG-B5 at 768 px on GLDv2x, the published recipe) on the Ray cluster.

    ray job submit --working-dir . -- python jobs/train_dolg.py --config configs/recipes/dolg_efficientnet_b5.yaml
The B7 recipe is three configs run in order (dolg_efficientnet_b7_step1/2/3.yaml); each starts from the previous
step's checkpoint through train.init_from.
"""

from ray_landmark.cli import job_parser, load_job_config, require_arch, run_job
from ray_landmark.runtime import init_ray
from ray_landmark.train.trainer import fit, load_training_data


def main() -> None:
    args = job_parser(__doc__, default_config="configs/recipes/dolg_efficientnet_b5.yaml").parse_args()
    cfg = load_job_config(args)
    require_arch(cfg, "dolg", args.config, other_job="jobs/train.py")
    data = load_training_data(cfg)
    init_ray()
    result = fit(cfg, data)
    print(f"[train] finished {cfg.run.name}; final checkpoint {result.checkpoint.path}")


if __name__ == "__main__":
    run_job(main)
