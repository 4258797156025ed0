"""Pipeline passes. Each takes a ModelGraph and a RunContext and returns a ModelGraph."""

from edgevit.passes.base import Pass, PassConfig

__all__ = ["Pass", "PassConfig"]
