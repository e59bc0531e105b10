"""A student built from a method's plan: the layers it converts, its new parameters initialised."""

from __future__ import annotations

from .base import build_student
from .registry import get_method


def build_converted(teacher, method: str, keep: list[int], options: dict):
    """``teacher`` converted by the conversion ``method`` with the layers ``keep`` left as attention (``options``
    resolved)."""
    m = get_method(method)
    student = build_student(teacher, m.plan(teacher.config, keep, options), method)
    m.finish(student, options)
    return student


__all__ = ["build_converted"]
