"""What every configuration section shares: the error type and strict validation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field."""


class Section(BaseModel):
    """A configuration section: unknown keys are errors, so a typo fails with its dotted path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
