"""The ``ram`` tier: snapshots in this node's shared memory.

:mod:`.writer` (the training process copies its state into a slot and commits
a record), :mod:`.slots` (which slot a save takes), :mod:`.files` (records,
seals and scans as readers see them), :mod:`.pin` (holding a committed slot
while reading it), :mod:`.sealer` (checksums after the fact, in the node
runtime) and :mod:`.source` (the restore path's view). The file format is in
:mod:`hpresil.checkpoint.api`.
"""
