"""Base class of every config section, kept apart from ``config.py`` so that each package can define its own section
without importing the root config (which imports all sections)."""

from pydantic import BaseModel, ConfigDict


class JobError(Exception):
    """A problem the user can fix (config, storage, checkpoint, embedding files): jobs end with its one-line message,
    which names the key, file or URI and what to do."""


class ConfigError(JobError, ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""


class Section(BaseModel):
    """Unknown keys and wrong types are errors; values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
