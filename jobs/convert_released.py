"""Turn one released 2021 checkpoint file (the seed repository's GitHub release v0.0.1-alpha) into a run folder of this
project, which jobs/embed.py, jobs/ensemble.py and train.init_from take like any trained run.

    python jobs/convert_released.py --source /models/dolg_b5.pth --out s3://my-bucket/runs/released_dolg_b5 \\
        [--model dolg_efficientnet_b5] [--data-root s3://google-landmark --anonymous]
The model is told from the tensor shapes unless --model names it. The config is the model's recipe
(configs/recipes/<model>.yaml) with data.preprocessing: original (and model.fusion: published for DOLG); the label map
is GLDv2c's landmark ids, sorted, from <data root>/metadata/train_clean.csv (default: the recipe's data.root, GLDv2's
public bucket).
"""

import argparse
from pathlib import Path

from ray_landmark.cli import run_job
from ray_landmark.config import parse_override
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import check_writable, resolve
from ray_landmark.runs.released import RELEASED_MODELS, convert_released

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="the released file: local path or bucket URI")
    parser.add_argument("--out", required=True, help="the run folder to write (local path or bucket URI); must be new")
    parser.add_argument("--model", choices=list(RELEASED_MODELS), help="default: told from the tensor shapes")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of --source and --out; default AWS")
    parser.add_argument("--data-root", help="GLDv2 root holding metadata/train_clean.csv; default the recipe's")
    parser.add_argument("--anonymous", action="store_true", help="read --data-root without credentials (public bucket)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="let torch.load run the file's pickled Python objects (only for a file you trust)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the written config, e.g. --set data.manifest=s3://my-bucket/manifest")
    args = parser.parse_args()
    for text in args.overrides:  # each --set parses before the file is read
        parse_override(text)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    check_writable(resolve(args.out, storage), "--out")
    report = convert_released(
        args.source, args.out, recipes=RECIPES, model_name=args.model, storage=storage, data_root=args.data_root,
        data_storage=StorageConfig(endpoint_url=args.endpoint_url, anonymous=args.anonymous),
        overrides=args.overrides, allow_pickle=args.allow_pickle,
    )
    print(report.summary())


if __name__ == "__main__":
    run_job(main)
