"""Per-node topology discovery: which NVLink domain this node is in.

Sources, first answer wins:

``env``
    ``HPRESIL_TOPOLOGY_DOMAIN`` (and optionally ``HPRESIL_TOPOLOGY_TRAY``): an
    operator's override, e.g. from a scheduler prolog.
``fake``
    ``HPRESIL_TOPOLOGY_FAKE``: JSON (or the path of a JSON file) mapping node ids
    to a domain or to ``{"domain": ..., "tray": ...}``, for CPU tests that run
    several simulated nodes (``--node-id``) on one host.
``nvml``
    ``nvmlDeviceGetGpuFabricInfoV`` of the node's GPUs: ``clusterUuid`` is the
    NVLink domain and ``cliqueId`` the partition inside it; only a state of
    ``COMPLETED`` is trusted (the fabric manager has finished). GPUs without a
    multi-node fabric (H100 p5) report "not supported".
``k8s``
    Node labels passed to the pod as environment variables (the label name
    upper-cased, other characters as ``_``): ``NVIDIA_COM_GPU_CLIQUE`` for
    ``nvidia.com/gpu.clique`` (``<clusterUuid>.<cliqueId>``, set by the GPU
    operator) and ``TOPOLOGY_K8S_AWS_ULTRASERVER_ID`` for
    ``topology.k8s.aws/ultraserver-id`` (HyperPod), or a downward-API labels file
    named by ``HPRESIL_K8S_LABELS_FILE``.
``slurm``
    The ``topology/block`` plugin: the block of ``scontrol show topology`` that
    lists ``$SLURMD_NODENAME``.
``host``
    Nothing else answered: the node is its own domain (NVLink stops at the node).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
from typing import Callable, Mapping

from hpresil.errors import TopologyError
from hpresil.topology.api import NodeTopology, TopologyConfig

__all__ = ["discover", "from_env", "from_fake", "from_nvml", "from_k8s", "from_slurm", "expand_hostlist",
           "ENV_DOMAIN", "ENV_TRAY", "ENV_FAKE", "K8S_CLIQUE", "K8S_ULTRASERVER", "ENV_LABELS_FILE"]

log = logging.getLogger(__name__)

ENV_DOMAIN = "HPRESIL_TOPOLOGY_DOMAIN"
ENV_TRAY = "HPRESIL_TOPOLOGY_TRAY"
ENV_FAKE = "HPRESIL_TOPOLOGY_FAKE"
ENV_LABELS_FILE = "HPRESIL_K8S_LABELS_FILE"
K8S_CLIQUE = "nvidia.com/gpu.clique"
K8S_ULTRASERVER = "topology.k8s.aws/ultraserver-id"
_FABRIC_COMPLETED = 3  # NVML_GPU_FABRIC_STATE_COMPLETED


def label_env_name(label: str) -> str:
    """The environment variable a label is passed in (``nvidia.com/gpu.clique`` -> ``NVIDIA_COM_GPU_CLIQUE``)."""
    return re.sub(r"[^A-Za-z0-9]", "_", label).upper()


def _tray(env: Mapping[str, str]) -> int | None:
    raw = env.get(ENV_TRAY)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise TopologyError(f"{ENV_TRAY}={raw!r} is not an integer tray index") from exc


def from_env(host: str, env: Mapping[str, str]) -> NodeTopology | None:
    """The operator's override, ``HPRESIL_TOPOLOGY_DOMAIN`` / ``HPRESIL_TOPOLOGY_TRAY``."""
    domain = env.get(ENV_DOMAIN)
    return NodeTopology(host=host, domain=domain, tray=_tray(env), source="env") if domain else None


def from_fake(host: str, env: Mapping[str, str]) -> NodeTopology | None:
    """``HPRESIL_TOPOLOGY_FAKE``: ``{"<node id>": "<domain>" | {"domain": ..., "tray": ...}}``.

    Raises:
        TopologyError: the spec is not valid JSON of that shape.
    """
    raw = env.get(ENV_FAKE)
    if not raw:
        return None
    try:
        if not raw.lstrip().startswith("{"):
            with open(raw) as f:
                raw = f.read()
        spec = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and Unicode decoding
        raise TopologyError(f"{ENV_FAKE}: not JSON nor a readable JSON file: {exc}") from exc
    if not isinstance(spec, dict):
        raise TopologyError(f"{ENV_FAKE} must map node ids to domains, got {type(spec).__name__}")
    entry = spec.get(host)
    if entry is None:
        return None
    if isinstance(entry, str):
        return NodeTopology(host=host, domain=entry, source="fake")
    if isinstance(entry, dict) and "domain" in entry:
        tray, clique = entry.get("tray"), entry.get("clique")
        try:
            tray = None if tray is None else int(tray)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TopologyError(f"{ENV_FAKE}[{host!r}]: tray {tray!r} is not an integer") from exc
        return NodeTopology(host=host, domain=str(entry["domain"]), clique=None if clique is None else str(clique),
                            tray=tray, source="fake")
    raise TopologyError(f"{ENV_FAKE}[{host!r}] must be a domain name or {{'domain': ..., 'tray': ...}}")


def from_nvml(host: str, nvml: object | None = None) -> NodeTopology | None:
    """NVLink domain from NVML fabric info; ``None`` without NVML, GPUs or a completed fabric.

    Args:
        host: this node's id.
        nvml: the ``pynvml`` module (tests pass a stand-in); default: import it.
    """
    nv: object | None = nvml
    if nv is None:
        try:
            import pynvml as nv  # type: ignore[no-redef]
        except ImportError:
            return None
    try:
        nv.nvmlInit()  # type: ignore[attr-defined]
    except Exception as exc:  # no driver, no GPUs: NVMLError_LibraryNotFound and friends
        log.debug("NVML unavailable for topology: %s", exc)
        return None
    try:
        count = int(nv.nvmlDeviceGetCount())  # type: ignore[attr-defined]
        for index in range(count):
            handle = nv.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
            info = nv.c_nvmlGpuFabricInfoV_t()  # type: ignore[attr-defined]
            try:
                nv.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))  # type: ignore[attr-defined]
            except Exception as exc:  # NOT_SUPPORTED (no multi-node NVLink), FUNCTION_NOT_FOUND (old driver)
                log.debug("GPU %d: no fabric info (%s)", index, exc)
                return None
            if int(info.state) != _FABRIC_COMPLETED or int(info.status) != 0:
                continue  # registration not finished or failed on this GPU: try the next one
            uuid = bytes(info.clusterUuid)
            if not any(uuid):
                continue
            return NodeTopology(host=host, domain=_uuid_str(uuid), clique=str(int(info.cliqueId)), source="nvml")
        return None
    except Exception as exc:
        log.warning("NVML fabric query failed, falling back to other topology sources: %s", exc)
        return None
    finally:
        try:
            nv.nvmlShutdown()  # type: ignore[attr-defined]
        except Exception:
            pass


def _uuid_str(raw: bytes) -> str:
    h = raw[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _labels_file(path: str) -> dict[str, str]:
    # Downward API format: one `key="value"` per line.
    labels: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    labels[key] = value.strip().strip('"')
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{ENV_LABELS_FILE}={path}: {exc}") from exc
    return labels


def from_k8s(host: str, env: Mapping[str, str]) -> NodeTopology | None:
    """Domain from Kubernetes node labels passed through the environment (see module docstring)."""
    labels = _labels_file(env[ENV_LABELS_FILE]) if env.get(ENV_LABELS_FILE) else {}
    clique = env.get(label_env_name(K8S_CLIQUE)) or labels.get(K8S_CLIQUE)
    if clique:
        domain, _, part = clique.partition(".")
        return NodeTopology(host=host, domain=domain, clique=part or None, tray=_tray(env), source="k8s")
    ultra = env.get(label_env_name(K8S_ULTRASERVER)) or labels.get(K8S_ULTRASERVER)
    if ultra:
        return NodeTopology(host=host, domain=ultra, tray=_tray(env), source="k8s")
    return None


def expand_hostlist(spec: str) -> list[str]:
    """Expands a Slurm host list (``gb[001-003,007],login1``) into names."""
    names: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        match = re.match(r"^(.*)\[([^\]]*)\](.*)$", part)
        if not match:
            names.append(part)
            continue
        head, body, tail = match.groups()
        for rng in body.split(","):
            lo, _, hi = rng.partition("-")
            first, last = int(lo), int(hi or lo)  # ValueError: not a range of numbers
            if last - first > 100_000:
                raise ValueError(f"host range {rng!r} of {spec!r} is implausibly large")
            for n in range(first, last + 1):
                names.append(f"{head}{str(n).zfill(len(lo))}{tail}")
    return names


def parse_slurm_blocks(text: str, node: str) -> tuple[str, int] | None:
    """The block (name, position of ``node`` in it) of ``scontrol show topology`` output."""
    for line in text.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "BlockName" not in fields or "Nodes" not in fields:
            continue
        try:
            hosts = expand_hostlist(fields["Nodes"])
        except ValueError as exc:
            log.warning("ignoring a block of `scontrol show topology`: %s", exc)
            continue
        if node in hosts:
            return fields["BlockName"], hosts.index(node)
    return None


def from_slurm(host: str, env: Mapping[str, str], config: TopologyConfig,
               run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> NodeTopology | None:
    """Domain from Slurm's ``topology/block`` plugin (GB200 racks as blocks)."""
    node = env.get("SLURMD_NODENAME")
    if not node or not env.get("SLURM_JOB_ID") or shutil.which("scontrol") is None:
        return None
    try:
        proc = run(["scontrol", "show", "topology"], capture_output=True, text=True,
                   timeout=config.slurm_timeout.total_seconds())
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("scontrol show topology failed: %s", exc)
        return None
    found = parse_slurm_blocks(proc.stdout, node) if proc.returncode == 0 else None
    if found is None:
        return None
    return NodeTopology(host=host, domain=found[0], tray=found[1], source="slurm")


def discover(host: str, config: TopologyConfig, env: Mapping[str, str] | None = None) -> NodeTopology:
    """This node's topology from the first source that answers (see the module docstring).

    Raises:
        TopologyError: an override (``HPRESIL_TOPOLOGY_*``, labels file) is malformed.
    """
    env = os.environ if env is None else env
    for probe in (lambda: from_env(host, env), lambda: from_fake(host, env),
                  lambda: from_nvml(host) if config.nvml else None, lambda: from_k8s(host, env),
                  lambda: from_slurm(host, env, config)):
        found = probe()
        if found is not None:
            return found
    return NodeTopology(host=host, domain=host, source="host")
