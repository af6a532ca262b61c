"""What every job script shares: ``--config`` and ``--set`` parsing, and one-line errors for the user."""

from __future__ import annotations

import argparse
import logging
import sys

from ray_landmark.config import Config, load_config
from ray_landmark.config_base import ConfigError, JobError


def job_parser(description: str, default_config: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None, help="YAML config")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set data.image_size=448 (repeatable)",
    )
    return parser


def load_job_config(args: argparse.Namespace, extra_overrides: list[str] = (), cls=Config):
    """The validated config (a ``cls``), or exit with the one-line error (before any Ray resource is requested)."""
    try:
        return load_config(args.config, [*args.overrides, *extra_overrides], cls)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


def require_arch(cfg: Config, arch: str, source: str, other_job: str) -> None:
    """A job made for one model family refuses others, naming the job that takes them."""
    if cfg.model is None or cfg.model.arch != arch:
        raise ConfigError(f"{source}: model.arch must be '{arch}' for this job; use {other_job} for others")


def run_job(main) -> None:
    """Run a job's main(); errors a user can fix (config, storage) end the job with their one-line message.
    Libraries' INFO chatter (botocore, Ray) stays off the console: warnings and errors still show."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except JobError as err:
        sys.exit(f"error: {err}")
