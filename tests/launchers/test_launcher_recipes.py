"""Launchers: Slurm script, Kubernetes manifests and the container recipe.

Manifests are checked against field lists of the CRDs they use
(``launchers/schemas``), shell scripts with ``bash -n`` (and shellcheck when
installed), the sbatch script by running it with stand-ins for srun/scontrol
and hpresil-run's real parser, and the Dockerfile by parsing it (no docker
daemon in CI; the signal path is tested in ``tests/launchers/test_container_signal.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest

from _launch import REPO

yaml = pytest.importorskip("yaml")

LAUNCHERS = os.path.join(REPO, "launchers")
SCHEMAS = os.path.join(LAUNCHERS, "schemas")
MANIFESTS = {
    "kubernetes/pytorchjob.yaml": "pytorchjob.kubeflow.org_v1.json",
    "kubernetes/hyperpod-pytorchjob.yaml": "hyperpodpytorchjob.sagemaker.amazonaws.com_v1.json",
}
SCRIPTS = ["slurm/hpresil.sbatch"]


def validate(value: object, schema: dict, path: str = "$") -> list[str]:
    """Errors of ``value`` against the small JSON-schema subset the schema files use."""
    errors: list[str] = []
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected an integer, got {value!r}"]
    elif kind == "int-or-string":
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            return [f"{path}: expected an integer or a string, got {value!r}"]
    elif kind in checks and not isinstance(value, checks[kind]):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and isinstance(value, int) and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required field {key!r}")
        for key, item in value.items():
            if "propertyNames" in schema and key not in schema["propertyNames"]:
                errors.append(f"{path}: key {key!r} not in {schema['propertyNames']}")
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(item, schema["additionalProperties"], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unknown field {key!r} (not in the CRD subset in launchers/schemas)")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _load(name: str) -> dict:
    with open(os.path.join(LAUNCHERS, name)) as f:
        return yaml.safe_load(f)


def _schema(name: str) -> dict:
    with open(os.path.join(SCHEMAS, name)) as f:
        return json.load(f)


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    replicas = spec["pytorchReplicaSpecs"].values() if "pytorchReplicaSpecs" in spec else spec["replicaSpecs"]
    return [r["template"]["spec"] for r in replicas]


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_matches_crd_fields(manifest: str) -> None:
    doc = _load(manifest)
    assert validate(doc, _schema(MANIFESTS[manifest])) == []


def test_validator_rejects_unknown_and_mistyped_fields() -> None:
    doc = _load("kubernetes/pytorchjob.yaml")
    doc["spec"]["elasticPolicy"]["minReplica"] = 2  # typo of minReplicas
    doc["spec"]["elasticPolicy"]["maxReplicas"] = "4"
    doc["spec"]["runPolicy"]["cleanPodPolicy"] = "Sometimes"
    errors = validate(doc, _schema(MANIFESTS["kubernetes/pytorchjob.yaml"]))
    assert len(errors) == 3 and any("unknown field 'minReplica'" in e for e in errors)


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_manifest_runs_hpresil_with_shm_secret_gpus_and_efa(manifest: str) -> None:
    doc = _load(manifest)
    for pod in _pod_specs(doc):
        (container,) = pod["containers"]
        assert container["command"] == ["hpresil-run"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HPRESIL_JOB_SECRET"]["valueFrom"]["secretKeyRef"]["key"]
        assert "$(HPRESIL_NODE_ID)" in env["HPRESIL_LOG_DIR"]["value"]  # one events.jsonl per node
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] and limits["vpc.amazonaws.com/efa"]
        # the kubelet's SIGKILL must come after the final snapshot and its upload
        args = container["args"]
        shutdown = int(args[args.index("--shutdown-timeout") + 1])
        assert pod["terminationGracePeriodSeconds"] > shutdown + int(env["HPRESIL_GRACE_PERIOD"]["value"])


def _parse_hpresil(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """hpresil-run's real parser (torch's + hpresil's group) on ``argv`` with ``env`` set."""
    from hpresil.run.cli import build_parser

    for key in [k for k in os.environ if k.startswith(("PET_", "HPRESIL_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return vars(build_parser().parse_args(argv))


def test_pet_variables_drive_hpresil_run(monkeypatch) -> None:
    """What the manifests leave to PET_* (set by the Kubeflow operator for elastic jobs,
    written out in the HyperPod manifest) reaches hpresil-run's parser like torchrun's."""
    doc = _load("kubernetes/hyperpod-pytorchjob.yaml")
    (container,) = _pod_specs(doc)[0]["containers"]
    pet = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("PET_")}
    pet["HPRESIL_GRACE_PERIOD"] = "60"
    args = _parse_hpresil(container["args"], pet, monkeypatch)
    assert (args["nnodes"], args["rdzv_backend"], args["rdzv_endpoint"]) == ("2:4", "c10d", "hpresil-train-rdzv:29400")
    assert args["nproc_per_node"] == "8" and args["max_restarts"] == 10 and args["grace_period"] == "60"
    assert args["training_script"] == "/workspace/train.py"


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script: str) -> None:
    subprocess.run(["bash", "-n", os.path.join(LAUNCHERS, script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n still ran")
    subprocess.run(["shellcheck", "-s", "bash", os.path.join(LAUNCHERS, script)], check=True)


def _stub(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_sbatch_script_builds_a_valid_hpresil_command(tmp_path, monkeypatch) -> None:
    """Runs the script with a two-node allocation: scontrol and srun are stand-ins (srun runs
    its command once, here), hpresil-run records its argv; the argv must parse with hpresil's parser."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(str(bin_dir / "scontrol"), 'printf "gpu-a\\ngpu-b\\n"\n')
    _stub(str(bin_dir / "srun"), 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(str(bin_dir / "hpresil-run"), f'printf "%s\\n" "$@" > "{tmp_path}/argv"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "MIN_NODES": "1", "NPROC_PER_NODE": "4", "LOG_ROOT": str(tmp_path / "logs"),
           "HOME": str(tmp_path)}
    subprocess.run(["bash", os.path.join(LAUNCHERS, "slurm/hpresil.sbatch"), "train.py", "--steps", "5"],
                   env=env, cwd=str(tmp_path), check=True, timeout=30)
    argv = (tmp_path / "argv").read_text().splitlines()
    args = _parse_hpresil(argv, {}, monkeypatch)
    assert (args["nnodes"], args["nproc_per_node"], args["rdzv_backend"]) == ("1:2", "4", "c10d")
    assert args["rdzv_endpoint"] == "gpu-a:29400" and args["rdzv_id"] == "77"
    assert args["job_log_dir"].startswith(str(tmp_path / "logs" / "77"))
    assert args["training_script"] == "train.py" and args["training_script_args"] == ["--steps", "5"]


@pytest.mark.parametrize("external", [False, True])
def test_sbatch_etcd_rendezvous_starts_members_or_uses_the_given_cluster(tmp_path, monkeypatch, external) -> None:
    """RDZV_BACKEND=etcd-v2: without ETCD_ENDPOINTS an etcd member starts on each of the
    first nodes (a stand-in etcd records its flags) and hpresil-run gets every member."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(str(bin_dir / "scontrol"), 'printf "gpu-a\\ngpu-b\\n"\n')
    _stub(str(bin_dir / "srun"), 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(str(bin_dir / "hostname"), 'echo gpu-a\n')
    _stub(str(bin_dir / "etcd"), f'printf "%s\\n" "$@" > "{tmp_path}/etcd-argv"\n')
    _stub(str(bin_dir / "hpresil-run"), f'sleep 0.5; printf "%s\\n" "$@" > "{tmp_path}/argv"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "78",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "LOG_ROOT": str(tmp_path / "logs"), "HOME": str(tmp_path),
           "RDZV_BACKEND": "etcd-v2"}
    if external:
        env["ETCD_ENDPOINTS"] = "etcd1:2379,etcd2:2379,etcd3:2379"
    subprocess.run(["bash", os.path.join(LAUNCHERS, "slurm/hpresil.sbatch"), "train.py"],
                   env=env, cwd=str(tmp_path), check=True, timeout=30)
    args = _parse_hpresil((tmp_path / "argv").read_text().splitlines(), {}, monkeypatch)
    assert args["rdzv_backend"] == "etcd-v2"
    if external:
        assert args["rdzv_endpoint"] == "etcd1:2379,etcd2:2379,etcd3:2379"
        assert not (tmp_path / "etcd-argv").exists()
        return
    assert args["rdzv_endpoint"] == "gpu-a:2379,gpu-b:2379"
    etcd_argv = (tmp_path / "etcd-argv").read_text().splitlines()
    assert "--enable-v2=true" in etcd_argv  # torch's etcd-v2 backend speaks etcd's v2 API
    etcd_argv.remove("--enable-v2=true")
    flags = dict(zip(etcd_argv[::2], etcd_argv[1::2]))
    assert flags["--initial-cluster"] == "gpu-a=http://gpu-a:2380,gpu-b=http://gpu-b:2380"
    assert flags["--advertise-client-urls"] == "http://gpu-a:2379"


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    with open(os.path.join(LAUNCHERS, "container", "Dockerfile")) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def test_dockerfile_entrypoint_is_hpresil_run_in_exec_form() -> None:
    instructions = _dockerfile()
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "STOPSIGNAL", "ENTRYPOINT", "CMD", "LABEL", "USER"}
    assert {word for word, _ in instructions} <= known
    first = next(word for word, _ in instructions if word != "ARG")
    assert first == "FROM"
    entry = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["hpresil-run"], "exec form: PID 1 must be hpresil-run"
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    cmd = [rest for word, rest in instructions if word == "CMD"]
    assert all(isinstance(json.loads(c), list) for c in cmd)
    for word, rest in instructions:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert os.path.exists(os.path.join(REPO, src)), f"COPY source {src} missing (context: repo root)"
    assert any("--no-deps" in rest for word, rest in instructions if word == "RUN"), "must not replace the base image's torch"


def test_etcd_manifest_is_a_three_member_v2_cluster_that_keeps_its_quorum() -> None:
    with open(os.path.join(LAUNCHERS, "kubernetes", "etcd.yaml")) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    sts, svc, pdb = docs["StatefulSet"], docs["Service"], docs["PodDisruptionBudget"]
    replicas, name = sts["spec"]["replicas"], sts["metadata"]["name"]
    assert replicas == 3 and sts["spec"]["serviceName"] == svc["metadata"]["name"] == name
    assert svc["spec"]["clusterIP"] == "None" and pdb["spec"]["minAvailable"] == replicas // 2 + 1
    script = sts["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--enable-v2=true" in script
    cluster = script.split("--initial-cluster ")[1].split()[0].strip('"')
    members = [m.split("=")[0] for m in cluster.split(",")]
    assert members == [f"{name}-{i}" for i in range(replicas)]
    assert all(f"{m}.{name}:2380" in cluster for m in members)
    # the endpoint list the README gives hpresil-run parses to every member
    from hpresil.elastic.etcd import parse_endpoints

    with open(os.path.join(LAUNCHERS, "kubernetes", "README.md")) as f:
        readme = f.read()
    endpoint = readme.split('"--rdzv-endpoint", "')[1].split('"')[0]
    assert parse_endpoints(endpoint) == [(f"{m}.{name}", 2379) for m in members]
