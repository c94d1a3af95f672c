"""The scenarios of PyTorch's own launcher tests, run against ``hpresil.run.cli.main``
in-process: the same arguments must give the same workers, errors and exceptions."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import tempfile
from unittest import mock

import pytest
from torch.distributed import Store
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from _launch import REPO, free_port, script
from hpresil.run.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for key in list(os.environ):
        if key.startswith(("PET_", "HPRESIL_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TEST_SENTINEL_PARENT", "FOOBAR")
    monkeypatch.setenv("HPRESIL_SHM_ROOT", str(tmp_path / "shm"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", REPO)
    # torchrun runs in this process: its workers' error files go to tempfile's directory, cached as /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _touched(d) -> set[str]:
    return set(os.listdir(d))


def _common(tmp_path) -> list[str]:
    return ["--monitor-interval=0.2", "--start-method=spawn", f"--job-log-dir={tmp_path / 'logs'}"]


def test_standalone(tmp_path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    main(["--nnodes=1", "--nproc-per-node=2", "--standalone", *_common(tmp_path),
          script("touch_rank.py"), f"--touch-dir={d}"])
    assert _touched(d) == {"0", "1"}


def test_static_master_addr_port(tmp_path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    main(["--nnodes=1", "--nproc_per_node=2", "--master_addr=localhost", f"--master_port={free_port()}",
          "--node_rank=0", *_common(tmp_path), script("touch_rank.py"), f"--touch-dir={d}"])
    assert _touched(d) == {"0", "1"}


def test_no_python_bash_and_conflict_with_module(tmp_path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    args = ["--nnodes=1", "--nproc_per_node=2", "--standalone", *_common(tmp_path), "--no_python"]
    with pytest.raises(ValueError):
        main([*args, "--module", script("touch_rank.sh"), str(d)])
    main([*args, script("touch_rank.sh"), str(d)])
    assert _touched(d) == {"0", "1"}


def test_env_vars_configure_the_launch(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "t"
    d.mkdir()
    monkeypatch.setenv("PET_NNODES", "1")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    monkeypatch.setenv("PET_STANDALONE", "1")
    monkeypatch.setenv("PET_NO_PYTHON", "1")
    monkeypatch.setenv("PET_MODULE", "1")
    with pytest.raises(ValueError):
        main([script("touch_rank.sh"), str(d)])
    monkeypatch.setenv("PET_MODULE", "0")
    main([f"--job-log-dir={tmp_path / 'logs'}", script("touch_rank.sh"), str(d)])
    assert _touched(d) == {"0", "1"}


@pytest.mark.parametrize("nproc, expected", [("auto", os.cpu_count()), ("3", 3)])
def test_nproc_configurations(tmp_path, nproc: str, expected: int) -> None:
    d = tmp_path / "t"
    d.mkdir()
    main(["--nnodes=1", f"--nproc_per_node={nproc}", "--standalone", *_common(tmp_path), "--no_python",
          script("touch_rank.sh"), str(d)])
    assert _touched(d) == {str(i) for i in range(expected)}


def test_nproc_unknown_raises_value_error(tmp_path) -> None:
    with pytest.raises(ValueError):
        main(["--nproc_per_node=unknown", "--standalone", script("touch_rank.sh"), str(tmp_path)])


def test_elastic_single_agent(tmp_path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    main(["--nnodes=1:2", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
          "--rdzv_id=parity", "--rdzv-conf=last_call_timeout=1", *_common(tmp_path),
          script("touch_rank.py"), f"--touch-dir={d}"])
    assert _touched(d) == {"0", "1"}


def test_worker_exception_raises_child_failed_error(tmp_path) -> None:
    with mock.patch("torch.distributed.elastic.events.record") as record_mock:
        with pytest.raises(ChildFailedError):
            main(["--nnodes=1", "--nproc_per_node=2", "--standalone", "--max_restarts=0", *_common(tmp_path),
                  script("touch_rank.py"), "--fail"])
    record_mock.assert_called_once()


class _AgentBroke(Exception):
    pass


def test_agent_exception_is_re_raised(tmp_path) -> None:
    with mock.patch("torch.distributed.elastic.agent.server.local_elastic_agent.LocalElasticAgent.run",
                    side_effect=_AgentBroke), mock.patch("torch.distributed.elastic.events.record") as record_mock:
        with pytest.raises(_AgentBroke):
            main(["--nnodes=1", "--nproc_per_node=2", "--standalone", *_common(tmp_path),
                  script("touch_rank.py"), f"--touch-dir={tmp_path}"])
    record_mock.assert_called_once()


def _agent(args: list[str]) -> None:
    os.environ["HPRESIL_NODE_ID"] = "second"
    main(args)


def _two_agents(tmp_path, start_method: str, rdzv_id: str) -> None:
    """This process and one started by ``start_method`` run the two agents of one job."""
    d = tmp_path / rdzv_id
    d.mkdir()
    args = ["--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            f"--rdzv_id={rdzv_id}", *_common(tmp_path), script("touch_rank.py"), f"--touch-dir={d}"]
    other = mp.get_context(start_method).Process(target=_agent, args=(args,))
    other.start()
    main(args)
    other.join(60)
    assert other.exitcode == 0
    assert _touched(d) == {"0", "1", "2", "3"}


def test_multiple_agents(tmp_path) -> None:
    _two_agents(tmp_path, "spawn", "multi")


def test_is_torchelastic_launched_and_env_init(tmp_path) -> None:
    out = tmp_path / "out"
    main(["--run_path", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
          "--master_addr=localhost", *_common(tmp_path), script("touch_rank.py"), f"--check-elastic={out}",
          "--init-env"])
    assert out.read_text() == "True"


def test_multiple_agents_forked_after_a_launch(tmp_path) -> None:
    """PyTorch's ``test_launch_elastic_multiple_agents``: an agent forked from a
    process that has launched before (and so holds a fork server) launches too."""
    first = tmp_path / "first"
    first.mkdir()
    main(["--nnodes=1", "--nproc-per-node=1", "--standalone", *_common(tmp_path), script("touch_rank.py"),
          f"--touch-dir={first}"])
    assert _touched(first) == {"0"}
    _two_agents(tmp_path, "fork", "forked")


def test_a_finished_launch_leaves_no_store_in_garbage(tmp_path) -> None:
    """A torch store that a finished launch left in cyclic garbage is destroyed by
    whichever process collects it. In a process forked later (the test above),
    its destructor joins a server thread the fork did not copy, and that process
    aborts ("terminate called after throwing an instance of 'std::system_error'")."""
    d = tmp_path / "t"
    d.mkdir()
    main(["--nnodes=1", "--nproc-per-node=1", "--standalone", *_common(tmp_path), script("touch_rank.py"),
          f"--touch-dir={d}"])
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        holders = [type(o).__name__ for o in gc.garbage if any(isinstance(r, Store) for r in gc.get_referents(o))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not holders, f"garbage holding a torch store: {holders}"
