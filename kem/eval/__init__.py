"""kem's evaluation harness: the field's metrics (EasyEdit teacher forcing, ROME/MEMIT probability
tests, greedy generation), on CounterFact, ZsRE and MQuAKE, for registered methods.

Datasets (cases, probes, the readers) are :mod:`kem.datasets`, shared with ``kem edit import`` and
free of torch; the rest loads models lazily::

    from kem.eval import run_eval
    results = run_eval("none,ike", "counterfact", n=200, mode="batch", out="eval-out")
"""

from __future__ import annotations

from typing import Any

from kem.eval.eval_methods import (
    EvalContext,
    Prepared,
    Request,
    WeightMethod,
    eval_methods,
    register_eval_method,
)

__all__ = [
    "EvalContext",
    "Prepared",
    "Request",
    "WeightMethod",
    "eval_methods",
    "register_eval_method",
    "run_eval",
]


def run_eval(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`kem.eval.run.run_eval` (imported lazily)."""
    from kem.eval.run import run_eval as _run

    return _run(*args, **kwargs)
