"""The rule table: instance families and what to set, leave or warn about.

Data, not branches: :func:`hpresil.netenv.plan.evaluate` walks :data:`RULES` in
order. Every rule names its source. Conditions (``when``) are documented in
:mod:`hpresil.netenv.plan`.

The central fact (aws-ofi-nccl ``platform-aws.c(pp)``, the EFA cheatsheet): from
aws-ofi-nccl 1.7 with libfabric 1.18 the plugin sets FI_PROVIDER, the fork-safety
variable, NCCL_PROTO where needed, NCCL_TOPO_FILE, NCCL_TUNER_PLUGIN and (newer
releases) NCCL_BUFFSIZE / NCCL_P2P_NET_CHUNKSIZE per instance type, and never
overrides a value that is already set. So on such stacks hpresil leaves those to
the plugin and reports user values that shadow the plugin's; on older stacks it
sets the values the cheatsheet's presets give.
"""

from __future__ import annotations

from hpresil.netenv.api import Rule
from hpresil.netenv.families import SOURCES

__all__ = ["RULES"]


_GPU_EFA = ("p4d", "p4de", "p5", "p5e", "p5en", "p6-b200", "p6-b300", "p6e-gb200")
_P4_P5 = ("p4d", "p4de", "p5", "p5e")
_TRN = ("trn1", "trn2")
_S = SOURCES

#: The rule table, evaluated in this order.
RULES: tuple[Rule, ...] = (
    # ---- always applied: hpresil's own needs ---------------------------------------------------
    Rule(id="rdzv-store-per-attempt", variable="TORCH_DISABLE_SHARE_RDZV_TCP_STORE", action="set", value="1",
         scope="launcher", source=_S["rdzv_store"],
         reason="with the c10d rendezvous's shared TCPStore, restarted workers can read the previous attempt's "
                "gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712); a fresh store per attempt avoids it"),
    Rule(id="fr-buffer", variable="TORCH_FR_BUFFER_SIZE", action="set", value="2000", scope="workers",
         source=_S["torch_fr"],
         reason="keep the last 2000 collectives per process group so a hang dump shows which collective each rank "
                "is in (torch flight recorder; gloo and NCCL)"),
    Rule(id="fr-buffer-nccl", variable="TORCH_NCCL_TRACE_BUFFER_SIZE", action="set", value="2000", scope="workers",
         when=("!torch_reads_fr_name",), source=_S["torch_fr"],
         reason="the same for torch releases before 2.7, which read only the NCCL name (2.7+ warns it is deprecated)"),
    Rule(id="fr-dump-on-timeout", variable="TORCH_NCCL_DUMP_ON_TIMEOUT", action="set", value="1", scope="workers",
         source=_S["torch_nccl_env"],
         reason="NCCL's watchdog dumps the flight recorder when a collective times out"),
    Rule(id="fr-dump-path", variable="TORCH_FR_DUMP_TEMP_FILE", action="set",
         value="{log_dir}/flight_recorder/nccl_trace_rank_", scope="workers", source=_S["torch_fr"],
         reason="where NCCL's own dumps go: next to hpresil's, in the job log dir"),
    # ---- torch-side checks -----------------------------------------------------------------------
    Rule(id="async-error-handling", variable="TORCH_NCCL_ASYNC_ERROR_HANDLING", action="warn", bad_values=("1",),
         severity="warning", source=_S["torch_nccl_env"],
         reason="1 aborts the NCCL communicators before tearing the process down, racing the flight-recorder dump "
                "that hang diagnosis needs; the default 3 tears down without the abort: unset it"),
    Rule(id="fr-disabled", variable="TORCH_FR_BUFFER_SIZE", action="warn", bad_values=("0",), severity="warning",
         source=_S["torch_fr"],
         reason="the flight recorder is off, so a hang dump cannot show which collective each rank is in"),
    Rule(id="fr-disabled-nccl", variable="TORCH_NCCL_TRACE_BUFFER_SIZE", action="warn", bad_values=("0",),
         severity="warning", source=_S["torch_fr"],
         reason="the flight recorder is off, so TORCH_NCCL_DUMP_ON_TIMEOUT has nothing to dump"),
    # ---- host checks -----------------------------------------------------------------------------
    Rule(id="efa-missing", variable=None, action="warn", families=_GPU_EFA + _TRN, when=("!efa",),
         severity="warning", source=_S["plugin_readme"],
         reason="no EFA device under /sys/class/infiniband: collectives between nodes fall back to TCP sockets "
                "(check the EFA driver, the security group and, in a container, the EFA device plugin)"),
    Rule(id="efa-short", variable=None, action="warn", families=_GPU_EFA + _TRN, when=("efa", "efa_short"),
         severity="warning", source="https://docs.aws.amazon.com/ec2/latest/instancetypes/ac.html",
         reason="fewer EFA devices than this instance type has: a network card is down or not attached, "
                "so inter-node bandwidth is reduced"),
    Rule(id="plugin-missing", variable=None, action="warn", families=_GPU_EFA, when=("efa", "!plugin_found"),
         severity="warning", source=_S["plugin_readme"],
         reason="EFA is present but no aws-ofi-nccl plugin (libnccl-net*.so) is on the library path: NCCL uses "
                "TCP sockets instead of EFA"),
    # ---- libfabric / EFA -------------------------------------------------------------------------
    Rule(id="fi-provider", variable="FI_PROVIDER", action="set", value="efa", families=_GPU_EFA,
         when=("!plugin_tunes",), source=_S["cheatsheet"],
         reason="older aws-ofi-nccl/libfabric stacks may pick another libfabric provider than EFA"),
    Rule(id="fi-provider-plugin", variable="FI_PROVIDER", action="leave", plugin_value="efa", families=_GPU_EFA,
         when=("plugin_tunes",), source=_S["plugin"],
         reason="aws-ofi-nccl >= 1.7 with libfabric >= 1.18 selects the EFA provider itself"),
    Rule(id="fi-provider-not-efa", variable="FI_PROVIDER", action="warn", bad_values=("*",), ok_values=("efa",),
         families=_GPU_EFA + _TRN, when=("efa",), severity="warning", source=_S["plugin"],
         reason="a libfabric provider other than efa bypasses the EFA devices (e.g. tcp): slow inter-node collectives"),
    Rule(id="fi-device-rdma", variable="FI_EFA_USE_DEVICE_RDMA", action="set", value="1", families=_GPU_EFA,
         when=("!plugin_tunes",), source=_S["cheatsheet"],
         reason="before aws-ofi-nccl 1.7 / libfabric 1.18, GPUDirect RDMA over EFA had to be enabled explicitly"),
    Rule(id="fi-device-rdma-plugin", variable="FI_EFA_USE_DEVICE_RDMA", action="leave", plugin_value="1",
         families=_GPU_EFA, when=("plugin_tunes",), source=_S["cheatsheet"],
         reason="not needed with libfabric >= 1.18 and aws-ofi-nccl >= 1.7 (harmless on p4/p5, but obsolete)"),
    Rule(id="fi-fork-safe", variable="FI_EFA_FORK_SAFE", action="set", value="1", families=_GPU_EFA,
         when=("!plugin_tunes", "kernel<5.15"), source=_S["plugin"],
         reason="kernels before 5.15 lack copy-on-fork of pinned memory: without it, fork() in DataLoader "
                "workers can corrupt registered buffers or abort the process"),
    Rule(id="fi-fork-safe-plugin", variable="FI_EFA_FORK_SAFE", action="leave", plugin_value="1", families=_GPU_EFA,
         when=("plugin_tunes",), source=_S["plugin"],
         reason="the plugin sets it when needed; kernels >= 5.15 are fork-safe without it"),
    Rule(id="rdmav-fork-safe", variable="RDMAV_FORK_SAFE", action="warn", bad_values=("*",),
         families=_GPU_EFA + _TRN, severity="warning", source=_S["cheatsheet"],
         reason="an rdma-core variable that behaves differently from FI_EFA_FORK_SAFE and can break things on "
                "newer kernels: unset it"),
    Rule(id="fi-huge-page", variable="FI_EFA_USE_HUGE_PAGE", action="set", value="0", families=_GPU_EFA,
         source=_S["cheatsheet"],
         reason="with huge pages, fork() in multi-process DataLoaders can fail with ENOMEM once huge pages run "
                "out; the cost is a minor slowdown"),
    Rule(id="fi-huge-page-on", variable="FI_EFA_USE_HUGE_PAGE", action="warn", bad_values=("1",),
         families=_GPU_EFA, severity="warning", source=_S["cheatsheet"],
         reason="fork-heavy DataLoaders can fail with 'OSError: Cannot allocate memory' when huge pages run out"),
    Rule(id="fi-cuda-sync-memops", variable="FI_EFA_SET_CUDA_SYNC_MEMOPS", action="set", value="0",
         families=_GPU_EFA, when=("efa_installer<1.29.1", "nccl>=2.19"), source=_S["cheatsheet"],
         reason="efa-installer < 1.29.1 with NCCL >= 2.19 fails to register memory ('Unable to register memory "
                "(type = 2)') unless this is 0"),
    # ---- NCCL ------------------------------------------------------------------------------------
    Rule(id="nccl-proto-legacy", variable="NCCL_PROTO", action="set", value="simple", families=_P4_P5,
         when=("plugin<1.6",), source=_S["cheatsheet"],
         reason="aws-ofi-nccl <= 1.5 on p4/p5 needs the simple protocol"),
    Rule(id="nccl-proto-plugin", variable="NCCL_PROTO", action="leave", families=_GPU_EFA, when=("plugin_tunes",),
         severity="warning", source=_S["plugin"] + " ; " + _S["nccl_env"],
         reason="the plugin restricts protocols itself where needed; a stale NCCL_PROTO (e.g. simple from old "
                "guides) overrides NCCL's choice and can cost bandwidth"),
    Rule(id="nccl-proto-forced", variable="NCCL_PROTO", action="warn", bad_values=("*",),
         when=("!plugin_tunes", "!plugin<1.6"), severity="warning", source=_S["nccl_env"],
         reason="a debugging variable (NCCL docs: not for production; may cause sub-optimal behaviour, crashes or "
                "hangs): unset it unless it works around a known issue"),
    Rule(id="nccl-algo-forced", variable="NCCL_ALGO", action="warn", bad_values=("*",), severity="warning",
         source=_S["nccl_env"],
         reason="forcing an algorithm overrides NCCL's tuner and the plugin's; a debugging variable (NCCL docs: "
                "not for production)"),
    Rule(id="nccl-buffsize-plugin", variable="NCCL_BUFFSIZE", action="leave", plugin_value="8388608",
         families=_GPU_EFA, when=("plugin_tunes",), source=_S["plugin"] + " ; " + _S["cheatsheet"],
         reason="recent plugins set a tuned buffer size per instance type; leave it out"),
    Rule(id="nccl-p2p-chunk-plugin", variable="NCCL_P2P_NET_CHUNKSIZE", action="leave", plugin_value="524288",
         families=_GPU_EFA, when=("plugin_tunes",), source=_S["plugin"],
         reason="recent plugins set a tuned chunk size per instance type"),
    Rule(id="nccl-topo-plugin", variable="NCCL_TOPO_FILE", action="leave", families=_GPU_EFA,
         when=("plugin_tunes",), source=_S["plugin"],
         reason="the plugin ships and sets the topology file of the instance type when it has one"),
    Rule(id="nccl-tuner-plugin", variable="NCCL_TUNER_PLUGIN", action="leave", families=_GPU_EFA,
         when=("plugin_tunes",), source=_S["plugin"],
         reason="the plugin points NCCL at its own tuner"),
    Rule(id="nccl-min-channels", variable="NCCL_MIN_CHANNELS", action="warn", bad_values=("*",),
         families=_GPU_EFA, severity="warning", source=_S["cheatsheet"],
         reason="more channels than needed split messages smaller and starve EFA; leave it out"),
    Rule(id="nccl-socket-tuning", variable="NCCL_SOCKET_NTHREADS", action="warn", bad_values=("*",),
         families=_GPU_EFA, when=("efa",), source=_S["cheatsheet"],
         reason="tunes NCCL's TCP socket transport, which EFA does not use"),
    Rule(id="nccl-nsocks", variable="NCCL_NSOCKS_PERTHREAD", action="warn", bad_values=("*",),
         families=_GPU_EFA, when=("efa",), source=_S["cheatsheet"],
         reason="tunes NCCL's TCP socket transport, which EFA does not use"),
    Rule(id="nccl-socket-ifname", variable="NCCL_SOCKET_IFNAME", action="set", value="^lo,docker,veth",
         families=_GPU_EFA, when=("value_matches_interface",), source=_S["nccl_env"],
         reason="keep NCCL's bootstrap and socket traffic off loopback, docker bridges and container veth pairs"),
    Rule(id="nccl-socket-ifname-none", variable="NCCL_SOCKET_IFNAME", action="warn", bad_values=("*",),
         when=("!user_value_matches_interface",), severity="error", source=_S["nccl_env"],
         reason="matches no network interface of this host (copied from another instance type?): NCCL fails at "
                "bootstrap with 'no socket interface found'"),
    # ---- GB200 NVL72: multi-node NVLink ----------------------------------------------------------
    Rule(id="mnnvl-cumem-off", variable="NCCL_CUMEM_ENABLE", action="warn", bad_values=("0",),
         families=("p6e-gb200",), severity="warning", source=_S["nccl_env"],
         reason="multi-node NVLink needs cuMem allocations: 0 silently turns MNNVL off and traffic between trays "
                "goes over EFA"),
    Rule(id="mnnvl-off", variable="NCCL_MNNVL_ENABLE", action="warn", bad_values=("0",), families=("p6e-gb200",),
         severity="warning", source=_S["nccl_env"],
         reason="turns multi-node NVLink off: traffic between trays of the NVL72 domain goes over EFA"),
    Rule(id="mnnvl-forced-no-imex", variable="NCCL_MNNVL_ENABLE", action="warn", bad_values=("1",),
         families=("p6e-gb200",), when=("imex_missing",), severity="error", source=_S["imex"],
         reason="MNNVL is forced but no IMEX channel exists under /dev/nvidia-caps-imex-channels: NCCL fails to "
                "create communicators (start the IMEX service / give the container a channel)"),
    Rule(id="mnnvl-no-imex", variable=None, action="warn", families=("p6e-gb200",),
         when=("imex_missing", "!$NCCL_MNNVL_ENABLE"), severity="warning", source=_S["imex"],
         reason="no IMEX channel under /dev/nvidia-caps-imex-channels: NCCL turns multi-node NVLink off and "
                "uses EFA between trays"),
    # ---- Trainium (Neuron) -----------------------------------------------------------------------
    Rule(id="trn-fi-provider", variable="FI_PROVIDER", action="set", value="efa", families=_TRN,
         source=_S["neuron"], reason="Neuron collectives run over libfabric's EFA provider"),
    Rule(id="trn-device-rdma", variable="FI_EFA_USE_DEVICE_RDMA", action="set", value="1", families=_TRN,
         source=_S["neuron"], reason="device RDMA between Trainium chips over EFA"),
    Rule(id="trn-fork-safe", variable="FI_EFA_FORK_SAFE", action="set", value="1", families=_TRN,
         source=_S["neuron"], reason="fork() in DataLoader workers must not corrupt registered buffers"),
)
