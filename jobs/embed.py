"""Embed every image of GLDv2 splits with a trained checkpoint (Ray Data batch inference), as parquet files of
(image id, float16 embedding) per shard.

    ray job submit --working-dir . -- python jobs/embed.py --checkpoint s3://my-bucket/runs/dolg_efficientnet_b5 \\
        --split test --split index --split train --view gldv2c --out s3://my-bucket/embeddings/dolg_b5 \\
        --actors 8 --gpus-per-actor 1
Rerunning the same command embeds only the shards that have no output yet. The data location comes from the
checkpoint's config; override it with --set data.root=... (any data.* key). How the images are embedded is the
ensemble config's `embed` section, with its defaults: --set embed.KEY=VALUE sets any of its keys (e.g. --set
embed.compile=false, --set embed.cpus_per_actor=4), and the flags --batch-size, --flip-tta, --actors,
--gpus-per-actor and --shards-per-pass are short for the keys a run most often sets.
"""

import argparse

from ray_landmark.cli import add_embed_arguments, embed_tree, run_job, split_overrides


def main() -> None:
    # Imported here, not at the top: run_job sets Ray's console options first (Ray reads them when imported).
    from ray_landmark.config import config_from_dict, set_dotted
    from ray_landmark.data import gldv2
    from ray_landmark.data.config import DataConfig, StorageConfig
    from ray_landmark.infer.config import EmbedSettings
    from ray_landmark.infer.embed import EmbedRequest, embed_splits
    from ray_landmark.data.pipeline import split_shards
    from ray_landmark.data.storage import check_writable, resolve
    from ray_landmark.runs.checkpoint import read_checkpoint_config
    from ray_landmark.runtime import init_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (its newest checkpoint)")
    parser.add_argument("--split", action="append", choices=gldv2.SPLITS, required=True, help="repeatable")
    parser.add_argument("--view", default="gldv2c", choices=["gldv2c", "gldv2x", "full"], help="train images")
    parser.add_argument("--out", required=True, help="folder or bucket URI; each split goes to <out>/<split>/")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of the checkpoint and --out; default AWS")
    add_embed_arguments(parser, "a data.* or embed.* key, e.g. --set data.root=s3://google-landmark (repeatable)")
    args = parser.parse_args()
    overrides = split_overrides(parser, args.overrides, ("data", "embed"))
    # Checked by the ensemble config's own model, before anything is read or Ray starts.
    settings = config_from_dict(embed_tree(args, overrides["embed"]), "jobs/embed.py arguments", EmbedSettings)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    data_tree = read_checkpoint_config(args.checkpoint, storage)["data"]
    for key, value in overrides["data"]:
        set_dotted(data_tree, key, value, "--set")
    data = config_from_dict(data_tree, "--set data.*", DataConfig)
    request = EmbedRequest(checkpoint=args.checkpoint, out=args.out, splits=tuple(dict.fromkeys(args.split)),
                           view=args.view, data=data, storage=storage, settings=settings)
    check_writable(resolve(args.out, storage), "--out")
    for split in request.splits:  # the shards the manifest lists are there, before Ray starts
        split_shards(data, split)
    init_ray()
    embed_splits(request)


if __name__ == "__main__":
    run_job(main)
