"""Train a DOLG-EfficientNet on the Ray cluster (default: step 1 of DOLG-B5's chain, 256 px on GLDv2c).

    ray job submit --working-dir . -- python jobs/train_dolg.py --config configs/recipes/dolg_efficientnet_b5_step1.yaml
Each published DOLG is a chain of such configs, each starting from the previous step's checkpoint through
train.init_from; jobs/train_chain.py --chain configs/chains/dolg_efficientnet_b5.yaml runs one whole.
"""

from ray_landmark.cli import job_parser, load_job_config, require_arch, run_job
from ray_landmark.runtime import init_ray
from ray_landmark.train.trainer import fit, load_training_data


def main() -> None:
    args = job_parser(__doc__, default_config="configs/recipes/dolg_efficientnet_b5_step1.yaml",
                      restart=True).parse_args()
    cfg = load_job_config(args)
    require_arch(cfg, "dolg", args.config, other_job="jobs/train.py")
    data = load_training_data(cfg, args.restart)
    init_ray()
    result = fit(cfg, data)
    print(f"[train] finished {cfg.run.name}; final checkpoint {result.checkpoint.path}")


if __name__ == "__main__":
    run_job(main)
