"""hpresil-run's command line is torchrun's: same options, same env vars, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from torch.distributed.run import get_args_parser

from _launch import base_env, hpresil_run, script
from hpresil.errors import ConfigError
from hpresil.run.cli import HPRESIL_OPTIONS, build_parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def test_every_torchrun_option_is_accepted_with_the_same_meaning() -> None:
    torch_actions = _actions(get_args_parser())
    ours = _actions(build_parser())
    for dest, action in torch_actions.items():
        assert dest in ours, f"torchrun option {action.option_strings} missing"
        mine = ours[dest]
        assert set(action.option_strings) <= set(mine.option_strings)
        assert mine.default == action.default, dest
        assert mine.nargs == action.nargs and mine.choices == action.choices, dest
        # local functions are re-created per parser: compare them by name
        assert getattr(mine.type, "__qualname__", mine.type) == getattr(action.type, "__qualname__", action.type), dest
    # and they parse to the same namespace
    argv = ["--nnodes", "1:3", "--nproc_per_node", "4", "--rdzv-backend", "c10d", "--rdzv_endpoint", "h:1",
            "--rdzv-id", "job", "--max-restarts", "5", "-r", "3", "-t", "1", "--local-ranks-filter", "0,1",
            "--log-dir", "/tmp/x", "--no-python", "prog", "--flag", "v"]
    theirs = vars(get_args_parser().parse_args(argv))
    mine = vars(build_parser().parse_args(argv))
    assert {k: mine[k] for k in theirs} == theirs


def test_help_lists_hpresil_options_in_their_own_group() -> None:
    text = build_parser().format_help()
    assert "hpresil:" in text
    for flag, env_var, *_ in HPRESIL_OPTIONS:
        assert flag in text and env_var in text
    assert "--rdzv-backend" in text and "--standalone" in text


def test_pet_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")
    monkeypatch.setenv("PET_NNODES", "1:2")
    args = build_parser().parse_args(["train.py"])
    assert args.nproc_per_node == "3" and args.nnodes == "1:2"


def test_hpresil_variables_are_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPRESIL_SHM_ROOT", "/dev/shm/from-env")
    monkeypatch.setenv("HPRESIL_KEEP_SHM", "1")
    args = build_parser().parse_args(["train.py"])
    assert args.shm_root == "/dev/shm/from-env" and args.keep_shm is True
    args = build_parser().parse_args(["--shm-root", "/dev/shm/flag", "--no-keep-shm", "train.py"])
    assert args.shm_root == "/dev/shm/flag" and args.keep_shm is False


@pytest.mark.parametrize(
    "argv, fix",
    [
        (["--nnodes", "3:2"], "need 0 < MIN <= MAX; pass e.g. --nnodes 2:3"),
        (["--nnodes", "a:b"], "is not N or MIN:MAX; pass e.g. --nnodes 2 or --nnodes 1:4"),
        (["--nproc-per-node", "lots"], "takes an integer > 0 or one of auto, cpu, gpu, xpu"),
        (["--max-restarts", "-1"], "--max-restarts -1: takes an integer >= 0"),
        (["--no-python", "-m"], "drop --no-python"),
        (["--local-ranks-filter", "a,b"], "--local_ranks_filter must be a comma-separated list"),
        (["--tracebacks", "maybe"], "invalid choice"),
        (["--hang-factor", "abc"], "--hang-factor='abc' is not a number (a factor, e.g. 2.5)"),
        (["--hang-step-floor", "abc"], "--hang-step-floor='abc' is not a number of seconds"),
        (["--nproc-pre-node", "2"], "--nproc-pre-node: did you mean --nproc-per-node?"),
        (["--metric-port", "9400"], "--metric-port: did you mean --metrics-port?"),
        (["--rollback-tries", "0"], "--rollback-tries '0': takes an integer >= 1"),
        (["--on-spike", "stop"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_naming_the_fix(tmp_path, argv: list[str], fix: str) -> None:
    proc = hpresil_run([*argv, "--standalone", script("report_env.py"), str(tmp_path)], tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fix in proc.stderr
    assert "usage: hpresil-run" in proc.stderr


def test_rollback_policy_reaches_the_workers_from_flags_or_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpresil.checkpoint.rollback import RollbackPolicy
    from hpresil.run.options import worker_env

    monkeypatch.setenv("HPRESIL_ON_DIVERGENCE", "leave")
    args = build_parser().parse_args(["--on-spike", "rollback", "--rollback-tries", "5", "train.py"])
    env = worker_env(args)
    assert env == {"HPRESIL_ON_NONFINITE": "rollback", "HPRESIL_ON_SPIKE": "rollback", "HPRESIL_ON_DIVERGENCE": "leave",
                   "HPRESIL_ROLLBACK_TRIES": "5"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    policy = RollbackPolicy.from_env()
    assert (policy.on_spike, policy.on_divergence, policy.max_tries) == ("rollback", "leave", 5)
    monkeypatch.setenv("HPRESIL_ROLLBACK_TRIES", "many")
    with pytest.raises(ConfigError, match="max_tries='many'.*HPRESIL_ROLLBACK_TRIES"):
        RollbackPolicy.from_env()


def test_bad_hpresil_env_value_exits_2(tmp_path) -> None:
    env = base_env(tmp_path, HPRESIL_KEEP_SHM="maybe")
    proc = hpresil_run(["--standalone", script("report_env.py"), str(tmp_path)], tmp_path, env=env, timeout=60)
    assert proc.returncode == 2
    assert "HPRESIL_KEEP_SHM='maybe' is not a boolean; set it to 1 or 0" in proc.stderr


def test_console_script_is_installed_or_module_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "hpresil.run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "hpresil-run" in proc.stdout


def test_version_and_help_name_the_subcommands() -> None:
    from importlib.metadata import version

    import hpresil

    proc = subprocess.run([sys.executable, "-m", "hpresil.run", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"hpresil-run {hpresil.__version__} (torch {version('torch')})"
    text = build_parser().format_help()
    assert "hpresil-run doctor" in text and "hpresil-run report LOG_DIR" in text
