"""The quickstart: synthetic GLDv2 in a local S3 server (127.0.0.1), streamed through the training pipeline, then a
tiny DOLG trained on it with 2 CPU workers, checkpointing to the same server.

    python jobs/quickstart.py [--config configs/quickstart.yaml] [--set data.image_size=64]
It writes a summary.json of what it measured to --out (runs/quickstart); checkpoints and logs go to run.output_dir on the
local S3 server, which lives only as long as the job.
"""

from pathlib import Path

from ray_landmark import quickstart
from ray_landmark.cli import job_parser, load_job_config, run_job
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials
from ray_landmark.runtime import init_ray


def main() -> None:
    parser = job_parser(__doc__, default_config="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/quickstart", help="local folder for summary.json")
    args = parser.parse_args()
    server = LocalS3Server()  # picks a free port; starts below, once the config is known to be good
    endpoint = f"endpoint_url={server.endpoint_url}"
    cfg = load_job_config(args, [f"data.storage.{endpoint}", f"run.storage.{endpoint}"])
    use_test_credentials()
    with server:
        init_ray()
        quickstart.run(cfg, server, Path(args.out))


if __name__ == "__main__":
    run_job(main)
