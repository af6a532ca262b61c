"""Train a published model's chain of steps in order (configs/chains/*.yaml), each step warm-started from the last.

    ray job submit --working-dir . -- python jobs/train_chain.py --chain configs/chains/dolg_efficientnet_b5.yaml
--set KEY=VALUE applies to every step (e.g. --set data.root=s3://my-bucket/gldv2 --set run.output_dir=s3://my-bucket/runs).
Rerunning the same command skips finished steps and resumes a half-done one from its last checkpoint. A step whose
config changed since its run was trained is refused, naming the keys; --restart moves such a run aside first.
"""

import argparse
import sys

from ray_landmark.cli import run_job
from ray_landmark.errors import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", required=True, help="a chain YAML, e.g. configs/chains/dolg_efficientnet_b5.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value of every step's config (repeatable)")
    parser.add_argument("--restart", action="store_true",
                        help="a step whose run was trained with another config: move that run aside and train afresh")
    args = parser.parse_args()
    # Ray is imported here, after run_job's plain_ray_console.
    from ray_landmark.runtime import init_ray
    from ray_landmark.train.chain import load_chain, pending_steps, run_chain
    from ray_landmark.train.trainer import final_checkpoint, fit, load_training_data

    try:
        chain, steps = load_chain(args.chain, args.overrides)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    pending = pending_steps(steps)
    # The next step's manifests are read before Ray starts: a wrong data.root fails at once.
    first_data = load_training_data(steps[pending[0]], args.restart) if pending else None

    def fit_step(cfg):
        data = first_data if cfg is steps[pending[0]] else load_training_data(cfg, args.restart)
        fit(cfg, data)
        print(f"[train] finished {cfg.run.name}; final checkpoint {final_checkpoint(cfg)}")

    if pending:
        init_ray()
    run_chain(chain, steps, fit_step)


if __name__ == "__main__":
    run_job(main)
