"""A process that started a fork server (a launch with warm start), then forks
a child that starts one again (a second launch in a forked process, as PyTorch's
``test_launch_elastic_multiple_agents`` does). Exits 0 when the child could
start its own fork server and fork a worker from it."""

import multiprocessing
import os
import sys

from hpresil.run.warm import start_fork_server


def work() -> None:
    pass


def forked_worker_runs() -> bool:
    p = multiprocessing.get_context("forkserver").Process(target=work)
    p.start()
    p.join(60)
    return p.exitcode == 0


if __name__ == "__main__":
    start_fork_server(["os"])  # the first launch
    assert forked_worker_runs()
    pid = os.fork()
    if pid == 0:
        try:
            start_fork_server(["os"])  # a launch in the forked process
            os._exit(0 if forked_worker_runs() else 3)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"child: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
