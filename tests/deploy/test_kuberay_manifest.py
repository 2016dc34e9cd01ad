"""k8s/rayjob.yaml: a structural schema for KubeRay's RayJob (ray.io/v1) plus the checks a schema
cannot express: Ray version, entrypoint parsed by the pipelines' own CLI, GPUs vs the recipe.

Written against KubeRay's CRD fields (ray.io/v1 RayJob); the operator itself is not needed.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "k8s" / "rayjob.yaml"

# KubeRay passes rayStartParams to `ray start` as strings; numbers/booleans are rejected by the CRD.
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+([KMGTPE]i?|m)?$"}, {"type": "integer", "minimum": 0}]}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string"},
        "resources": {
            "type": "object",
            "required": ["limits"],
            "properties": {
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
            },
            "additionalProperties": False,
        },
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array"},
            },
        }
    },
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            # DNS-1123 label; KubeRay derives the cluster and submitter Job names from it.
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47}},
        },
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        # KubeRay >= 1.5.1: token auth with a generated Secret (AuthOptions in the CRD).
                        "authOptions": {
                            "type": "object",
                            "properties": {
                                "mode": {"enum": ["disabled", "token"]},
                                "secretName": {"type": "string"},
                                "enableK8sTokenAuth": {"type": "boolean"},
                            },
                            "additionalProperties": False,
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": [
                                    "groupName",
                                    "replicas",
                                    "minReplicas",
                                    "maxReplicas",
                                    "rayStartParams",
                                    "template",
                                ],
                                "properties": {
                                    "groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 1},
                                    "rayStartParams": _START_PARAMS,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def manifest() -> dict:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(docs) == 1, "k8s/rayjob.yaml should hold exactly one RayJob"
    return docs[0]


def _containers(m: dict):
    rcs = m["spec"]["rayClusterSpec"]
    yield "head", rcs["headGroupSpec"]["template"]["spec"]["containers"][0], rcs["headGroupSpec"]
    for g in rcs["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"][0], g


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------- structure


def test_manifest_matches_rayjob_schema(manifest):
    jsonschema.validate(manifest, RAYJOB_SCHEMA)


@pytest.mark.parametrize(
    "breakage",
    ["wrong_api", "no_shutdown", "int_start_param", "no_entrypoint", "bad_group_name"],
)
def test_schema_rejects_broken_manifests(manifest, breakage):
    m = copy.deepcopy(manifest)
    spec = m["spec"]
    if breakage == "wrong_api":
        m["apiVersion"] = "ray.io/v1alpha1"
    elif breakage == "no_shutdown":
        del spec["shutdownAfterJobFinishes"]
    elif breakage == "int_start_param":
        spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif breakage == "no_entrypoint":
        del spec["entrypoint"]
    elif breakage == "bad_group_name":
        spec["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] = "GPU_H100"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, RAYJOB_SCHEMA)


def test_token_auth_guards_every_reachable_endpoint(manifest):
    """The dashboard carries the Jobs API, which runs any code it is sent: off loopback only with
    Ray token auth on, and nothing in the manifest switches auth off again."""
    rcs = manifest["spec"]["rayClusterSpec"]
    assert rcs.get("authOptions", {}).get("mode") == "token", "the cluster runs without authentication"
    assert Version(rcs["rayVersion"]) >= Version("2.52"), "Ray token authentication starts at 2.52"
    host = rcs["headGroupSpec"]["rayStartParams"].get("dashboard-host", "localhost")
    assert host in ("localhost", "127.0.0.1", "0.0.0.0")  # 0.0.0.0: the operator and submitter need it
    for name, container, _ in _containers(manifest):
        for var in container.get("env", []):
            assert var["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") or "valueFrom" in var, (
                f"{name}: {var['name']} set by hand (KubeRay sets it from its Secret)"
            )
    env_vars = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_vars), "auth settings do not belong in the job's env"


def test_schema_rejects_an_unknown_auth_mode(manifest):
    m = copy.deepcopy(manifest)
    m["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, RAYJOB_SCHEMA)


def test_cluster_lifecycle_and_images(manifest):
    ray = pytest.importorskip("ray")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "GPUs must not stay up after the job"
    assert spec["submissionMode"] == "K8sJobMode"
    installed = Version(ray.__version__)
    declared = Version(spec["rayClusterSpec"]["rayVersion"])
    assert (declared.major, declared.minor) == (installed.major, installed.minor) == (2, 60)
    for name, c, _ in _containers(manifest):
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)(-gpu|-cu\d+)?", c["image"])
        assert m, f"{name}: unexpected image {c['image']}"
        assert Version(m.group(1)) == declared, f"{name}: image Ray {m.group(1)} != rayVersion {declared}"
        assert int(m.group(2)) >= 11, f"{name}: transformers 5 needs Python >= 3.11"
        if _gpus(c):
            assert m.group(3), f"{name}: GPU pod on a CPU image"
            assert c["resources"]["requests"].get("nvidia.com/gpu", _gpus(c)) == _gpus(c), (
                "GPU requests must equal limits"
            )
            mounts = {v["mountPath"] for v in c.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}: NCCL needs a large /dev/shm"
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    assert _gpus(head["template"]["spec"]["containers"][0]) == 0, "the head is a CPU pod"
    for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert any(_gpus(c) > 0 for n, c, _ in _containers(manifest) if n != "head")


def test_user_edits_are_marked():
    """Each placeholder line carries '# EDIT:' itself or in the nearest comment-only line above it."""
    lines = MANIFEST.read_text().splitlines()
    found = 0
    for i, line in enumerate(lines):
        if "EDIT-ME" not in line or line.lstrip().startswith("#"):
            continue
        found += 1
        j = i
        while j > 0 and not lines[j].lstrip().startswith("#") and "# EDIT:" not in lines[j]:
            j -= 1
        assert "# EDIT:" in lines[j], f"k8s/rayjob.yaml line {i + 1}: placeholder without an '# EDIT:' marker"
    assert found


# --------------------------------------------------------------------------- runtime env and entrypoint


def test_runtime_env_ships_code_and_package_from_one_archive(manifest):
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "pip", "env_vars", "py_modules", "uv", "config"}
    wd = env["working_dir"]
    assert wd.startswith(("https://", "s3://", "gs://")) and wd.endswith(".zip"), (
        "KubeRay pods cannot see a local directory"
    )
    pkgs = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    ours = [p for p in pkgs if re.match(r"^linearard_ray(\[[^\]]*\])?\s*@", p)]
    assert len(ours) == 1 and ours[0].split("@", 1)[1].strip() == wd, (
        "code and installed package must be the same revision"
    )
    ev = env["env_vars"]
    assert all(isinstance(v, str) for v in ev.values()), "runtime_env env_vars must be strings"
    assert ev["MLFLOW_TRACKING_URI"].startswith(("http://", "https://")), "one tracking server for every pod"
    assert "NCCL_DEBUG" in ev


def _entrypoint_argv(manifest) -> list[str]:
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["python", "pipelines/distill.py"], argv
    return argv[2:]


def test_entrypoint_parses_with_the_pipeline_cli(manifest):
    from linearard_ray.cli import build_parser
    from linearard_ray.config import Config, build_config, dump_config, parse_overrides

    args = build_parser("distill.py", "").parse_args(_entrypoint_argv(manifest))
    assert args.config and args.config.startswith("configs/") and args.config.endswith(".yaml")
    overrides = parse_overrides(args.overrides)
    assert str(overrides["train.storage_path"]).startswith("s3://"), "multi-pod checkpoints need shared storage"
    assert overrides.get("train.run_name"), "a fixed run name makes a re-submitted job resume"
    # On top of the embedded default: the overrides name real fields and carry valid values.
    cfg = build_config(yaml.safe_load(dump_config(Config())), overrides)
    assert cfg.train.storage_path == overrides["train.storage_path"]


def test_recipe_in_entrypoint_fits_the_worker_groups(manifest):
    from linearard_ray.cli import build_parser, parse_config

    argv = _entrypoint_argv(manifest)
    args = build_parser("distill.py", "").parse_args(argv)
    recipe = ROOT / args.config
    if not any((ROOT / "configs").glob("*.yaml")):
        pytest.skip("no recipes in configs/ yet")
    assert recipe.exists(), f"the entrypoint names {args.config}, which is not in configs/"
    _, cfg = parse_config(build_parser("distill.py", ""), ["--config", str(recipe), *argv[2:]])
    t = cfg.train
    gpu_groups = [(c, g) for n, c, g in _containers(manifest) if n != "head" and _gpus(c) > 0]
    assert t.use_gpu is not False
    per_pod = max(_gpus(c) for c, _ in gpu_groups)
    assert t.gpus_per_worker <= per_pod
    capacity = sum(int(_gpus(c) // t.gpus_per_worker) * g["maxReplicas"] for c, g in gpu_groups)
    assert t.num_workers <= capacity, (
        f"{t.num_workers} workers × {t.gpus_per_worker} GPU do not fit {capacity} worker slots"
    )
    if (ROOT / "pipelines").is_dir() and any((ROOT / "pipelines").glob("*.py")):
        assert (ROOT / "pipelines" / "distill.py").exists()
