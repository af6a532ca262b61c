"""The quickstart: synthetic GLDv2 in a local S3 server (127.0.0.1), streamed through the training pipeline; a tiny
DOLG and a tiny plain EfficientNet trained on it with 2 CPU workers each, checkpointing to the same server; then the
ensemble of the two: embeddings, kNN, post-processing, metrics per model and stage, submissions and a report; with
--tune, then a 3-trial Ray Tune sweep of the tiny DOLG on the same data; with --serve, then the two models as a
service (ray_landmark/serve), queried over HTTP with a few test images.

    python jobs/quickstart.py [--config configs/quickstart.yaml] [--set data.image_size=64]
It writes summary.json and ensemble/ (report.html, submissions, embeddings) to --out (runs/quickstart); checkpoints
and logs go to run.output_dir on the local S3 server, which lives only as long as the job: its bucket is copied to
<out>/bucket once training is done. Rerunning into the same --out restores it and reuses what is finished (the data
set, the trained runs, the embeddings) and says so; a changed config is refused, or with --restart trained afresh.
"""

from pathlib import Path

from ray_landmark.cli import job_parser, load_job_config, run_job
from ray_landmark.config import load_config
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials
from ray_landmark.tune.config import load_sweep


def main() -> None:
    parser = job_parser(__doc__, default_config="configs/quickstart.yaml", restart=True)
    parser.add_argument("--second", default="configs/quickstart_efficientnet.yaml", help="a model of another family")
    parser.add_argument("--ensemble", default="configs/ensemble/quickstart.yaml")
    parser.add_argument("--out", default="runs/quickstart", help="local folder for summary.json and the ensemble")
    parser.add_argument("--tune", action="store_true",
                        help="then a 3-trial sweep of the tiny DOLG on the same data (configs/tune_tiny.yaml)")
    parser.add_argument("--serve", action="store_true",
                        help="then start the landmark service on the two models and query it with a few test images")
    args = parser.parse_args()
    server = LocalS3Server()  # picks a free port; starts below, once the configs are known to be good
    endpoint = f"endpoint_url={server.endpoint_url}"
    cfg = load_job_config(args, [f"data.storage.{endpoint}", f"run.storage.{endpoint}"])
    second = load_config(args.second, [f"data.storage.{endpoint}", f"run.storage.{endpoint}"])
    ensemble = load_config(args.ensemble, [f"storage.{endpoint}", f"output_dir={Path(args.out).resolve()}"],
                           EnsembleConfig)
    # The data as this run's server serves it (a reused run's checkpoint names the last run's server).
    ensemble = ensemble.model_copy(update={"data": cfg.data})
    sweep = load_sweep("configs/tune_tiny.yaml", [f"output_dir={Path(args.out).resolve() / 'sweeps'}"],
                       [f"data.storage.{endpoint}"]) if args.tune else None
    from ray_landmark import quickstart  # Ray is imported here, after run_job's plain_ray_console
    from ray_landmark.runtime import init_ray

    use_test_credentials()
    with server:
        init_ray()
        quickstart.run(cfg, second, ensemble, server, Path(args.out), sweep, args.restart)
        if args.serve:
            quickstart.serve_and_ask(ensemble, cfg.data)


if __name__ == "__main__":
    run_job(main)
