"""hpresil-run launches scripts in every torchrun form, restarts killed workers,
reports root causes, and runs the node runtime around the workers."""

from __future__ import annotations

import json
import os

import pytest

from _launch import SCRIPTS, base_env, events, free_port, hpresil_run, script
from hpresil.testing import fail_at, to_env

pytestmark = pytest.mark.slow


def _ranks(out_dir, n: int) -> list[dict]:
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(n)]


def test_standalone_runs_workers_with_runtime_env_and_events(tmp_path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--node-id", "nodeA",
                        script("report_env.py"), str(out), "--x", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    infos = _ranks(out, 2)
    assert [i["RANK"] for i in infos] == ["0", "1"] and infos[0]["WORLD_SIZE"] == "2"
    assert infos[0]["argv"] == ["--x", "1"]
    shm = infos[0]["HPRESIL_SHM_DIR"]
    assert infos[0]["shm_dir_exists"] and shm.startswith(str(tmp_path / "shm")) and shm.endswith("/nodeA")
    assert infos[1]["HPRESIL_EVENTS_FILE"] == str(logs / "events.jsonl")
    assert infos[0]["HPRESIL_ATTEMPT"] == "0" and infos[0]["HPRESIL_NODE_ID"] == "nodeA"
    assert not os.path.exists(shm), "shared memory must be cleaned at job end"
    evs = events(logs / "events.jsonl")
    names = [e["event"] for e in evs]
    assert names[0] == "runtime_start" and names[-1] == "runtime_stop"
    assert {"rendezvous", "workers_start", "workers_succeeded"} <= set(names)
    for e in evs:
        assert {"ts", "event", "node"} <= set(e) and e["node"] == "nodeA"
    start = next(e for e in evs if e["event"] == "workers_start")
    assert start["ranks"] == [0, 1] and len(start["pids"]) == 2 and start["world_size"] == 2


def test_keep_shm_keeps_the_directory(tmp_path) -> None:
    out = tmp_path / "out"
    proc = hpresil_run(["--standalone", "--keep-shm", script("report_env.py"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isdir(_ranks(out, 1)[0]["HPRESIL_SHM_DIR"])


@pytest.mark.parametrize("form", ["module", "no_python", "run_path", "c10d_endpoint", "static", "elastic_range"])
def test_launch_forms(tmp_path, form: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = base_env(tmp_path)
    port = str(free_port())
    if form == "module":
        env["PYTHONPATH"] = SCRIPTS + os.pathsep + env["PYTHONPATH"]
        args = ["--standalone", "--nproc-per-node", "2", "-m", "pkg_mod.entry", str(out)]
        expect = [out / "module_rank0", out / "module_rank1"]
    elif form == "no_python":
        args = ["--standalone", "--nproc-per-node", "2", "--no-python", script("no_python.sh"), str(out)]
        expect = [out / "sh_rank0", out / "sh_rank1"]
    elif form == "run_path":
        args = ["--standalone", "--nproc-per-node", "2", "--run-path", script("report_env.py"), str(out)]
        expect = [out / "rank0.json", out / "rank1.json"]
    elif form == "c10d_endpoint":
        args = ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job1", script("report_env.py"), str(out)]
        expect = [out / "rank0.json", out / "rank1.json"]
    elif form == "static":
        args = ["--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2", "--rdzv-backend", "static",
                "--master-addr", "127.0.0.1", "--master-port", port, script("report_env.py"), str(out)]
        expect = [out / "rank0.json", out / "rank1.json"]
    else:  # --nnodes MIN:MAX with a single agent
        env.update({"PET_NNODES": "1:2", "PET_NPROC_PER_NODE": "2", "PET_RDZV_BACKEND": "c10d",
                    "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": "job2",
                    "PET_RDZV_CONF": "last_call_timeout=1"})
        args = [script("report_env.py"), str(out)]
        expect = [out / "rank0.json", out / "rank1.json"]
    proc = hpresil_run(args, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in expect:
        assert path.exists(), f"{path} missing; stderr: {proc.stderr[-2000:]}"
    if form == "run_path":
        assert _ranks(out, 2)[0]["main_module"] == "__main__"
    if form == "static":
        assert _ranks(out, 2)[0]["MASTER_PORT"] == port


def test_log_dir_redirects_and_local_ranks_filter(tmp_path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "-r", "3",
                        "--local-ranks-filter", "1", script("report_env.py"), str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    stdouts = sorted(logs.rglob("stdout.log"))
    assert len(stdouts) == 2
    assert {p.read_text().strip() for p in stdouts} == {"rank 0 ok", "rank 1 ok"}
    assert "rank 0 ok" not in proc.stdout  # redirected, not on the console


def test_sigkilled_worker_is_restarted_within_max_restarts(tmp_path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = base_env(tmp_path, **to_env([fail_at(rank=1, step=3)]))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
                        "--log-dir", str(logs), script("crash_and_resume.py"), str(out), "6"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (out / "rank1.attempt0").read_text().split()
    assert first == ["0", "1", "2"], "rank 1 must die at step 3 in the first attempt"
    assert (out / "rank0.attempt1").read_text().split() == [str(s) for s in range(6)]
    evs = events(logs / "events.jsonl")
    exits = [e for e in evs if e["event"] == "worker_exit"]
    assert any(e["rank"] == 1 and e["signal"] == "SIGKILL" and e["attempt"] == 0 for e in exits)
    restarts = [e for e in evs if e["event"] == "workers_restart"]
    assert len(restarts) == 1 and restarts[0]["cause"] == "failure" and restarts[0]["remaining_restarts"] == 1
    assert [e["attempt"] for e in evs if e["event"] == "workers_start"] == [0, 1]


def test_max_restarts_zero_reports_root_cause_with_traceback(tmp_path) -> None:
    logs = tmp_path / "logs"
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "--log-dir", str(logs),
                        script("raise_error.py")], tmp_path)
    assert proc.returncode == 1
    err = proc.stderr
    assert "hpresil-run: job failed; 0 of --max-restarts 0 restarts used" in err
    assert "root cause: rank 1 (local rank 1" in err and "exited with code 1" in err
    report = err[err.index("hpresil-run: job failed"):]
    assert "ValueError: distinctive failure 4242 in load_batch" in report
    assert 'in load_batch' in report
    failed = [e for e in events(logs / "events.jsonl") if e["event"] == "workers_failed"]
    assert failed and "distinctive failure 4242" in failed[0]["report"]


def test_killed_worker_without_restarts_names_the_signal(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = base_env(tmp_path, **to_env([fail_at(rank=0, step=1)]))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", script("crash_and_resume.py"), str(out), "5"],
                       tmp_path, env=env)
    assert proc.returncode == 1
    assert "root cause: rank 0 (local rank 0" in proc.stderr and "was killed by SIGKILL" in proc.stderr


@pytest.mark.parametrize("warm", [False, True], ids=["subprocess", "warm-start"])
def test_half_written_error_file_does_not_end_the_job(tmp_path, warm: bool) -> None:
    # torch parses a dead worker's error.json and lets a JSON error end the agent;
    # a worker killed mid-write must cost one restart, not the job.
    logs = tmp_path / "logs"
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1",
                        "--log-dir", str(logs), script("torn_error_file.py")], tmp_path,
                       env=base_env(tmp_path, warm=warm), timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "was not valid JSON" in proc.stderr
    assert "rank 1 attempt 1 ok" in proc.stdout + proc.stderr
    evs = events(logs / "events.jsonl")
    exits = [e for e in evs if e["event"] == "worker_exit" and e["rank"] == 1]
    assert exits and "error file was unreadable" in json.dumps(exits[0]["message"])
    assert [e["cause"] for e in evs if e["event"] == "workers_restart"] == ["failure"]


def test_the_job_shm_directory_and_its_empty_parents_are_removed(tmp_path) -> None:
    from hpresil.runtime.shm import JobShmDir

    root = tmp_path / "shmroot"
    nodes = [JobShmDir(str(root), "job", f"node{i}") for i in range(2)]
    for node in nodes:
        node.create()
    nodes[0].remove()
    assert sorted(os.listdir(root / "job")) == ["node1"]  # the other simulated node still uses them
    nodes[1].remove()
    assert not root.exists(), "the job directory and the root the job made are gone once empty"
