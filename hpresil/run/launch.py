"""Launches the elastic agent with the node runtime around it.

torch's ``launch_agent`` hard-codes ``LocalElasticAgent``; this module builds
the same pieces from torch's public elastic API (``RendezvousParameters``,
the rendezvous registry, ``WorkerSpec``, ``events``, ``metrics``) and runs
:class:`~hpresil.run.agent.HpresilAgent`, a ``LocalElasticAgent`` subclass.
Everything torchrun decides from its flags — rendezvous, restarts, logs,
NUMA binding, signal handling — is taken from torch's own ``LaunchConfig``
unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import uuid
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.distributed.elastic.rendezvous.registry as rdzv_registry
from torch.distributed.elastic import events, metrics
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.launcher.api import LaunchConfig

from hpresil.elastic import torch_rdzv
from hpresil.elastic.api import ElasticConfig
from hpresil.elastic.etcd import BACKEND as ETCD_BACKEND, create_etcd_v2_handler, parse_endpoints, quorum_report
from hpresil.elastic.membership import lost_after_from_rdzv, tuned_rdzv_configs
from hpresil.errors import ConfigError, LaunchError, NodeUnhealthyError
from hpresil.run.agent import HpresilAgent
from hpresil.netenv.env import EnvChange
from hpresil.run.console import WorkerConsole
from hpresil.run.failure import explain_failure, pick_root_cause
from hpresil.run.logs import render_exceptions_eagerly, route_agent_logs, unroute_agent_logs
from hpresil.runtime.node import NodeRuntime

__all__ = ["launch_agent", "entrypoint_name"]

log = logging.getLogger(__name__)


def entrypoint_name(entrypoint: Callable[..., Any] | str | None, args: list[Any]) -> str:
    """Names the entrypoint the way torchrun's logs do (script, not ``python``)."""
    if callable(entrypoint):
        return getattr(entrypoint, "__name__", str(entrypoint))
    if isinstance(entrypoint, str):
        if os.path.basename(entrypoint).startswith("python"):
            return next((str(a) for a in args if not str(a).startswith("-")), entrypoint)
        return entrypoint
    return ""


def _master_addr_port(params: RendezvousParameters) -> tuple[str | None, int | None]:
    # Only the static backend takes a master address from the endpoint; the
    # others publish one through the store (same rule as torch's launcher).
    if params.backend != "static":
        return None, None
    endpoint = params.endpoint.strip()
    if not endpoint:
        raise ValueError("the static rendezvous needs an endpoint: pass --master-addr and --master-port")
    addr, port = parse_rendezvous_endpoint(endpoint, default_port=-1)
    if port == -1:
        raise ValueError(f"port is missing in endpoint {endpoint!r}: pass --master-port")
    return addr, port


_OPTIONAL_SPEC_FIELDS = (
    "event_log_handler",
    "numa_options",
    "duplicate_stdout_filters",
    "duplicate_stderr_filters",
    "virtual_local_rank",
)


def join_when_ready(params: RendezvousParameters, warm: bool, timeout: float = 300.0) -> Callable[[], None] | None:
    """What an agent does before its first rendezvous: when the job already trains
    (a node joining or replacing one; ``RUNNING_KEY`` is in the c10d rendezvous
    store), wait until the warm-start fork server has imported torch. Joining the
    rendezvous makes every other node stop its workers; joining before this
    node can start its own would stall them for the imports (seconds). At job
    start (no key yet) the imports overlap the rendezvous instead.
    ``None`` without warm start or with another rendezvous backend."""
    if not warm or params.backend != "c10d" or not params.endpoint:
        return None

    def before_join() -> None:
        from torch.distributed import TCPStore

        from hpresil.elastic.api import RUNNING_KEY
        from hpresil.run.warm import wait_until_warm

        try:
            host, port = parse_rendezvous_endpoint(params.endpoint, default_port=29400)
            if port == 0:  # --standalone: this agent hosts a store on a port picked at creation; nothing runs yet
                return
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2), wait_for_workers=False)
            running = store.check([RUNNING_KEY.format(run_id=params.run_id)])
        except Exception as exc:  # noqa: BLE001 - no store yet: the job is starting
            log.debug("rendezvous store not reachable before joining (%s): job start", exc)
            return
        if running:
            log.info("job %s already trains: joining once this node's fork server is ready", params.run_id)
            if not wait_until_warm(timeout):
                log.warning("fork server not ready after %.0f s; joining anyway", timeout)

    return before_join


def _rendezvous_handler(params: RendezvousParameters) -> Any:
    """torch's handler for ``params.backend``; for etcd-v2, the same handler over a
    client that fails over between every listed member (:mod:`hpresil.elastic.etcd`).
    c10d and etcd-v2 back off after a lost compare-and-set, and torch's
    per-operation event naming is made cheap first (:mod:`hpresil.elastic.torch_rdzv`)."""
    torch_rdzv.install()
    if params.backend == ETCD_BACKEND:
        return create_etcd_v2_handler(params)
    if params.backend == "c10d":
        return torch_rdzv.c10d_handler(params)
    return rdzv_registry.get_rendezvous_handler(params)


def _shared_fields(config: LaunchConfig, target: type, names: tuple[str, ...]) -> dict[str, Any]:
    accepted = set(inspect.signature(target).parameters)
    return {n: getattr(config, n) for n in names if n in accepted and hasattr(config, n)}


def launch_agent(
    config: LaunchConfig,
    entrypoint: Callable[..., Any] | str,
    args: list[Any],
    runtime: NodeRuntime,
    env_changes: Sequence[EnvChange] = (),
    grace_period: timedelta = timedelta(seconds=30),
    fast_restart: bool = True,
    console: bool = False,
) -> dict[int, Any]:
    """Runs the worker group to completion under an :class:`HpresilAgent`.

    Args:
        config: torch's launch config, as built by ``torch.distributed.run.config_from_args``.
        entrypoint: the worker command (e.g. the Python executable) or function.
        args: arguments of the entrypoint.
        runtime: the node runtime; started here, stopped when the job ends.
        env_changes: environment changes made by the launcher, reported as events.
        grace_period: after a stop signal, how long the runtime's services may
            finish pending work (durable uploads of the final snapshots).
        fast_restart: restart failed workers without a new rendezvous round when
            the nodes stay the same (:mod:`hpresil.elastic.fast_restart`).
        console: copy the workers' stderr logs (``redirects`` must capture stderr)
            to the console, a recovered failure's tracebacks folded to one line
            (:mod:`hpresil.run.console`).

    Returns:
        The workers' return values by global rank (function entrypoints only).

    Raises:
        ChildFailedError: the worker group failed and ran out of restarts.
    """
    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
        log.warning("no --rdzv-id given; generated run id %s", config.run_id)

    # Fast rescale: torch's keep-alive and last-call defaults cost ~45 s per
    # membership change; user-set --rdzv-conf values always win.
    config.rdzv_configs, tuned = tuned_rdzv_configs(config.rdzv_backend, config.rdzv_configs, config.max_nodes)
    for key, value, reason in tuned:
        log.info("rdzv-conf %s: unset -> %s (%s)", key, value, reason)
    params = RendezvousParameters(
        backend=config.rdzv_backend,
        endpoint=config.rdzv_endpoint,
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        local_addr=config.local_addr,
        **config.rdzv_configs,
    )
    master_addr, master_port = _master_addr_port(params)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle

    spec = WorkerSpec(
        role=config.role,
        local_world_size=config.nproc_per_node,
        entrypoint=entrypoint,
        args=tuple(args),
        rdzv_handler=_rendezvous_handler(params),
        max_restarts=config.max_restarts,
        monitor_interval=config.monitor_interval,
        master_addr=master_addr,
        master_port=master_port,
        local_addr=config.local_addr,
        # Fields newer torch releases added to both LaunchConfig and WorkerSpec.
        **_shared_fields(config, WorkerSpec, _OPTIONAL_SPEC_FIELDS),
    )
    worker_console = WorkerConsole() if console else None
    agent = HpresilAgent(
        spec=spec,
        console=worker_console,
        runtime=runtime,
        elastic=ElasticConfig(lost_after=lost_after_from_rdzv(config.rdzv_configs, [k for k, _, _ in tuned])),
        fast_restart=fast_restart,
        before_join=join_when_ready(params, warm=config.start_method == "forkserver"),
        logs_specs=config.logs_specs,
        start_method=config.start_method,
        log_line_prefix_template=config.log_line_prefix_template,
        **_shared_fields(config, HpresilAgent, ("shutdown_timeout",)),
    )
    log.info(
        "hpresil-run: entrypoint=%s nnodes=%s:%s nproc_per_node=%s run_id=%s rdzv=%s@%s max_restarts=%s",
        entrypoint_name(entrypoint, args),
        config.min_nodes,
        config.max_nodes,
        config.nproc_per_node,
        config.run_id,
        config.rdzv_backend,
        config.rdzv_endpoint,
        config.max_restarts,
    )

    render_exceptions_eagerly()  # a worker failure's log line must not import torch._dynamo first
    shutdown_rdzv = True
    stop_timeout = timedelta(seconds=60)
    succeeded = False
    runtime.start()
    agent_log = route_agent_logs(runtime.log_dir)
    for change in env_changes:
        runtime.events.emit("env_change", name=change.name, old=change.old, new=change.new, reason=change.reason)
    try:
        metrics.initialize_metrics(metrics.MetricsConfig(config.metrics_cfg))
        result = agent.run()
        events.record(agent.get_event_succeeded(), config.event_log_handler)
        if result.is_failed():
            error = ChildFailedError(name=entrypoint_name(entrypoint, args), failures=result.failures)
            if worker_console is not None:  # the tracebacks first, folded: the report quotes the root cause's
                worker_console.close(failed=True, root_rank=pick_root_cause(error, agent.stderr_paths)[0])
            report = explain_failure(
                error,
                max_restarts=config.max_restarts,
                restarts_used=config.max_restarts - agent.remaining_restarts,
                stderr_paths=agent.stderr_paths,
            )
            print(report, file=sys.stderr, flush=True)
            runtime.events.emit("workers_failed", report=report)
            raise error
        succeeded = True
        return result.return_values
    except ChildFailedError:
        raise
    except Exception as exc:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        # Neither a signal (SIGTERM from the scheduler) nor a node leaving for
        # bad health may close the rendezvous: that would end the job for
        # every node instead of letting the others continue.
        if isinstance(exc, (SignalException, NodeUnhealthyError)):
            shutdown_rdzv = False
        if isinstance(exc, SignalException):
            stop_timeout = grace_period
        events.record(agent.get_event_failed(), config.event_log_handler)
        agent_log.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "the agent ended: %r", (exc,),
                                           sys.exc_info()))  # the traceback in agent.log; the console gets one line
        if config.rdzv_backend == ETCD_BACKEND and isinstance(exc, RendezvousConnectionError):
            raise LaunchError(f"the rendezvous lost the etcd cluster: {exc}; "
                              f"{quorum_report(parse_endpoints(config.rdzv_endpoint))}") from exc
        if isinstance(exc, (ValueError, AssertionError)) and not isinstance(exc, ConfigError):
            # hpresil-run reports ValueError as a usage error (exit 2); this one came while running.
            raise LaunchError(f"the agent failed while supervising the workers: {type(exc).__name__}: {exc}") from exc
        raise
    finally:
        if worker_console is not None:
            worker_console.close()
        if shutdown_rdzv:
            spec.rdzv_handler.shutdown()
        runtime.stop(succeeded=succeeded, timeout=stop_timeout)
        unroute_agent_logs(agent_log)
