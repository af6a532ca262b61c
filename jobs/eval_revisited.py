"""Revisited Oxford and Paris (+R1M distractors) for a trained checkpoint or an ensemble: mAP and mP@1,5,10 under
the Easy, Medium and Hard protocols (Radenović et al., CVPR 2018), with queries cropped to their boxes and
multi-scale descriptors.

    ray job submit --working-dir . -- python jobs/eval_revisited.py --checkpoint s3://my-bucket/runs/dolg_b5 \\
        --dataset roxford5k --data s3://my-bucket/revisitop --distractors s3://my-bucket/revisitop1m \\
        --long-side 1024 --out s3://my-bucket/revisited/dolg_b5 --actors 8 --gpus-per-actor 1
<data> holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/ as the revisitop project distributes them. Writes
<out>/<dataset>[+r1m]/results.json and report.html; embeddings go to <out>/embeddings/ and a rerun reuses them.
The images are embedded as jobs/embed.py embeds them, with the ensemble config's `embed` section and its defaults
(but the scales: 1/sqrt(2) 1 sqrt(2) unless --scales or --set embed.scales=[...] say otherwise): --set
embed.KEY=VALUE sets any of its keys, and --batch-size, --flip-tta, --actors, --gpus-per-actor and
--shards-per-pass are short for the keys a run most often sets.
--qe K and --dba K add rows to the table: the last stage (the model, or the ensemble) with alpha-QE over its K nearest
database images, DBA over each database image's K nearest others, and both (those asked), each neighbour weighted by
its similarity to the power --alpha (default 3); the plain row stays beside them.
"""

import argparse
import math
from dataclasses import replace

from ray_landmark.cli import add_embed_arguments, embed_tree, run_job, split_overrides


def _scale(text: str) -> float:
    """A scale as a number or an expression of sqrt: 0.7071, 1, sqrt(2), 1/sqrt(2)."""
    value = {"sqrt(2)": math.sqrt(2), "1/sqrt(2)": 1 / math.sqrt(2)}.get(text.replace(" ", ""))
    try:
        value = float(text) if value is None else value
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, sqrt(2) or 1/sqrt(2)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: a scale must be positive")
    return value


def main() -> None:
    # Imported here, not at the top: run_job sets Ray's console options first (Ray reads them when imported).
    from ray_landmark.config import load_config
    from ray_landmark.data.config import StorageConfig
    from ray_landmark.data.revisited import DATASETS
    from ray_landmark.data.storage import check_writable, resolve
    from ray_landmark.infer.config import EnsembleConfig
    from ray_landmark.infer.revisited import (
        RevisitedRequest, check_inputs, embed_settings, expansion_flags, models_from_checkpoint, models_from_ensemble,
        results_text, run_revisited,
    )
    from ray_landmark.runtime import init_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder or run folder (its newest checkpoint)")
    which.add_argument("--ensemble", help="an ensemble config: its retrieval models, and their combination")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data", required=True, help="folder or bucket holding <dataset>/gnd_<dataset>.pkl and jpg/")
    parser.add_argument("--distractors", help="R1M: a folder of JPEGs or of tar shards (.tar, .tar.gz)")
    parser.add_argument("--out", required=True, help="folder or bucket for embeddings/ and the results")
    parser.add_argument("--long-side", type=int, help="the image's long side at scale 1; default: the checkpoint's "
                        "data.image_size (DELG and DOLG: 1024, the images as distributed)")
    parser.add_argument("--scales", type=_scale, nargs="+",
                        help="embed.scales; default here: 1/sqrt(2) 1 sqrt(2), as DELG and DOLG")
    parser.add_argument("--square", action="store_true", help="squash each image to a square, as in training")
    parser.add_argument("--ranking-depth", type=int, default=10_000, help="ranked images per query (exact AP when "
                        "the database is not larger)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score although images of the ground truth are missing (not comparable then)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of --data, --distractors, --out and the "
                        "checkpoint; default AWS (an ensemble uses its storage section)")
    parser.add_argument("--part-size", type=int, default=2000, help="images embedded and written together")
    parser.add_argument("--qe", type=int, metavar="K", help="add rows with alpha query expansion over the K nearest "
                        "database images (not part of the 2021 method)")
    parser.add_argument("--dba", type=int, metavar="K", help="add rows with database-side augmentation over each "
                        "database image's K nearest others (not part of the 2021 method)")
    parser.add_argument("--alpha", type=float, metavar="A", help="--qe and --dba: each neighbour weighs its "
                        "similarity to the power A (default 3)")
    add_embed_arguments(parser, "an embed.* key, e.g. --set embed.cpus_per_actor=4 (repeatable)")
    args = parser.parse_args()
    tree = embed_tree(args, split_overrides(parser, args.overrides, ("embed",))["embed"])
    if args.scales:  # like the other flags, it wins over --set
        tree["scales"] = args.scales
    settings = embed_settings(tree, "jobs/eval_revisited.py arguments")  # checked before anything is read or Ray starts
    expansions = expansion_flags(args.qe, args.dba, args.alpha)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    ensemble = None
    if args.ensemble:
        ensemble = load_config(args.ensemble, [], EnsembleConfig)  # a ConfigError ends the job with its line
        storage = storage if args.endpoint_url else ensemble.storage
    request = RevisitedRequest(
        dataset=args.dataset, data=args.data, out=args.out, models=(), distractors=args.distractors,
        storage=storage, long_side=args.long_side, square=args.square, settings=settings,
        ranking_depth=args.ranking_depth, allow_missing=args.allow_missing, part_size=args.part_size, **expansions,
    )
    check_writable(resolve(args.out, storage), "--out")
    inputs = check_inputs(request)  # bad ground truth or missing images: refused before any model or Ray
    models = models_from_ensemble(ensemble) if ensemble else models_from_checkpoint(args.checkpoint, storage)
    request = replace(request, models=models)
    init_ray()
    results = run_revisited(request, inputs)
    print(results_text(results))
    print(f"[revisited] results: {results['results']}; report: {results['report']}")


if __name__ == "__main__":
    run_job(main)
