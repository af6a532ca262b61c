"""Base class of every config section, kept apart from ``config.py`` so that each package can define its own section
without importing the root config (which imports all sections). The errors a config can raise live in ``errors.py``,
which needs no pydantic."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys and wrong types are errors; values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
