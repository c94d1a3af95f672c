"""``hpresil-run``: torchrun's command line plus hpresil's own option group.

The parser *is* torch's (``torch.distributed.run.get_args_parser``), so every
torchrun flag, alias and ``PET_*`` variable keeps its meaning; hpresil's
options live in a separate group, each also settable through an
``HPRESIL_*`` variable (an explicit flag wins). Argument errors exit with
status 2 and a message that names the fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import uuid
from datetime import timedelta
from typing import NoReturn, Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

from hpresil._parse import parse_bool
from hpresil.errors import ConfigError, NodeUnhealthyError
from hpresil.hang.config import HANG_OPTIONS, hang_config
from hpresil.checkpoint.peer.api import PEER_OPTIONS
from hpresil.netenv.api import Plan
from hpresil.netenv.env import apply_launcher_env
from hpresil.runtime.api import RuntimeConfig

__all__ = ["build_parser", "main", "console_main", "validate", "HPRESIL_OPTIONS", "SUBCOMMANDS", "run_subcommand"]

log = logging.getLogger(__name__)

#: hpresil's options: (flag, env var, kind, default, help).
HPRESIL_OPTIONS: tuple[tuple[str, str, str, object, str], ...] = (
    ("--shm-root", "HPRESIL_SHM_ROOT", "str", "/dev/shm/hpresil",
     "Parent of the job's shared-memory directory (<shm-root>/<run-id>/<node-id>); the RAM "
     "checkpoint tier lives there, so it must be a tmpfs large enough for the snapshots."),
    ("--node-id", "HPRESIL_NODE_ID", "str", None,
     "This node's id in events and in the shared-memory path (default: the host name). "
     "Give each agent its own id when simulating several nodes on one host."),
    ("--keep-shm", "HPRESIL_KEEP_SHM", "bool", False,
     "Keep the job's shared-memory directory when the job ends (default: remove it)."),
    ("--job-log-dir", "HPRESIL_LOG_DIR", "str", None,
     "Where events.jsonl and hpresil's diagnostics go (default: --log-dir when given, "
     "else <tmp>/hpresil-logs/<run-id>/<node-id>)."),
    *((flag, env_var, "str", None, help_text) for flag, env_var, _, help_text in HANG_OPTIONS),
    *((flag, env_var, "str", None, help_text) for flag, env_var, help_text in PEER_OPTIONS),
    ("--metrics-port", "HPRESIL_METRICS_PORT", "str", None,
     "Serve Prometheus metrics of this node on this port (0: a free port, logged); off by default. "
     "Needs prometheus-client: pip install 'hpresil[metrics]'."),
    ("--grace-period", "HPRESIL_GRACE_PERIOD", "str", "30",
     "Seconds left to pending durable uploads after SIGTERM/SIGINT stopped the workers (the workers "
     "themselves get --shutdown-timeout to take their final snapshot)."),
    ("--topology", "HPRESIL_TOPOLOGY", "choice:auto,off", "auto",
     "auto: find each node's NVLink domain (NVML fabric info, HPRESIL_TOPOLOGY_DOMAIN, Kubernetes "
     "labels, Slurm blocks) and give the nodes of a domain contiguous global ranks; off: torchrun's order."),
    ("--net-env", "HPRESIL_NET_ENV", "str", "auto",
     "off | auto | a family preset (p4d, p4de, p5, p5e, p5en, p6-b200, p6-b300, p6e-gb200, trn1, trn2): "
     "set the EFA/NCCL/libfabric variables the detected stack needs, never overriding yours, and warn about "
     "harmful ones; `hpresil-run doctor` explains the result. IMDSv2 lookup only with HPRESIL_NET_ENV_IMDS=1."),
    ("--warm-start", "HPRESIL_WARM_START", "choice:auto,off", "auto",
     "auto: fork the workers of every attempt from a fork server that imported torch (and --preload) "
     "once, so a restart does not pay the interpreter and torch imports again; the script still runs "
     "as __main__ with its arguments, environment and exit status. off: a fresh `python -u` per worker "
     "like torchrun (also what --no-python and --run-path get); choose off when a worker reads stdin."),
    ("--preload", "HPRESIL_PRELOAD", "str", None,
     "Comma-separated modules the warm-start fork server imports besides torch, torch.distributed and "
     "hpresil's checkpointing (e.g. transformers,numpy): imports every worker would otherwise repeat."),
    ("--fast-restart", "HPRESIL_FAST_RESTART", "choice:auto,off", "auto",
     "auto: when a worker fails and the nodes stay the same (none lost, none waiting to join), the agents "
     "agree through the rendezvous store and restart their workers with the same ranks, without a new "
     "rendezvous round (which costs seconds); off: torchrun's stop -> rendezvous -> start on every failure."),
    ("--tracebacks", "HPRESIL_TRACEBACKS", "choice:auto,off", "auto",
     "auto: when neither --redirects nor --tee is given, keep each worker's stderr in the job log dir "
     "(workers/) and copy it to the console, where the tracebacks of a failure the job recovers from "
     "become one line each and a failed job's report quotes the root cause's; off: torchrun's behaviour."),
)

#: Subcommands dispatched before torch's parser, ``hpresil-run NAME ARGS...``: name ->
#: "module:function"; the function takes ARGS and returns an exit status. (A training
#: script with one of these names must be given as a path, e.g. ``./report``.)
SUBCOMMANDS: dict[str, str] = {
    "report": "hpresil.report.cli:main",
    "doctor": "hpresil.doctor:main",
}


def run_subcommand(argv: Sequence[str]) -> int | None:
    """Runs ``argv[0]`` when it names a subcommand; ``None`` when it does not."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return None
    import importlib

    module, function = SUBCOMMANDS[argv[0]].split(":")
    return int(getattr(importlib.import_module(module), function)(list(argv[1:])) or 0)


def _env_default(env_var: str, kind: str, default: object) -> object:
    raw = os.environ.get(env_var)
    if raw is None:
        return default
    if kind == "bool":
        return parse_bool(raw, env_var)
    if kind.startswith("choice:"):
        choices = kind.split(":", 1)[1].split(",")
        if raw not in choices:
            raise ConfigError(f"{env_var}={raw!r} is not one of {', '.join(choices)}")
    return raw


def build_parser() -> argparse.ArgumentParser:
    """torch's launcher parser with hpresil's option group added.

    Raises:
        ConfigError: an ``HPRESIL_*`` variable holds an invalid value.
    """
    parser = get_args_parser()
    parser.prog = "hpresil-run"
    parser.description = (
        "hpresil-run: a drop-in torchrun (same flags, same PET_* variables) with a node runtime "
        "for tiered checkpointing, hang detection and elastic recovery."
    )
    parser.epilog = (
        "subcommands: `hpresil-run doctor [--json]` explains the network environment hpresil-run would set "
        "here and exits 1 on a misconfiguration that will break the job; `hpresil-run report LOG_DIR "
        "[--png FILE]` prints a finished or running job's goodput, time lost per cause and checkpoint "
        "statistics. Each takes --help."
    )
    _suggest_close_flags(parser)
    group = parser.add_argument_group(
        "hpresil", "hpresil's options; each is also read from the HPRESIL_* variable named in its help."
    )
    group.add_argument("--version", action="version", version=f"hpresil-run {_version()} (torch {torch_version()})")
    for flag, env_var, kind, default, help_text in HPRESIL_OPTIONS:
        dest = flag.lstrip("-").replace("-", "_")
        value = _env_default(env_var, kind, default)
        help_full = f"{help_text} [env: {env_var}]"
        if kind == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value, help=help_full)
        elif kind.startswith("choice:"):
            group.add_argument(flag, dest=dest, choices=kind.split(":", 1)[1].split(","), default=value, help=help_full)
        else:
            group.add_argument(flag, dest=dest, type=str, default=value, help=help_full)
    return parser


def _version() -> str:
    from hpresil import __version__

    return __version__


def torch_version() -> str:
    """The installed torch's version (no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


def _suggest_close_flags(parser: argparse.ArgumentParser) -> None:
    """Makes the parser's "unrecognized arguments" error name the flags a typo was meant to be."""
    import difflib

    fail = parser.error

    def error(message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            hints = []
            for word in message.split(": ", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag.startswith("-"):
                    close = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{flag}: did you mean {close[0]}?")
            if hints:
                message += "\n" + "\n".join(hints)
        fail(message)

    parser.error = error  # type: ignore[method-assign]


def resolve_rendezvous(args: argparse.Namespace) -> None:
    """Applies torchrun's rendezvous defaults (``--standalone``, single-node static).

    Same rules as ``torch.distributed.run.run``, which cannot be called without
    also launching torch's own agent.
    """
    if args.standalone:
        args.rdzv_backend = "c10d"
        args.rdzv_endpoint = "localhost:0"
        args.rdzv_id = str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        _, max_nodes = parse_min_max_nnodes(args.nnodes)
        if max_nodes == 1:
            args.rdzv_backend = "c10d"
            args.rdzv_endpoint = "localhost:0"
            args.rdzv_id = str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500


_NNODES = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


def validate(args: argparse.Namespace) -> None:
    """Checks torchrun's arguments up front so errors name the fix.

    Raises:
        ConfigError: an argument is invalid; the message says how to fix it.
    """
    match = _NNODES.match(str(args.nnodes))
    if not match:
        raise ConfigError(f"--nnodes {args.nnodes!r} is not N or MIN:MAX; pass e.g. --nnodes 2 or --nnodes 1:4")
    low, high = int(match.group(1)), int(match.group(2) or match.group(1))
    if not 0 < low <= high:
        raise ConfigError(f"--nnodes {args.nnodes!r}: need 0 < MIN <= MAX; pass e.g. --nnodes {max(1, high)}:{max(1, low, high)}")
    nproc = str(args.nproc_per_node)
    if not (nproc.isdigit() and int(nproc) > 0) and nproc not in ("auto", "cpu", "gpu", "xpu"):
        raise ConfigError(f"--nproc-per-node {nproc!r}: takes an integer > 0 or one of auto, cpu, gpu, xpu")
    if int(args.max_restarts) < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: takes an integer >= 0")
    if float(args.monitor_interval) <= 0:
        raise ConfigError(f"--monitor-interval {args.monitor_interval}: takes a number of seconds > 0")
    if args.no_python and args.module:
        raise ConfigError("--no-python and -m/--module conflict: drop --no-python to run a module with -m")
    if getattr(args, "preload", None):
        from hpresil.run.warm import preload_modules

        preload_modules(args.preload)


def _check_entrypoint(args: argparse.Namespace) -> None:
    """Fails before any worker starts when the script (or ``--no-python``
    program) does not exist: every worker of every attempt would fail the same way.

    Raises:
        ConfigError: it does not exist; the message names the path looked at.
    """
    import shutil

    script = args.training_script
    if args.module or args.run_path or not script:
        return  # a module resolves in the workers' environment; --run-path is torch's own
    if args.no_python:
        if os.sep not in script and shutil.which(script) is None:
            raise ConfigError(f"--no-python: program {script!r} is not on PATH; give its path or install it")
        if os.sep in script and not os.path.exists(script):
            raise ConfigError(f"--no-python: program {script!r} does not exist (looked in {os.getcwd()})")
        return
    if not os.path.isfile(script):
        what = "is a directory" if os.path.isdir(script) else "does not exist"
        raise ConfigError(f"training script {script!r} {what} (looked in {os.getcwd()}); pass the path of a "
                          "Python file, or -m package.module to run a module")


def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(shm_root=args.shm_root, node_id=args.node_id, keep_shm=bool(args.keep_shm),
                         service_interval=timedelta(milliseconds=50))


def _seconds(args: argparse.Namespace, flag: str, minimum: float) -> float | None:
    raw = getattr(args, flag.lstrip("-").replace("-", "_"))
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = minimum - 1
    # `not a <= v <= b` also refuses NaN; 1e9 s keeps durations inside timedelta's range
    if not minimum <= value <= 1e9 or (flag == "--metrics-port" and (value != int(value) or value > 65535)):
        raise ConfigError(f"{flag} {raw!r}: takes a number >= {minimum:g}"
                          + (" and <= 65535" if flag == "--metrics-port" else " and <= 1e9"))
    return value


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
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args)
    port = _seconds(args, "--metrics-port", 0)
    grace = timedelta(seconds=_seconds(args, "--grace-period", 0) or 0)
    resolve_rendezvous(args)
    runtime_config = _runtime_config(args)
    node_id = runtime_config.node_id or socket.gethostname()
    log_dir = _job_log_dir(args, str(args.rdzv_id), node_id)
    user_log_dir = args.log_dir
    console = _apply_traceback_capture(args, log_dir)
    try:
        config, cmd, cmd_args = config_from_args(args)
    except OSError as exc:  # torch creates the workers' log dir here
        flag = "--log-dir" if user_log_dir else "--job-log-dir"
        raise ConfigError(f"log directory {args.log_dir!r} cannot be used: {exc}; pass another {flag}") from exc
    hang = hang_config({flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, *_ in HANG_OPTIONS})

    from hpresil.run.launch import launch_agent
    from hpresil.runtime.node import NodeRuntime
    from hpresil.netenv.service import NetEnvReport
    from hpresil.run.services import default_services

    net_plan = _net_env_plan(args)
    _check_entrypoint(args)  # after every value check, before anything starts
    env_changes = apply_launcher_env(plan=net_plan)
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
    launch_agent(config, cmd, cmd_args, runtime, env_changes=env_changes, grace_period=grace,
                 fast_restart=args.fast_restart != "off", console=console)


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
    except NodeUnhealthyError as exc:
        print(f"hpresil-run: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (ConfigError, ValueError, AssertionError) as exc:
        print(f"usage: hpresil-run [options] training_script [args...]\nhpresil-run: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console_main()
