"""``python -m hpresil.doctor``: same as ``hpresil-run doctor``."""

import sys

from hpresil.doctor.report import main

if __name__ == "__main__":
    sys.exit(main())
