"""``hpresil-run doctor`` / ``python -m hpresil.doctor``: explains the network environment.

Prints what was detected (instance type, EFA devices, aws-ofi-nccl, libfabric,
NCCL, GPUs, NVSwitch, IMEX, container, schedulers), what ``hpresil-run`` will
set and why, what it leaves to the aws-ofi-nccl plugin, which of your values it
keeps, and every warning, each with its source. ``--json`` prints the same as
one JSON object.

Exit status: 0, or 1 when a finding will break the job (e.g. GB200 with
``NCCL_MNNVL_ENABLE=1`` but no IMEX channel), 2 for invalid arguments.
"""

from hpresil.doctor.report import main, render_text

__all__ = ["main", "render_text"]
