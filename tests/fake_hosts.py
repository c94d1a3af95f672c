"""Fake hosts for the network-environment tests: one sysfs/proc/lib tree per
instance family (``data/netenv/hosts.json``) and plugin stack, written under a
temporary root that detection reads instead of ``/``."""

from __future__ import annotations

import json
import os
from typing import Any

from hpresil.netenv import HostRoots

__all__ = ["HOSTS", "STACKS", "build_host", "write_file"]

HOSTS: dict[str, dict[str, Any]] = {
    k: v for k, v in json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "netenv", "hosts.json"))).items()
    if not k.startswith("_")
}
#: Software stacks: aws-ofi-nccl and libfabric before/after the plugin tunes itself (1.7 + 1.18).
STACKS: dict[str, dict[str, str | None]] = {
    "new": {"plugin": "1.9.1-aws", "libfabric": "1.22.0amzn4.0", "installer": "1.38.0", "nccl": "2.21.5",
            "kernel": "6.8.0-1015-aws"},
    "old": {"plugin": "1.6.0", "libfabric": "1.17.1amzn1.0", "installer": "1.26.0", "nccl": "2.19.3",
            "kernel": "5.10.210-201.852.amzn2.x86_64"},
    "legacy": {"plugin": "1.5.0-aws", "libfabric": "1.16.0amzn1.0", "installer": "1.20.0", "nccl": "2.14.3",
               "kernel": "5.10.0"},
    "plugin17-oldfabric": {"plugin": "1.7.4-aws", "libfabric": "1.17.0", "installer": "1.25.0", "nccl": "2.18.5",
                           "kernel": "5.15.0"},
}


def write_file(path: str, data: str | bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def build_host(root: Any, family: str, stack: str | None = "new", efa: int | None = None,
               imex: int | None = None, interfaces: list[str] | None = None) -> HostRoots:
    """Writes a fake host tree for ``family`` with the ``stack`` libraries (``None``: no plugin)."""
    root = str(root)
    spec = HOSTS[family]
    write_file(f"{root}/sys/devices/virtual/dmi/id/product_name", spec["product"] + "\n")
    for i in range(spec["efa"] if efa is None else efa):
        os.makedirs(f"{root}/sys/class/infiniband/rdmap{16 + i}s0/device", exist_ok=True)
    # A non-EFA RDMA device, driven by mlx5: never counted as EFA.
    os.makedirs(f"{root}/sys/bus/pci/drivers/mlx5_core", exist_ok=True)
    os.makedirs(f"{root}/sys/class/infiniband/mlx5_0/device", exist_ok=True)
    os.symlink(f"{root}/sys/bus/pci/drivers/mlx5_core", f"{root}/sys/class/infiniband/mlx5_0/device/driver")
    for name in spec["interfaces"] if interfaces is None else interfaces:
        os.makedirs(f"{root}/sys/class/net/{name}", exist_ok=True)
    for i in range(spec["gpus"]):
        dev = f"0000:{0x10 + i:02x}:00.0"
        write_file(f"{root}/sys/bus/pci/devices/{dev}/vendor", "0x10de\n")
        write_file(f"{root}/sys/bus/pci/devices/{dev}/class", "0x030200\n")
        write_file(f"{root}/proc/driver/nvidia/gpus/{dev}/information", f"Model: \t\t {spec['gpu_model']}\nIRQ: 1\n")
    for i in range(spec["nvswitches"]):
        dev = f"0000:{0x80 + i:02x}:00.0"
        write_file(f"{root}/sys/bus/pci/devices/{dev}/vendor", "0x10de\n")
        write_file(f"{root}/sys/bus/pci/devices/{dev}/class", "0x068000\n")
    write_file(f"{root}/sys/bus/pci/devices/0000:00:05.0/vendor", "0x1d0f\n")  # the ENA NIC
    write_file(f"{root}/sys/bus/pci/devices/0000:00:05.0/class", "0x020000\n")
    channels = spec.get("imex") if imex is None else imex
    if channels is not None:
        os.makedirs(f"{root}/dev/nvidia-caps-imex-channels", exist_ok=True)
        for i in range(channels):
            write_file(f"{root}/dev/nvidia-caps-imex-channels/channel{i}", "")
    if stack is not None:
        s = STACKS[stack]
        write_file(f"{root}/proc/sys/kernel/osrelease", f"{s['kernel']}\n")
        write_file(f"{root}/opt/amazon/efa_installed_packages",
               f"# EFA installer version: {s['installer']}\n# Packages installed:\n"
               f"ibacm_50.0-1_amd64 libfabric-aws-bin_{s['libfabric']}_amd64\n")
        write_file(f"{root}/opt/amazon/ofi-nccl/lib/libnccl-net.so",
               b"\x7fELF" + b"\0" * 4096 + f"Initializing aws-ofi-nccl {s['plugin']}\0".encode() + b"\0" * 64)
        write_file(f"{root}/opt/amazon/efa/lib/libfabric.so.1", b"\x7fELF")
        write_file(f"{root}/opt/amazon/efa/lib/pkgconfig/libfabric.pc", f"Name: libfabric\nVersion: {s['libfabric']}\n")
        write_file(f"{root}/usr/local/lib/libnccl.so.{s['nccl']}", b"\x7fELF")
    return HostRoots(root=root, python_metadata=False)
