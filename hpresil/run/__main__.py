"""``python -m hpresil.run``: same as ``hpresil-run``."""

from hpresil.run.cli import console_main

if __name__ == "__main__":
    console_main()
