"""The error of the metrics and of the evaluation stage (``trainer/evaluate.py``).

Its own module so that every metrics module and the stage raise the one class without the metrics
package importing the stage.
"""
from __future__ import annotations

from schemas.errors import UserError


class EvaluationError(UserError, ValueError):
    """Inputs that cannot be evaluated: a bad ``.npz``, mismatched statistics, too few images."""


__all__ = ["EvaluationError"]
