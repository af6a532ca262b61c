"""The ensemble: embeddings of every model (reused when they exist), kNN, the post-processing of the winning
solution, official metrics per model, family and stage, Kaggle submissions and an HTML report.

    ray job submit --working-dir . -- python jobs/ensemble.py --config configs/ensemble/gldv2_2021.yaml
Outputs in the config's <output_dir>/<name>/: embeddings/, submission_recognition.csv, submission_retrieval.csv,
report.html and summary.json. Rerunning reuses every shard already embedded.
"""

from ray_landmark.cli import job_parser, load_job_config, run_job


def main() -> None:
    # Imported here, not at the top: run_job sets Ray's console options first (Ray reads them when imported).
    from ray_landmark.infer.config import EnsembleConfig
    from ray_landmark.data.metadata import open_manifest
    from ray_landmark.infer.ensemble import check_models, data_config, metrics_text, run_ensemble
    from ray_landmark.runtime import init_ray

    cfg = load_job_config(job_parser(__doc__).parse_args(), cls=EnsembleConfig)
    # Before Ray starts: every model's checkpoint and config, the output folder, the data's manifest.
    check_models(cfg)
    open_manifest(data_config(cfg))
    init_ray()
    summary = run_ensemble(cfg, models_checked=True)
    print(metrics_text(summary["stages"]))
    print(f"[ensemble] report: {summary['report']}; submissions: {', '.join(summary['submissions'])}")


if __name__ == "__main__":
    run_job(main)
