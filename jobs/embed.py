"""Embed every image of GLDv2 splits with a trained checkpoint (Ray Data batch inference), as parquet files of
(image id, float16 embedding) per shard.

    ray job submit --working-dir . -- python jobs/embed.py --checkpoint s3://my-bucket/runs/dolg_efficientnet_b5 \\
        --split test --split index --split train --view gldv2c --out s3://my-bucket/embeddings/dolg_b5 \\
        --actors 8 --gpus-per-actor 1
Rerunning the same command embeds only the shards that have no output yet. The data location comes from the
checkpoint's config; override it with --set data.root=... (any data.* key).
"""

import argparse

from ray_landmark.cli import run_job
from ray_landmark.config import config_from_dict, parse_override, set_dotted
from ray_landmark.data.config import DataConfig, StorageConfig
from ray_landmark.infer.config import EmbedSettings
from ray_landmark.infer.embed import EMBEDDING_SPLITS, EmbedRequest, embed_splits
from ray_landmark.runtime import init_ray
from ray_landmark.train.checkpoint import read_checkpoint_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its newest checkpoint)")
    parser.add_argument("--split", action="append", choices=EMBEDDING_SPLITS, required=True, help="repeatable")
    parser.add_argument("--view", default="gldv2c", choices=["gldv2c", "gldv2x", "full"], help="train images")
    parser.add_argument("--out", required=True, help="folder or bucket URI; each split goes to <out>/<split>/")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of the checkpoint and --out; default AWS")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's embedding")
    parser.add_argument("--actors", type=int, default=1, help="model replicas (one per GPU on a cluster)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--shards-per-pass", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override where the data lives, e.g. --set data.root=s3://google-landmark")
    args = parser.parse_args()
    # Checked by the ensemble config's own model, before anything is read or Ray starts.
    settings = config_from_dict({"batch_size": args.batch_size, "flip_tta": args.flip_tta, "actors": args.actors,
                                 "gpus_per_actor": args.gpus_per_actor, "shards_per_pass": args.shards_per_pass},
                                "jobs/embed.py arguments", EmbedSettings)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    data_tree = read_checkpoint_config(args.checkpoint, storage)["data"]
    for text in args.overrides:
        key, value = parse_override(text)
        if not key.startswith("data."):
            parser.error(f"--set {text}: only data.* keys can be overridden here")
        set_dotted(data_tree, key.removeprefix("data."), value, "--set")
    data = config_from_dict(data_tree, "--set data.*", DataConfig)
    request = EmbedRequest(
        checkpoint=args.checkpoint, out=args.out, splits=tuple(dict.fromkeys(args.split)), view=args.view, data=data,
        storage=storage, batch_size=settings.batch_size, flip_tta=settings.flip_tta, actors=settings.actors,
        gpus_per_actor=settings.gpus_per_actor, shards_per_pass=settings.shards_per_pass,
    )
    init_ray()
    embed_splits(request)


if __name__ == "__main__":
    run_job(main)
