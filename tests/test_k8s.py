"""The Kubernetes manifests (k8s/) and the image they run (infra/Dockerfile), checked offline.

Every buildable kustomization is rendered, validated against the Kubernetes 1.32 schemas and the
KubeRay v1.7.0 CRDs, and checked for what the schemas cannot see: references (also after a
nameSuffix), pod hardening, resources, Ray and Serve settings, and that the RayJob entrypoints and
the Serve import path point at real code. The helpers live in tests/k8s_validation.py.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import k8s_validation as kv
import pytest
import yaml

from pneumonet.training.resources import auto_worker_cpus

REPO = kv.REPO
SUFFIX = "-sfx"

needs_kubectl = pytest.mark.skipif(kv.kubectl() is None, reason="kubectl (with built-in kustomize) is not installed")
needs_crds = pytest.mark.skipif(
    kv.kuberay_crd_dir() is None,
    reason=f"KubeRay CRDs not found in {kv.schemas_root() / kv.KUBERAY_CRDS} (set PNEUMONET_K8S_SCHEMAS)",
)


# ---------------------------------------------------------------------------------------------
# Fixtures: render everything once
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of k8s/ with secrets.env made from the examples, plus one nameSuffix overlay per build."""
    root = kv.prepare_tree(tmp_path_factory.mktemp("k8s"))
    for name in kv.buildable_dirs(root):
        if name.startswith("overlays/"):
            suffixed = root / "suffixed" / name.replace("/", "-")
            suffixed.mkdir(parents=True)
            relative = os.path.relpath(root / name, suffixed)
            suffixed.joinpath("kustomization.yaml").write_text(
                yaml.safe_dump({"resources": [relative], "nameSuffix": SUFFIX})
            )
    return root


@pytest.fixture(scope="session")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    if kv.kubectl() is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    return {name: kv.render(path) for name, path in kv.buildable_dirs(tree).items()}


@pytest.fixture(scope="session")
def builds(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The builds a user applies (base and overlays), without the test's suffixed copies."""
    return {name: docs for name, docs in rendered.items() if not name.startswith("suffixed/")}


@pytest.fixture(scope="session")
def environments(builds: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per environment (overlays/<env>), the union of its builds: what a user ends up with."""
    union: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for name, docs in builds.items():
        if name.startswith("overlays/"):
            env = name.split("/")[1]
            for doc in docs:
                union[env].setdefault((doc["kind"], doc["metadata"]["name"]), doc)
    return {env: list(objects.values()) for env, objects in union.items()}


def workload(builds: dict[str, list[dict[str, Any]]], env: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in builds[f"overlays/{env}/{name.split('-')[-1]}"]
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return doc


def ray_docs(builds: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, docs in builds.items() for doc in docs if doc["apiVersion"].startswith("ray.io/")]


def entrypoint(doc: dict[str, Any]) -> tuple[str, dict[str, str], list[str]]:
    """(script, {--flag: value}, [key=value overrides]) of a RayJob's `python SCRIPT ...` entrypoint."""
    tokens = shlex.split(doc["spec"]["entrypoint"])
    assert tokens[0] == "python", f"{kv.describe(doc)}: entrypoint must start with python: {tokens}"
    flags: dict[str, str] = {}
    overrides: list[str] = []
    rest = tokens[2:]
    while rest:
        token = rest.pop(0)
        if token.startswith("--"):
            flags[token] = rest.pop(0) if rest and not rest[0].startswith("--") and "=" not in rest[0] else ""
        else:
            overrides.append(token)
    return tokens[1], flags, overrides


def dockerfile() -> str:
    return (REPO / "infra" / "Dockerfile").read_text()


def image_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", dockerfile(), re.M)[-1]


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def test_layout_has_base_and_both_environments_with_each_workload(tree: Path) -> None:
    names = set(kv.buildable_dirs(tree))
    expected = {"base"} | {
        f"overlays/{env}{sub}" for env in ("dev", "gpu") for sub in ("", "/train", "/score", "/serve")
    }
    assert expected <= names


@needs_kubectl
def test_every_build_renders_and_a_missing_secrets_file_stops_it(rendered: dict, tmp_path: Path) -> None:
    assert all(rendered.values())
    # Without secrets.env nothing is deployed (no placeholder credentials reach a cluster).
    bare = tmp_path / "k8s"
    shutil.copytree(kv.K8S_DIR, bare, ignore=shutil.ignore_patterns("secrets.env"))
    with pytest.raises(kv.RenderError, match="secrets.env"):
        kv.render(bare / "overlays" / "dev")


def test_secrets_files_are_gitignored_and_examples_are_tracked() -> None:
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for env in ("dev", "gpu"):
        secrets = f"k8s/overlays/{env}/env/secrets.env"
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", secrets])
        assert ignored.returncode == 0, f"{secrets} must be gitignored"
        assert (REPO / f"{secrets}.example").is_file()


# Real-looking credentials: AWS access key ids, a secret/key/token/password set to a 40-character
# base64 string (an AWS secret access key), W&B API keys (40 hex digits).
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "40-character secret": re.compile(
        r"(?i)(?:secret|password|token|key)\w*[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
    ),
    "W&B API key": re.compile(r"\b[0-9a-f]{40}\b"),
}


def credential_findings(text: str) -> list[str]:
    return [
        f"{label}: {match.group(0)[:8]}..."
        for label, pattern in CREDENTIAL_PATTERNS.items()
        for match in pattern.finditer(text)
    ]


def test_credential_scan_catches_real_looking_keys() -> None:
    assert credential_findings("AWS_ACCESS_KEY_ID=" + "AKIA" + "IOSFODNN7EXAMPLE")  # AWS docs example, split for scanners
    assert credential_findings("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert credential_findings("WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567")
    assert not credential_findings("AWS_SECRET_ACCESS_KEY=change-me-dev-password")


def test_no_tracked_file_under_k8s_holds_a_real_looking_credential() -> None:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "k8s"], capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / line for line in listed.stdout.splitlines() if line]
    assert files
    findings = [
        f"{path.relative_to(REPO)}: {finding}" for path in files for finding in credential_findings(path.read_text())
    ]
    assert not findings


@needs_kubectl
def test_rendered_secrets_hold_only_placeholders(builds: dict) -> None:
    secrets = [doc for docs in builds.values() for doc in docs if doc["kind"] == "Secret"]
    assert secrets
    for doc in secrets:
        for key, value in kv.secret_data(doc).items():
            assert not credential_findings(f"{key}={value}"), f"{kv.describe(doc)}[{key}]"


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


def test_kubernetes_validate_ships_the_1_32_schemas_offline() -> None:
    import kubernetes_validate.utils as kvu

    assert kv.K8S_VERSION in {kvu.major_minor(v) for v in kvu.all_versions()}


@needs_kubectl
@needs_crds
def test_every_rendered_document_validates_strictly(rendered: dict) -> None:
    crds = kv.kuberay_crd_dir()
    problems = [
        f"{name}: {p}" for name, docs in rendered.items() for doc in docs for p in kv.schema_problems(doc, crds)
    ]
    assert not problems, "\n".join(problems)


def test_crd_conversion_forbids_unknown_fields_and_keeps_int_or_string() -> None:
    schema = kv.crd_to_json_schema(
        {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "note": {"type": "string", "nullable": True},
                "free": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"a": {"type": "string"}},
                },
            },
            "x-kubernetes-validations": [{"rule": "true"}],
        }
    )
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid({"port": 8000, "note": None, "free": {"a": "x", "b": 1}})
    assert validator.is_valid({"port": "serve"})
    assert not validator.is_valid({"prot": 8000})
    assert "x-kubernetes-validations" not in schema


BROKEN_RAYJOB = """
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: broken}
spec:
  entrypoint: python /app/jobs/train.py
  shutdownAfterJobFinish: true
  rayClusterSpec:
    headGroupSpec:
      template:
        spec:
          containers: [{name: ray-head, image: pneumonet:0.1.0-cpu, securityContex: {}}]
"""

BROKEN_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: two
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      containers: [{name: x, image: x:1}]
"""


@needs_crds
def test_misspelled_rayjob_fields_fail_validation() -> None:
    problems = kv.schema_problems(yaml.safe_load(BROKEN_RAYJOB), kv.kuberay_crd_dir())
    assert any("shutdownAfterJobFinish" in p for p in problems), problems
    assert any("securityContex" in p for p in problems), problems


@needs_crds
def test_ray_pod_templates_are_held_to_the_1_32_api() -> None:
    """The CRDs come from newer Kubernetes types: env valueFrom.fileKeyRef (1.34) passes the CRD
    schema, but a 1.32 API server would drop it - the core check of the pod template catches it."""
    job = yaml.safe_load(BROKEN_RAYJOB)
    job["spec"].pop("shutdownAfterJobFinish")
    container = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container.pop("securityContex")
    container["env"] = [{"name": "A", "valueFrom": {"fileKeyRef": {"key": "k", "path": "p", "volumeName": "v"}}}]
    crds = kv.kuberay_crd_dir()
    assert not list(kv.ray_validators(crds)["RayJob"].iter_errors(job))
    problems = kv.schema_problems(job, crds)
    assert any("fileKeyRef" in p for p in problems), problems


def test_wrong_type_in_a_deployment_fails_validation() -> None:
    problems = kv.schema_problems(yaml.safe_load(BROKEN_DEPLOYMENT), None)
    assert any("replicas" in p for p in problems), problems


def test_unknown_kinds_fail_validation() -> None:
    assert kv.schema_problems({"apiVersion": "v1", "kind": "Secert", "metadata": {"name": "x"}}, None)
    assert kv.schema_problems({"apiVersion": "ray.io/v1", "kind": "RayJobs", "metadata": {"name": "x"}}, None)


# ---------------------------------------------------------------------------------------------
# References and names
# ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_every_build_is_self_contained_also_with_a_name_suffix(rendered: dict) -> None:
    """Each build resolves its own references, so any one of them can be applied on its own."""
    problems = [f"{name}: {p}" for name, docs in rendered.items() for p in kv.reference_problems(docs)]
    problems += [f"{name}: {p}" for name, docs in rendered.items() for p in kv.pod_consistency_problems(docs)]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_name_suffix_reaches_every_object_and_reference(rendered: dict) -> None:
    suffixed = {name: docs for name, docs in rendered.items() if name.startswith("suffixed/")}
    assert suffixed
    for name, docs in suffixed.items():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert SUFFIX in doc["metadata"]["name"], f"{name}: {kv.describe(doc)}"
        for ref in (ref for doc in docs for ref in kv.references(doc)):
            assert SUFFIX in ref.name, f"{name}: {ref.source} still names {ref.kind} {ref.name!r}"


def every_reference_pod_spec() -> dict[str, Any]:
    """A pod spec that names a ConfigMap, Secret, ServiceAccount and PVC in every way a pod can."""
    container = {
        "name": "c",
        "image": "x:1",
        "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "sec"}}],
    }
    return {
        "serviceAccountName": "sa",
        "imagePullSecrets": [{"name": "sec"}],
        "initContainers": [dict(container, name="i")],
        "containers": [container],
        "volumes": [
            {"name": "a", "configMap": {"name": "cm"}},
            {"name": "b", "secret": {"secretName": "sec"}},
            {"name": "c", "persistentVolumeClaim": {"claimName": "pvc"}},
            {"name": "d", "projected": {"sources": [{"configMap": {"name": "cm"}}, {"secret": {"name": "sec"}}]}},
        ],
    }


def every_reference_ray_object(kind: str) -> dict[str, Any]:
    template = {"spec": every_reference_pod_spec()}
    cluster = {
        "headGroupSpec": {"template": copy.deepcopy(template)},
        "workerGroupSpecs": [
            {"groupName": "w", "minReplicas": 0, "maxReplicas": 1, "template": copy.deepcopy(template)}
        ],
        "autoscalerOptions": {
            k: v for k, v in every_reference_pod_spec()["containers"][0].items() if k in ("env", "envFrom")
        },
    }
    spec: dict[str, Any] = {
        "RayCluster": cluster,
        "RayJob": {"rayClusterSpec": cluster},
        "RayService": {"rayClusterConfig": cluster},
    }[kind]
    if kind == "RayJob":
        spec["submitterPodTemplate"] = copy.deepcopy(template)
    return {"apiVersion": kv.RAY_API_VERSION, "kind": kind, "metadata": {"name": kind.lower()}, "spec": spec}


@needs_kubectl
def test_kustomizeconfig_renames_references_in_every_ray_pod_location(tmp_path: Path) -> None:
    """kustomizeconfig.yaml covers every place the reference walker knows, for all three kinds."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomizeconfig.yaml").write_text((kv.K8S_DIR / "base" / "kustomizeconfig.yaml").read_text())
    objects = [every_reference_ray_object(kind) for kind in kv.CRD_FILES] + [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "pvc"}, "spec": {}},
    ]
    (base / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    (base / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["objects.yaml"],
                "configMapGenerator": [{"name": "cm", "literals": ["k=v"]}],
                "secretGenerator": [{"name": "sec", "literals": ["k=v"]}],
                "configurations": ["kustomizeconfig.yaml"],
            }
        )
    )
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../base"], "nameSuffix": SUFFIX}))
    docs = kv.render(overlay)
    refs = [ref for doc in docs for ref in kv.references(doc)]
    # head, worker and submitter pods x 15 references, plus 4 in autoscalerOptions, per kind
    assert len(refs) == 3 * (4 + 2 * 15) + 15
    stale = [f"{ref.source}: {ref.name}" for ref in refs if SUFFIX not in ref.name]
    assert not stale, "kustomizeconfig.yaml misses:\n" + "\n".join(stale)
    assert not kv.reference_problems(docs)


@needs_kubectl
def test_reference_check_reports_a_missing_secret_key(builds: dict) -> None:
    docs = copy.deepcopy(builds["overlays/dev/serve"])
    (secret,) = [doc for doc in docs if doc["kind"] == "Secret"]
    del secret["data"]["PNEUMONET_API_TOKEN"]
    assert any("PNEUMONET_API_TOKEN" in p for p in kv.reference_problems(docs))


@needs_kubectl
def test_builds_of_one_environment_agree_on_shared_objects(builds: dict) -> None:
    """Applying the workload builds one after another must not flip a shared object back and forth."""
    seen: dict[tuple[str, str, str], tuple[str, dict]] = {}
    for name, docs in builds.items():
        if not name.startswith("overlays/"):
            continue
        env = name.split("/")[1]
        for doc in docs:
            key = (env, doc["kind"], doc["metadata"]["name"])
            if key in seen:
                assert seen[key][1] == doc, (
                    f"{name} and {seen[key][0]} render {doc['kind']}/{doc['metadata']['name']} differently"
                )
            seen[key] = (name, doc)


@needs_kubectl
def test_selectors_match_pods(environments: dict) -> None:
    problems = [f"{env}: {p}" for env, docs in environments.items() for p in kv.selector_problems(docs)]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_dev_s3_endpoint_names_the_minio_service(environments: dict, builds: dict) -> None:
    docs = environments["dev"]
    (secret,) = [doc for doc in docs if doc["kind"] == "Secret"]
    endpoint = urlparse(kv.secret_data(secret)["AWS_ENDPOINT_URL"])
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    assert endpoint.hostname in services, f"{endpoint.hostname} is not a Service of the dev overlay"
    assert endpoint.port in {port["port"] for port in services[endpoint.hostname]["spec"]["ports"]}
    # The endpoint is a Secret value kustomize cannot rename: dev must not rename the Service.
    for name in builds:
        if name.startswith("overlays/dev"):
            k = kv.kustomization(kv.K8S_DIR / name) or {}
            assert not k.get("namePrefix") and not k.get("nameSuffix"), name


@needs_kubectl
def test_dev_bucket_job_creates_the_bucket_every_dev_uri_uses(builds: dict, environments: dict) -> None:
    (job,) = [doc for doc in environments["dev"] if doc["kind"] == "Job"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert s3_buckets(environments["dev"]) == {env["BUCKET"]}


def s3_buckets(docs: list[dict[str, Any]]) -> set[str]:
    """Buckets of the s3:// URIs in RayJob entrypoints and serveConfigV2 args."""
    texts = [
        doc["spec"].get("entrypoint", "") + (doc["spec"].get("serveConfigV2") or "")
        for doc in docs
        if doc["apiVersion"].startswith("ray.io/")
    ]
    return {match for text in texts for match in re.findall(r"s3://([a-z0-9.-]+)/", text)}


# ---------------------------------------------------------------------------------------------
# Pods: hardening, resources, images
# ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_every_container_is_hardened_and_has_requests_and_limits(builds: dict) -> None:
    problems = [
        f"{name}: {p}" for name, docs in builds.items() for p in kv.security_problems(docs) + kv.resource_problems(docs)
    ]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_hardening_check_catches_a_root_container(builds: dict) -> None:
    docs = copy.deepcopy(builds["overlays/dev"])
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["runAsUser"] = 0
    del container["resources"]["limits"]
    problems = kv.security_problems(docs) + kv.resource_problems(docs)
    assert any("runAsUser" in p for p in problems) and any("no limits" in p for p in problems)


@needs_kubectl
def test_ray_pods_keep_writable_paths_on_emptydirs(builds: dict) -> None:
    for _, doc in ray_docs(builds):
        for where, container, pod in kv.all_containers(doc):
            if container["name"] in ("ray-head", "ray-worker"):
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in pod["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], where
                assert volumes[mounts["/dev/shm"]]["emptyDir"].get("medium") == "Memory", where
                env = {e["name"]: e.get("value", "") for e in container["env"]}
                for var in ("HOME", "KERAS_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
                    assert env[var].startswith("/tmp"), f"{where}: {var}"
                # Ray reads num-cpus from the CPU limit: fractions would be rounded.
                assert float(kv.quantity(container["resources"]["limits"]["cpu"])).is_integer(), where


@needs_kubectl
def test_overlay_images_are_pinned_and_flavoured(builds: dict) -> None:
    for name, docs in builds.items():
        for doc in docs:
            for where, container, _ in kv.all_containers(doc):
                image = container.get("image")
                if image and "pneumonet" in image.rpartition("/")[2]:
                    flavour = "gpu" if name.startswith("overlays/gpu") else "cpu"
                    assert image.endswith(f":0.1.0-{flavour}"), f"{name} {where}: {image}"


# ---------------------------------------------------------------------------------------------
# KubeRay and Ray settings
# ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_ray_fields_the_crds_do_not_check(builds: dict) -> None:
    problems = [f"{name}: {p}" for name, doc in ray_docs(builds) for p in kv.ray_problems(doc)]
    assert not problems, "\n".join(problems)


@needs_kubectl
def test_ray_field_checks_catch_mistakes(builds: dict) -> None:
    job = copy.deepcopy(workload(builds, "dev", "RayJob", "pneumonet-train"))
    job["spec"]["submissionMode"] = "K8sJobmode"
    job["spec"]["runtimeEnvYAML"] = "env_vars: {A: 1}\nenv_var: {}\n"
    problems = kv.ray_problems(job)
    assert any("submissionMode" in p for p in problems), problems
    assert any("env_var'" in p for p in problems) and any("Dict[str, str]" in p for p in problems), problems
    service = copy.deepcopy(workload(builds, "dev", "RayService", "pneumonet-serve"))
    service["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("min_replicas", "min_replica")
    service["spec"]["upgradeStrategy"]["type"] = "Recreate"
    problems = kv.ray_problems(service)
    assert any("min_replica'" in p for p in problems) and any("upgradeStrategy" in p for p in problems), problems


@needs_kubectl
def test_rayjobs_clean_up_and_have_deadlines(builds: dict) -> None:
    for _, doc in ray_docs(builds):
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            assert spec["submissionMode"] == "K8sJobMode"
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
            assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0


@needs_kubectl
def test_ray_heads_serve_the_dashboard_and_run_no_work(builds: dict) -> None:
    for name, doc in ray_docs(builds):
        params = kv.ray_cluster(doc)["headGroupSpec"]["rayStartParams"]
        assert params["dashboard-host"] == "0.0.0.0", name
        assert params["num-cpus"] == "0", name


@needs_kubectl
def test_every_ray_pod_runs_as_the_pneumonet_service_account(builds: dict) -> None:
    for name, doc in ray_docs(builds):
        for where, template in kv.pod_templates(doc):
            assert template["spec"]["serviceAccountName"] == "pneumonet", f"{name} {kv.describe(doc)} {where}"


def image_ray_version() -> str:
    return re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile(), re.M).group(1)


def test_image_ray_version_matches_pyproject() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [dep for dep in deps if re.match(r"ray(\[|=)", dep)]
    pinned = pin.split("==")[1].rstrip(".*")
    assert image_ray_version().startswith(pinned), (
        f"infra/Dockerfile RAY_VERSION={image_ray_version()}, pyproject {pin}"
    )


@needs_kubectl
def test_manifests_ray_version_is_the_image_ray_version(builds: dict) -> None:
    for name, doc in ray_docs(builds):
        assert kv.ray_cluster(doc)["rayVersion"] == image_ray_version(), f"{name} {kv.describe(doc)}"


@needs_kubectl
def test_rayservice_upgrades_without_downtime_and_autoscales(builds: dict) -> None:
    for env in ("dev", "gpu"):
        service = workload(builds, env, "RayService", "pneumonet-serve")
        assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
        assert kv.autoscaling(service)
        head = kv.ray_cluster(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
        serve = yaml.safe_load(service["spec"]["serveConfigV2"])
        assert {"name": "serve", "containerPort": serve["http_options"]["port"]} in head["ports"]


@needs_kubectl
def test_serve_config_fits_the_app_config(builds: dict) -> None:
    """max_ongoing_requests >= serve.max_batch_size, or a replica never sees a full batch."""
    from pneumonet.config import load_config

    max_batch = load_config(kv.K8S_DIR / "base" / "config" / "train.yaml").serve.max_batch_size
    for env in ("dev", "gpu"):
        service = workload(builds, env, "RayService", "pneumonet-serve")
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        (deployment,) = app["deployments"]
        assert deployment["name"] == "PneumonetModel"
        assert not kv.overload_problems(deployment, max_batch, env)
        assert not kv.request_timeout_problems(yaml.safe_load(service["spec"]["serveConfigV2"]),
                                               load_config().serve.request_timeout_s, env)  # fmt: skip
        assert app["import_path"] == "serve.app:app_builder" and app["route_prefix"] == "/"
        assert app["args"]["model"].startswith("s3://")


@needs_kubectl
def test_every_serve_node_has_the_serve_environment(builds: dict) -> None:
    """Every Ray node of the RayService runs a Serve proxy (proxy_location EveryNode) and may run
    replicas: each needs SERVE_ENV, or e.g. a request whose replica dies gets a bare 500 there."""
    from pneumonet.scoring.cluster import SERVE_ENV

    for env in ("dev", "gpu"):
        service = workload(builds, env, "RayService", "pneumonet-serve")
        for where, template in kv.pod_templates(service):
            for _, container in kv.containers(template):
                values = {e["name"]: e.get("value") for e in container.get("env") or []}
                assert values | SERVE_ENV == values, f"{env} {where} {container['name']}"


def test_overload_check_catches_mistakes() -> None:
    good = {"max_ongoing_requests": 64, "max_queued_requests": 16,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16}}  # fmt: skip
    assert not kv.overload_problems(good, 16, "x")
    for change in ({"max_ongoing_requests": 16}, {"max_queued_requests": -1}, {"max_queued_requests": 256},
                   {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64}},
                   {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 16}},
                   {"backpressure_config": {"retry_after_s": 5}}):  # fmt: skip
        assert kv.overload_problems({**good, **change}, 16, "x"), change


def test_request_timeout_check_catches_a_missing_or_too_short_proxy_timeout() -> None:
    assert not kv.request_timeout_problems({"http_options": {"request_timeout_s": 40}}, 30, "x")
    for config in ({}, {"http_options": {"port": 8000}}, {"http_options": {"request_timeout_s": 30}}):
        assert kv.request_timeout_problems(config, 30, "x"), config


def serve_apps(config: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    """import_path -> (route_prefix, deployment names), for a multi- or single-application config."""
    apps = config.get("applications") or [config]
    return {
        app["import_path"]: (app.get("route_prefix", "/"), {d["name"] for d in app.get("deployments") or []})
        for app in apps
    }


@needs_kubectl
def test_rayservice_matches_serve_config_yaml(builds: dict) -> None:
    path = REPO / "serve" / "config.yaml"
    if not path.is_file():
        pytest.skip("serve/config.yaml does not exist (yet): nothing to compare the RayService with")
    expected = serve_apps(yaml.safe_load(path.read_text()))
    for env in ("dev", "gpu"):
        service = workload(builds, env, "RayService", "pneumonet-serve")
        assert serve_apps(yaml.safe_load(service["spec"]["serveConfigV2"])) == expected, env


def ray_capacity(doc: dict[str, Any]) -> list[dict[str, float]]:
    """Per worker group: pods at most, and what one pod offers Ray (from its container limits)."""
    groups = []
    for group in kv.ray_cluster(doc)["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append(
            {
                "pods": group["maxReplicas"],
                "cpu": kv.quantity(limits["cpu"]),
                "gpu": kv.quantity(limits.get("nvidia.com/gpu", 0)),
                "memory": kv.quantity(limits["memory"]),
            }
        )
    return groups


def fits(capacity: list[dict[str, float]], count: int, bundle: dict[str, float]) -> bool:
    """Can COUNT bundles be placed, each inside one pod? (Otherwise the work waits forever.)"""
    slots = 0
    for group in capacity:
        per_pod = min(int(group[res] // need) if need else 10**6 for res, need in bundle.items())
        slots += group["pods"] * per_pod
    return slots >= count


@needs_kubectl
def test_workloads_fit_their_ray_clusters(builds: dict) -> None:
    for env in ("dev", "gpu"):
        train = workload(builds, env, "RayJob", "pneumonet-train")
        _, flags, _ = entrypoint(train)
        capacity, workers = ray_capacity(train), int(flags["--workers"])
        pods = [group["cpu"] for group in capacity for _ in range(int(group["pods"]))]  # auto: what the job would reserve
        cpus = float(flags["--cpus-per-worker"]) if "--cpus-per-worker" in flags else auto_worker_cpus(pods, workers)
        bundle = {"cpu": cpus, "gpu": float(flags.get("--gpus-per-worker", 0))}
        assert fits(capacity, workers, bundle), f"{env} train"

        score = workload(builds, env, "RayJob", "pneumonet-score")
        _, flags, _ = entrypoint(score)
        bundle = {"cpu": 1.0, "gpu": float(flags.get("--gpus-per-worker", 0))}
        assert fits(ray_capacity(score), int(flags["--workers"]), bundle), f"{env} score"

        service = workload(builds, env, "RayService", "pneumonet-serve")
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        (deployment,) = app["deployments"]
        options = deployment["ray_actor_options"]
        bundle = {
            "cpu": options.get("num_cpus", 1),
            "gpu": options.get("num_gpus", 0),
            "memory": options.get("memory", 0),
        }
        assert fits(ray_capacity(service), deployment["autoscaling_config"]["max_replicas"], bundle), f"{env} serve"


@needs_kubectl
def test_fit_check_catches_a_job_too_big_for_its_cluster(builds: dict) -> None:
    capacity = ray_capacity(workload(builds, "dev", "RayJob", "pneumonet-train"))
    assert not fits(capacity, 1, {"cpu": 1.0, "gpu": 1.0})
    assert not fits(capacity, 5, {"cpu": 1.0, "gpu": 0.0})


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_dev_is_cpu_only_with_minio(environments: dict) -> None:
    docs = environments["dev"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {
        ("Deployment", "minio"),
        ("Service", "minio"),
        ("PersistentVolumeClaim", "minio-data"),
        ("Job", "minio-create-bucket"),
    } <= kinds
    images = {c.get("image") for doc in docs for _, c, _ in kv.all_containers(doc)}
    assert any(str(i).startswith("quay.io/minio/minio:RELEASE.") for i in images)
    assert any(str(i).startswith("quay.io/minio/mc:RELEASE.") for i in images)


@needs_kubectl
def test_gpu_workers_request_gpus_and_scale_from_zero(builds: dict) -> None:
    for kind, name in (("RayJob", "pneumonet-train"), ("RayJob", "pneumonet-score"), ("RayService", "pneumonet-serve")):
        doc = workload(builds, "gpu", kind, name)
        assert kv.autoscaling(doc), name
        for group in kv.ray_cluster(doc)["workerGroupSpecs"]:
            spec = group["template"]["spec"]
            resources = spec["containers"][0]["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1", name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], name
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
            assert group["minReplicas"] < group["maxReplicas"], name


@needs_kubectl
def test_gpu_uses_irsa_not_static_keys(environments: dict, builds: dict) -> None:
    docs = environments["gpu"]
    (account,) = [doc for doc in docs if doc["kind"] == "ServiceAccount"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/.+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    )
    (secret,) = [doc for doc in docs if doc["kind"] == "Secret"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & set(kv.secret_data(secret))
    assert len(s3_buckets(docs)) == 1


@needs_kubectl
def test_gpu_service_account_is_the_one_the_irsa_role_trusts(environments: dict) -> None:
    defaults = terraform_defaults()
    (account,) = [doc for doc in environments["gpu"] if doc["kind"] == "ServiceAccount"]
    assert account["metadata"]["namespace"] == defaults["namespace"]
    assert account["metadata"]["name"] == defaults["service_account_name"]


@needs_kubectl
def test_gpu_checkpoints_are_what_the_bucket_lifecycle_expires_and_models_are_not(builds: dict) -> None:
    _, flags, _ = entrypoint(workload(builds, "gpu", "RayJob", "pneumonet-train"))
    storage = urlparse(flags["--storage"])
    prefix = storage.path.strip("/")
    assert (prefix + "/" if prefix else "") + "runs/" == terraform_defaults()["checkpoint_prefix"]


@needs_kubectl
def test_training_retries_resume_the_run_the_manifest_names(builds: dict) -> None:
    """A RayJob retry runs the same entrypoint on a new cluster: with a fixed --run-id and
    --resume-if-exists it continues that run's checkpoints instead of orphaning them."""
    from pneumonet.registry import check_run_id

    for env in ("dev", "gpu"):
        train = workload(builds, env, "RayJob", "pneumonet-train")
        _, flags, _ = entrypoint(train)
        assert train["spec"]["backoffLimit"] >= 1, env
        assert check_run_id(flags["--run-id"]) and "--resume-if-exists" in flags and "--resume" not in flags, env
        assert "--out" not in flags, f"{env}: artifacts live in the registry under --storage, not in mutable copies"


@needs_kubectl
def test_the_rayservice_names_an_immutable_version_and_scoring_an_alias_or_version(builds: dict) -> None:
    """No moving path (models/current, latest) in the RayService: a new model must change its spec."""
    from pneumonet.registry import version_of

    for env in ("dev", "gpu"):
        _, train, _ = entrypoint(workload(builds, env, "RayJob", "pneumonet-train"))
        (app,) = yaml.safe_load(workload(builds, env, "RayService", "pneumonet-serve")["spec"]["serveConfigV2"])["applications"]
        located = version_of(app["args"]["model"])
        assert located, f"{env}: args.model {app['args']['model']} is not <storage>/models/<variant>/<run-id>"
        assert located[0] == train["--storage"], f"{env}: the RayService loads from another registry than training writes"
        _, score, _ = entrypoint(workload(builds, env, "RayJob", "pneumonet-score"))
        model = score["--model"]
        assert version_of(model) or model.startswith(train["--storage"] + "/models/aliases/"), f"{env} score: {model}"


@needs_kubectl
def test_pin_changes_the_rendered_rayservice_to_the_promoted_version(tree: Path, tmp_path: Path) -> None:
    """The documented command (pneumonet models pin) is what makes `kubectl apply -k` roll a model out."""
    from test_registry import make_version

    from pneumonet.cli import main
    from pneumonet.registry import Registry

    copy_root = tmp_path / "k8s"
    shutil.copytree(tree, copy_root)
    store = str(tmp_path / "store")
    make_version(store, "transfer/run-7", 0.95)
    Registry(store).promote("transfer/run-7", "production")
    main(["models", "pin", "production", str(copy_root / "overlays" / "dev"), "--storage", store])
    (service,) = [doc for doc in kv.render(copy_root / "overlays" / "dev" / "serve") if doc["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model"] == f"{store}/models/transfer/run-7"


def terraform_defaults() -> dict[str, Any]:
    """Default values of infra/terraform/variables.tf (a light regex parse: no HCL library needed)."""
    text = (REPO / "infra" / "terraform" / "variables.tf").read_text()
    return dict(re.findall(r'variable "(\w+)" \{[^}]*?default\s*=\s*"([^"]*)"', text, re.S))


@needs_kubectl
def test_serve_endpoint_is_open_only_to_clients_on_port_8000(environments: dict) -> None:
    for env, docs in environments.items():
        (policy,) = [
            doc
            for doc in docs
            if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "pneumonet-serve-clients"
        ]
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
        peers = [yaml.safe_dump(peer, sort_keys=True) for peer in rule["from"]]
        assert any("pneumonet.io/client" in p and "podSelector" in p for p in peers)
        assert any("pneumonet.io/client" in p and "namespaceSelector" in p for p in peers)
        assert any("kubernetes.io/metadata.name" in p for p in peers)
        serve_pods = [labels for where, labels in kv.pod_labels(docs) if "RayService" in where]
        assert serve_pods and all(kv.selects(policy["spec"]["podSelector"], labels) for labels in serve_pods)
        (ray_policy,) = [
            doc for doc in docs if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "pneumonet-ray"
        ]
        ray_pods = [labels for where, labels in kv.pod_labels(docs) if where.startswith("Ray")]
        peer = ray_policy["spec"]["ingress"][0]["from"][0]["podSelector"]
        assert all(kv.selects(ray_policy["spec"]["podSelector"], p) and kv.selects(peer, p) for p in ray_pods), env


# ---------------------------------------------------------------------------------------------
# Config and code the manifests point at
# ---------------------------------------------------------------------------------------------


@needs_kubectl
def test_train_config_and_entrypoint_overrides_are_valid(builds: dict) -> None:
    from pneumonet.config import load_config

    config_file = kv.K8S_DIR / "base" / "config" / "train.yaml"
    load_config(config_file)
    for env in ("dev", "gpu"):
        train = workload(builds, env, "RayJob", "pneumonet-train")
        _, flags, overrides = entrypoint(train)
        load_config(config_file, overrides)
        assert flags["--config"] == "/etc/pneumonet/config.yaml"
        head = kv.ray_cluster(train)["headGroupSpec"]["template"]["spec"]
        mount = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/pneumonet"][0]
        volume = [v for v in head["volumes"] if v["name"] == mount["name"]][0]
        assert volume["configMap"]["name"].startswith("pneumonet-config-")


def test_dockerfile_builds_the_layout_the_manifests_expect() -> None:
    text = dockerfile()
    assert re.search(r"^ARG FLAVOUR=cpu$", text, re.M)
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-${FLAVOUR}" in text
    assert "tensorflow[and-cuda]" in text
    assert image_workdir() == "/app"
    assert re.search(r"^ENV .*PYTHONPATH=/app", text, re.M | re.S)
    for folder in ("jobs", "serve"):
        assert re.search(rf"^COPY {folder}/ \./{folder}/$", text, re.M), folder
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000:100"
    assert "pip install --no-deps /home/ray/build" in text


def test_dockerfile_copies_only_what_a_fresh_clone_has() -> None:
    """COPY of a missing path fails the build: every source must be a tracked, non-empty path
    that .dockerignore lets through (git keeps no empty folders)."""
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in re.findall(r"^COPY (.+)$", dockerfile(), re.M):
        sources = [part for part in line.split()[:-1] if not part.startswith("--")]
        for source in sources:
            path = REPO / source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
            assert path.is_file() or (path.is_dir() and any(p.is_file() for p in path.rglob("*"))), (
                f"COPY {source}: missing or empty in the repository"
            )


def entrypoint_scripts(builds: dict) -> dict[str, set[str]]:
    """Repo-relative script -> every flag some RayJob passes it."""
    scripts: dict[str, set[str]] = defaultdict(set)
    workdir = image_workdir().rstrip("/") + "/"
    for name, doc in ray_docs(builds):
        if doc["kind"] == "RayJob":
            script, flags, _ = entrypoint(doc)
            assert script.startswith(workdir), f"{name}: {script} is not in the image's WORKDIR {workdir}"
            scripts[script[len(workdir) :]] |= set(flags)
    return scripts


@pytest.fixture(scope="session")
def code_checks(builds: dict) -> dict[str, subprocess.CompletedProcess]:
    """`python SCRIPT --help` for every entrypoint and the Serve import, run in parallel like the image runs them."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    commands = {
        script: [sys.executable, script, "--help"] for script in entrypoint_scripts(builds) if (REPO / script).is_file()
    }
    import_paths = {
        app["import_path"]
        for _, doc in ray_docs(builds)
        if doc["kind"] == "RayService"
        for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    }
    importer = (
        "import importlib, sys; module, _, attr = sys.argv[1].partition(':');"
        " assert callable(getattr(importlib.import_module(module), attr))"
    )
    commands.update({path: [sys.executable, "-c", importer, path] for path in import_paths})
    procs = {
        key: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, cmd in commands.items()
    }
    results = {}
    for key, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[key] = subprocess.CompletedProcess(commands[key], proc.returncode, out, err)
    return results


@needs_kubectl
def test_rayjob_entrypoints_run_real_scripts_with_real_flags(builds: dict, code_checks: dict) -> None:
    scripts = entrypoint_scripts(builds)
    assert set(scripts) == {"jobs/train.py", "jobs/batch_score.py"}
    for script, flags in scripts.items():
        assert (REPO / script).is_file(), f"{script} does not exist (yet)"
        result = code_checks[script]
        assert result.returncode == 0, f"python {script} --help failed:\n{result.stderr[-2000:]}"
        unknown = {flag for flag in flags if flag not in result.stdout}
        assert not unknown, f"{script} --help does not mention {sorted(unknown)}"


@needs_kubectl
def test_serve_import_path_imports(code_checks: dict) -> None:
    paths = [key for key in code_checks if ":" in key]
    assert paths == ["serve.app:app_builder"]
    result = code_checks[paths[0]]
    assert result.returncode == 0, f"importing serve.app:app_builder failed:\n{result.stderr[-2000:]}"
