"""Write the compact GLDv2 manifests (label views, label maps, class counts, evaluation sets) once.

    python jobs/prepare_gldv2.py --root s3://google-landmark --out s3://my-bucket/gldv2/manifest --anonymous
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.metadata import prepare_manifests
from ray_landmark.data.storage import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="GLDv2 root holding metadata/ and ground_truth/ (folder or s3://)")
    parser.add_argument("--out", help="where to write the manifests (default: <root>/manifest)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default AWS")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--anonymous", action="store_true", help="read the root without credentials (public bucket)")
    args = parser.parse_args()
    read = StorageConfig(endpoint_url=args.endpoint_url, region=args.region, anonymous=args.anonymous)
    # Writing always needs credentials, even when the source is a public bucket.
    write = StorageConfig(endpoint_url=args.endpoint_url, region=args.region)
    out = args.out or args.root.rstrip("/") + "/manifest"
    summary = prepare_manifests(resolve(args.root, read), resolve(out, write))
    print(f"wrote manifests to {out}: {summary}")


if __name__ == "__main__":
    run_job(main)
