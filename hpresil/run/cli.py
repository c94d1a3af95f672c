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
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

from hpresil.errors import ConfigError, NodeUnhealthyError
from hpresil.hang.config import HANG_OPTIONS, hang_config
from hpresil.runtime.env import apply_launcher_env
from hpresil.runtime.api import RuntimeConfig

__all__ = ["build_parser", "main", "console_main", "validate", "HPRESIL_OPTIONS"]

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
    ("--tracebacks", "HPRESIL_TRACEBACKS", "choice:auto,off", "auto",
     "auto: when neither --redirects nor --tee is given, also copy each worker's stderr to "
     "the log dir so a failure report can show the failing rank's traceback; off: torchrun's behaviour."),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_default(env_var: str, kind: str, default: object) -> object:
    raw = os.environ.get(env_var)
    if raw is None:
        return default
    if kind == "bool":
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise ConfigError(f"{env_var}={raw!r} is not a boolean; set it to 1 or 0")
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
    group = parser.add_argument_group(
        "hpresil", "hpresil's options; each is also read from the HPRESIL_* variable named in its help."
    )
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


def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(shm_root=args.shm_root, node_id=args.node_id, keep_shm=bool(args.keep_shm),
                         service_interval=timedelta(milliseconds=50))


def _job_log_dir(args: argparse.Namespace, run_id: str, node_id: str) -> str:
    import tempfile

    from hpresil.runtime.shm import safe_component

    if args.job_log_dir:
        return args.job_log_dir
    if args.log_dir:
        return args.log_dir
    return os.path.join(tempfile.gettempdir(), "hpresil-logs", safe_component(run_id), safe_component(node_id))


def _apply_traceback_capture(args: argparse.Namespace) -> None:
    # Only when the user chose no redirection: tee stderr so the failure
    # report can quote the failing rank's traceback from its stderr.log.
    unset = (None, "", "0")
    if args.tracebacks == "auto" and args.redirects in unset and args.tee in unset:
        args.tee = "2"


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
    _apply_traceback_capture(args)
    validate(args)
    resolve_rendezvous(args)
    config, cmd, cmd_args = config_from_args(args)
    runtime_config = _runtime_config(args)
    hang = hang_config({flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, *_ in HANG_OPTIONS})

    from hpresil.run.launch import launch_agent
    from hpresil.runtime.node import NodeRuntime
    from hpresil.runtime.services import default_services

    env_changes = apply_launcher_env()
    node_id = runtime_config.node_id or socket.gethostname()
    log_dir = _job_log_dir(args, str(config.run_id), node_id)
    runtime = NodeRuntime(runtime_config, run_id=str(config.run_id), log_dir=log_dir, services=default_services({"hpresil.hang.watchdog": hang}))
    launch_agent(config, cmd, cmd_args, runtime, env_changes=env_changes)


def console_main() -> None:
    """The ``hpresil-run`` console script: invalid values exit 2 naming the fix."""
    logging.basicConfig(
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        format="[hpresil-run] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        main()
    except NodeUnhealthyError as exc:
        print(f"hpresil-run: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (ConfigError, ValueError, AssertionError) as exc:
        print(f"usage: hpresil-run [options] training_script [args...]\nhpresil-run: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console_main()
