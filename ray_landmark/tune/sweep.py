"""A Ray Tune sweep over any values of a training config (docs/ray-notes.md §3's Train-inside-Tune pattern).

Each trial is a function that builds its own config (base + sampled values) and runs the project's ordinary training
(``train.trainer.fit``) under a stable Train run name, ``trial_<id>``, so a failed trial resumes from its checkpoint.
``TuneReportCallback`` forwards every epoch's report to Tune, where ASHA stops the weaker trials early. Rerunning the
same sweep restores it (``Tuner.restore``) if its sweep config and base config are those the sweep was started with
(``sweep.json``; ``runs.identity``'s rule, ``--restart`` moves a changed sweep aside); Tune does not save ASHA's
rungs, so after a resume the remaining trials are compared only with the trials run since. A sweep whose every trial
failed, or whose best trial failed, ends with ``SweepFailed`` listing the failed trials. At the end: ``trials.csv``, ``trials.md``, ``metric_vs_params.png`` and
``best_config.yaml`` (a config ``jobs/train.py`` takes as it is) in ``<output_dir>/<name>/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile

import pandas as pd
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from ray_landmark.config import Config, config_from_dict
from ray_landmark.data.storage import exists, read_bytes, write_bytes
from ray_landmark.errors import JobError, user_error
from ray_landmark.markdown import markdown_table
from ray_landmark.progress import Printer, say
from ray_landmark.runs.folders import output_folder, output_parent
from ray_landmark.runs.identity import RESUMABLE, check_rerun
from ray_landmark.train.trainer import fit
from ray_landmark.tune.config import Distribution, SweepConfig, with_values

TRIALS_FOLDER = "trials"  # the trials' Train runs: <output_dir>/<name>/trials/trial_<id>/
IDENTITY_FILE = "sweep.json"  # the sweep and base configs the sweep was started with
# What a resumed sweep may change: how many trials run at once and their data CPUs, where things are, and the base's
# resumable keys (its train.epochs never reaches a trial: settings.epochs does).
SWEEP_RESUMABLE = ("sweep.settings.max_concurrent_trials", "sweep.settings.data_cpus_per_trial", "sweep.storage.",
                   *(f"base.{key}" for key in RESUMABLE))


class SweepFailed(JobError, RuntimeError):
    """Every trial, or the best one, failed; the message lists the failed trials."""


def _search_space(space: dict[str, Distribution]) -> dict:
    samplers = {"grid": ray.tune.grid_search, "choice": ray.tune.choice,
                "uniform": lambda v: ray.tune.uniform(*v), "loguniform": lambda v: ray.tune.loguniform(*v)}
    return {key: samplers[d.kind](d.values) for key, d in space.items()}


def trial_config(sweep: SweepConfig, base: Config, params: dict, trial_name: str) -> Config:
    """The config of one trial: the base with the sampled values, the sweep's horizon, validation every epoch (ASHA
    compares trials at epoch ends), and its own run folder."""
    tree = with_values(base, {
        **params, **_warm_start(sweep),
        "train.epochs": sweep.settings.epochs, "train.stop_at": None, "train.eval_every": 1,
        # Only epoch reports, each with the metric.
        "train.checkpoint_every_steps": None, "train.checkpoint_every_minutes": None,
    }, sweep.name)
    tree["run"] = {"name": trial_name, "output_dir": output_folder(sweep).child(TRIALS_FOLDER).uri,
                   "storage": sweep.storage.model_dump(mode="json")}
    return config_from_dict(tree, f"{sweep.name} trial {trial_name}")


def _warm_start(sweep: SweepConfig) -> dict:
    return {"train.init_from": sweep.init_from} if sweep.init_from else {}


def _trainable(sweep: SweepConfig, base: Config):
    def run_trial(params: dict) -> None:
        cfg = trial_config(sweep, base, params, f"trial_{ray.tune.get_context().get_trial_id()}")
        # Each trial builds its own pipelines (the image size may differ): capped, so that concurrent trials' decode
        # tasks share the CPUs instead of starving each other.
        fit(cfg, callbacks=[TuneReportCallback()], data_cpus=sweep.settings.data_cpus_per_trial)

    # A trial's own actor only drives Ray Train: a sliver of a CPU, so the CPUs stay with training and decoding.
    return ray.tune.with_resources(run_trial, {"CPU": 0.1})


class TrialEvents(ray.tune.Callback):
    """One line per trial event instead of Tune's status table."""

    def __init__(self, metric: str, epochs: int, printer: Printer):
        self.metric, self.epochs, self.printer = metric, epochs, printer

    def _params(self, trial) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        self.printer(f"[tune] {trial.trial_id} started: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, float) else value
        self.printer(f"[tune] {trial.trial_id} epoch {result.get('epoch')}/{self.epochs}: {self.metric} {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("epoch", 0)
        state = "finished" if epochs >= self.epochs else f"stopped early by ASHA after {epochs} epochs"
        self.printer(f"[tune] {trial.trial_id} {state}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.printer(f"[tune] {trial.trial_id} FAILED: {trial.error_file or 'see its log'} has its error; the sweep "
                     f"goes on")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sweep_identity(sweep: SweepConfig, base: Config) -> dict:
    return {"sweep": sweep.model_dump(mode="json"), "base": base.model_dump(mode="json")}


def check_sweep_rerun(sweep: SweepConfig, base: Config, restart: bool = False, printer: Printer = say) -> None:
    """A sweep folder holds one sweep: rerunning it with other sweep or base values is refused (``restart`` moves
    the old one aside). Before Ray starts."""
    location = output_folder(sweep)
    marker = location.child(IDENTITY_FILE)
    saved = json.loads(read_bytes(marker)) if exists(marker) else None
    check_rerun(location, saved, sweep_identity(sweep, base), restart=restart, resumable_keys=SWEEP_RESUMABLE,
                name_key="name", printer=printer)


def run_sweep(sweep: SweepConfig, base: Config, printer: Printer = say) -> dict:
    """Run (or resume) the sweep on the connected Ray cluster; write its table, plot and best config. Raises
    SweepFailed when every trial or the best one failed (after writing the table)."""
    location = output_folder(sweep)
    settings = sweep.settings
    trainable = _trainable(sweep, base)
    # Tune's new output engine prints its own boxes and tables whatever the verbosity; the legacy one is silent at
    # verbose=0, and TrialEvents prints a line per event instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    parent = output_parent(sweep)
    run_config = ray.tune.RunConfig(
        name=sweep.name, storage_path=parent.path, storage_filesystem=parent.fs, verbose=0,
        callbacks=[TrialEvents(settings.metric, settings.epochs, printer)],
        failure_config=ray.tune.FailureConfig(max_failures=0),
    )
    if ray.tune.Tuner.can_restore(location.path, storage_filesystem=location.fs):
        printer(f"[tune] resuming the sweep in {location.uri}")
        tuner = ray.tune.Tuner.restore(location.path, trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=location.fs)
    else:
        concurrent = settings.max_concurrent_trials or _default_concurrency(base)
        printer(f"[tune] sweep {sweep.name}: {', '.join(sweep.space)}; {settings.num_samples} samples, "
                f"{concurrent} at a time, ASHA on {settings.metric} ({settings.mode}) -> {location.uri}")
        tuner = ray.tune.Tuner(
            trainable,
            param_space=_search_space(sweep.space),
            tune_config=ray.tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                search_alg=BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrent),
                # Epochs, not Tune's iteration count: a trial resumed from its Train checkpoint goes on counting
                # its epochs, while Tune's count would restart.
                scheduler=ASHAScheduler(time_attr="epoch", max_t=settings.epochs,
                                        grace_period=settings.grace_period,
                                        reduction_factor=settings.reduction_factor),
            ),
            run_config=run_config,
        )
    write_bytes(location.child(IDENTITY_FILE), json.dumps(sweep_identity(sweep, base), indent=2).encode())
    tune_log = tune_log_path(sweep)
    with tune_logs_to(tune_log):
        results = tuner.fit()
    table = trials_table(results, sweep)
    summary = write_outputs(sweep, base, table, printer)
    failed = table.loc[table["status"] == "failed", "trial"].astype(str).tolist()
    if failed and (len(failed) == len(table) or table.iloc[0]["status"] == "failed"):
        which = "every trial" if len(failed) == len(table) else "its best trial"
        first = results.errors[0]
        reason = user_error(first) or str(first).strip().splitlines()[-1]
        raise SweepFailed(f"sweep {sweep.name}: {which} failed ({', '.join(failed)}), the first with: {reason}; "
                          f"each trial's error.txt under {location.uri} has the whole error, and Tune's log "
                          f"{tune_log}")
    return summary


def tune_log_path(sweep: SweepConfig) -> str:
    """Where the driver's Tune log goes: beside Ray's logs (the head node's session folder)."""
    from ray_landmark.runtime import ray_logs_folder

    return os.path.join(ray_logs_folder() or tempfile.gettempdir(), f"tune_{sweep.name}.log")


@contextlib.contextmanager
def tune_logs_to(path: str):
    """Tune's own log records (a failed trial's traceback above all) go to ``path``, not the console, while the
    sweep runs: the console has TrialEvents' line per event and the job's one-line end."""
    logger = logging.getLogger("ray.tune")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


def _default_concurrency(base: Config) -> int:
    """Tune does not reserve the Train workers' GPUs (docs/ray-notes.md §3.3): run as many trials as the GPUs hold."""
    if not base.train.use_gpu:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0)) // max(1, base.train.num_workers))


def trials_table(results, sweep: SweepConfig) -> pd.DataFrame:
    """One row per trial: its values, best metric, epochs run and whether it finished, stopped early or failed."""
    settings = sweep.settings
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        values = history[settings.metric].dropna() if settings.metric in history else pd.Series(dtype=float)
        best = (values.max() if settings.mode == "max" else values.min()) if len(values) else math.nan
        epochs = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        status = "failed" if result.error else ("finished" if epochs >= settings.epochs else "stopped early")
        trial = result.metrics.get("trial_id") if result.metrics else result.path.rsplit("/", 1)[-1]
        rows.append({"trial": trial, **{k: result.config.get(k) for k in sweep.space},
                     f"best_{settings.metric}": best, "epochs": epochs, "status": status})
    table = pd.DataFrame(rows)
    return table.sort_values(f"best_{settings.metric}", ascending=settings.mode == "min", na_position="last",
                             ignore_index=True)


def write_outputs(sweep: SweepConfig, base: Config, table: pd.DataFrame, printer: Printer) -> dict:
    location = output_folder(sweep)
    metric = f"best_{sweep.settings.metric}"
    write_bytes(location.child("trials.csv"), table.to_csv(index=False).encode())
    cells = [["" if isinstance(v, float) and math.isnan(v) else _short(v) for v in row]
             for row in table.itertuples(index=False)]
    write_bytes(location.child("trials.md"), (markdown_table(list(table.columns), cells) + "\n").encode())
    write_bytes(location.child("metric_vs_params.png"), _plot(table, list(sweep.space), metric))
    printer("[tune] trials:\n" + table.to_string(index=False))
    scored = table[table[metric].notna()]
    summary = {"location": location.uri, "trials": len(table), "failed": int((table["status"] == "failed").sum()),
               "stopped_early": int((table["status"] == "stopped early").sum())}
    if len(scored):
        best = scored.iloc[0]
        params = {k: _plain(best[k]) for k in sweep.space}
        best_cfg = best_config(sweep, base, params)
        header = (f"# Best trial {best['trial']} of sweep {sweep.name}: {metric} {best[metric]:.4f} after "
                  f"{best['epochs']} epochs, with {params}.\n# Train it: python jobs/train.py --config <this file>\n")
        write_bytes(location.child("best_config.yaml"),
                    (header + yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False)).encode())
        summary.update(best_trial=str(best["trial"]), best_params=params, best_metric=float(best[metric]),
                       best_config=location.child("best_config.yaml").uri)
        printer(f"[tune] best: {best['trial']} {metric} {best[metric]:.4f} {params}; config: "
                f"{summary['best_config']}")
    return summary


def best_config(sweep: SweepConfig, base: Config, params: dict) -> Config:
    """The base recipe with the best values (and the sweep's warm start): its own epochs, a run name of its own."""
    tree = with_values(base, {**params, **_warm_start(sweep)}, sweep.name)
    tree["run"]["name"] = f"{base.run.name}_{sweep.name}_best"
    return config_from_dict(tree, f"{sweep.name} best config")


def _plain(value):
    """numpy scalars -> Python values, for YAML."""
    return value.item() if hasattr(value, "item") else value


def _plot(table: pd.DataFrame, params: list[str], metric: str) -> bytes:
    """One panel per swept value: the trials' best metric against it (failed trials left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params):
        scored = table[table[metric].notna()]
        numeric = pd.api.types.is_numeric_dtype(scored[param])
        x = scored[param] if numeric else scored[param].astype(str)
        colors = ["tab:blue" if s == "finished" else "tab:orange" for s in scored["status"]]
        ax.scatter(x, scored[metric], c=colors)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        if numeric and param in table and (scored[param] > 0).all() and scored[param].max() / scored[param].min() > 20:
            ax.set_xscale("log")
    fig.suptitle("blue: finished, orange: stopped early by ASHA", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
