"""``hpresil-run``: torchrun plus the node runtime (see :mod:`hpresil.run.cli`)."""
