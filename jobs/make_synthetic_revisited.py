"""Write a synthetic Revisited Oxford (gnd_<dataset>.pkl, jpg/) and R1M-like distractors, drawn from the landmarks of
the synthetic GLDv2 that a training config's ``synthetic`` section describes (new views of its buildings).

    python jobs/make_synthetic_revisited.py --config configs/quickstart.yaml --data runs/revisited/data \\
        --distractors runs/revisited/distractors
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.config import load_config
from ray_landmark.data.config import StorageConfig, SyntheticSpec
from ray_landmark.data.revisited import DATASETS, SyntheticRevisitedSpec, write_synthetic_revisited
from ray_landmark.data.storage import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml",
                        help="the training config whose synthetic GLDv2 the landmarks come from")
    parser.add_argument("--data", required=True, help="folder or bucket: <data>/<dataset>/ is written")
    parser.add_argument("--distractors", required=True, help="folder or bucket for the distractors")
    parser.add_argument("--dataset", default="roxford5k", choices=DATASETS)
    parser.add_argument("--distractor-format", default="tar", choices=["tar", "folder"])
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default AWS")
    args = parser.parse_args()
    spec = SyntheticRevisitedSpec(load_config(args.config).synthetic or SyntheticSpec())
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    summary = write_synthetic_revisited(spec, resolve(args.data, storage), resolve(args.distractors, storage),
                                        args.dataset, args.distractor_format)
    print(f"[revisited] wrote {summary['queries']} queries and {summary['database']} database images to "
          f"{summary['data']}/{summary['dataset']}, {summary['distractors']} distractors to "
          f"{summary['distractors_at']}")


if __name__ == "__main__":
    run_job(main)
