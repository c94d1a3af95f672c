"""``hpresil-run``: torchrun's command line plus hpresil's own option group.

The parser and value checks are in :mod:`hpresil.run.options`; this module
prepares the job (torch's launch config, the node runtime and its services,
warm start, the console) and runs it. Argument errors exit with status 2 and
a message that names the fix; a failed job exits 1 after its report.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import config_from_args

from hpresil._parse import parse_bool
from hpresil.errors import ConfigError, LaunchError, NodeUnhealthyError
from hpresil.hang.config import HANG_OPTIONS, hang_config
from hpresil.netenv.api import Plan
from hpresil.netenv.env import apply_launcher_env
from hpresil.run.options import (HPRESIL_OPTIONS, build_parser, check_entrypoint, resolve_rendezvous, seconds, validate,
                                 worker_env)
from hpresil.runtime.api import RuntimeConfig

if TYPE_CHECKING:
    from hpresil.runtime.node import NodeRuntime

__all__ = ["build_parser", "main", "console_main", "validate", "HPRESIL_OPTIONS", "SUBCOMMANDS", "run_subcommand"]

log = logging.getLogger(__name__)

#: Subcommands dispatched before torch's parser, ``hpresil-run NAME ARGS...``: name ->
#: "module:function"; the function takes ARGS and returns an exit status. (A training
#: script with one of these names must be given as a path, e.g. ``./report``.)
SUBCOMMANDS: dict[str, str] = {
    "report": "hpresil.report.cli:main",
    "doctor": "hpresil.doctor:main",
    "plan": "hpresil.report.plan:main",
}


def run_subcommand(argv: Sequence[str]) -> int | None:
    """Runs ``argv[0]`` when it names a subcommand; ``None`` when it does not."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    import importlib

    module, function = SUBCOMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), function)(list(argv[1:])) or 0)


def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(shm_root=args.shm_root, node_id=args.node_id, keep_shm=bool(args.keep_shm),
                         service_interval=timedelta(milliseconds=50))


def _net_env_plan(args: argparse.Namespace) -> Plan:
    from hpresil.netenv import NetEnvConfig, make_plan

    imds = parse_bool(os.environ.get("HPRESIL_NET_ENV_IMDS", "0"), "HPRESIL_NET_ENV_IMDS")
    return make_plan(NetEnvConfig(mode=args.net_env, imds=imds))


def _job_log_dir(args: argparse.Namespace, run_id: str, node_id: str) -> str:
    import tempfile

    from hpresil.runtime.shm import safe_component

    if args.job_log_dir:
        return args.job_log_dir
    if args.log_dir:
        return args.log_dir
    return os.path.join(tempfile.gettempdir(), "hpresil-logs", safe_component(run_id), safe_component(node_id))


def _apply_traceback_capture(args: argparse.Namespace, job_log_dir: str) -> bool:
    """With ``--tracebacks auto`` and no redirection chosen by the user: stderr goes
    to per-rank logs (under the job log dir unless --log-dir says where) that
    :mod:`hpresil.run.console` copies to the console. Returns whether it does."""
    unset = (None, "", "0")
    if args.tracebacks != "auto" or args.redirects not in unset or args.tee not in unset:
        return False
    args.redirects = "2"
    if not args.log_dir and not getattr(args, "logs_specs", None):
        args.log_dir = os.path.join(job_log_dir, "workers")
    return True


def _prepare(args: argparse.Namespace, runtime_config: RuntimeConfig, log_dir: str, user_log_dir: str | None,
             port: float | None) -> tuple[Any, Any, list[Any], Any, list[Any]]:
    """torch's launch config, the worker command, the node runtime and the launcher's
    environment changes, after every check that can refuse the job."""
    try:
        config, cmd, cmd_args = config_from_args(args)
    except OSError as exc:  # torch creates the workers' log dir here
        flag = "--log-dir" if user_log_dir else "--job-log-dir"
        raise ConfigError(f"log directory {args.log_dir!r} cannot be used: {exc}; pass another {flag}") from exc
    hang = hang_config({flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, *_ in HANG_OPTIONS})

    from hpresil.runtime.node import NodeRuntime
    from hpresil.netenv.service import NetEnvReport
    from hpresil.run.services import default_services

    net_plan = _net_env_plan(args)
    check_entrypoint(args)  # after every value check, before anything starts
    env_changes = apply_launcher_env(plan=net_plan)
    os.environ.update(worker_env(args))  # the workers' rollback policy, inherited
    from hpresil.run.warm import preload_modules, warm_entrypoint

    warm = warm_entrypoint(args, args.warm_start, preload_modules(args.preload, args.training_script_args))
    if warm is not None:  # the fork server imports torch while the node runtime starts and rendezvous runs
        cmd, cmd_args = warm
        config.start_method = "forkserver"
    configs: dict[str, object] = {"watchdog": hang}
    from hpresil.checkpoint.peer.api import config_from_options

    configs["replicator"] = config_from_options(args.replicas, args.peer_host, args.peer_port)
    from hpresil.topology.api import TopologyConfig

    configs["topology"] = TopologyConfig(mode=args.topology)
    if port is not None:
        from hpresil.metrics.api import MetricsConfig

        configs["metrics"] = MetricsConfig(port=int(port))
    try:
        runtime = NodeRuntime(runtime_config, run_id=str(config.run_id), log_dir=log_dir, services=[*default_services(configs), NetEnvReport(net_plan)])
    except OSError as exc:  # the job log directory is created here
        raise ConfigError(f"log directory {log_dir!r} cannot be used: {exc}; pass another --job-log-dir") from exc
    return config, cmd, cmd_args, runtime, env_changes


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(dirs: list[str]) -> None:
    for path in dirs:  # deepest first
        try:
            os.rmdir(path)
        except OSError:
            return


@record
def main(argv: Sequence[str] | None = None) -> None:
    """Runs ``hpresil-run`` with ``argv`` (default: ``sys.argv[1:]``) in this process.

    Same contract as ``torch.distributed.run.main``: argparse errors exit 2;
    invalid argument values raise :class:`~hpresil.errors.ConfigError` (a
    ``ValueError``); a failed worker group raises ``ChildFailedError``.

    Raises:
        ConfigError: an argument or ``HPRESIL_*`` value is invalid.
        ChildFailedError: the workers failed and ran out of restarts.
    """
    launch, runtime = _prepared_launch(argv)
    try:
        launch()
    finally:
        # The launch's node services and agent form reference cycles that hold torch's
        # stores. Collected now, a store this agent hosted is destroyed in the process
        # that runs its server thread; left to a later collection in a process forked
        # from this one (a second launch), its destructor would join a thread the fork
        # did not copy and abort that process.
        ran = runtime.stopped
        del launch, runtime
        if ran:
            gc.collect()


def _prepared_launch(argv: Sequence[str] | None) -> tuple[Callable[[], None], NodeRuntime]:
    """The launch ``argv`` asks for, checked and prepared (nothing runs yet)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args)
    port = seconds(args, "--metrics-port", 0)
    grace = timedelta(seconds=seconds(args, "--grace-period", 0) or 0)
    resolve_rendezvous(args)
    runtime_config = _runtime_config(args)
    node_id = runtime_config.node_id or socket.gethostname()
    log_dir = _job_log_dir(args, str(args.rdzv_id), node_id)
    user_log_dir = args.log_dir
    console = _apply_traceback_capture(args, log_dir)
    made = _missing_dirs(args.log_dir) if console and not user_log_dir else []
    try:
        config, cmd, cmd_args, runtime, env_changes = _prepare(args, runtime_config, log_dir, user_log_dir, port)
    except BaseException:
        _remove_if_empty(made)  # a job that never started leaves no empty log directories
        raise
    from hpresil.run.launch import launch_agent

    return functools.partial(launch_agent, config, cmd, cmd_args, runtime, env_changes=env_changes,
                             grace_period=grace, fast_restart=args.fast_restart != "off", console=console), runtime


def _handle_stop_signals() -> None:
    """Turns stop signals into torch's ``SignalException`` from the start, not
    only once the workers run: as a container's PID 1, a signal without a
    handler is ignored, so a SIGTERM during rendezvous would be lost."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    def _raise(signum: int, frame: object) -> None:
        sig = signal.Signals(signum)
        raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)

    names = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    for name in names.split(","):
        sig = getattr(signal, name.strip(), None)
        if isinstance(sig, signal.Signals):
            signal.signal(sig, _raise)


def console_main() -> None:
    """The ``hpresil-run`` console script: invalid values exit 2 naming the fix."""
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        format="[hpresil-run] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = run_subcommand(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from hpresil.run.logs import trim_console

    trim_console()  # after torch's import: its loggers' handlers exist now
    _handle_stop_signals()
    try:
        main()
    except SignalException as exc:
        # A scheduler's stop (SIGTERM) ends the job like a killed process would
        # (128 + signal), after the graceful shutdown, without a traceback.
        print(f"hpresil-run: stopped by {exc.sigval.name}", file=sys.stderr)
        sys.exit(128 + int(exc.sigval))
    except ChildFailedError:
        # The report (root cause, its traceback, the fix) is printed; torchrun's exit status.
        sys.exit(1)
    except LaunchError as exc:  # the launcher could not go on (e.g. the rendezvous lost its etcd quorum)
        print(f"hpresil-run: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except NodeUnhealthyError as exc:
        print(f"hpresil-run: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (ConfigError, ValueError, AssertionError) as exc:
        print(f"usage: hpresil-run [options] training_script [args...]\nhpresil-run: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console_main()
