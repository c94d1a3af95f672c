"""The ``durable`` tier: checkpoints in torch.distributed.checkpoint's layout
on fsspec storage.

:mod:`.drain` (the node runtime's service that copies sealed RAM snapshots),
:mod:`.writer` (the multi-writer commit and retention), :mod:`.layout` (the
files, in DCP's format), :mod:`.source` (the restore path's view) and
:mod:`.stores` (one backend per URL scheme).
"""
