"""DeepSpeed integration: tiered checkpointing of a ``DeepSpeedEngine``.

::

    from hpresil.integrations.deepspeed import DeepSpeedCheckpointer

    ckpt = DeepSpeedCheckpointer(engine, durable="s3://bucket/run1")
    start = ckpt.restore()
    ...
    ckpt.save(step + 1)

Install with ``pip install hpresil[deepspeed]``. Importing this package does not
import DeepSpeed; constructing a checkpointer uses the engine's own modules.
See :mod:`hpresil.integrations.deepspeed.api` for the contract.
"""

from hpresil.integrations.deepspeed.api import ZeroLayout

__all__ = ["DeepSpeedCheckpointer", "ZeroLayout"]


def __getattr__(name: str) -> object:
    # The checkpoint stack is imported on first use, as in ``hpresil``.
    if name == "DeepSpeedCheckpointer":
        from hpresil.integrations.deepspeed.checkpointer import DeepSpeedCheckpointer

        globals()[name] = DeepSpeedCheckpointer
        return DeepSpeedCheckpointer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
