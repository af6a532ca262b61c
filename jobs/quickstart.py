"""The quickstart: synthetic GLDv2 in a local S3 server (127.0.0.1), streamed through the training pipeline.

    python jobs/quickstart.py [--config configs/quickstart.yaml] [--set data.image_size=64]
Outputs go under run.output_dir (runs/quickstart), with a summary.json of what was measured.
"""

from pathlib import Path

from ray_landmark import quickstart
from ray_landmark.cli import job_parser, load_job_config, run_job
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials
from ray_landmark.runtime import init_ray


def main() -> None:
    args = job_parser(__doc__, default_config="configs/quickstart.yaml").parse_args()
    server = LocalS3Server()  # picks a free port; starts below, once the config is known to be good
    cfg = load_job_config(args, [f"data.storage.endpoint_url={server.endpoint_url}"])
    use_test_credentials()
    with server:
        init_ray()
        quickstart.run(cfg, server, Path(cfg.run.output_dir))


if __name__ == "__main__":
    run_job(main)
