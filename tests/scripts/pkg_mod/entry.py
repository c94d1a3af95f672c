"""Test worker run with ``-m pkg_mod.entry``: writes its rank to argv[1]."""

import os
import sys

with open(os.path.join(sys.argv[1], f"module_rank{os.environ['RANK']}"), "w") as f:
    f.write(__name__)
