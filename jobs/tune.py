"""Sweep training config values with Ray Tune (ASHA early stopping on the validation metric).

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_margins.yaml
Each trial is a full Ray Train run of the base config with the sampled values. Rerunning the same command resumes an
interrupted sweep; a rerun with other sweep or base values is refused (--restart moves the old sweep aside). Exits 1
when every trial, or the best one, failed. Writes trials.csv, trials.md, metric_vs_params.png and best_config.yaml (train it with
jobs/train.py --config best_config.yaml) to <output_dir>/<name>/.
"""

from ray_landmark.cli import job_parser, run_job
from ray_landmark.data.metadata import open_manifest
from ray_landmark.tune.config import load_sweep


def main() -> None:
    parser = job_parser(__doc__, restart=True)
    parser.add_argument("--set-base", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the base training config, e.g. --set-base data.root=s3://... ")
    args = parser.parse_args()
    # Every key and value of the space is checked against the base before Ray starts.
    sweep, base = load_sweep(args.config, args.overrides, args.base_overrides)
    open_manifest(base.data).view_classes(base.data.view)  # a wrong data.root fails here, before Ray starts
    from ray_landmark.data.storage import check_writable
    from ray_landmark.runs.folders import output_folder
    from ray_landmark.runtime import init_ray  # Ray is imported here, after run_job's plain_ray_console
    from ray_landmark.tune.sweep import check_sweep_rerun, run_sweep

    check_sweep_rerun(sweep, base, args.restart)
    check_writable(output_folder(sweep), "output_dir")
    init_ray()
    run_sweep(sweep, base)


if __name__ == "__main__":
    run_job(main)
