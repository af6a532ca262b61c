"""Write the compact GLDv2 manifests (label views, label maps, class counts, evaluation sets) once.

    python jobs/prepare_gldv2.py --root s3://google-landmark --out s3://my-bucket/gldv2/manifest --anonymous \
        [--verify-shards]
--verify-shards lists the members of every tar (headers only) so that class counts and steps per epoch count only
images that exist, reports metadata rows without images and images without rows, and writes each split's shard index
(where every member's bytes are), from which training and embedding read only the images they use.
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.metadata import prepare_manifests
from ray_landmark.data.shard_members import dataset_shard_index, dataset_tar_files
from ray_landmark.data.storage import check_writable, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="GLDv2 root: metadata/, ground_truth/, shards (folder, s3://)")
    parser.add_argument("--out", help="where to write the manifests (default: <root>/manifest)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default AWS")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--anonymous", action="store_true", help="read the root without credentials (public bucket)")
    parser.add_argument("--verify-shards", action="store_true", help="count only images the tar shards hold; write the shard index")
    args = parser.parse_args()
    read = StorageConfig(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.anonymous)
    # Writing always needs credentials, even when the source is a public bucket.
    write = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    out = args.out or args.root.rstrip("/") + "/manifest"
    root = resolve(args.root, read)
    out_loc = resolve(out, write)
    check_writable(out_loc, "--out")  # before the shards are listed
    shard_index = dataset_shard_index(root) if args.verify_shards else None
    # Without the index, the tar list alone: every job then knows which shards to expect.
    shard_files = None if args.verify_shards else dataset_tar_files(root)
    summary = prepare_manifests(root, out_loc, shard_index=shard_index, shard_files=shard_files)
    print(f"wrote manifests to {out}: {summary}")


if __name__ == "__main__":
    run_job(main)
