"""The learned edit-follower: a LoRA adapter on the served model, trained to answer from the facts kem
composes into an in-scope request (SERAC's counterfactual model, as in-context editing learned).

- :mod:`kem.follower.data`: the training set (CounterFact train split, kem's own request formats);
- :mod:`kem.follower.train`: the LoRA training loop (``kem follower train``);
- :mod:`kem.follower.follower_registry`: the shipped adapter, ``KEM_FOLLOWER``, base-model checks.

Out-of-scope requests never touch the adapter: engines run them on the base weights.
"""

from kem.follower.follower_registry import FOLLOWER_NAME, default_adapter_dir, resolve_follower

__all__ = ["FOLLOWER_NAME", "default_adapter_dir", "resolve_follower"]
