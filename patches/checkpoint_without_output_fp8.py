"""Patch: norm recomputation (``--recompute-modules layernorm``) without Transformer Engine.

Upstream symbol: ``megatron.core.tensor_parallel.random.CheckpointWithoutOutput.__init__``
(megatron-core 0.16.1, ``tensor_parallel/random.py:635``; 0.19.2, ``random.py:739``).
``TransformerLayer`` builds one per layer for ``recompute_modules`` "layernorm" (the input
and pre-MLP norms are recomputed in the backward instead of stored).

Checked on: megatron-core 0.16.1 and 0.19.2 (tests/integration/test_model.py: the norms run
again in the backward and the gradients are bit-identical; the test fails with NameError
without this patch; tests/integration/test_patches.py).

Why: ``__init__(self, fp8=False)`` sets ``self.fp8 = fp8 is not None``, which is True for its
default ``False``, so every checkpoint takes the FP8 branch of
``CheckpointWithoutOutputFunction.forward`` and calls Transformer Engine's
``FP8GlobalStateManager``. Where Transformer Engine is not installed (every CPU run, and GPU
runs of the local spec without it) that name was never imported and the first forward
fails with ``NameError: name 'FP8GlobalStateManager' is not defined``. With Transformer
Engine the FP8 branch asks TE whether FP8 is on, which is what the layer relies on.

The wrapper keeps upstream's value where Transformer Engine is importable (the module's own
``HAVE_TE``) and sets ``fp8 = False`` where it is not: without Transformer Engine there is no
FP8 to restore, and the non-FP8 branch is the one upstream meant for that case.

Undo: ``remove()`` restores the original method.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["apply", "remove", "is_applied"]

_saved: dict[str, Any] = {}


def is_applied() -> bool:
    return bool(_saved)


def _module():
    from megatron.core.tensor_parallel import random

    return random


def apply() -> None:
    """Wrap ``CheckpointWithoutOutput.__init__``. Raises PatchError if applied or if the class
    or the module's ``HAVE_TE`` flag is missing."""
    from . import PatchError

    if _saved:
        raise PatchError("checkpoint_without_output_fp8 is already applied")
    module = _module()
    cls = getattr(module, "CheckpointWithoutOutput", None)
    if cls is None or "__init__" not in cls.__dict__ or not hasattr(module, "HAVE_TE"):
        raise PatchError(
            "checkpoint_without_output_fp8: megatron.core.tensor_parallel.random.CheckpointWithoutOutput.__init__ "
            "or HAVE_TE is missing in this megatron-core version"
        )
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if not module.HAVE_TE:
            self.fp8 = False

    _saved["original"] = original
    cls.__init__ = __init__


def remove() -> None:
    """Restore the original method (no-op when not applied)."""
    if not _saved:
        return
    _module().CheckpointWithoutOutput.__init__ = _saved.pop("original")
