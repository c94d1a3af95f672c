"""Adapters that give training frameworks hpresil's tiered checkpointing.

One subpackage per framework (``hpresil.integrations.deepspeed``). Each imports
its framework only when an adapter is constructed, so ``import hpresil`` and
importing these modules work without the framework installed.
"""
