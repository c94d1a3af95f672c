"""``python -m hpresil.run``: same as ``hpresil-run``."""

from hpresil.run.cli import main

if __name__ == "__main__":
    main()
