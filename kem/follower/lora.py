"""Run a peft LoRA adapter on a plain transformers model, only while a request asks for it.

The transformers engine serves in-scope requests with the edit-follower and everything else with the
base weights. peft's ``PeftModel`` would rename the model's parameters (``...down_proj.base_layer.weight``)
under the consolidation code, which edits those same matrices in place. :class:`LoraHooks` instead
reads peft's adapter folder and adds ``scale * B(A(x))`` to each target module's output through forward
hooks that exist only inside :meth:`LoraHooks.active`: out of it, the model is exactly the base model
(no hook, no parameter renamed), and over a consolidated version the adapter adds to the edited weights.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kem.errors import ModelError
from kem.models import linear_dims

_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoraHooks:
    """A peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) bound to ``model``.

    Args:
        model: The transformers causal LM (its weights are never changed).
        path: The adapter folder.

    Raises:
        ModelError: the folder is not a LoRA adapter, or names modules the model does not have.
    """

    def __init__(self, model: Any, path: str | Path) -> None:
        import torch
        from safetensors.torch import load_file

        self.path = Path(path)
        try:
            cfg = json.loads((self.path / "adapter_config.json").read_text(encoding="utf-8"))
            tensors = load_file(str(self.path / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the LoRA adapter in {self.path}: {exc}") from None
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise ModelError(f"{self.path} is a {cfg.get('peft_type')} adapter; kem runs LoRA adapters")
        rank = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", rank))
        rslora = bool(cfg.get("use_rslora"))
        self.scale = alpha / (rank ** 0.5) if rslora else alpha / rank
        self.rank = rank
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        param = next(model.parameters())
        pairs: dict[str, dict[str, Any]] = {}
        for key, t in tensors.items():
            for suf in _SUFFIXES:
                if key.endswith(suf):
                    mod = key[: -len(suf)]
                    mod = mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod
                    pairs.setdefault(mod, {})[suf[1:7]] = t.to(device=param.device, dtype=param.dtype)
        if not pairs:
            raise ModelError(f"{self.path}/adapter_model.safetensors holds no LoRA weights")
        self.modules: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        for name, ab in sorted(pairs.items()):
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ModelError(f"the adapter in {self.path} targets {name!r}, which this model lacks "
                                 "(trained on another architecture?)") from None
            if "lora_A" not in ab or "lora_B" not in ab:
                raise ModelError(f"{self.path}: {name} has only one of lora_A / lora_B")
            a, b = ab["lora_A"], ab["lora_B"]
            d_in, d_out, _ = linear_dims(mod)  # nn.Linear or GPT-2's Conv1D (peft's fan_in_fan_out: same A, B)
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ModelError(f"{self.path}: {name} shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                                 f"the model's {d_in}->{d_out}")
            # per-module rank / alpha (peft's rank_pattern / alpha_pattern, matched as peft and vLLM do)
            r = _pattern(rank_pattern, name, rank)
            al = float(_pattern(alpha_pattern, name, alpha))
            scale = al / (r ** 0.5) if rslora else al / r
            self.modules.append((mod, a, b * scale if scale != 1.0 else b))
        self.nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for _, a, b in self.modules)
        self._handles: list[Any] = []
        self._lock = threading.RLock()
        self._depth = 0

    def _hook(self, a: Any, b: Any) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            x = inputs[0]
            return output + (x.to(a.dtype) @ a.T @ b.T).to(output.dtype)  # b carries the module's scale

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The adapter is on for the model's forward passes inside this block (re-entrant)."""
        with self._lock:
            if self._depth == 0:
                self._handles = [m.register_forward_hook(self._hook(a, b)) for m, a, b in self.modules]
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for h in self._handles:
                        h.remove()
                    self._handles = []

    @property
    def is_active(self) -> bool:
        return self._depth > 0


def _pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` rule: a key matches a module name it ends (at a ``.`` boundary); the
    first match wins; else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class ResidentAdapters:
    """A bounded LRU of :class:`LoraHooks` over one model, loaded from their folders on first use.

    Each adapter is bound once (its tensors in memory, no hook registered); a request switches its
    adapter on for its own forward passes only (:meth:`LoraHooks.active`), so requests of different
    tenants interleave step by step on one model. Loading the (capacity + 1)-th adapter evicts the one
    used longest ago (an adapter in use by a running request stays valid: the request holds it).

    Args:
        model: The transformers model the adapters bind to.
        capacity: Adapters kept resident.
    """

    def __init__(self, model: Any, capacity: int = 32) -> None:
        if capacity < 1:
            from kem.errors import ValidationError

            raise ValidationError(f"max_adapters must be at least 1 (got {capacity})", field="max_adapters")
        self.model = model
        self.capacity = capacity
        self._lru: OrderedDict[tuple[str, str], LoraHooks] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # adapters loaded from disk so far
        self.evictions = 0

    def get(self, name: str, path: str | Path) -> LoraHooks:
        """The hooks of adapter ``name`` in ``path`` (loaded now when not resident)."""
        key = (name, str(path))
        with self._lock:
            hooks = self._lru.get(key)
            if hooks is not None:
                self._lru.move_to_end(key)
                return hooks
        hooks = LoraHooks(self.model, path)  # outside the lock: reading a folder takes a while
        with self._lock:
            self._lru[key] = hooks
            self._lru.move_to_end(key)
            self.loads += 1
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
                self.evictions += 1
        return hooks

    def __len__(self) -> int:
        return len(self._lru)


class WithLora:
    """A model view whose calls run with ``hooks`` active (for code that calls ``model(...)`` directly,
    such as the evaluation scorer). Every other attribute is the model's own."""

    def __init__(self, model: Any, hooks: LoraHooks) -> None:
        self._model = model
        self._hooks = hooks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._hooks.active():
            return self._model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._hooks.active():
            return self._model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
