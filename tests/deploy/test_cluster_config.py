"""cluster.yaml: Ray's own schema, its shell snippets, and whether every recipe fits the cluster.

The schema check uses Ray's private autoscaler helpers (`prepare_config`, `validate_config`);
their behaviour is pinned to the Ray range below and the test skips, saying why, outside it.
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import shlex
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
# Where the head keeps the MLflow credentials every Ray process sources (made by head_setup_commands).
MLFLOW_ENV = "~/.linearard/mlflow.env"

# pyproject pins ray>=2.60,<2.61; the private autoscaler API is only trusted inside that range.
RAY_MIN, RAY_MAX = Version("2.60"), Version("2.61")

# Published EC2 specs of the instance types cluster.yaml uses: (vCPUs, GPUs, Ray accelerator name).
# Ray names the accelerator from EC2's GpuInfo, and at run time from the device name
# ("NVIDIA A10G" -> A10G, "NVIDIA A100-SXM4-40GB" -> A100, "NVIDIA H100 80GB HBM3" -> H100).
EC2_GPU_SPECS = {
    "g5.12xlarge": (48, 4, "A10G"),
    "p4d.24xlarge": (96, 8, "A100"),
    "p4de.24xlarge": (96, 8, "A100"),
    "p5.48xlarge": (192, 8, "H100"),
}
EC2_CPU_SPECS = {"m5.2xlarge": 8, "m5.4xlarge": 16, "m5.8xlarge": 32}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_private_util():
    ray = pytest.importorskip("ray")
    v = Version(ray.__version__)
    if not (RAY_MIN <= v < RAY_MAX):
        pytest.skip(
            f"ray {v} is outside [{RAY_MIN}, {RAY_MAX}): "
            "prepare_config/validate_config are private API checked only there"
        )
    from ray.autoscaler._private import util

    return util


# --------------------------------------------------------------------------- Ray's schema


def test_validates_against_rays_schema(raw):
    util = _ray_private_util()
    prepared = util.prepare_config(copy.deepcopy(raw))
    util.validate_config(prepared)
    # prepare_config merged the common setup into head and worker setup: the package install runs on both.
    assert any("pip install" in c for c in prepared["head_setup_commands"])
    assert any("pip install" in c for c in prepared["worker_setup_commands"])


def test_schema_check_rejects_broken_configs(raw):
    """The validation above has teeth: the mistakes a user might make are refused."""
    import jsonschema

    util = _ray_private_util()
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu-a10g-x4"]["resorces"] = typo["available_node_types"]["gpu-a10g-x4"].pop(
        "resources"
    )
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(typo))
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["gpu-h100-x8"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(fractional))


# --------------------------------------------------------------------------- node types


def test_node_types_match_their_instances(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["max_workers"] == 0 and "GPU" not in head["resources"], "the head is a CPU node"
    assert head["node_config"]["InstanceType"] in EC2_CPU_SPECS
    assert head["resources"]["CPU"] < EC2_CPU_SPECS[head["node_config"]["InstanceType"]], (
        "keep head CPUs for GCS and MLflow"
    )
    gpu_accels = set()
    for name, t in types.items():
        itype = t["node_config"]["InstanceType"]
        res = t["resources"]
        assert 0 <= t.get("min_workers", 0) <= t.get("max_workers", raw["max_workers"]) <= raw["max_workers"], name
        if itype in EC2_GPU_SPECS:
            cpus, gpus, accel = EC2_GPU_SPECS[itype]
            assert res.get("CPU") == cpus and res.get("GPU") == gpus, (
                f"{name}: resources {res} vs {itype} {cpus} vCPU / {gpus} GPU"
            )
            labels = [k for k in res if k.startswith("accelerator_type:")]
            assert labels == [f"accelerator_type:{accel}"], f"{name}: accelerator label {labels}, expected {accel}"
            assert res[labels[0]] == 1
            gpu_accels.add(accel)
        else:
            assert itype in EC2_CPU_SPECS and "GPU" not in res, f"{name}: unknown instance type {itype}"
            assert res["CPU"] <= EC2_CPU_SPECS[itype]
    assert gpu_accels == {"A10G", "A100", "H100"}
    assert raw["idle_timeout_minutes"] > 0 and raw["upscaling_speed"] > 0
    assert sum(t.get("max_workers", 0) for t in types.values()) <= raw["max_workers"], (
        "per-type maxima exceed the global cap"
    )


def test_user_edits_are_marked(raw):
    """Every placeholder a user must replace, and the region, carries an '# EDIT:' marker."""
    lines = CLUSTER_YAML.read_text().splitlines()
    placeholders = [i for i, line in enumerate(lines) if "EDIT-ME" in line and not line.lstrip().startswith("#")]
    assert placeholders, "cluster.yaml lost its placeholders"
    for i in placeholders:
        j = i - 1
        while lines[j].strip() in ("- >-", "- |", "- >"):  # block-scalar openers cannot carry a comment
            j -= 1
        marked = "# EDIT:" in lines[i] or "# EDIT:" in lines[j]
        assert marked, f"cluster.yaml line {i + 1} has a placeholder but no '# EDIT:' marker: {lines[i].strip()}"
    region_line = next(line for line in lines if line.strip().startswith("region:"))
    assert "# EDIT:" in region_line
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    for name, t in raw["available_node_types"].items():
        assert (
            t["node_config"]["ImageId"] == raw["available_node_types"][raw["head_node_type"]]["node_config"]["ImageId"]
        ), name


# --------------------------------------------------------------------------- setup and start commands


def test_setup_installs_pinned_ray_and_this_package(raw):
    ray = pytest.importorskip("ray")
    install = [c for c in raw["setup_commands"] if "pip install" in c]
    assert len(install) == 1
    args = shlex.split(install[0])
    pins = [a for a in args if a.startswith("ray[")]
    assert len(pins) == 1
    pinned = Version(pins[0].split("==", 1)[1])
    assert (pinned.major, pinned.minor) == (Version(ray.__version__).major, Version(ray.__version__).minor)
    assert RAY_MIN <= pinned < RAY_MAX
    editable = args[args.index("-e") + 1]
    mount = re.sub(r"\[.*\]$", "", editable)
    assert raw["file_mounts"].get(mount) == ".", f"{mount} is not the file mount of the repository"
    assert (ROOT / "pyproject.toml").exists()


def _run_bash(cmd: str, home: Path, extra_env: dict[str, str] | None = None) -> str:
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env.update(extra_env or {})
    out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _env_after_sourcing(path: Path, names: list[str], preset: dict[str, str] | None = None) -> dict[str, str | None]:
    probe = f"source {shlex.quote(str(path))}; " + "; ".join(f'echo "{n}=${{{n}-<unset>}}"' for n in names)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(preset or {})}
    out = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    vals = dict(line.split("=", 1) for line in out.stdout.splitlines())
    return {k: (None if v == "<unset>" else v) for k, v in vals.items()}


NCCL_NAMES = [
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
    "FI_PROVIDER",
    "FI_EFA_USE_DEVICE_RDMA",
    "LD_LIBRARY_PATH",
]


@pytest.mark.parametrize("efa", [True, False])
def test_nccl_env_follows_the_node_network(raw, tmp_path, efa):
    """The setup snippet picks EFA settings exactly when the node has RDMA devices."""
    snippet = next(c for c in raw["setup_commands"] if "linearard_nccl.env" in c)
    sysfs = tmp_path / "infiniband"
    sysfs.mkdir()
    if efa:
        (sysfs / f"rdmap{random.randint(0, 99)}s{random.randint(0, 99)}").mkdir()
    _run_bash(snippet, tmp_path, {"LINEARARD_RDMA_SYSFS": str(sysfs)})
    env_file = tmp_path / "linearard_nccl.env"
    got = _env_after_sourcing(env_file, NCCL_NAMES)
    assert got["NCCL_DEBUG"] == "WARN" and got["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    if efa:
        assert got["FI_PROVIDER"] == "efa" and got["FI_EFA_USE_DEVICE_RDMA"] == "1" and got["NCCL_IB_DISABLE"] is None
        assert got["LD_LIBRARY_PATH"].split(":") == ["/opt/amazon/ofi-nccl/lib", "/opt/amazon/efa/lib"]
    else:
        assert got["NCCL_IB_DISABLE"] == "1" and got["FI_PROVIDER"] is None
    # A value given per job (runtime_env env_vars, or the shell) wins over the node default.
    level = random.choice(["INFO", "TRACE", "VERSION"])
    again = _env_after_sourcing(env_file, NCCL_NAMES, {"NCCL_DEBUG": level, "LD_LIBRARY_PATH": "/x/lib"})
    assert again["NCCL_DEBUG"] == level
    if efa:
        assert again["LD_LIBRARY_PATH"].endswith(":/x/lib")


def test_ray_start_sources_the_nccl_env_tracking_uri_and_token_auth(raw):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert len(start) == 1, key
        cmd = start[0]
        # The env must be in place before `ray start`: Ray worker processes inherit the raylet's env.
        for needed in ("source ~/linearard_nccl.env", "MLFLOW_TRACKING_URI=", "export RAY_AUTH_MODE=token"):
            assert needed in cmd and cmd.index(needed) < cmd.index("ray start"), f"{key}: {needed}"
        assert cmd.index(f"source {MLFLOW_ENV}") < cmd.index("ray start"), f"{key}: MLflow credentials"
        assert ":5000" in cmd
        assert "0.0.0.0" not in cmd and "RAY_AUTH_MODE=disabled" not in cmd
    head = next(c for c in raw["head_start_ray_commands"] if "ray start" in c)
    # The dashboard carries the Jobs API (it runs any code it is sent): loopback only, reached by SSH.
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    assert "$RAY_HEAD_IP:6379" in worker and "http://$RAY_HEAD_IP:5000" in worker


def test_mlflow_server_command_parses_with_mlflows_own_cli(raw, tmp_path):
    """The head's MLflow command is accepted by `mlflow server`; it binds the cluster network only
    behind the basic-auth app, whose config and admin password come from the head's secrets."""
    pytest.importorskip("mlflow")
    from mlflow.cli import server as mlflow_server

    env_cmd = next(c for c in raw["head_setup_commands"] if "linearard_cluster.env" in c)
    _run_bash(env_cmd, tmp_path)
    values = _env_after_sourcing(tmp_path / "linearard_cluster.env", ["LINEARARD_S3", "MLFLOW_BACKEND_STORE_URI"])
    start = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    tail = start.split("mlflow server", 1)[1]
    tail = tail.split(">", 1)[0]  # stop at the log redirection
    for k, v in values.items():
        tail = tail.replace(f"${k}", v)
    args = shlex.split(tail)
    ctx = mlflow_server.make_context("server", args)
    p = ctx.params
    assert p["port"] == 5000
    assert p["host"] in ("127.0.0.1", "localhost") or p["app_name"] == "basic-auth", "MLflow open without auth"
    setup = start.split("nohup", 1)[0]
    assert f"source {MLFLOW_ENV}" in setup and 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in setup
    assert "MLFLOW_AUTH_CONFIG_PATH=~/mlflow/basic_auth.ini" in setup
    assert p["backend_store_uri"].split(":", 1)[0] in ("sqlite", "postgresql")
    assert p["serve_artifacts"] is True
    assert p["artifacts_destination"].startswith("s3://")
    # A start command must not leave ssh waiting on the server's output, and the recorded pid must
    # be the server's own: the backgrounded statement starts at `nohup`, not at an `a && b` list.
    background = re.split(r"(?<![>&])&(?!&)", start.split(";")[-1], maxsplit=1)[0]  # not 2>&1, not &&
    assert background.strip().startswith("nohup mlflow server") and "&&" not in background
    assert "< /dev/null" in background and "echo $! > ~/mlflow/server.pid" in start


# --------------------------------------------------------------------------- recipes vs node types


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: int
    gpus: int
    accelerator: str | None
    max_nodes: int


def node_types_of(cluster: dict) -> list[NodeType]:
    out = []
    for name, t in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        res = t["resources"]
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        out.append(
            NodeType(
                name,
                int(res.get("CPU", 0)),
                int(res.get("GPU", 0)),
                accel,
                min(t.get("max_workers", cluster["max_workers"]), cluster["max_workers"]),
            )
        )
    return out


def workers_per_node(t: NodeType, use_gpu: bool, gpus_per_worker: float, cpus_per_worker: float) -> int:
    """How many identical train workers one node of this type holds (exact arithmetic: 0.5 GPU is common)."""
    by_cpu = math.floor(Fraction(t.cpus) / Fraction(cpus_per_worker).limit_denominator(1000))
    if not use_gpu:
        return by_cpu
    if t.gpus == 0:
        return 0
    by_gpu = math.floor(Fraction(t.gpus) / Fraction(gpus_per_worker).limit_denominator(1000))
    return min(by_gpu, by_cpu)


def hosts_for(train: dict, types: list[NodeType]) -> list[str]:
    """Node types on which the whole gang of train workers can be placed (one type per run)."""
    use_gpu = train.get("use_gpu")
    use_gpu = True if use_gpu is None else use_gpu  # None = "GPU when the cluster has them", and this one does
    n = train.get("num_workers", 1)
    accel = train.get("accelerator_type")
    ok = []
    for t in types:
        if use_gpu and accel is not None and t.accelerator != accel:
            continue
        per = workers_per_node(t, use_gpu, train.get("gpus_per_worker", 1.0), train.get("cpus_per_worker", 1.0))
        if per > 0 and math.ceil(n / per) <= t.max_nodes:
            ok.append(t.name)
    return ok


def recipe_problem(name: str, train: dict, types: list[NodeType]) -> str | None:
    accel = train.get("accelerator_type")
    if accel is not None and train.get("use_gpu") is not False and accel not in {t.accelerator for t in types}:
        have = sorted(t.accelerator for t in types if t.accelerator)
        return f"{name}: train.accelerator_type={accel!r} is not offered by cluster.yaml (node types offer {have})"
    if not hosts_for(train, types):
        workers, gpus, cpus = (
            train.get(k, d) for k, d in (("num_workers", 1), ("gpus_per_worker", 1.0), ("cpus_per_worker", 1.0))
        )
        need = f"{workers} workers × {gpus} GPU, {cpus} CPU each"
        return f"{name}: no node type of cluster.yaml can host {need}" + (f" on {accel}" if accel else "")
    return None


def _simulate(train: dict, t: NodeType) -> bool:
    """Reference: place workers one by one on nodes of type t, opening a node when the last is full."""
    use_gpu = True if train.get("use_gpu") is None else train["use_gpu"]
    if use_gpu and train.get("accelerator_type") not in (None, t.accelerator):
        return False
    gpw = Fraction(train.get("gpus_per_worker", 1.0)).limit_denominator(1000) if use_gpu else Fraction(0)
    cpw = Fraction(train.get("cpus_per_worker", 1.0)).limit_denominator(1000)
    nodes: list[list[Fraction]] = []
    for _ in range(train.get("num_workers", 1)):
        if not nodes or nodes[-1][0] < gpw or nodes[-1][1] < cpw:
            nodes.append([Fraction(t.gpus), Fraction(t.cpus)])
            if nodes[-1][0] < gpw or nodes[-1][1] < cpw or len(nodes) > t.max_nodes:
                return False
        nodes[-1][0] -= gpw
        nodes[-1][1] -= cpw
    return True


def test_fit_check_agrees_with_a_placement_simulation():
    rng = random.Random()
    accels = ["A10G", "A100", "H100", "V100", None]
    for _ in range(400):
        types = [
            NodeType(
                f"t{i}",
                rng.choice([4, 8, 48, 96]),
                rng.choice([0, 1, 2, 4, 8]),
                rng.choice(accels[:3]),
                rng.randint(0, 3),
            )
            for i in range(rng.randint(1, 4))
        ]
        train = {
            "num_workers": rng.randint(1, 24),
            "gpus_per_worker": rng.choice([0.25, 0.5, 1.0, 2.0, 3.0, 8.0, 16.0]),
            "cpus_per_worker": rng.choice([0.5, 1.0, 4.0, 12.0, 100.0]),
            "use_gpu": rng.choice([True, None, False]),
            "accelerator_type": rng.choice(accels),
        }
        expected = [t.name for t in types if _simulate(train, t)]
        assert hosts_for(train, types) == expected, (train, types)


def test_fit_check_names_the_problem(raw):
    types = node_types_of(raw)
    assert recipe_problem("x", {"num_workers": 8, "gpus_per_worker": 1.0, "accelerator_type": "H100"}, types) is None
    assert recipe_problem("x", {"num_workers": 4, "gpus_per_worker": 1.0, "accelerator_type": "A10G"}, types) is None
    msg = recipe_problem("x.yaml", {"num_workers": 1, "accelerator_type": "V100"}, types)
    assert "x.yaml" in msg and "train.accelerator_type='V100'" in msg and "H100" in msg
    msg = recipe_problem("y.yaml", {"num_workers": 1, "gpus_per_worker": 16.0}, types)
    assert msg and "y.yaml" in msg and "16.0 GPU" in msg
    # Two p5 nodes hold 16 single-GPU workers, three would be needed for 17.
    assert recipe_problem("z", {"num_workers": 16, "accelerator_type": "H100"}, types) is None
    assert recipe_problem("z", {"num_workers": 17, "accelerator_type": "H100"}, types) is not None


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_fits_the_cluster(raw, recipe):
    from linearard_ray.config import load_config

    cfg = load_config(recipe)
    train = cfg.train.model_dump()
    problem = recipe_problem(recipe.name, train, node_types_of(raw))
    assert problem is None, problem


# --------------------------------------------------------------------------- the walk-through


def _doc_pipeline_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) of every `python pipelines/<x>.py ...` command in docs/cluster.md's code blocks."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            m = re.search(r"python (pipelines/\w+\.py)(.*)$", line)
            if m:
                args = m.group(2).replace("$BUCKET", "s3://bucket/linearard")
                out.append((m.group(1), shlex.split(args)))
    return out


def test_walkthrough_commands_use_real_config_fields():
    """Every `--set` in the walk-through names a real field with a valid value, and multi-node
    runs there put their Ray storage on S3."""
    from linearard_ray.cli import build_parser
    from linearard_ray.config import Config, build_config, dump_config, parse_overrides

    cmds = _doc_pipeline_commands()
    scripts = {s for s, _ in cmds}
    assert {"pipelines/distill.py", "pipelines/tune.py"} <= scripts
    base = yaml.safe_load(dump_config(Config()))
    for script, argv in cmds:
        args = build_parser(script, "").parse_args(argv)
        assert args.config and args.config.startswith("configs/"), (script, argv)
        overrides = parse_overrides(args.overrides)
        build_config(base, overrides)
        for key in ("train.storage_path", "tune.storage_path"):
            if key in overrides:
                assert str(overrides[key]).startswith("s3://"), f"{script}: {key} must be shared storage"
    distill = [
        overrides
        for s, a in cmds
        if s == "pipelines/distill.py"
        for overrides in [parse_overrides(build_parser(s, "").parse_args(a).overrides)]
    ]
    names = [(o.get("train.run_name"), o.get("train.storage_path")) for o in distill]
    assert len(names) >= 2 and names[0] == names[1] and all(names[0]), (
        "the resume example must reuse run name and storage"
    )
