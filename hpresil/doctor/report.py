"""The doctor's command line and its text rendering."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence, TextIO

from hpresil._parse import parse_bool
from hpresil.errors import ConfigError
from hpresil.netenv.api import Decision, Facts, HostRoots, NetEnvConfig, Plan
from hpresil.netenv.plan import make_plan
from hpresil.netenv.families import FAMILIES

__all__ = ["main", "build_parser", "render_text"]


def build_parser() -> argparse.ArgumentParser:
    """The doctor's options."""
    parser = argparse.ArgumentParser(
        prog="hpresil-run doctor",
        description="Explain the network environment hpresil-run would give the workers: what was detected, "
                    "what will be set and why, what is left to the aws-ofi-nccl plugin, and every warning. "
                    "Exits 1 when a finding will break the job.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--net-env", default=os.environ.get("HPRESIL_NET_ENV", "auto"),
                        help=f"off, auto or a family preset ({', '.join(FAMILIES)}) [env: HPRESIL_NET_ENV]")
    parser.add_argument("--imds", action=argparse.BooleanOptionalAction, default=None,
                        help="ask IMDSv2 (0.2 s timeout) when the DMI product name gives no instance type "
                             "[env: HPRESIL_NET_ENV_IMDS; default off: no network call]")
    parser.add_argument("--root", default="/", help="look for /sys, /proc, /dev, /opt under this directory "
                        "(e.g. a host's root mounted into a container)")
    parser.add_argument("--lib-dir", action="append", default=None, metavar="DIR",
                        help="search only these directories for the NCCL plugin, libfabric and NCCL "
                             "(repeatable; default: $LD_LIBRARY_PATH and the usual install directories)")
    parser.add_argument("--log-dir", default=None, help="the job's log dir, to show the flight-recorder path")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the source of every line")
    return parser


def _facts_lines(f: Facts) -> list[tuple[str, str]]:
    efa = f"{len(f.efa_devices)} device(s)"
    if f.efa_expected is not None:
        efa += f" (this instance type has {f.efa_expected})"
    gpus = "none on the PCI bus" if not f.gpu_count else f"{f.gpu_count} x {f.gpu_model or 'NVIDIA GPU'}"
    if f.nvswitch_count:
        gpus += f", {f.nvswitch_count} NVSwitch(es)"
    rows = [
        ("instance", f"{f.instance_type or 'unknown'} ({f.instance_source}) -> family {f.family}"),
        ("EFA", efa),
        ("aws-ofi-nccl", f"{f.plugin_version or 'version unknown'} at {f.plugin_path}" if f.plugin_path else "not found"),
        ("libfabric", f"{f.libfabric_version or 'version unknown'}"
                      + (f" at {f.libfabric_path}" if f.libfabric_path else "")),
        ("EFA installer", f.efa_installer_version or "unknown"),
        ("NCCL", f.nccl_version or "unknown"),
        ("kernel", f.kernel or "unknown"),
        ("GPUs", gpus),
        ("IMEX channels", "no channel directory" if f.imex_channels is None else str(f.imex_channels)),
        ("interfaces", ", ".join(f.interfaces) if f.interfaces is not None else "unknown"),
        ("container", f.container or "no (host)"),
        ("schedulers", ", ".join(f.schedulers) or "none"),
    ]
    rows += [("note", n) for n in f.notes]
    return rows


def _line(d: Decision, verbose: bool) -> str:
    if d.action == "set":
        text = f"{d.variable}={d.value}  ({d.scope}) {d.reason}"
    elif d.action == "keep":
        text = f"{d.variable}={d.current}  {d.reason}"
    elif d.action == "leave":
        text = f"{d.variable}" + (f" (plugin sets {d.value})" if d.value else "") + f"  {d.reason}"
    else:
        what = f"{d.variable}={d.current}" if d.variable else "host"
        text = f"{d.severity.upper()} {what}: {d.reason}"
    text += f"  [{d.rule}]"
    if verbose or d.severity != "info":
        text += f"\n      source: {d.source}"
    return "  " + text


def render_text(plan: Plan, out: TextIO, verbose: bool = False) -> None:
    """Writes the plan for people."""
    print(f"hpresil doctor (--net-env {plan.mode})", file=out)
    if plan.facts is None:
        print("\n--net-env off: hpresil-run detects, sets and checks nothing network-related.", file=out)
        return
    print(f"\nDetected in {plan.facts.elapsed_s * 1e3:.1f} ms (no network call unless --imds)", file=out)
    for key, value in _facts_lines(plan.facts):
        print(f"  {key:<14}{value}", file=out)
    sections = (
        ("hpresil-run will set (your environment lacks them)", lambda d: d.action == "set"),
        ("Kept: your values win", lambda d: d.action == "keep"),
        ("Left to the aws-ofi-nccl plugin", lambda d: d.action == "leave"),
        ("Findings", lambda d: d.action == "warn"),
    )
    for title, wanted in sections:
        rows = [d for d in plan.decisions if wanted(d)]
        if rows:
            print(f"\n{title}", file=out)
            for d in rows:
                print(_line(d, verbose), file=out)
    errors, warnings = len(plan.errors), len(plan.warnings) - len(plan.errors)
    verdict = "the job will fail: fix the errors above" if errors else "nothing will break the job"
    print(f"\n{errors} error(s), {warnings} warning(s): {verdict}", file=out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs the doctor; returns the exit status (1 when a finding will break the job)."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        imds = args.imds
        if imds is None:
            imds = parse_bool(os.environ.get("HPRESIL_NET_ENV_IMDS", "0"), "HPRESIL_NET_ENV_IMDS")
        config = NetEnvConfig(mode=args.net_env, imds=imds)
    except ConfigError as exc:
        print(f"hpresil-run doctor: error: {exc}", file=sys.stderr)
        return 2
    roots = HostRoots(root=args.root, lib_dirs=None if args.lib_dir is None else tuple(args.lib_dir))
    plan = make_plan(config, os.environ, roots, log_dir=args.log_dir)
    if args.json:
        json.dump(plan.to_json_obj(), out, indent=2)
        out.write("\n")
    else:
        render_text(plan, out, verbose=args.verbose)
    return 1 if plan.errors else 0
