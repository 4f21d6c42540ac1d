"""The base of every config model, and the error a config that cannot be served raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot be served. The message names the file and the field."""


class StrictModel(BaseModel):
    """Unknown keys are errors, and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
