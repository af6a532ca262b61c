"""Base class of every config section, kept apart from ``config.py`` so that each package can define its own section
without importing the root config (which imports all sections). The errors live in ``errors.py`` (no pydantic there)
and are imported here too, where every section module already looks for them."""

from pydantic import BaseModel, ConfigDict

from ray_landmark.errors import ConfigError, JobError, user_error

__all__ = ["ConfigError", "JobError", "Section", "user_error"]


class Section(BaseModel):
    """Unknown keys and wrong types are errors; values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
