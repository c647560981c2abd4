"""Process-wide defaults for processes kem owns (the ``kem`` CLI and server, kem's tests and benchmarks).

``import kem`` changes nothing in its caller's environment; a process kem owns calls
:func:`own_process` first thing, before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def own_process() -> None:
    """Set kem's process defaults unless the user chose otherwise (idempotent).

    ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. It only takes effect
    before torch is imported. Measured on 2 shared cores: spinning threads that wait for a descheduled
    sibling made each SmolLM2 forward pass 10-30x slower (docs/results.md). ``OMP_WAIT_POLICY=ACTIVE``
    restores spinning.

    ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``: kem never asks a model hub (its models are local
    folders; vLLM's engine processes inherit this). ``TOKENIZERS_PARALLELISM=false``: no fork warnings from
    the tokenizers' thread pool. Library calls (loading a model) never set any of these.
    """
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        log.debug("torch is already imported: OMP_WAIT_POLICY would not take effect")
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
