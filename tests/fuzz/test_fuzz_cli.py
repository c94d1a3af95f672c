"""Fuzz pass over what users type (untrusted input): ``hpresil-run``'s command
line and ``HPRESIL_*`` defaults, the ``report`` subcommand and the
``events.jsonl`` lines it reads, and the ``doctor`` subcommand with the host
files it reads.

``hpresil-run`` runs in-process through :func:`hpresil.run.cli.main` up to the
point where it would start the elastic agent (``launch.launch_agent`` is
replaced by a stub that stops there: everything hpresil parses and validates
has run by then). Each input must be accepted, or refused the documented way:
argparse's exit status 2, a :class:`~hpresil.errors.ConfigError`, or a
``ValueError`` from torch's own torchrun parsing (which ``hpresil-run``
prints as ``error: ...`` with exit status 2); anything else would reach the
user as a traceback from deep inside.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import tempfile
import traceback
from typing import Any, Iterator

import pytest

from fuzzing import NASTY, Fuzzer, Tally, deadline, quiet
from hpresil import errors
from hpresil.events import JsonlEventLog

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:Unable to enable fault handler:UserWarning")]

#: Values tried for options and variables: valid ones, and the ways they go wrong.
VALUES = (
    "", " ", "0", "1", "2", "-1", "3", "65535", "65536", "1.5", "0.001", "1e3", "1e400", "-1e400", "inf", "-inf", "nan",
    "NaN", "0x10", "1_000", "abc", "auto", "off", "on", "yes", "TRUE", "none", "1:2", "2:1", "0:1", "1:0", ":", "1:",
    ":4", "a:b", "1:2:3", "9" * 30, "localhost:0", "localhost:99999", "[::1]:29500", "127.0.0.1", "c10d", "static",
    "etcd-v2", "x" * 3000, "\u00e9\u202e", "a/../b", "a,b", ",", "=", "a=1,b", "0:3,1:4", "-", "--", "p5", "trn2",
    "transformers,numpy", "os.path", "1 2", "\t", "spawn", "fork", "node", "SIGTERM,SIGFOO", "train.py",
)
#: torchrun's options the fuzz varies, besides every hpresil option.
TORCHRUN = (
    "--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf", "--standalone",
    "--max-restarts", "--monitor-interval", "--start-method", "--role", "--log-dir", "--redirects", "--tee",
    "--local-ranks-filter", "--node-rank", "--master-addr", "--master-port", "--local-addr", "--signals-to-handle",
    "--shutdown-timeout", "--numa-binding", "-m", "--no-python", "--run-path",
)
VALID = ["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--job-log-dir", "logs",
         "--hang-step-timeout", "30", "--replicas", "1", "--grace-period", "10", "--metrics-port", "0",
         "train.py", "--lr", "0.1"]


class _Launched(Exception):
    """Raised by the stub in place of starting the elastic agent: the command line was accepted."""


def _stub_launch(*args: Any, **kwargs: Any) -> None:
    raise _Launched()


@pytest.fixture
def launcher(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``cli.main`` that stops where the agent would start, in a scratch directory,
    with the environment put back after every input."""
    import hpresil.run.launch
    from hpresil.run import cli

    monkeypatch.setattr(hpresil.run.launch, "launch_agent", _stub_launch)
    monkeypatch.chdir(tmp_path)  # log dirs a command line names are created here
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and the default one (<tmp>/hpresil-logs/...)
    (tmp_path / "train.py").write_text("")  # the script the command lines name exists: it is checked first
    monkeypatch.setenv("PYTHON_EXEC", "/nonexistent/python")  # never start the warm-start fork server
    monkeypatch.setenv("HPRESIL_SHM_ROOT", str(tmp_path / "shm"))
    for name in [n for n in os.environ if n.startswith(("HPRESIL_", "PET_", "TORCHELASTIC_"))]:
        if name != "HPRESIL_SHM_ROOT":
            monkeypatch.delenv(name)
    saved = dict(os.environ)

    def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, str]:
        os.environ.update(env or {})
        err = io.StringIO()
        try:
            with deadline(10, f"{argv} {env}"), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                cli.main(argv)
        except _Launched:
            return "accepted", "launch"
        except SystemExit as exc:
            if exc.code == 0:
                return "accepted", "help"
            assert exc.code == 2 and "error:" in err.getvalue(), (argv, env, exc.code, err.getvalue()[-300:])
            return "rejected", "argparse"
        except errors.ConfigError as exc:
            assert str(exc), (argv, env)
            return "rejected", "ConfigError"
        except ValueError as exc:  # torch's own torchrun parsing; hpresil-run prints it and exits 2
            origin = traceback.extract_tb(exc.__traceback__)[-1].filename
            assert str(exc) and "/torch/" in origin, (argv, env, origin, exc)  # hpresil's own refusals are ConfigErrors
            return "rejected", "ValueError from torch"
        except BaseException as exc:
            raise AssertionError(f"hpresil-run {argv} with {env}: {type(exc).__name__}: {exc}") from exc
        finally:
            os.environ.clear()
            os.environ.update(saved)
        raise AssertionError(f"main returned without launching for {argv}")

    with quiet(), quiet("torch"):
        yield run


def _options() -> list[str]:
    from hpresil.run.cli import HPRESIL_OPTIONS

    return [*TORCHRUN, *(flag for flag, *_ in HPRESIL_OPTIONS)]


def _argv_inputs(fz: Fuzzer, count: int) -> Iterator[tuple[str, list[str]]]:
    rng = fz.rng
    options = _options()
    for _ in range(count):
        kind = rng.random()
        argv = list(VALID)
        if kind < 0.6:  # one to three options with odd values, before the script
            pairs: list[str] = []
            for _ in range(rng.choice((1, 1, 2, 3))):
                pairs += [rng.choice(options), rng.choice(VALUES)]
            argv = argv[:-3] + pairs + argv[-3:]
            yield " ".join(pairs)[:120], argv
        elif kind < 0.8:  # token edits of a valid command line
            i = rng.randrange(len(argv))
            op = rng.choice(("drop", "dup", "swap", "value"))
            if op == "drop":
                del argv[i]
            elif op == "dup":
                argv.insert(i, argv[i])
            elif op == "swap" and i + 1 < len(argv):
                argv[i], argv[i + 1] = argv[i + 1], argv[i]
            else:
                argv[i] = rng.choice(VALUES)
            yield f"{op} token {i}", argv
        else:  # a byte-level mutant of one token
            i = rng.randrange(len(argv) - 2)
            what, data = fz.mutate_bytes(argv[i].encode())
            argv[i] = data.decode("utf-8", "surrogateescape").replace("\0", "")
            yield f"token {i}: {what}", argv


def test_fuzz_hpresil_run_arguments(launcher: Any) -> None:
    """Every hpresil option and the important torchrun ones with odd values, and
    edits of a valid command line."""
    tally = Tally("hpresil-run arguments")
    assert launcher(list(VALID)) == ("accepted", "launch")
    for what, argv in _argv_inputs(Fuzzer(41), 220):
        tally.add(*launcher(argv))
    tally.check(200)


def test_fuzz_hpresil_env_defaults(launcher: Any) -> None:
    """``HPRESIL_*`` variables that give hpresil-run's options their defaults."""
    from hpresil.run.cli import HPRESIL_OPTIONS

    names = [env for _, env, *_ in HPRESIL_OPTIONS] + ["HPRESIL_NET_ENV_IMDS"]
    rng = random.Random(42)
    tally = Tally("hpresil-run HPRESIL_* defaults")
    argv = ["--nnodes", "1", "--nproc-per-node", "1", "train.py"]
    for _ in range(150):
        env = {rng.choice(names): rng.choice(VALUES) for _ in range(rng.choice((1, 1, 2)))}
        tally.add(*launcher(argv, env))
    tally.check(150)


# -- hpresil-run report ------------------------------------------------------------------------

def _real_events(path: str) -> list[str]:
    """An events.jsonl written by the real writer: two epochs, a failure, a restore."""
    def log(ts: float, event: str, **fields: Any) -> None:
        sink = JsonlEventLog(path, node="n0")
        sink.emit(event, **fields)
        sink.close()
        lines = open(path).read().splitlines()
        obj = json.loads(lines[-1])
        obj["ts"] = ts  # a fixed clock: the known-answer times of test_report
        lines[-1] = json.dumps(obj, separators=(",", ":"))
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    log(0, "runtime_start", run_id="r")
    log(1, "workers_start", world_size=2, attempt=0)
    log(3.1, "checkpoint_saved", rank=0, step=10, tier="ram", blocking_s=0.1, bytes=100)
    log(3.2, "progress", step=10, t_step=3.0, step_time_s=0.2)
    log(4.0, "checkpoint_drained", step=10, tier="durable", duration_s=0.5, bytes=100, committed=True)
    log(5.1, "progress", step=20, t_step=5.0, step_time_s=0.2)
    log(6, "worker_exit", rank=1, exitcode=-9, signal="SIGKILL")
    log(6, "workers_restart", cause="failure")
    log(7, "hang_detected", waited_s=3.0, diagnose_s=1.0, phase="step", suspects=[1])
    log(8, "workers_start", world_size=2, attempt=1)
    log(9, "checkpoint_restored", rank=0, step=10, tier="ram", duration_s=0.5, bytes=100)
    log(11.1, "progress", step=20, t_step=11.0)
    log(12, "straggler", rank=1, window=2, ratio=1.8)
    log(13.1, "progress", step=30, t_step=13.0)
    log(14, "workers_succeeded")
    log(15, "runtime_stop", succeeded=True)
    return open(path).read().splitlines()


def _report(argv: list[str]) -> tuple[str, str]:
    from hpresil.run.cli import run_subcommand

    out, err = io.StringIO(), io.StringIO()
    try:
        with deadline(10, str(argv)), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_subcommand(["report", *argv])
    except SystemExit as exc:
        assert exc.code in (0, 2), (argv, exc.code)
        return ("rejected", "argparse") if exc.code else ("accepted", "help")
    except BaseException as exc:
        raise AssertionError(f"hpresil-run report {argv}: {type(exc).__name__}: {exc}") from exc
    assert code in (0, 2), (argv, code)
    if code == 2:
        assert "error:" in err.getvalue(), argv
        return "rejected", "exit 2"
    if "--json" in argv:
        json.loads(out.getvalue())  # the summary stays valid JSON whatever the events held
    return "accepted", "report"


def test_fuzz_report_events(tmp_path: Any) -> None:
    """``events.jsonl`` lines mutated (bytes, JSON values: NaN, huge steps, wrong
    types, deep nesting), and odd ``report`` arguments."""
    tally = Tally("report: events.jsonl lines and arguments")
    path = str(tmp_path / "node0" / "events.jsonl")
    os.makedirs(os.path.dirname(path))
    lines = _real_events(path)
    assert _report([str(tmp_path), "--json"]) == ("accepted", "report")
    fz = Fuzzer(43)
    with quiet():
        for _ in range(300):
            i = fz.rng.randrange(len(lines))
            if fz.rng.random() < 0.65:
                what, line = next(fz.json_mutants(json.loads(lines[i]), 1))
            else:
                what, raw = fz.mutate_bytes(lines[i].encode())
                line = raw.decode("utf-8", "replace")
            with open(path, "w") as f:
                f.write("\n".join(lines[:i] + [line] + lines[i + 1:]) + "\n")
            tally.add(*_report([str(tmp_path), "--json"] if fz.rng.random() < 0.7 else [path]))
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        for value in NASTY[:12] + ("--png", "-h"):
            tally.add(*_report([str(tmp_path), "--run-id", str(value)]))
        for argv in ([], [str(tmp_path / "missing")], ["--json"], [str(tmp_path), "--bogus"], [os.devnull]):
            tally.add(*_report(argv))
    tally.check(300)


# -- hpresil-run doctor ------------------------------------------------------------------------

def _doctor(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, str]:
    from hpresil.run.cli import run_subcommand

    out, err = io.StringIO(), io.StringIO()
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        with deadline(10, str(argv)), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_subcommand(["doctor", *argv])
    except SystemExit as exc:
        assert exc.code in (0, 2), (argv, exc.code)
        return ("rejected", "argparse") if exc.code else ("accepted", "help")
    except BaseException as exc:
        raise AssertionError(f"hpresil-run doctor {argv} {env}: {type(exc).__name__}: {exc}") from exc
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert code in (0, 1, 2), (argv, code)
    return ("rejected", "exit 2") if code == 2 else ("accepted", f"exit {code}")


def test_fuzz_doctor_arguments_and_host_files(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor's options and ``HPRESIL_NET_ENV*``, and the host files detection
    reads (DMI product name, kernel release, EFA installer list, the plugin's
    version string, libfabric.pc, GPU information) damaged on a fake p5 host."""
    from fake_hosts import build_host

    for name in ("LD_LIBRARY_PATH", "NCCL_NET_PLUGIN", "HPRESIL_NET_ENV", "HPRESIL_NET_ENV_IMDS"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "host"
    build_host(root, "p5", "new")
    tally = Tally("doctor: arguments and host files")
    assert _doctor(["--json", "--root", str(root)]) == ("accepted", "exit 0")
    rng = random.Random(44)
    for _ in range(40):
        argv = ["--json", "--root", str(root)]
        flag = rng.choice(("--net-env", "--root", "--lib-dir", "--log-dir", "--imds", "--no-imds", "-v"))
        argv += [flag] if flag in ("--imds", "--no-imds", "-v") else [flag, rng.choice(VALUES)]
        env = {rng.choice(("HPRESIL_NET_ENV", "HPRESIL_NET_ENV_IMDS")): rng.choice(VALUES)} if rng.random() < 0.3 else {}
        tally.add(*_doctor(argv, env))
    files = [f for f in (str(p) for p in root.rglob("*")) if os.path.isfile(f) and not os.path.islink(f)
             and any(k in f for k in ("product_name", "osrelease", "efa_installed", "libnccl-net", "libfabric.pc",
                                      "information", "vendor", "class"))]
    fz = Fuzzer(45)
    for _ in range(80):
        path = rng.choice(files)
        original = open(path, "rb").read()
        cut = rng.randrange(len(original) + 1)
        what, data = fz.mutate_bytes(original) if rng.random() < 0.7 else (f"truncated to {cut}", original[:cut])
        with open(path, "wb") as f:
            f.write(data)
        try:
            tally.add(*_doctor(["--json", "--root", str(root)]))
        finally:
            with open(path, "wb") as f:
                f.write(original)
    tally.check(120)
