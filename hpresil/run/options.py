"""``hpresil-run``'s parser and value checks.

The parser *is* torch's (``torch.distributed.run.get_args_parser``), so every
torchrun flag, alias and ``PET_*`` variable keeps its meaning; hpresil's
options live in a separate group, each also settable through an
``HPRESIL_*`` variable (an explicit flag wins). Every check here runs before
anything starts, and its error names the fix.
"""

from __future__ import annotations

import argparse
import os
import re
import uuid
from typing import NoReturn

from torch.distributed.run import get_args_parser, parse_min_max_nnodes

from hpresil._parse import parse_bool
from hpresil.checkpoint.peer.api import PEER_OPTIONS
from hpresil.errors import ConfigError
from hpresil.hang.config import HANG_OPTIONS

__all__ = ["HPRESIL_OPTIONS", "WORKER_OPTIONS", "build_parser", "check_entrypoint", "resolve_rendezvous", "seconds",
           "torch_version", "validate", "worker_env"]

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
    ("--on-nonfinite", "HPRESIL_ON_NONFINITE", "choice:rollback,stop,warn", "rollback",
     "A snapshot whose state (or loss, from ckpt.save(step, loss=...)) holds NaN/Inf: rollback: every rank "
     "restores the newest healthy snapshot in-process and trains on; stop: the workers raise "
     "UnhealthyStateError; warn: report only."),
    ("--on-spike", "HPRESIL_ON_SPIKE", "choice:rollback,warn", "warn",
     "A loss spike (above median + 6 MAD of the recent snapshots' losses): rollback or warn."),
    ("--on-divergence", "HPRESIL_ON_DIVERGENCE", "choice:rollback,leave,warn", "rollback",
     "Replicas that must be bitwise identical (DDP parameters and optimizer state, replicated DTensor "
     "shards) differ (silent data corruption): rollback to the newest snapshot they agreed on; leave: "
     "also make a node that diverges again leave the job like an unhealthy GPU; warn: report only."),
    ("--rollback-tries", "HPRESIL_ROLLBACK_TRIES", "str", "3",
     "Rollbacks for one bad step (each one snapshot further back) before the workers stop with an error "
     "naming it: a crash loop ends instead of spending --max-restarts."),
    ("--tracebacks", "HPRESIL_TRACEBACKS", "choice:auto,off", "auto",
     "auto: when neither --redirects nor --tee is given, keep each worker's stderr in the job log dir "
     "(workers/) and copy it to the console, where the tracebacks of a failure the job recovers from "
     "become one line each and a failed job's report quotes the root cause's; off: torchrun's behaviour."),
)

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
        "statistics; `hpresil-run plan --goodput-json F` recommends snapshot intervals and predicts goodput "
        "from the benches' measurements. Each takes --help."
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
    if args.rdzv_backend == "etcd-v2":
        from hpresil.elastic.etcd import parse_endpoints

        parse_endpoints(args.rdzv_endpoint)
    if args.no_python and args.module:
        raise ConfigError("--no-python and -m/--module conflict: drop --no-python to run a module with -m")
    if getattr(args, "preload", None):
        from hpresil.run.warm import preload_modules

        preload_modules(args.preload)
    tries = str(getattr(args, "rollback_tries", "3"))
    if not (tries.isdigit() and int(tries) >= 1):
        raise ConfigError(f"--rollback-tries {tries!r}: takes an integer >= 1")


#: Options the workers read from the environment (the Checkpointer's rollback policy).
WORKER_OPTIONS = ("--on-nonfinite", "--on-spike", "--on-divergence", "--rollback-tries")


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The ``HPRESIL_*`` variables of :data:`WORKER_OPTIONS` as given (flag or variable)."""
    env = {}
    for flag, env_var, *_ in HPRESIL_OPTIONS:
        if flag in WORKER_OPTIONS:
            env[env_var] = str(getattr(args, flag.lstrip("-").replace("-", "_")))
    return env


def check_entrypoint(args: argparse.Namespace) -> None:
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


def seconds(args: argparse.Namespace, flag: str, minimum: float) -> float | None:
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
