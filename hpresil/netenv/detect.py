"""Host detection for the network rules: files only, unless IMDS is asked for.

Every step reads a few small files under :attr:`HostRoots.root` (sysfs, /proc,
/dev, /opt) or the library directories, so detection takes milliseconds and
tests run it against fake trees. A step that fails leaves its fact ``None`` and
adds a note; detection itself never raises.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
import re
import sys
import time
from typing import Mapping

from hpresil.netenv.api import Facts, HostRoots, NetEnvConfig
from hpresil.netenv.families import FAMILIES, family_of

__all__ = ["detect", "library_dirs", "plugin_version_of", "IMDS_URL"]

log = logging.getLogger(__name__)

IMDS_URL = "http://169.254.169.254/latest"
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
_PLUGIN_VERSION = re.compile(rb"aws-ofi-nccl[ -]v?(\d+\.\d+(?:\.\d+)?)")
_PLUGIN_NAMES = ("libnccl-net-ofi.so", "libnccl-net.so", "libnccl-net-aws-ofi.so")
#: Bytes of a plugin binary scanned for its version string.
_SCAN_LIMIT = 64 << 20
#: Install directories of the EFA installer, aws-ofi-nccl (DLAMI and EFA installer) and the system.
_DEFAULT_LIB_DIRS = (
    "opt/amazon/ofi-nccl/lib", "opt/amazon/ofi-nccl/lib64", "opt/aws-ofi-nccl/lib",
    "opt/amazon/efa/lib", "opt/amazon/efa/lib64", "usr/local/lib", "usr/lib64",
    "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib",
)
_NVIDIA = "0x10de"


def _path(roots: HostRoots, rel: str) -> str:
    return os.path.join(roots.root, rel.lstrip("/"))


def _read(path: str, limit: int = 65536) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _listdir(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def library_dirs(roots: HostRoots, environ: Mapping[str, str]) -> list[str]:
    """Where the dynamic loader would look, roughly: ``$LD_LIBRARY_PATH`` first."""
    if roots.lib_dirs is not None:
        return list(roots.lib_dirs)
    dirs = [d for d in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    dirs += [_path(roots, d) for d in _DEFAULT_LIB_DIRS]
    return list(dict.fromkeys(dirs))


def _instance_from_imds(config: NetEnvConfig) -> str | None:
    import urllib.request

    timeout = config.imds_timeout.total_seconds()
    token_req = urllib.request.Request(f"{IMDS_URL}/api/token", method="PUT",
                                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(token_req, timeout=timeout) as resp:  # noqa: S310 (fixed link-local URL)
        token = resp.read().decode()
    req = urllib.request.Request(f"{IMDS_URL}/meta-data/instance-type",
                                 headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return resp.read().decode().strip() or None


def _instance(config: NetEnvConfig, roots: HostRoots, notes: list[str]) -> tuple[str | None, str]:
    if config.mode in FAMILIES:
        return FAMILIES[config.mode].canonical, "preset"
    product = (_read(_path(roots, "sys/devices/virtual/dmi/id/product_name")) or "").strip()
    if _INSTANCE_TYPE.match(product):
        return product, "dmi"
    notes.append(f"DMI product name {product!r} is not an EC2 instance type" if product
                 else "no DMI product name")
    if config.imds:
        try:
            found = _instance_from_imds(config)
            if found:
                return found, "imds"
        except Exception as exc:  # any failure just means "not on EC2 / IMDS unreachable"
            notes.append(f"IMDSv2 gave no instance type: {exc}")
    return None, "none"


def _efa_devices(roots: HostRoots) -> tuple[str, ...]:
    base = _path(roots, "sys/class/infiniband")
    found = []
    for name in _listdir(base) or []:
        driver = os.path.basename(os.path.realpath(os.path.join(base, name, "device", "driver")))
        # The driver link is authoritative; EFA devices are also named rdmap*/efa_*.
        if driver == "efa" or name.startswith(("rdmap", "efa")):
            found.append(name)
    return tuple(found)


def _pci(roots: HostRoots) -> tuple[int, int]:
    """(NVIDIA GPUs, NVSwitch bridges) on the PCI bus."""
    base = _path(roots, "sys/bus/pci/devices")
    gpus = switches = 0
    for dev in _listdir(base) or []:
        if (_read(os.path.join(base, dev, "vendor"), 64) or "").strip() != _NVIDIA:
            continue
        cls = (_read(os.path.join(base, dev, "class"), 64) or "").strip()
        if cls.startswith(("0x0300", "0x0302")):
            gpus += 1
        elif cls.startswith("0x0680"):
            switches += 1
    return gpus, switches


def _gpu_model(roots: HostRoots) -> str | None:
    for info in sorted(glob.glob(_path(roots, "proc/driver/nvidia/gpus/*/information"))):
        for line in (_read(info) or "").splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip() or None
    return None


def _imex_channels(roots: HostRoots) -> int | None:
    names = _listdir(_path(roots, "dev/nvidia-caps-imex-channels"))
    return None if names is None else sum(1 for n in names if n.startswith("channel"))


def _container(roots: HostRoots, environ: Mapping[str, str]) -> str | None:
    if "KUBERNETES_SERVICE_HOST" in environ:
        return "kubernetes"
    if os.path.exists(_path(roots, ".dockerenv")):
        return "docker"
    if os.path.exists(_path(roots, "run/.containerenv")):
        return "podman"
    cgroup = _read(_path(roots, "proc/1/cgroup")) or ""
    for marker, name in (("kubepods", "kubernetes"), ("docker", "docker"), ("containerd", "containerd")):
        if marker in cgroup:
            return name
    return None


def _schedulers(roots: HostRoots, environ: Mapping[str, str]) -> tuple[str, ...]:
    found = []
    if "SLURM_JOB_ID" in environ:
        found.append("slurm")
    if "KUBERNETES_SERVICE_HOST" in environ:
        found.append("kubernetes")
    # HyperPod lifecycle scripts read the cluster layout from this file.
    if os.path.exists(_path(roots, "opt/ml/config/resource_config.json")):
        found.append("hyperpod")
    return tuple(found)


def _find(dirs: list[str], names: tuple[str, ...]) -> str | None:
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def plugin_version_of(path: str) -> str | None:
    """The version the plugin logs at init ("Initializing aws-ofi-nccl 1.7.4-aws"), read from its binary."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                match = _PLUGIN_VERSION.search(data, 0, min(size, _SCAN_LIMIT))
                return match.group(1).decode() if match else None
    except (OSError, ValueError):
        return None


def _plugin(dirs: list[str], environ: Mapping[str, str]) -> str | None:
    chosen = environ.get("NCCL_NET_PLUGIN")
    if chosen and "," not in chosen:
        if os.sep in chosen:
            return chosen if os.path.isfile(chosen) else None
        return _find(dirs, (f"libnccl-net-{chosen}.so", chosen))
    return _find(dirs, _PLUGIN_NAMES)


def _libfabric(dirs: list[str], installed: str) -> tuple[str | None, str | None]:
    path = _find(dirs, ("libfabric.so.1", "libfabric.so"))
    version = None
    if path is not None:
        pc = _read(os.path.join(os.path.dirname(path), "pkgconfig", "libfabric.pc")) or ""
        match = re.search(r"^Version:\s*(\S+)", pc, re.M)
        version = match.group(1) if match else None
    if version is None:
        match = re.search(r"libfabric[\w.+-]*?[_-](\d+\.\d+\.\d+\S*)", installed)
        version = match.group(1) if match else None
    return path, version


def _nccl(roots: HostRoots, dirs: list[str]) -> str | None:
    if roots.python_metadata:
        torch = sys.modules.get("torch")
        if torch is not None and getattr(torch.version, "cuda", None):
            try:  # NCCL linked into torch; needs no GPU and does not initialise CUDA
                return ".".join(str(p) for p in torch.cuda.nccl.version())
            except Exception:
                pass
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "libnccl.so.*.*"))):
            match = re.search(r"libnccl\.so\.(\d+\.\d+\.\d+)", path)
            if match:
                return match.group(1)
    if roots.python_metadata:
        from importlib import metadata

        for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return None


def detect(config: NetEnvConfig, roots: HostRoots = HostRoots(), environ: Mapping[str, str] | None = None) -> Facts:
    """Reads the host into :class:`Facts`.

    No network call unless ``config.imds`` (then two IMDSv2 requests bounded by
    ``config.imds_timeout``, only when the DMI product name is not an instance type).
    """
    env = os.environ if environ is None else environ
    start = time.monotonic()
    notes: list[str] = []
    instance_type, source = _instance(config, roots, notes)
    family = config.mode if config.mode in FAMILIES else family_of(instance_type)
    expected = FAMILIES[family].efa_expected.get(instance_type or "") if family in FAMILIES else None
    dirs = library_dirs(roots, env)
    installed = _read(_path(roots, "opt/amazon/efa_installed_packages")) or ""
    match = re.search(r"EFA installer version:\s*(\S+)", installed)
    plugin_path = _plugin(dirs, env)
    plugin_version = plugin_version_of(plugin_path) if plugin_path else None
    if plugin_path and plugin_version is None:
        notes.append(f"no aws-ofi-nccl version string in {plugin_path}")
    libfabric_path, libfabric_version = _libfabric(dirs, installed)
    gpus, switches = _pci(roots)
    net = _listdir(_path(roots, "sys/class/net"))
    kernel = (_read(_path(roots, "proc/sys/kernel/osrelease")) or "").strip() or None
    facts = Facts(
        instance_type=instance_type,
        instance_source=source,
        family=family,
        efa_devices=_efa_devices(roots),
        efa_expected=expected,
        plugin_path=plugin_path,
        plugin_version=plugin_version,
        libfabric_path=libfabric_path,
        libfabric_version=libfabric_version,
        efa_installer_version=match.group(1) if match else None,
        nccl_version=_nccl(roots, dirs),
        kernel=kernel,
        gpu_model=_gpu_model(roots),
        gpu_count=gpus,
        nvswitch_count=switches,
        imex_channels=_imex_channels(roots),
        interfaces=None if net is None else tuple(net),
        container=_container(roots, env),
        schedulers=_schedulers(roots, env),
        notes=tuple(notes),
        elapsed_s=time.monotonic() - start,
    )
    log.debug("net-env detection took %.1f ms", facts.elapsed_s * 1e3)
    return facts
