"""Test worker: rank 1 raises a distinctive error after a short delay; others wait."""

import os
import time


def load_batch() -> None:
    raise ValueError("distinctive failure 4242 in load_batch")


if os.environ["RANK"] == "1":
    time.sleep(0.3)
    load_batch()
time.sleep(30)
