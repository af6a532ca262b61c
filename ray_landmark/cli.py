"""What every job script shares: ``--config`` and ``--set`` parsing, the embedding jobs' ``embed.*`` flags, one-line
errors for the user, and how Ray's own console lines look.

Ray reads some of its settings once, when it is imported: job scripts import what uses Ray inside their ``main()``,
which ``run_job`` calls after ``plain_ray_console``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ray_landmark.config import Config, load_config, parse_override, set_dotted
from ray_landmark.errors import ConfigError, JobError, user_error
from ray_landmark.infer.config import EmbedSettings

# The embed.* keys with a flag of their own (--batch-size for embed.batch_size, ...): those a run most often sets.
EMBED_FLAGS = {"batch_size": "", "flip_tta": "average with the mirrored image's embedding",
               "actors": "model replicas (one per GPU on a cluster)", "gpus_per_actor": "", "shards_per_pass": ""}


def job_parser(description: str, default_config: str | None = None, restart: bool = False) -> argparse.ArgumentParser:
    """``--config`` and ``--set``; with ``restart``, also ``--restart`` (jobs that write a run folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None, help="YAML config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.image_size=448 (repeatable)",
    )
    if restart:
        parser.add_argument("--restart", action="store_true",
                            help="the run folder was made with another config: move it aside and start afresh")
    return parser


def load_job_config(args: argparse.Namespace, extra_overrides: list[str] = (), cls=Config):
    """The validated config (a ``cls``), or exit with the one-line error (before any Ray resource is requested)."""
    try:
        return load_config(args.config, [*args.overrides, *extra_overrides], cls)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


def add_embed_arguments(parser: argparse.ArgumentParser, set_help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) and a flag per key of ``EMBED_FLAGS``, short for ``--set embed.<key>`` (and
    winning over it); unset, a key keeps EmbedSettings' default."""
    for key, text in EMBED_FLAGS.items():
        field = EmbedSettings.model_fields[key]
        flag, help_text = "--" + key.replace("_", "-"), f"embed.{key}" + (f": {text}" if text else "")
        if field.annotation is bool:
            parser.add_argument(flag, action="store_const", const=True, help=help_text)
        else:
            parser.add_argument(flag, type=field.annotation, help=f"{help_text} (default {field.default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def split_overrides(parser: argparse.ArgumentParser, texts: list[str],
                    sections: tuple[str, ...]) -> dict[str, list[tuple[str, Any]]]:
    """``--set`` values by section (the key's first part): (the rest of the key, the value); a key of another
    section is a usage error."""
    found: dict[str, list[tuple[str, Any]]] = {section: [] for section in sections}
    for text in texts:
        key, value = parse_override(text)
        section, _, rest = key.partition(".")
        if section not in found or not rest:
            parser.error(f"--set {text}: only {' and '.join(f'{s}.*' for s in sections)} keys can be set here")
        found[section].append((rest, value))
    return found


def embed_tree(args: argparse.Namespace, overrides: list[tuple[str, Any]]) -> dict:
    """The embed section a job was given: its ``--set embed.*`` values, then the ``EMBED_FLAGS`` flags it was given."""
    tree: dict = {}
    for key, value in overrides:
        set_dotted(tree, key, value, "--set")
    tree.update({key: value for key in EMBED_FLAGS if (value := getattr(args, key)) is not None})
    return tree


def require_arch(cfg: Config, arch: str, source: str, other_job: str) -> None:
    """A job made for one model family refuses others, naming the job that takes them."""
    if cfg.model is None or cfg.model.arch != arch:
        raise ConfigError(f"{source}: model.arch must be '{arch}' for this job; use {other_job} for others")


def plain_ray_console() -> None:
    """When the output is a log file, not a terminal, Ray's own console lines (its scheduler warnings reach the
    console whatever log_to_driver says) come without colour codes and without the deduplicator's coloured
    "[repeated Nx]" suffix. A user's own setting wins. Ray reads RAY_DEDUP_LOGS when it is imported: call this
    before."""
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def train_job(description: str, default_config: str | None = None, arch: str | None = None) -> None:
    """The main() of the training jobs: ``--config``/``--set``/``--restart``; with ``arch``, a config of another model
    family is refused. The manifests are read (a wrong data.root fails at once) before Ray starts and trains."""
    args = job_parser(description, default_config, restart=True).parse_args()
    cfg = load_job_config(args)
    if arch:
        require_arch(cfg, arch, args.config, other_job="jobs/train.py")
    from ray_landmark.runtime import init_ray  # Ray is imported here, after run_job's plain_ray_console
    from ray_landmark.train.trainer import final_checkpoint, fit, load_training_data

    data = load_training_data(cfg, args.restart)
    init_ray()
    fit(cfg, data)
    print(f"[train] finished {cfg.run.name}; final checkpoint {final_checkpoint(cfg)}")


def run_job(main) -> None:
    """Run a job's main(); every failure ends the job with one line and exit code 1: errors a user can fix (config,
    storage, data), raised here or inside a Ray worker, with their own message (plus where Ray's logs are, once Ray
    runs); any other with what it was and the file that holds its traceback (``failure_line``).
    Libraries' INFO chatter (botocore, Ray) stays off the console: warnings and errors still show, Ray's plain in a
    log file (``plain_ray_console``)."""
    plain_ray_console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except Exception as err:
        sys.exit(failure_line(err))


def failure_line(err: BaseException) -> str:
    """The one line a job ends with. A JobError (also one at the root of Ray's wrappers) is the user's to fix and
    says how; a file or storage request that failed (an OSError: pyarrow's S3 errors are OSErrors) names what it
    could; anything else is unexpected. Those two keep their traceback in a file the line names."""
    cause = user_error(err)
    if cause is not None:
        return f"error: {cause}{_ray_logs_hint(err)}"
    root = root_cause(err)
    trace = save_traceback(err)
    what = " ".join(str(root).split())[:400] or type(root).__name__
    if isinstance(root, OSError):
        return (f"error: {what}: a file or storage request failed; check the path or URI, its permissions and the "
                f"storage credentials (traceback: {trace})")
    return f"error: unexpected {type(root).__name__}: {what} (the whole traceback: {trace}; please report it)"


def root_cause(err: BaseException) -> BaseException:
    """The innermost error of an exception's chain, Ray's wrappers included (a RayTaskError's ``cause``)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    return err


def save_traceback(err: BaseException) -> str:
    """Write ``err``'s traceback beside Ray's logs (once Ray runs), else in the temporary folder; its path."""
    import tempfile
    import time
    import traceback

    folder = None
    if "ray" in sys.modules:  # importing Ray only to say that it never ran would be slow
        from ray_landmark.runtime import ray_logs_folder

        folder = ray_logs_folder()
    folder = folder or os.path.join(tempfile.gettempdir(), "ray_landmark")
    job = os.path.splitext(os.path.basename(sys.argv[0] or "job"))[0] or "job"
    path = os.path.join(folder, f"{job}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.traceback.txt")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write("".join(traceback.format_exception(err)))
    except OSError:
        return "not saved: the folder for it cannot be written"
    return path


def _ray_logs_hint(err: Exception) -> str:
    """Where the full log of an error raised inside Ray is; nothing for one raised in this process."""
    if isinstance(err, JobError) and user_error(err) is err:
        return ""
    from ray_landmark.runtime import ray_logs_folder

    folder = ray_logs_folder()
    return f" (full log: {folder})" if folder else ""
