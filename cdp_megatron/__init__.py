"""cdp-megatron: Complete(d)P hyperparameter transfer for Megatron-Core.

The top-level package holds the pure rules (no torch, no megatron): ``rules`` (Table 1 and
the SDE batch/duration rules), ``spec`` (the ``base.json`` hyperparameter spec), ``target``
(resolution of a spec at a target shape) and ``convert`` (the ``cdp-convert`` CLI).
``cdp_megatron.integration`` is the only package that imports megatron.core.
"""

__version__ = "0.1.0"
