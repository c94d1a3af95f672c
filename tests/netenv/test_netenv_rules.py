"""Network-environment rules against fake hosts: one sysfs/proc/lib tree per instance family
and plugin stack, detection with every socket forbidden, user values always winning."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from typing import Any

import pytest

from hpresil._parse import parse_bool
from hpresil.errors import ConfigError
from hpresil.netenv import FAMILIES, RULES, NetEnvConfig, detect, make_plan
from hpresil.netenv.api import Decision, Facts, Plan
from hpresil.netenv.plan import condition_holds, ifname_selects
from hpresil.netenv.env import LAUNCHER_DEFAULTS, apply_launcher_env, worker_defaults

from fake_hosts import HOSTS, build_host, write_file

GPU_EFA = [f for f, spec in FAMILIES.items() if spec.accelerator == "nvidia"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection must not touch the network: every way of opening a connection fails."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access during net-env detection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def plan_for(tmp_path: Any, family: str, stack: str | None = "new", env: dict[str, str] | None = None,
             mode: str = "auto", **host: Any) -> Plan:
    roots = build_host(tmp_path / "host", family, stack, **host)
    return make_plan(NetEnvConfig(mode=mode), dict(env or {}), roots, log_dir="/logs/job")


def by_var(plan: Plan, action: str | None = None) -> dict[str, Decision]:
    return {d.variable: d for d in plan.decisions if d.variable and (action is None or d.action == action)}


def rules_hit(plan: Plan) -> set[str]:
    return {d.rule for d in plan.decisions if d.action == "warn"}


@pytest.mark.parametrize("family", sorted(HOSTS))
def test_detects_each_family_from_files_only(tmp_path, family: str) -> None:
    roots = build_host(tmp_path, family, "new")
    facts = detect(NetEnvConfig(), roots, environ={})
    spec = HOSTS[family]
    assert facts.family == family
    assert facts.instance_type == (spec["product"] if family != "unknown" else None)
    assert facts.instance_source == ("dmi" if family != "unknown" else "none")
    assert len(facts.efa_devices) == spec["efa"] and "mlx5_0" not in facts.efa_devices
    assert facts.efa_expected == FAMILIES[family].efa_expected.get(spec["product"]) if family in FAMILIES else True
    assert (facts.gpu_count, facts.nvswitch_count, facts.gpu_model) == (spec["gpus"], spec["nvswitches"], spec["gpu_model"])
    assert facts.plugin_version == "1.9.1" and facts.plugin_path.endswith("opt/amazon/ofi-nccl/lib/libnccl-net.so")
    assert (facts.libfabric_version, facts.efa_installer_version, facts.nccl_version) == ("1.22.0amzn4.0", "1.38.0", "2.21.5")
    assert facts.kernel == "6.8.0-1015-aws" and facts.interfaces == tuple(sorted(spec["interfaces"]))
    assert facts.imex_channels == spec.get("imex") and facts.container is None and facts.schedulers == ()
    json.dumps(facts.to_json_obj())


def test_detects_markers_and_plugin_named_by_nccl_net_plugin(tmp_path) -> None:
    roots = build_host(tmp_path, "p5", None)
    write_file(f"{tmp_path}/.dockerenv", "")
    write_file(f"{tmp_path}/opt/ml/config/resource_config.json", "{}")
    lib = tmp_path / "mylibs"
    write_file(f"{lib}/libnccl-net-ofi.so", b"xx aws-ofi-nccl 1.13.2-aws\0")
    env = {"LD_LIBRARY_PATH": str(lib), "NCCL_NET_PLUGIN": "ofi", "SLURM_JOB_ID": "7"}
    facts = detect(NetEnvConfig(), roots, environ=env)
    assert facts.plugin_path == f"{lib}/libnccl-net-ofi.so" and facts.plugin_version == "1.13.2"
    assert facts.container == "docker" and facts.schedulers == ("slurm", "hyperpod")
    assert facts.libfabric_path is None and facts.kernel is None


def test_imds_only_when_enabled_and_bounded(tmp_path) -> None:
    roots = build_host(tmp_path, "unknown", "new")
    assert detect(NetEnvConfig(), roots, {}).instance_source == "none"  # the socket guard did not fire
    facts = detect(NetEnvConfig(imds=True, imds_timeout=timedelta(milliseconds=50)), roots, {})
    assert facts.instance_type is None and any("IMDSv2" in n for n in facts.notes)
    with pytest.raises(ConfigError, match="imds_timeout"):
        NetEnvConfig(imds_timeout=timedelta(seconds=5))


@pytest.mark.parametrize("family", GPU_EFA)
def test_new_stack_leaves_tuning_to_the_plugin(tmp_path, family: str) -> None:
    plan = plan_for(tmp_path, family, "new")
    left, sets = by_var(plan, "leave"), by_var(plan, "set")
    assert {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE", "NCCL_PROTO", "NCCL_BUFFSIZE"} <= set(left)
    assert left["FI_PROVIDER"].value == "efa"
    assert not {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE", "NCCL_PROTO"} & set(sets)
    assert sets["FI_EFA_USE_HUGE_PAGE"].value == "0" and sets["NCCL_SOCKET_IFNAME"].value == "^lo,docker,veth"
    assert sets["TORCH_FR_DUMP_TEMP_FILE"].value == "/logs/job/flight_recorder/nccl_trace_rank_"
    assert "FI_EFA_SET_CUDA_SYNC_MEMOPS" not in sets
    assert plan.warnings == []


@pytest.mark.parametrize("family", GPU_EFA)
def test_old_stack_gets_the_values_the_plugin_would_set(tmp_path, family: str) -> None:
    plan = plan_for(tmp_path, family, "old")
    sets = {k: d.value for k, d in by_var(plan, "set").items()}
    assert sets["FI_PROVIDER"] == "efa" and sets["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert sets["FI_EFA_FORK_SAFE"] == "1"  # kernel 5.10: no copy-on-fork of pinned memory
    # efa-installer 1.26 with NCCL 2.19: memory registration needs this
    assert sets["FI_EFA_SET_CUDA_SYNC_MEMOPS"] == "0"
    assert "NCCL_PROTO" not in sets  # plugin 1.6 no longer needs simple
    assert not by_var(plan, "leave")


@pytest.mark.parametrize("family,proto", [("p4d", "simple"), ("p5e", "simple"), ("p5en", None), ("p6-b200", None)])
def test_legacy_plugin_on_p4_p5_forces_simple(tmp_path, family: str, proto: str | None) -> None:
    plan = plan_for(tmp_path, family, "legacy")
    assert getattr(by_var(plan, "set").get("NCCL_PROTO"), "value", None) == proto
    assert "FI_EFA_FORK_SAFE" in by_var(plan, "set")


def test_plugin_1_7_needs_libfabric_1_18_to_tune_itself(tmp_path) -> None:
    plan = plan_for(tmp_path, "p5", "plugin17-oldfabric")
    sets = by_var(plan, "set")
    assert sets["FI_PROVIDER"].value == "efa" and sets["FI_EFA_USE_DEVICE_RDMA"].value == "1"
    assert "FI_EFA_FORK_SAFE" not in sets  # kernel 5.15 is fork-safe


@pytest.mark.parametrize("family", ["trn1", "trn2"])
def test_trainium_gets_neuron_settings_and_no_nccl_ones(tmp_path, family: str) -> None:
    plan = plan_for(tmp_path, family, "new")
    sets = {k: d.value for k, d in by_var(plan, "set").items() if d.scope == "net"}
    assert sets == {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}
    assert plan.warnings == []


def test_unknown_host_gets_only_hpresils_own_settings(tmp_path) -> None:
    plan = plan_for(tmp_path, "unknown", "new", env={"NCCL_ALGO": "Ring"})
    assert {d.scope for d in plan.decisions if d.action == "set"} == {"launcher", "workers"}
    assert rules_hit(plan) == {"nccl-algo-forced"}


def test_preset_uses_the_family_without_reading_the_instance_type(tmp_path) -> None:
    plan = plan_for(tmp_path, "unknown", "new", mode="p5")
    assert plan.facts.family == "p5" and plan.facts.instance_source == "preset" and plan.facts.efa_expected == 32
    assert "FI_EFA_USE_HUGE_PAGE" in by_var(plan, "set")
    assert rules_hit(plan) == {"efa-missing"}


def test_user_values_always_win(tmp_path) -> None:
    user = {"FI_PROVIDER": "efa", "FI_EFA_USE_HUGE_PAGE": "1", "NCCL_SOCKET_IFNAME": "enp", "FI_EFA_FORK_SAFE": "0",
            "TORCH_FR_BUFFER_SIZE": "50", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    plan = plan_for(tmp_path, "p5", "old", env=user)
    kept = by_var(plan, "keep")
    assert set(user) <= set(kept) and not set(user) & set(by_var(plan, "set"))
    assert kept["NCCL_SOCKET_IFNAME"].value == "^lo,docker,veth" and kept["NCCL_SOCKET_IFNAME"].current == "enp"
    env = dict(user)
    changes = apply_launcher_env(env, plan)
    assert {k: env[k] for k in user} == user
    assert {c.name for c in changes} == {"FI_EFA_USE_DEVICE_RDMA", "FI_EFA_SET_CUDA_SYNC_MEMOPS"}
    assert all(c.old is None and c.reason for c in changes)
    out, worker_changes = worker_defaults("/logs/job", env)
    assert "TORCH_FR_BUFFER_SIZE" not in out and out["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert {c.name for c in worker_changes} == set(out)


def test_harmful_user_values_are_warned_not_changed(tmp_path) -> None:
    env = {"NCCL_ALGO": "Ring", "NCCL_PROTO": "simple", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
           "RDMAV_FORK_SAFE": "1", "NCCL_MIN_CHANNELS": "32", "FI_PROVIDER": "tcp", "FI_EFA_USE_HUGE_PAGE": "1",
           "TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "NCCL_BUFFSIZE": "8388608"}
    plan = plan_for(tmp_path, "p5", "new", env=env)
    assert rules_hit(plan) == {"nccl-algo-forced", "async-error-handling", "rdmav-fork-safe", "nccl-min-channels",
                               "fi-provider-not-efa", "fi-huge-page-on", "fr-disabled-nccl"}
    kept = by_var(plan, "keep")
    assert kept["NCCL_PROTO"].severity == "warning" and "overrides the plugin" in kept["NCCL_PROTO"].reason
    assert kept["NCCL_BUFFSIZE"].severity == "info" and "redundant" in kept["NCCL_BUFFSIZE"].reason
    assert kept["FI_PROVIDER"].severity == "info"  # the plugin-leave rule; the warning comes from fi-provider-not-efa
    assert all(d.source for d in plan.decisions) and plan.errors == []
    before = dict(env)
    apply_launcher_env(env, plan)
    assert {k: env[k] for k in before} == before
    # older stack: NCCL_PROTO is a forced debugging variable, not a plugin override
    old = plan_for(tmp_path / "old", "p5", "old", env={"NCCL_PROTO": "LL128"})
    assert "nccl-proto-forced" in rules_hit(old)


def test_gb200_mnnvl(tmp_path) -> None:
    ok = plan_for(tmp_path / "a", "p6e-gb200", env={"NCCL_MNNVL_ENABLE": "1"})
    assert ok.errors == [] and ok.warnings == []
    cumem = plan_for(tmp_path / "b", "p6e-gb200", env={"NCCL_CUMEM_ENABLE": "0"})
    assert rules_hit(cumem) == {"mnnvl-cumem-off"} and cumem.errors == []
    forced = plan_for(tmp_path / "c", "p6e-gb200", env={"NCCL_MNNVL_ENABLE": "1"}, imex=0)
    assert [d.rule for d in forced.errors] == ["mnnvl-forced-no-imex"]
    auto = plan_for(tmp_path / "d", "p6e-gb200", imex=0)
    assert rules_hit(auto) == {"mnnvl-no-imex"} and auto.errors == []
    # the same variables mean nothing on a p5
    assert plan_for(tmp_path / "e", "p5", env={"NCCL_MNNVL_ENABLE": "1", "NCCL_CUMEM_ENABLE": "0"}).warnings == []


def test_efa_count_and_missing_plugin(tmp_path) -> None:
    assert rules_hit(plan_for(tmp_path / "a", "p5", efa=31)) == {"efa-short"}
    assert rules_hit(plan_for(tmp_path / "b", "p5", efa=0)) == {"efa-missing"}
    assert rules_hit(plan_for(tmp_path / "c", "p6-b300", efa=1)) == set()  # count unknown: not checked
    assert rules_hit(plan_for(tmp_path / "d", "p5", stack=None)) == {"plugin-missing"}


def test_socket_ifname_matching_nothing_is_an_error(tmp_path) -> None:
    plan = plan_for(tmp_path / "a", "p5", env={"NCCL_SOCKET_IFNAME": "ens5"})
    assert [d.rule for d in plan.errors] == ["nccl-socket-ifname-none"]
    assert plan_for(tmp_path / "b", "unknown", env={"NCCL_SOCKET_IFNAME": "=eth0"}).errors == []
    # hpresil never sets an exclusion list that would leave no interface
    only_lo = plan_for(tmp_path / "c", "p5", interfaces=["lo", "docker0"])
    assert "NCCL_SOCKET_IFNAME" not in by_var(only_lo, "set")


def test_ifname_selects_follows_nccls_syntax() -> None:
    ifs = ["lo", "docker0", "veth12", "eth0", "eth10", "ens5"]
    assert ifname_selects("^lo,docker,veth", ifs) == ["eth0", "eth10", "ens5"]
    assert ifname_selects("eth", ifs) == ["eth0", "eth10"]
    assert ifname_selects("=eth1", ifs) == [] and ifname_selects("=eth10", ifs) == ["eth10"]
    assert ifname_selects("^=eth0", ifs) == ["lo", "docker0", "veth12", "eth10", "ens5"]


def test_net_env_off_applies_and_checks_nothing(tmp_path) -> None:
    roots = build_host(tmp_path, "p5", "old")
    env = {"NCCL_ALGO": "Ring"}
    plan = make_plan(NetEnvConfig(mode="off"), env, roots)
    assert plan.facts is None and plan.decisions == ()
    changes = apply_launcher_env(env, plan)
    assert [c.name for c in changes] == [name for name, _, _ in LAUNCHER_DEFAULTS]
    assert not [k for k in env if k.startswith(("FI_", "NCCL_")) and k != "NCCL_ALGO"]
    assert apply_launcher_env({}, None)[0].name == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def test_rule_table_is_complete_data() -> None:
    families = set(FAMILIES) | {"*", "unknown"}
    for rule in RULES:
        assert rule.source and rule.reason and set(rule.families) <= families, rule.id
        for cond in rule.when:  # every condition parses and evaluates on an empty host
            condition_holds(cond, Facts(), {}, rule)
    assert len({r.id for r in RULES}) == len(RULES)
    assert {"p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6-b300", "p6e-gb200", "trn1", "trn2"} == set(FAMILIES)
    with pytest.raises(ConfigError, match="use one of off, auto, p4d"):
        NetEnvConfig(mode="p9")


def test_parse_bool_is_shared() -> None:
    assert parse_bool(" On", "X") and not parse_bool("", "X") and not parse_bool("no", "X")
    with pytest.raises(ConfigError, match="X='maybe' is not a boolean; set it to 1 or 0"):
        parse_bool("maybe", "X")


def test_hpresil_run_rejects_an_unknown_preset() -> None:
    from hpresil.run.cli import main

    with pytest.raises(ConfigError, match="--net-env 'p9'"):
        main(["--standalone", "--net-env", "p9", "train.py"])
