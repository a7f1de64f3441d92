"""Errors raised by vllm_control to the rest of the project."""

from __future__ import annotations


class ModelServerUnavailable(Exception):
    """The model server cannot take requests; `message` says why in words a user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
