"""Write a synthetic GLDv2 (same files and columns as the real one) to a folder or bucket, then its manifests with
the shard index (as jobs/prepare_gldv2.py --verify-shards writes them).

    python jobs/make_synthetic_gldv2.py --out /tmp/gldv2-synthetic --set width=640 --set height=480
    python jobs/make_synthetic_gldv2.py --out /tmp/gldv2-f0.01 --fraction 0.01

--set: a small set whose images a tiny model learns (ray_landmark/data/synthetic.py).
--fraction f: GLDv2's counts, tars and views times f (0.000254 <= f <= 1) with tiny JPEGs, to rehearse the pipeline
at scale (ray_landmark/data/synthetic_scale.py). Its disk is checked before the first file; a rerun reuses a complete
set, resumes an unfinished one, and refuses a folder that holds another fraction.
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.config import config_from_dict, parse_override
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.metadata import SUMMARY_FILE, prepare_manifests
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import check_writable, exists, resolve
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2
from ray_landmark.data.synthetic_scale import write_scaled_gldv2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to write (folder or s3://bucket/prefix)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto); default AWS")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"a SyntheticSpec field, e.g. --set num_landmarks=200; fields: {', '.join(SyntheticSpec.model_fields)}",
    )
    parser.add_argument("--fraction", type=float, help="GLDv2 at this fraction of its counts instead of --set's set")
    parser.add_argument("--no-manifest", action="store_true",
                        help="write the dataset only (the scale benchmark times jobs/prepare_gldv2.py on its own)")
    args = parser.parse_args()
    if args.fraction is not None and args.overrides:
        parser.error("--set shapes the small set and --fraction scales GLDv2's counts: give one of them")
    spec = config_from_dict(dict(parse_override(o) for o in args.overrides), "--set", SyntheticSpec)
    root = resolve(args.out, StorageConfig(endpoint_url=args.endpoint_url))
    check_writable(root, "--out")
    if args.fraction is None:
        summary = write_synthetic_gldv2(spec, root)
    else:
        summary = write_scaled_gldv2(args.fraction, root, what="--fraction")
    manifest = root.child("manifest")
    if args.no_manifest or (summary.get("reused") and exists(manifest.child(SUMMARY_FILE))):
        return
    prepare_manifests(root, manifest, shard_index=dataset_shard_index(root))


if __name__ == "__main__":
    run_job(main)
