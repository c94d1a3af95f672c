"""Test worker: in the first attempt, rank 1 dies in the middle of writing its
elastic error file (a truncated JSON document, then os._exit, as if SIGKILLed
mid-write); every rank of the next attempt succeeds."""

import os
import time

if os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        f.write('{"message": {"message": "RuntimeError: boo')
    os._exit(1)
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    time.sleep(30)  # the other rank waits to be stopped by the agent
print(f"rank {os.environ['RANK']} attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')} ok", flush=True)
