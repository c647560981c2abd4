"""Weight deltas: what a method computes. One module applies, reverts, hooks, saves and loads them.

A :class:`WeightDelta` maps parameter names to low-rank factors ``(A, B)`` with
``delta_W = A @ B`` in the parameter's own layout (``A``: ``(rows, r)``, ``B``: ``(r, cols)``); a
dense update is stored as ``A = delta_W`` and ``B = None``. Methods never touch the model:

- :func:`apply_delta` adds the delta in place and returns an :class:`AppliedDelta` that keeps the
  original tensors, so :meth:`AppliedDelta.revert` restores them bit for bit;
- :func:`delta_hooks` adds the delta's effect through forward hooks, leaving the weights untouched
  (MEMIT/AlphaEdit use it between layers, FT-L to train).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kem.errors import ValidationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Factors:
    """``delta_W = a @ b`` (``b`` is None for a dense ``a``), in the parameter's layout, float32."""

    a: torch.Tensor
    b: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The full update, shape of the parameter."""
        return self.a if self.b is None else self.a @ self.b

    @property
    def rank(self) -> int:
        return min(self.a.shape) if self.b is None else self.a.shape[1]


@dataclass
class WeightDelta:
    """A method's result: per-parameter updates plus a little provenance.

    Attributes:
        updates: Parameter name (as in ``model.named_parameters()``) -> :class:`Factors`.
        method: Name of the method that computed it.
        meta: JSON-serialisable details (hparams, edit ids, timings...).
    """

    updates: dict[str, Factors] = field(default_factory=dict)
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Add an update to ``name``, summing with one already there (ranks concatenate)."""
        a = a.detach().float()
        b = None if b is None else b.detach().float()
        old = self.updates.get(name)
        if old is None:
            self.updates[name] = Factors(a, b)
        elif old.b is not None and b is not None:
            self.updates[name] = Factors(torch.cat([old.a, a], 1), torch.cat([old.b, b], 0))
        else:
            self.updates[name] = Factors(old.dense() + (a if b is None else a @ b))

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each update."""
        return {k: float(f.dense().norm()) for k, f in self.updates.items()}

    def to(self, device: str | torch.device) -> WeightDelta:
        ups = {k: Factors(f.a.to(device), None if f.b is None else f.b.to(device)) for k, f in self.updates.items()}
        return WeightDelta(ups, self.method, dict(self.meta))

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the delta as one safetensors file (factors + JSON metadata)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, f in self.updates.items():
            tensors[f"{name}::a"] = f.a.detach().cpu().contiguous()
            if f.b is not None:
                tensors[f"{name}::b"] = f.b.detach().cpu().contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"method": self.method, "meta": json.dumps(self.meta, default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> WeightDelta:
        """Read a delta written by :meth:`save`."""
        from safetensors import safe_open

        parts: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            md = fh.metadata() or {}
            for key in fh.keys():
                name, _, which = key.rpartition("::")
                parts.setdefault(name, {})[which] = fh.get_tensor(key)
        ups = {n: Factors(p["a"], p.get("b")) for n, p in parts.items()}
        return cls(ups, md.get("method", ""), json.loads(md.get("meta", "{}")))


def _params(model: torch.nn.Module, names: Mapping[str, Any]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValidationError(f"WeightDelta names parameters the model lacks: {missing[:3]}", field="updates")
    return {n: params[n] for n in names}


@dataclass
class AppliedDelta:
    """Handle returned by :func:`apply_delta`; holds the original tensors for an exact revert."""

    model: torch.nn.Module
    originals: dict[str, torch.Tensor]
    reverted: bool = False

    def revert(self) -> None:
        """Restore every edited parameter bit for bit (idempotent)."""
        if self.reverted:
            return
        params = _params(self.model, self.originals)
        with torch.no_grad():
            for name, orig in self.originals.items():
                params[name].copy_(orig)
        self.reverted = True


def apply_delta(model: torch.nn.Module, delta: WeightDelta) -> AppliedDelta:
    """Add ``delta`` to the model's weights in place (the sum is formed in float32, then cast).

    Returns:
        An :class:`AppliedDelta` whose ``revert()`` restores the original weights exactly.
    """
    params = _params(model, delta.updates)
    originals = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, f in delta.updates.items():
            p = params[name]
            upd = f.dense().to(p.device)
            if upd.shape != p.shape:
                raise ValidationError(f"update for {name} has shape {tuple(upd.shape)}, parameter {tuple(p.shape)}")
            p.copy_((p.float() + upd).to(p.dtype))
    return AppliedDelta(model, originals)


@contextlib.contextmanager
def delta_hooks(model: torch.nn.Module, delta: WeightDelta | None) -> Iterator[None]:
    """Within the block, modules owning an updated ``weight`` behave as ``W + delta_W``; weights stay as they are.

    Linear modules (weight ``(out, in)``) get ``y += x @ delta_W.T``; GPT-2 ``Conv1D`` (weight
    ``(in, out)``) gets ``y += x @ delta_W``. Low-rank factors are used without forming ``delta_W``.
    """
    handles = []
    try:
        if delta is not None:
            modules = dict(model.named_modules())
            for name, f in delta.updates.items():
                mod_name, _, pname = name.rpartition(".")
                if pname != "weight" or mod_name not in modules:
                    raise ValidationError(f"delta_hooks supports module weights only (got {name})")
                handles.append(modules[mod_name].register_forward_hook(_make_hook(f)))
        yield
    finally:
        for h in handles:
            h.remove()


def _make_hook(f: Factors) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0].to(f.a.dtype)
        linear = isinstance(module, torch.nn.Linear)
        if f.b is None:
            extra = x @ (f.a.T if linear else f.a)
        elif linear:  # dW = a @ b, (out, in): x @ b.T @ a.T
            extra = (x @ f.b.T) @ f.a.T
        else:  # Conv1D, dW (in, out): x @ a @ b
            extra = (x @ f.a) @ f.b
        return out + extra.to(out.dtype)

    return hook
