"""Test worker of the warm-start tests: records how it was started, then ends
the way argv[2] says.

argv: OUT_DIR MODE [ARGS...]; MODE: ok | exit-msg | atexit (sys.exit() without status) |
print-then-kill | interrupt | restart-once; every mode registers an atexit handler
that writes OUT_DIR/atexit<RANK>.
"""

import sys

PRELOADED = "torch" in sys.modules  # before this script imports anything heavy

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

out_dir, mode = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
os.makedirs(out_dir, exist_ok=True)
info = {
    "preloaded": PRELOADED,
    "argv": sys.argv,
    "path0": sys.path[0],
    "name": __name__,
    "file": __file__,
    "ppid": os.getppid(),
    "late_var": os.environ.get("HPRESIL_TEST_LATE_VAR"),
    "cwd": os.getcwd(),
}
with open(os.path.join(out_dir, f"rank{rank}.attempt{attempt}.json"), "w") as f:
    json.dump(info, f)

atexit.register(lambda: open(os.path.join(out_dir, f"atexit{rank}"), "w").close())

if mode == "exit-msg":
    sys.exit("fatal: bad config" if rank == "1" else 0)
elif mode == "atexit":
    sys.exit()  # no status: success
elif mode == "print-then-kill":
    print(f"marker-before-kill rank {rank}")  # no flush: only unbuffered output survives SIGKILL
    if rank == "1":
        os.kill(os.getpid(), signal.SIGKILL)
elif mode == "interrupt":
    if rank == "1":
        raise KeyboardInterrupt
elif mode == "restart-once":
    if rank == "1" and attempt == "0":
        os.kill(os.getpid(), signal.SIGKILL)
