"""Write a synthetic GLDv2 (same files and columns as the real one) to a folder or bucket, then its manifests with
the shard index (as jobs/prepare_gldv2.py --verify-shards writes them).

    python jobs/make_synthetic_gldv2.py --out /tmp/gldv2-synthetic --set width=640 --set height=480
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.config import config_from_dict, parse_override
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.metadata import prepare_manifests
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import check_writable, resolve
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to write (folder or s3://bucket/prefix)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default AWS")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"a SyntheticSpec field, e.g. --set num_landmarks=200; fields: {', '.join(SyntheticSpec.model_fields)}",
    )
    args = parser.parse_args()
    spec = config_from_dict(dict(parse_override(o) for o in args.overrides), "--set", SyntheticSpec)
    root = resolve(args.out, StorageConfig(endpoint_url=args.endpoint_url))
    check_writable(root, "--out")
    write_synthetic_gldv2(spec, root)
    prepare_manifests(root, root.child("manifest"), shard_index=dataset_shard_index(root))


if __name__ == "__main__":
    run_job(main)
