"""``hpresil-run doctor``: text and JSON reports of fake hosts, exit status on a breaking misconfiguration."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from _launch import base_env
from hpresil.doctor import main
from hpresil.netenv import RULES
from fake_hosts import build_host


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor reads os.environ: start from none of the variables the rules look at."""
    for name in {r.variable for r in RULES if r.variable} | {"HPRESIL_NET_ENV", "HPRESIL_NET_ENV_IMDS",
                                                             "LD_LIBRARY_PATH", "NCCL_NET_PLUGIN"}:
        monkeypatch.delenv(name, raising=False)


def doctor(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_text_report_explains_detection_settings_and_warnings(tmp_path, monkeypatch) -> None:
    build_host(tmp_path, "p5", "new")
    monkeypatch.setenv("NCCL_ALGO", "Ring")
    monkeypatch.setenv("FI_EFA_USE_HUGE_PAGE", "1")
    code, text = doctor("--root", str(tmp_path), "--log-dir", "/logs/j")
    assert code == 0, text
    assert "p5.48xlarge (dmi) -> family p5" in text and "32 device(s) (this instance type has 32)" in text
    assert "1.9.1 at " in text and "8 x NVIDIA H100 80GB HBM3, 4 NVSwitch(es)" in text
    assert "TORCH_FR_DUMP_TEMP_FILE=/logs/j/flight_recorder/nccl_trace_rank_" in text
    assert "Left to the aws-ofi-nccl plugin" in text and "FI_PROVIDER (plugin sets efa)" in text
    assert "Kept: your values win" in text and "FI_EFA_USE_HUGE_PAGE=1" in text
    assert "WARNING NCCL_ALGO=Ring" in text and "source: https://docs.nvidia.com" in text
    assert "0 error(s), 2 warning(s)" in text


def test_json_report(tmp_path) -> None:
    build_host(tmp_path, "p4d", "old")
    code, text = doctor("--json", "--root", str(tmp_path))
    report = json.loads(text)
    assert code == 0 and report["mode"] == "auto" and report["errors"] == 0
    assert report["facts"]["family"] == "p4d" and report["facts"]["plugin_version"] == "1.6.0"
    sets = {d["variable"]: d["value"] for d in report["decisions"] if d["action"] == "set"}
    assert sets["FI_PROVIDER"] == "efa" and sets["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert all(d["source"] and d["reason"] for d in report["decisions"])


def test_breaking_misconfiguration_exits_1(tmp_path, monkeypatch) -> None:
    build_host(tmp_path, "p6e-gb200", "new", imex=0)
    monkeypatch.setenv("NCCL_MNNVL_ENABLE", "1")
    code, text = doctor("--root", str(tmp_path))
    assert code == 1 and "ERROR NCCL_MNNVL_ENABLE=1" in text and "1 error(s)" in text
    code, text = doctor("--json", "--root", str(tmp_path))
    assert code == 1 and json.loads(text)["errors"] == 1


def test_off_and_presets(tmp_path) -> None:
    build_host(tmp_path, "unknown", "new")
    code, text = doctor("--net-env", "off", "--root", str(tmp_path))
    assert code == 0 and "detects, sets and checks nothing" in text
    code, text = doctor("--json", "--net-env", "trn2", "--root", str(tmp_path))
    assert code == 0 and json.loads(text)["facts"]["instance_source"] == "preset"
    assert doctor("--net-env", "p9")[0] == 2


def test_hpresil_run_doctor_dispatches_before_torchs_parser(tmp_path) -> None:
    build_host(tmp_path, "p5en", "new")
    proc = subprocess.run([sys.executable, "-m", "hpresil.run", "doctor", "--json", "--root", str(tmp_path)],
                          env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["facts"]["family"] == "p5en"
