"""The base of every config section: unknown keys and non-finite numbers are errors, assignments are checked."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section (pydantic model) with ftl's strictness."""

    # allow_inf_nan=False: `lr: .inf` or `epochs: .nan` is a typo, never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
