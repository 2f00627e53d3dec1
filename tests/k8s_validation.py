"""Offline checks of the Kubernetes manifests in k8s/, shared by the tests (no cluster needed).

Rendering goes through `kubectl kustomize`; core kinds are validated against the Kubernetes 1.32
schemas of kubernetes-validate, KubeRay kinds against strict JSON Schemas derived from the KubeRay
v1.7.0 CRDs, and the pod templates KubeRay embeds against the core PodTemplate schema as well
(the CRDs are generated from newer Kubernetes types, so they accept fields a 1.32 API server
drops). The rest are checks no schema can express: references between objects, pod hardening,
and the fields the operator only checks at run time. Checks return lists of problems rather than
asserting, so one run reports every broken manifest and a test can show a broken one is caught.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
K8S_VERSION = "1.32"
KUBERAY_CRDS = "kuberay-v1.7.0"
RAY_API_VERSION = "ray.io/v1"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

# Where each KubeRay kind embeds its Ray cluster spec and, inside it, pod templates
# ("*" = every item of a list). k8s/base/kustomizeconfig.yaml must name the same places.
RAY_CLUSTER_SPEC = {
    "RayCluster": ("spec",),
    "RayJob": ("spec", "rayClusterSpec"),
    "RayService": ("spec", "rayClusterConfig"),
}
CLUSTER_POD_TEMPLATES = (("headGroupSpec", "template"), ("workerGroupSpecs", "*", "template"))
EXTRA_POD_TEMPLATES = {"RayJob": (("spec", "submitterPodTemplate"),)}
CORE_POD_TEMPLATES = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
# What KubeRay accepts where the CRDs have no enum (ray-operator/apis/ray/v1 and utils/validation.go).
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYSERVICE_UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# RayJob/RayService names get a 6-character suffix for their RayCluster, whose name must leave
# room for "-serve-svc" in a 63-character Service name (utils.MaxRayJobNameLength).
MAX_RAY_CR_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RenderError(RuntimeError):
    """`kubectl kustomize` failed; the message is its stderr."""


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(path: Path) -> list[dict[str, Any]]:
    """Documents of `kubectl kustomize PATH` (kustomize built into kubectl, no cluster needed)."""
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl is not installed")
    proc = subprocess.run([binary, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def prepare_tree(dest: Path) -> Path:
    """Copy k8s/ to DEST with every secrets.env replaced by its committed secrets.env.example.

    secretGenerator needs the (gitignored) secrets.env files; rendering a copy built from the
    examples works on a fresh clone and never reads a developer's real secrets.
    """
    root = dest / "k8s"
    shutil.copytree(K8S_DIR, root, ignore=shutil.ignore_patterns("secrets.env"))
    for example in root.rglob("secrets.env.example"):
        shutil.copyfile(example, example.with_name("secrets.env"))
    return root


def kustomization(directory: Path) -> dict[str, Any] | None:
    path = directory / "kustomization.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def buildable_dirs(root: Path) -> dict[str, Path]:
    """Every directory under ROOT with a Kustomization (not a Component), by relative path."""
    found = {}
    for path in sorted(root.rglob("kustomization.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization") == "Kustomization":
            found[path.parent.relative_to(root).as_posix()] = path.parent
    return found


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


def schemas_root() -> Path:
    return Path(os.environ.get("PNEUMONET_K8S_SCHEMAS", REPO.parent / "shared" / "k8s-schemas"))


def kuberay_crd_dir() -> Path | None:
    """The KubeRay CRDs, or None when they are not there (tests then skip)."""
    directory = schemas_root() / KUBERAY_CRDS
    return directory if all((directory / name).is_file() for name in CRD_FILES.values()) else None


def crd_to_json_schema(node: Any, strict: bool = True) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON Schema.

    Drops x-kubernetes-* keys (keeping their meaning where it matters: int-or-string, preserved
    unknown fields, embedded resources), turns `nullable: true` into a type list and, if STRICT,
    forbids properties the schema does not list - which is what catches a misspelled field.
    """
    if isinstance(node, list):
        return [crd_to_json_schema(item, strict) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: crd_to_json_schema(value, strict) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            out["properties"].setdefault(key, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def ray_validators(crd_dir: Path) -> dict[str, Any]:
    """One Draft 7 validator per KubeRay kind, from the CRD's served v1 schema."""
    import jsonschema

    validators = {}
    for kind, filename in CRD_FILES.items():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
        crd = yaml.load((crd_dir / filename).read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = crd_to_json_schema(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def core_problems(doc: dict[str, Any], where: str | None = None) -> list[str]:
    """Validation of a core-kind object against the Kubernetes 1.32 schemas, strict mode."""
    import kubernetes_validate

    where = where or describe(doc)
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(part) for part in err.path) or "<root>"
        return [f"{where}: {path}: {err.message}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as err:
        return [f"{where}: {err.message}"]
    return []


def schema_problems(doc: dict[str, Any], crd_dir: Path | None) -> list[str]:
    """Schema validation of any rendered document; KubeRay kinds need CRD_DIR."""
    if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return core_problems(doc)
    where = describe(doc)
    if doc.get("apiVersion") != RAY_API_VERSION or doc.get("kind") not in CRD_FILES:
        return [f"{where}: unknown KubeRay kind/version {doc.get('apiVersion')} {doc.get('kind')}"]
    if crd_dir is None:
        raise FileNotFoundError("KubeRay CRDs are needed to validate ray.io objects")
    errors = sorted(
        ray_validators(crd_dir)[doc["kind"]].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))
    )
    problems = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    # The pod templates (and the autoscaler sidecar) once more, as a 1.32 API server sees them.
    for template_where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"}, "template": template}
        problems += core_problems(wrapped, f"{where} {template_where}")
    options = autoscaler_container(doc)
    if options is not None:
        pod = {"containers": [options], "volumes": (head_template(doc).get("spec") or {}).get("volumes", [])}
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "embedded"},
            "template": {"spec": pod},
        }
        problems += core_problems(wrapped, f"{where} autoscalerOptions")
    return problems


# ---------------------------------------------------------------------------------------------
# Walking pods
# ---------------------------------------------------------------------------------------------


def dig(node: Any, path: tuple[str, ...], where: str = "") -> Iterator[tuple[str, Any]]:
    """(location, value) for every match of PATH in NODE; "*" walks every list item."""
    if not path:
        yield where.lstrip("."), node
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for index, item in enumerate(node if isinstance(node, list) else []):
            yield from dig(item, rest, f"{where}[{index}]")
    elif isinstance(node, dict) and head in node and node[head] is not None:
        yield from dig(node[head], rest, f"{where}.{head}")


def ray_cluster(doc: dict[str, Any]) -> dict[str, Any] | None:
    path = RAY_CLUSTER_SPEC.get(doc.get("kind", "")) if str(doc.get("apiVersion", "")).startswith("ray.io/") else None
    found = [value for _, value in dig(doc, path)] if path else []
    return found[0] if found else None


def head_template(doc: dict[str, Any]) -> dict[str, Any]:
    return ((ray_cluster(doc) or {}).get("headGroupSpec") or {}).get("template") or {}


def autoscaling(doc: dict[str, Any]) -> bool:
    return bool((ray_cluster(doc) or {}).get("enableInTreeAutoscaling"))


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(location, PodTemplateSpec) of every pod the object makes, core kinds and KubeRay kinds."""
    kind = doc.get("kind", "")
    if kind == "Pod":
        return [("", {"metadata": doc.get("metadata", {}), "spec": doc.get("spec", {})})]
    if kind in CORE_POD_TEMPLATES and not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return list(dig(doc, CORE_POD_TEMPLATES[kind]))
    if kind not in RAY_CLUSTER_SPEC:
        return []
    found = []
    base = RAY_CLUSTER_SPEC[kind]
    for path in CLUSTER_POD_TEMPLATES:
        found += dig(doc, base + path)
    for path in EXTRA_POD_TEMPLATES.get(kind, ()):
        found += dig(doc, path)
    return found


def autoscaler_container(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The autoscaler sidecar KubeRay adds to the head pod, as far as autoscalerOptions define it.

    None when autoscaling is off (no sidecar). Its image is the head's unless overridden.
    """
    if not autoscaling(doc):
        return None
    options = (ray_cluster(doc) or {}).get("autoscalerOptions") or {}
    fields = (
        "image",
        "imagePullPolicy",
        "command",
        "args",
        "env",
        "envFrom",
        "resources",
        "securityContext",
        "volumeMounts",
    )
    return {"name": "autoscaler", **{key: copy.deepcopy(options[key]) for key in fields if key in options}}


def containers(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = template.get("spec") or {}
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            yield f"{field}[{container.get('name')}]", container


def all_containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(location, container, pod spec) of every container the object runs, autoscaler included."""
    for where, template in pod_templates(doc):
        for container_where, container in containers(template):
            yield f"{describe(doc)} {where} {container_where}", container, template.get("spec") or {}
    sidecar = autoscaler_container(doc)
    if sidecar is not None:
        yield f"{describe(doc)} autoscalerOptions", sidecar, head_template(doc).get("spec") or {}


# ---------------------------------------------------------------------------------------------
# References between objects
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One object named by another: KIND/NAME, optionally a KEY of its data."""

    source: str
    kind: str
    name: str
    key: str | None = None
    optional: bool = False


def _container_refs(where: str, container: dict[str, Any]) -> list[Ref]:
    refs = []
    for env in container.get("env") or []:
        source = env.get("valueFrom") or {}
        for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if field in source:
                ref = source[field]
                refs.append(
                    Ref(
                        f"{where}.env[{env['name']}]",
                        kind,
                        ref.get("name", ""),
                        ref.get("key"),
                        bool(ref.get("optional")),
                    )
                )
    for index, env_from in enumerate(container.get("envFrom") or []):
        for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if field in env_from:
                ref = env_from[field]
                refs.append(
                    Ref(f"{where}.envFrom[{index}]", kind, ref.get("name", ""), None, bool(ref.get("optional")))
                )
    return refs


def references(doc: dict[str, Any]) -> list[Ref]:
    """Every ConfigMap, Secret, ServiceAccount and PVC the object's pods need."""
    refs = []
    for where, template in pod_templates(doc):
        spec = template.get("spec") or {}
        where = f"{describe(doc)} {where}"
        if spec.get("serviceAccountName"):
            refs.append(Ref(f"{where}.serviceAccountName", "ServiceAccount", spec["serviceAccountName"]))
        for secret in spec.get("imagePullSecrets") or []:
            refs.append(Ref(f"{where}.imagePullSecrets", "Secret", secret.get("name", "")))
        for volume in spec.get("volumes") or []:
            at = f"{where}.volumes[{volume.get('name')}]"
            if "configMap" in volume:
                refs.append(
                    Ref(
                        at,
                        "ConfigMap",
                        volume["configMap"].get("name", ""),
                        None,
                        bool(volume["configMap"].get("optional")),
                    )
                )
            if "secret" in volume:
                refs.append(
                    Ref(
                        at,
                        "Secret",
                        volume["secret"].get("secretName", ""),
                        None,
                        bool(volume["secret"].get("optional")),
                    )
                )
            if "persistentVolumeClaim" in volume:
                refs.append(Ref(at, "PersistentVolumeClaim", volume["persistentVolumeClaim"].get("claimName", "")))
            for source in (volume.get("projected") or {}).get("sources") or []:
                for field, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
                    if field in source:
                        refs.append(
                            Ref(at, kind, source[field].get("name", ""), None, bool(source[field].get("optional")))
                        )
        for container_where, container in containers(template):
            refs += _container_refs(f"{where} {container_where}", container)
    options = (ray_cluster(doc) or {}).get("autoscalerOptions")
    if options:
        refs += _container_refs(f"{describe(doc)} autoscalerOptions", options)
    return refs


def _data_keys(obj: dict[str, Any]) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {}) | set(obj.get("binaryData") or {})


def reference_problems(docs: list[dict[str, Any]]) -> list[str]:
    """References that do not resolve inside DOCS (a missing object or key), unless optional."""
    index = {(doc.get("kind"), doc["metadata"]["name"]): doc for doc in docs}
    problems = []
    for doc in docs:
        for ref in references(doc):
            target = index.get((ref.kind, ref.name))
            if target is None:
                if not ref.optional:
                    problems.append(f"{ref.source}: {ref.kind} {ref.name!r} is not in the rendered manifests")
            elif ref.key is not None and ref.key not in _data_keys(target) and not ref.optional:
                problems.append(f"{ref.source}: {ref.kind} {ref.name!r} has no key {ref.key!r}")
    return problems


def pod_consistency_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Mistakes inside one pod that no schema sees: mounts of undefined volumes, duplicate env vars."""
    problems = []
    for doc in docs:
        for where, container, pod_spec in all_containers(doc):
            volumes = {volume.get("name") for volume in pod_spec.get("volumes") or []}
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    problems.append(f"{where}: volumeMount {mount.get('name')!r} has no volume in its pod")
            names = [env.get("name") for env in container.get("env") or []]
            for name in sorted({name for name in names if names.count(name) > 1}):
                problems.append(f"{where}: env {name!r} is defined more than once")
    return problems


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a LabelSelector (matchLabels + matchExpressions) select LABELS?"""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"{describe(doc)} {where}", (template.get("metadata") or {}).get("labels") or {})
        for doc in docs
        for where, template in pod_templates(doc)
    ]


def selector_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Services and NetworkPolicies whose selector matches none of the pods (a label typo)."""
    labels = pod_labels(docs)
    problems = []
    for doc in docs:
        if doc.get("kind") == "Service" and (doc.get("spec") or {}).get("selector"):
            selector = {"matchLabels": doc["spec"]["selector"]}
        elif doc.get("kind") == "NetworkPolicy":
            selector = doc["spec"].get("podSelector") or {}
        else:
            continue
        if not any(selects(selector, pod) for _, pod in labels):
            problems.append(f"{describe(doc)}: selector {selector} matches no pod")
    return problems


# ---------------------------------------------------------------------------------------------
# Pod hardening and resources
# ---------------------------------------------------------------------------------------------


def security_problems(docs: list[dict[str, Any]], uid: int = 1000) -> list[str]:
    """Containers that could run as root, escalate, keep capabilities or write their root fs."""
    problems = []
    for doc in docs:
        for where, container, pod_spec in all_containers(doc):
            own = container.get("securityContext") or {}
            # The container's setting wins over the pod's, where both exist.
            effective = {**(pod_spec.get("securityContext") or {}), **own}
            if effective.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if effective.get("runAsUser") != uid:
                problems.append(f"{where}: runAsUser is {effective.get('runAsUser')!r}, not {uid}")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if own.get("privileged"):
                problems.append(f"{where}: privileged")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in ((own.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if (own.get("capabilities") or {}).get("add"):
                problems.append(f"{where}: capabilities added")
            if (effective.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    return problems


def resource_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Containers without CPU and memory requests and limits, or with an unpinned image."""
    problems = []
    for doc in docs:
        for where, container, _ in all_containers(doc):
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(section) or {})
                if missing:
                    problems.append(f"{where}: no {section} for {', '.join(sorted(missing))}")
            image = container.get("image")
            if image is not None and "@sha256:" not in image:
                tag = image.rpartition("/")[2].partition(":")[2]
                if not tag or tag == "latest":
                    problems.append(f"{where}: image {image!r} is not pinned to a version tag")
    return problems


# ---------------------------------------------------------------------------------------------
# KubeRay fields the CRDs do not constrain
# ---------------------------------------------------------------------------------------------


def runtime_env_problems(text: str, where: str) -> list[str]:
    """runtimeEnvYAML as Ray reads it (RuntimeEnv accepts unknown keys as plugins: check them too)."""
    from ray.runtime_env import RuntimeEnv

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: runtimeEnvYAML is not YAML: {err}"]
    if not isinstance(value, dict):
        return [f"{where}: runtimeEnvYAML must be a mapping"]
    problems = [
        f"{where}: runtimeEnvYAML: unknown field {key!r}" for key in value if key not in RuntimeEnv.known_fields
    ]
    try:
        RuntimeEnv(**value)
    except Exception as err:  # Ray raises TypeError/ValueError/RuntimeEnvSetupError alike
        problems.append(f"{where}: runtimeEnvYAML: {err}")
    return problems


def _unknown_keys(data: dict[str, Any], model: Any, where: str) -> list[str]:
    return [f"{where}: unknown field {key!r}" for key in data if key not in model.model_fields]


def serve_config_problems(text: str, where: str) -> list[str]:
    """serveConfigV2 as Ray Serve reads it, plus the typos Serve silently ignores.

    ServeDeploySchema accepts unknown keys and keeps autoscaling_config as a plain dict, so e.g.
    `min_replica: 2` would deploy with the default instead: every level is checked by name too.
    """
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: serveConfigV2 is not YAML: {err}"]
    if not isinstance(config, dict):
        return [f"{where}: serveConfigV2 must be a mapping"]
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as err:  # pydantic.ValidationError
        return [f"{where}: serveConfigV2: {err}"]
    problems = _unknown_keys(config, ServeDeploySchema, f"{where} serveConfigV2")
    for app in config.get("applications") or []:
        app_where = f"{where} serveConfigV2 application {app.get('name')!r}"
        problems += _unknown_keys(app, ServeApplicationSchema, app_where)
        for deployment in app.get("deployments") or []:
            dep_where = f"{app_where} deployment {deployment.get('name')!r}"
            problems += _unknown_keys(deployment, DeploymentSchema, dep_where)
            problems += _unknown_keys(
                deployment.get("ray_actor_options") or {}, RayActorOptionsSchema, f"{dep_where} ray_actor_options"
            )
            autoscaling_config = deployment.get("autoscaling_config")
            if isinstance(autoscaling_config, dict):
                problems += _unknown_keys(autoscaling_config, AutoscalingConfig, f"{dep_where} autoscaling_config")
                try:
                    AutoscalingConfig(**autoscaling_config)
                except Exception as err:
                    problems.append(f"{dep_where} autoscaling_config: {err}")
    return problems


def ray_problems(doc: dict[str, Any]) -> list[str]:
    """What the KubeRay operator would reject or ignore at run time, for one RayJob/RayService."""
    kind, where = doc.get("kind"), describe(doc)
    spec = doc.get("spec") or {}
    name = doc["metadata"]["name"]
    problems = []
    if len(name) > MAX_RAY_CR_NAME or not DNS1035.match(name):
        problems.append(f"{where}: name must be a DNS-1035 label of at most {MAX_RAY_CR_NAME} characters")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"{where}: submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if not str(spec.get("entrypoint", "")).strip():
            problems.append(f"{where}: no entrypoint")
        if spec.get("runtimeEnvYAML"):
            problems += runtime_env_problems(spec["runtimeEnvYAML"], where)
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            problems.append(f"{where}: activeDeadlineSeconds must be positive")
        submitter = spec.get("submitterPodTemplate")
        if submitter:
            if mode != "K8sJobMode":
                problems.append(f"{where}: submitterPodTemplate is only used in K8sJobMode")
            first = ((submitter.get("spec") or {}).get("containers") or [{}])[0]
            if first.get("command") or first.get("args"):
                problems.append(
                    f"{where}: the submitter's first container sets command/args, so KubeRay will not submit the job"
                )
            if (submitter.get("spec") or {}).get("restartPolicy") != "Never":
                problems.append(f"{where}: submitter restartPolicy must be Never (the Job's backoffLimit retries)")
    if kind == "RayService":
        problems += serve_config_problems(spec.get("serveConfigV2") or "", where)
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in RAYSERVICE_UPGRADE_TYPES:
            problems.append(
                f"{where}: upgradeStrategy.type {upgrade!r} is not one of {sorted(RAYSERVICE_UPGRADE_TYPES)}"
            )
        for deprecated in ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"):
            if deprecated in spec:
                problems.append(f"{where}: {deprecated} is deprecated and ignored by KubeRay >= 1.3")
        head_service = (spec.get("rayClusterConfig") or {}).get("headGroupSpec", {}).get("headService") or {}
        if (head_service.get("metadata") or {}).get("name"):
            problems.append(f"{where}: headService.metadata.name must not be set on a RayService")
    cluster = ray_cluster(doc)
    if cluster is not None:
        problems += _cluster_problems(doc, cluster)
    return problems


def _cluster_problems(doc: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    where = describe(doc)
    problems = []
    if not cluster.get("rayVersion"):
        problems.append(f"{where}: rayVersion is not set")
    groups = [("head", cluster.get("headGroupSpec") or {})] + [
        (group.get("groupName", "?"), group) for group in cluster.get("workerGroupSpecs") or []
    ]
    for group_name, group in groups:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(key) for key in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{where} group {group_name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{where} group {group_name}: rayStartParams['labels'] is not supported, use labels")
    for group in cluster.get("workerGroupSpecs") or []:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"{where} group {group.get('groupName')}: replicas outside [minReplicas, maxReplicas]")
    head_spec = head_template(doc).get("spec") or {}
    if autoscaling(doc):
        options = cluster.get("autoscalerOptions") or {}
        if not options.get("resources") or not options.get("securityContext"):
            problems.append(f"{where}: autoscaling without autoscalerOptions.resources/securityContext for the sidecar")
        if head_spec.get("automountServiceAccountToken") is not True:
            problems.append(f"{where}: the autoscaler sidecar needs automountServiceAccountToken: true on the head pod")
    elif head_spec.get("automountServiceAccountToken"):
        problems.append(f"{where}: head pod mounts an API token but runs no autoscaler")
    return problems


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "2", "16Gi", 3) as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def secret_data(doc: dict[str, Any]) -> dict[str, str]:
    """A rendered Secret's values, decoded."""
    data = {key: base64.b64decode(value).decode() for key, value in (doc.get("data") or {}).items()}
    data.update(doc.get("stringData") or {})
    return data


def request_timeout_problems(config: dict[str, Any], request_timeout_s: float, where: str) -> list[str]:
    """The proxy's http_options.request_timeout_s is set, and above the replica's serve.request_timeout_s
    (which answers first, with its reason; the proxy's is the backstop a request header can lift)."""
    proxy = (config.get("http_options") or {}).get("request_timeout_s")
    if proxy is None or not proxy > request_timeout_s:
        return [f"{where}: http_options.request_timeout_s {proxy} must be set and above serve.request_timeout_s {request_timeout_s}"]
    return []


def overload_problems(deployment: dict[str, Any], max_batch_size: int, where: str) -> list[str]:
    """The PneumonetModel deployment's queue bounds and autoscaling follow one signal (online.py):
    a bounded proxy queue, room in the replica for two batches and its admitted queue, and a scaling
    target under the point where a replica starts refusing."""
    problems = []
    ongoing = deployment.get("max_ongoing_requests", 0)
    queued = deployment.get("max_queued_requests", -1)
    scaling = deployment.get("autoscaling_config") or {}
    if ongoing < 2 * max_batch_size:
        problems.append(f"{where}: max_ongoing_requests {ongoing} < 2 x serve.max_batch_size {max_batch_size}")
    if not 0 < queued <= ongoing:
        problems.append(f"{where}: max_queued_requests {queued} must be bounded (1..max_ongoing_requests)")
    target = scaling.get("target_ongoing_requests")
    if not (target and max_batch_size <= target < ongoing):
        problems.append(f"{where}: target_ongoing_requests {target} must be in [max_batch_size, max_ongoing_requests)")
    if not 1 <= scaling.get("min_replicas", 0) < scaling.get("max_replicas", 0):
        problems.append(f"{where}: autoscaling needs 1 <= min_replicas < max_replicas")
    if "backpressure_config" in deployment:
        problems.append(f"{where}: backpressure_config comes from serve.retry_after_s (build_app); do not restate it")
    return problems
