"""``python -m hpresil.report LOG_DIR``: same as ``hpresil-run report LOG_DIR``."""

import sys

from hpresil.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
