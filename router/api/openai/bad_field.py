"""The refusal of one HTTP request field, shared by the body converters (convert.py, tools.py)."""

from __future__ import annotations


class BadField(ValueError):
    """A request field the API refuses: 400 invalid_request_error with `param` = the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code
