"""The Helm chart (charts/kfopt) through the real Helm engine, and `kfopt publish` that its hook Job runs.

Helm: the `helm` binary when it is on PATH, else helm-python-sdk (Helm's Go SDK in a
shared library, a dev dependency), so no binary is needed. Every rendered document is
checked against Kubernetes' own JSON schemas (kubernetes-validate, offline, strict: an
unknown field is an error) for the oldest and the newest Kubernetes the chart supports,
plus a few rules those schemas do not carry. The placement ConfigMap is loaded back with
kfopt's own load_placement and compiled into a pipeline. The chart's MLflow launcher runs
for real: the schema migration on an old database, and a server that asks for a login.
The image's constraints.txt is checked against the versions kfopt is tested with.
"""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kfopt.cli import main
from kfopt.errors import KfoptError
from kfopt.pipelines.placement import load_placement

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kfopt"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "rel", "ml"
FULLNAME = f"{RELEASE}-kfopt"
KFOPT = str(Path(sys.executable).parent / "kfopt")


# -- the Helm engine -------------------------------------------------------------------------
class HelmFailed(Exception):
    """Helm refused the values or a template failed; the message is Helm's."""


class _SdkEngine:
    """helm-python-sdk: Helm's Go SDK (the same engine as the helm binary) through ctypes."""

    def __init__(self):
        import helm_python

        self.helm = helm_python
        self.name = f"helm-python-sdk (Helm SDK {helm_python.helm_sdk_version()})"

    def render(self, values: dict, chart_dir: Path = CHART) -> tuple[dict[str, str], str]:
        with self.helm.Chart.load(str(chart_dir)) as chart:
            try:
                files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except self.helm.HelmError as exc:
                raise HelmFailed(str(exc)) from None
        notes = files.pop("kfopt/templates/NOTES.txt", "")
        return files, notes

    def lint(self, values: dict) -> list[tuple[int, str]]:
        report = self.helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        return [(m["severity"], f"{m['path']}: {m['error']}") for m in report["messages"]]


class _BinaryEngine:
    """The helm binary on PATH."""

    def __init__(self, path: str):
        self.path = path
        version = subprocess.run([path, "version", "--short"], capture_output=True, text=True).stdout.strip()
        self.name = f"helm binary {version} ({path})"

    def _run(self, *args, values: dict):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "values.json"
            path.write_text(json.dumps(values))  # JSON is YAML
            return subprocess.run(
                [self.path, *args, "--namespace", NAMESPACE, "-f", str(path)], capture_output=True, text=True
            )

    def render(self, values: dict, chart_dir: Path = CHART) -> tuple[dict[str, str], str]:
        done = self._run("template", RELEASE, str(chart_dir), values=values)
        if done.returncode:
            raise HelmFailed(done.stderr.strip())
        files: dict[str, str] = {}
        for part in re.split(r"^---\s*$", done.stdout, flags=re.M):
            source = re.search(r"^# Source: (\S+)", part, flags=re.M)
            if source:
                files[source[1]] = files.get(source[1], "") + "\n---\n" + part
        installed = self._run("install", RELEASE, str(chart_dir), "--dry-run=client", values=values)
        notes = installed.stdout.split("NOTES:", 1)[1] if "NOTES:" in installed.stdout else ""
        return files, notes

    def lint(self, values: dict) -> list[tuple[int, str]]:
        done = self._run("lint", str(CHART), "--strict", values=values)
        levels = {"[INFO]": 1, "[WARNING]": 2, "[ERROR]": 3}
        found = [
            (levels[m[1]], m[2])
            for m in re.finditer(
                r"^(\S*\s*)?(\[INFO\]|\[WARNING\]|\[ERROR\])(.*)$", done.stdout + done.stderr, flags=re.M
            )
        ]
        return found or ([(3, done.stdout + done.stderr)] if done.returncode else [])


ENGINE = _BinaryEngine(shutil.which("helm")) if shutil.which("helm") else _SdkEngine()


class Rendered:
    """The documents of one `helm template`, and NOTES.txt."""

    def __init__(self, files: dict[str, str], notes: str):
        self.notes = notes
        self.docs = [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]

    def kinds(self) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in self.docs}

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {sorted(self.kinds())}"
        return found[0]

    def placement_file(self) -> str:
        return self.one("ConfigMap", f"{FULLNAME}-config")["data"]["placement.yaml"]

    def pod_specs(self) -> dict[str, dict]:
        """Every pod template: by 'Kind/name'."""
        pods = {}
        for d in self.docs:
            spec = {
                "Deployment": lambda d: d["spec"]["template"]["spec"],
                "Job": lambda d: d["spec"]["template"]["spec"],
                "CronJob": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            }.get(d["kind"])
            if spec:
                pods[f"{d['kind']}/{d['metadata']['name']}"] = spec(d)
        return pods


def render(values: dict | None = None) -> Rendered:
    return Rendered(*ENGINE.render(copy.deepcopy(values or {})))


def render_without_schema(values: dict, tmp_path: Path) -> Rendered:
    """Render as `helm install --skip-schema-validation` does: the templates must hold the line alone."""
    chart_dir = tmp_path / "kfopt"
    shutil.copytree(CHART, chart_dir)
    (chart_dir / "values.schema.json").unlink()
    return Rendered(*ENGINE.render(copy.deepcopy(values), chart_dir))


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / name).read_text())


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


DIGEST = "sha256:" + "0123456789abcdef" * 4
EVERYTHING = {  # every optional resource of the chart at once
    "schedule": {"enabled": True},
    "rbac": {"create": True},
    "image": {"digest": DIGEST},
    "pipeline": {
        "mlflowSecret": "mlflow-login",
        "search": [
            "quantize(mode=int8)",
            {"name": "student", "steps": [{"distill": {"width": 0.5}}, "quantize(mode=int8)"]},
        ],
    },
    "mlflow": {
        "ingress": {"enabled": True, "tlsSecretName": "tls"},
        "networkPolicy": {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nginx"}}}]},
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "basicAuthSecret": "mlflow-prometheus"}},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 0},
        "env": {"AZURE_STORAGE_CONNECTION_STRING": {"secretKeyRef": {"name": "azure", "key": "connection-string"}}},
        "envFrom": [{"secretRef": {"name": "mlflow-extra"}}],
    },
}
POSTGRES_S3 = {
    "mlflow": {
        "replicas": 2,
        "backendStore": {
            "type": "postgresql",
            "postgresql": {"host": "pg.db.svc", "existingSecret": "mlflow-db", "sslmode": "require"},
        },
        "artifactStore": {
            "type": "s3",
            "s3": {
                "bucket": "models",
                "prefix": "kfopt",
                "endpointUrl": "http://minio.minio.svc:9000",
                "existingSecret": "mlflow-s3",
                "region": "eu-west-1",
            },
        },
    }
}


# -- Kubernetes validity -----------------------------------------------------------------------
#: Fields each kind needs beyond what its JSON schema requires (the schemas leave most optional).
REQUIRED = {
    "ConfigMap": ["data"],
    "Secret": ["data"],
    "PodDisruptionBudget": ["spec.selector.matchLabels"],
    "ServiceMonitor": ["spec.selector.matchLabels", "spec.endpoints"],
    "ServiceAccount": [],
    "Service": ["spec.selector", "spec.ports"],
    "Deployment": ["spec.selector.matchLabels", "spec.template.metadata.labels", "spec.template.spec.containers"],
    "Job": ["spec.template.spec.containers", "spec.template.spec.restartPolicy"],
    "CronJob": [
        "spec.schedule",
        "spec.jobTemplate.spec.template.spec.containers",
        "spec.jobTemplate.spec.template.spec.restartPolicy",
    ],
    "PersistentVolumeClaim": ["spec.accessModes", "spec.resources.requests.storage"],
    "Ingress": ["spec.rules"],
    "NetworkPolicy": ["spec.podSelector", "spec.policyTypes"],
    "Role": ["rules"],
    "RoleBinding": ["roleRef", "subjects"],
}
#: Kinds of CRDs (the Prometheus Operator's): no schema in kubernetes-validate; their fields are asserted by the tests.
CUSTOM_KINDS = {"ServiceMonitor"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUBERNETES = ["1.25", "latest"]  # Chart.yaml's kubeVersion floor, and the newest schemas shipped


def annotations(doc: dict) -> dict:
    return doc["metadata"].get("annotations") or {}


def hook_weight(doc: dict) -> int:
    return int(annotations(doc).get("helm.sh/hook-weight", "0"))


def check_pre_install_hooks(rendered: Rendered) -> None:
    """A pre-install hook runs before any other object of the release exists: it may only use hooks before it."""
    for hook in rendered.docs:
        if "pre-install" not in annotations(hook).get("helm.sh/hook", "").split(","):
            continue
        earlier = {
            (d["kind"], d["metadata"]["name"])
            for d in rendered.docs
            if "pre-install" in annotations(d).get("helm.sh/hook", "") and hook_weight(d) < hook_weight(hook)
        }
        if hook["kind"] != "Job":
            continue
        pod = hook["spec"]["template"]["spec"]
        where = f"Job/{hook['metadata']['name']}"
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in earlier, (
                    f"{where}: its ConfigMap does not exist yet"
                )
        account = pod.get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) not in rendered.kinds(), f"{where}: SA not created yet"


def dig(doc: dict, path: str):
    for key in path.split("."):
        doc = doc[key]
    return doc


def check_kubernetes_objects(rendered: Rendered, existing_claims=()) -> None:
    """Every document: a known kind, valid for Kubernetes (strict schema), and consistent with the others."""
    import kubernetes_validate

    configmaps = {d["metadata"]["name"] for d in rendered.all("ConfigMap")}
    claims = {d["metadata"]["name"] for d in rendered.all("PersistentVolumeClaim")}
    for doc in rendered.docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion") and doc.get("kind") in REQUIRED, where
        name = doc["metadata"]["name"]
        assert DNS_1123.match(name) and len(name) <= 63, f"{where}: not a DNS-1123 label"
        for field in REQUIRED[doc["kind"]]:
            assert dig(doc, field), f"{where}: {field} is empty"
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBERNETES:
            version = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{where} is not a valid Kubernetes {version} object: {'.'.join(map(str, exc.path))}: {exc.message}"
                )
    for where, pod in rendered.pod_specs().items():
        if not where.startswith("Deployment"):
            assert pod["restartPolicy"] in ("Never", "OnFailure"), where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}/{c['name']}: mounts undefined volume {mount['name']}"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{where}: no ConfigMap {volume['configMap']['name']}"
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims or claim in existing_claims, f"{where}: no PVC {claim}"
    check_pre_install_hooks(rendered)
    for deployment in rendered.all("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in rendered.all("Service"):
        assert any(
            service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in rendered.all("Deployment")
        ), "the Service selects no pod"


# -- rendering and linting -------------------------------------------------------------------------
def test_the_helm_engine_is_helm():
    assert re.search(r"v\d+\.\d+\.\d+", ENGINE.name), ENGINE.name
    assert render().notes.startswith('kfopt 0.1.0 is installed as release "rel" in namespace "ml"')


def test_default_install_renders_mlflow_and_the_registration_hook():
    rendered = render()
    assert rendered.kinds() == {
        ("ServiceAccount", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-config"),
        ("Secret", f"{FULLNAME}-mlflow-auth"),
        ("Deployment", f"{FULLNAME}-mlflow"),
        ("Service", f"{FULLNAME}-mlflow"),
        ("NetworkPolicy", f"{FULLNAME}-mlflow"),
        ("PersistentVolumeClaim", f"{FULLNAME}-mlflow-db"),
        ("PersistentVolumeClaim", f"{FULLNAME}-mlflow-artifacts"),
        ("Job", f"{FULLNAME}-register"),
    }
    check_kubernetes_objects(rendered)
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    args = mlflow["args"]
    assert mlflow["command"] == ["python3", "/etc/kfopt/serve-mlflow.py"]
    assert args[args.index("--artifacts-destination") + 1] == "/artifacts" and "--serve-artifacts" in args
    assert args[args.index("--app-name") + 1] == "basic-auth"  # a login by default
    assert env(mlflow)["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////data/mlflow.db"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert mlflow["resources"]["requests"] and mlflow["resources"]["limits"]["memory"]
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert f"{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:*" in hosts and "localhost:*" in hosts
    assert rendered.one("Deployment")["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce volumes
    uri = f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert uri in rendered.notes and "port-forward service/rel-kfopt-mlflow" in rendered.notes


def test_lint_is_clean_at_strict_level_for_the_defaults_and_every_example():
    for values in [{}, EVERYTHING, POSTGRES_S3] + [yaml.safe_load(p.read_text()) for p in EXAMPLES]:
        problems = [m for m in ENGINE.lint(values) if m[0] >= 2]  # warnings and errors; info is fine
        assert problems == [], problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders_valid_kubernetes_objects(path):
    rendered = render(yaml.safe_load(path.read_text()))
    check_kubernetes_objects(rendered)
    assert load_placement_text(rendered.placement_file()).cpu is not None


def test_every_optional_resource_renders_valid_kubernetes_objects(tmp_path):
    from kfopt.recipe_search import load_search

    rendered = render(EVERYTHING)
    (tmp_path / "search.yaml").write_text(rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["search.yaml"])
    assert [r.label for r in load_search(tmp_path / "search.yaml")] == ["quantize(mode=int8)", "student"]
    assert {kind for kind, _ in rendered.kinds()} == {
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Job",
        "CronJob",
        "Ingress",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
    }
    check_kubernetes_objects(rendered)
    check_kubernetes_objects(render(POSTGRES_S3 | {"mlflow": {**POSTGRES_S3["mlflow"], **EVERYTHING["mlflow"]}}))


def test_external_mlflow_deploys_no_server_and_the_runs_log_there():
    uri = "http://mlflow.mlflow.svc.cluster.local:5000"
    rendered = render({"mlflow": {"external": {"uri": uri}}, "schedule": {"enabled": True}})
    assert not {kind for kind, _ in rendered.kinds()} & {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Ingress",
        "NetworkPolicy",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    assert "serve-mlflow.py" not in rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]
    args = container(rendered.pod_specs()[f"CronJob/{FULLNAME}-schedule"], "submit")["args"]
    assert args[args.index("--tracking-uri") + 1] == uri
    assert f"existing tracking server {uri}" in rendered.notes and f"tracking_uri = {uri}" in rendered.notes
    check_kubernetes_objects(rendered)


def test_postgresql_and_s3_take_credentials_from_existing_secrets_only():
    rendered = render(POSTGRES_S3)
    check_kubernetes_objects(rendered)
    assert not rendered.all("PersistentVolumeClaim")
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]  # rolling updates: no volume
    mlflow = container(deployment["spec"]["template"]["spec"], "mlflow")
    variables = env(mlflow)
    assert variables["KFOPT_DB_PASSWORD"] == {"secretKeyRef": {"name": "mlflow-db", "key": "password"}}
    assert variables["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert variables["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "mlflow-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert variables["KFOPT_DB_HOST"] == "pg.db.svc" and variables["KFOPT_DB_SSLMODE"] == "require"
    assert (
        variables["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
        and variables["AWS_DEFAULT_REGION"] == "eu-west-1"
    )
    assert "MLFLOW_BACKEND_STORE_URI" not in variables  # built at runtime by serve-mlflow.py, never in the spec
    args = mlflow["args"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://models/kfopt" and "--serve-artifacts" in args
    # No secret material anywhere in plain text: every credential-like variable comes from a Secret.
    for c in (c for pod in rendered.pod_specs().values() for c in pod.get("initContainers", []) + pod["containers"]):
        for e in c.get("env", []):
            if re.search(r"PASSWORD|SECRET|TOKEN$|KEY_ID", e["name"]):
                assert "valueFrom" in e, e
    assert "@pg.db.svc" not in yaml.safe_dump_all(rendered.docs)  # no connection URI anywhere in the manifests
    assert env(mlflow)["KFOPT_AUTH_CONFIG"] == "/etc/kfopt/basic_auth.ini"  # users in the same PostgreSQL server
    ini = rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["basic_auth.ini"]
    assert re.search(r"^database_uri =$", ini, flags=re.M)  # filled in at start, from the Secret


def test_gcs_and_unproxied_artifact_stores():
    rendered = render(
        {
            "mlflow": {
                "artifactStore": {"type": "gcs", "gcs": {"bucket": "b", "prefix": "", "existingSecret": "gcs-key"}}
            }
        }
    )
    check_kubernetes_objects(rendered)
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    mlflow = container(pod, "mlflow")
    assert mlflow["args"][mlflow["args"].index("--artifacts-destination") + 1] == "gs://b"
    assert env(mlflow)["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/secrets/gcs/key.json"
    assert any(v.get("secret", {}).get("secretName") == "gcs-key" for v in pod["volumes"])
    rendered = render({"mlflow": {"artifactStore": {"type": "s3", "proxied": False, "s3": {"bucket": "b"}}}})
    args = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")["args"]
    assert "--no-serve-artifacts" in args and args[args.index("--default-artifact-root") + 1] == "s3://b/mlflow"
    assert "AWS_ACCESS_KEY_ID" not in env(
        container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    )  # IRSA


def test_security_context_of_every_pod_and_container():
    for values in (EVERYTHING, POSTGRES_S3):
        rendered = render(values)
        pods = rendered.pod_specs()
        assert set(pods) >= {f"Job/{FULLNAME}-register", f"Deployment/{FULLNAME}-mlflow"}
        for where, pod in pods.items():
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["automountServiceAccountToken"] is False, where  # no Kubernetes API token anywhere
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), where
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert not any("hostPath" in v for v in volumes.values()), where
            for c in pod.get("initContainers", []) + pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (
                    where,
                    c["name"],
                )
                assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False, (where, c["name"])
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["runAsNonRoot"] is True, (
                    where,
                    c["name"],
                )
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/home/kfopt"]], (
                    where,
                    c["name"],
                )
                assert env(c)["HOME"] == "/home/kfopt", (where, c["name"])
                assert c["resources"]["requests"], (where, c["name"])
        assert rendered.one("ServiceAccount")["automountServiceAccountToken"] is False


def test_rbac_is_created_only_when_asked_and_grants_only_kfp_pipelines():
    assert not render().all("Role") and not render().all("RoleBinding")
    rendered = render({"rbac": {"create": True}, "kfp": {"namespace": "team-a"}})
    role, binding = rendered.one("Role"), rendered.one("RoleBinding")
    assert role["metadata"]["namespace"] == "team-a" == binding["metadata"]["namespace"]
    assert role["metadata"]["name"] == f"{FULLNAME}-{NAMESPACE}-kfp" == binding["roleRef"]["name"]
    assert role["rules"] == [
        {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["pipelines"], "verbs": ["get", "list", "create"]}
    ]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    scheduled = render({"rbac": {"create": True}, "schedule": {"enabled": True}}).one("Role")
    assert scheduled["metadata"]["namespace"] == "kubeflow"  # shared pipelines are authorized in KFP's namespace
    assert {r for rule in scheduled["rules"] for r in rule["resources"]} == {"pipelines", "experiments", "runs"}
    assert all(
        rule["apiGroups"] == ["pipelines.kubeflow.org"] and "delete" not in rule["verbs"] for rule in scheduled["rules"]
    )


def test_the_registration_hook_compiles_with_the_configmap_and_publishes_with_the_sa_token():
    rendered = render(
        {
            "pipeline": {
                "name": "kfopt-prod",
                "version": "v7",
                "acceleratorImage": "r/kfopt:gpu",
                "parallelism": 4,
                "rounds": 2,
                "stepRetries": 5,
                "search": ["quantize(mode=int8)"],
            },
            "kfp": {"namespace": "team-a", "host": "https://kubeflow.example.com/pipeline"},
        }
    )
    job = rendered.one("Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    pod = job["spec"]["template"]["spec"]
    compile_args = container(pod, "compile")["args"]
    assert compile_args[:3] == ["compile", "--output", "/tmp/pipeline/pipeline.yaml"]
    options = dict(zip(compile_args[3::2], compile_args[4::2]))
    assert options == {
        "--image": "ghcr.io/kfopt/kfopt:0.1.0",
        "--accelerator-image": "r/kfopt:gpu",
        "--placement": "/etc/kfopt/placement.yaml",
        "--search": "/etc/kfopt/search.yaml",
        "--parallelism": "4",
        "--rounds": "2",
        "--step-retries": "5",
    }
    assert yaml.safe_load(rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["search.yaml"]) == [
        "quantize(mode=int8)"
    ]
    publish = container(pod, "publish")
    assert publish["args"] == [
        "publish",
        "--package",
        "/tmp/pipeline/pipeline.yaml",
        "--host",
        "https://kubeflow.example.com/pipeline",
        "--name",
        "kfopt-prod",
        "--version",
        "v7",
        "--namespace",
        "team-a",
    ]
    assert env(publish)["KF_PIPELINES_SA_TOKEN_PATH"] == "/var/run/secrets/kubeflow/pipelines/token"
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")["projected"]["sources"][0][
        "serviceAccountToken"
    ]
    assert token["audience"] == "pipelines.kubeflow.org" and token["path"] == "token"
    default = container(render().one("Job")["spec"]["template"]["spec"], "publish")["args"]
    assert "--version" not in default and "--namespace" not in default  # content-hash versions, shared pipeline
    assert not render({"pipeline": {"register": False}}).all("Job")


def test_the_schedule_runs_kfopt_submit_with_the_run_arguments():
    rendered = render(
        {
            "schedule": {
                "enabled": True,
                "cron": "30 2 * * 1",
                "timeZone": "Europe/Berlin",
                "arguments": {
                    "model": "gs://b/m",
                    "data": "gs://b/d.npz",
                    "maxAccuracyDrop": 0.005,
                    "objective": "latency",
                    "registeredModel": "resnet",
                },
            },
            "pipeline": {"mlflowSecret": "mlflow-login"},
        }
    )
    cron = rendered.one("CronJob")
    assert cron["spec"]["schedule"] == "30 2 * * 1" and cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    args = container(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"], "submit")["args"]
    assert args[0] == "submit"
    options = dict(zip(args[1::2], args[2::2]))
    assert (
        options["--model"] == "gs://b/m"
        and options["--data"] == "gs://b/d.npz"
        and options["--max-accuracy-drop"] == "0.005"
    )
    assert options["--objective"] == "latency" and options["--registered-model"] == "resnet"
    assert options["--mlflow-secret"] == "mlflow-login"
    assert options["--tracking-uri"] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert options["--placement"] == "/etc/kfopt/placement.yaml" and options["--host"].startswith(
        "http://ml-pipeline.kubeflow"
    )
    # Every option the CronJob passes is one `kfopt submit` accepts.
    result = CliRunner().invoke(main, ["submit", "--help"])
    assert all(option in result.output for option in options)


def namespace_peer(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def test_network_policy_is_on_by_default_and_admits_only_the_release_and_the_pipeline_namespace():
    release = {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kfopt", "app.kubernetes.io/instance": RELEASE}}
    }
    policy = render().one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    # The chart's own Jobs and scheduled runs, and standalone KFP's namespace, where its steps run.
    assert rule["from"] == [release, namespace_peer("kubeflow")]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # Multi-user Kubeflow: the profile namespace; more peers (an ingress controller) only when listed.
    nginx = namespace_peer("ingress-nginx")
    rendered = render({"kfp": {"namespace": "team-a"}, "mlflow": {"networkPolicy": {"from": [nginx]}}})
    assert rendered.one("NetworkPolicy")["spec"]["ingress"][0]["from"] == [release, namespace_peer("team-a"), nginx]
    check_kubernetes_objects(rendered)
    pinned = render({"mlflow": {"networkPolicy": {"pipelineNamespace": "pipelines"}}}).one("NetworkPolicy")
    assert pinned["spec"]["ingress"][0]["from"][1] == namespace_peer("pipelines")
    assert not render({"mlflow": {"networkPolicy": {"enabled": False}}}).all("NetworkPolicy")
    notes = render({"mlflow": {"ingress": {"enabled": True}}}).notes
    assert "the Ingress cannot reach the server until your ingress controller's namespace is in" in notes
    metrics = {"enabled": True, "serviceMonitor": {"enabled": True, "basicAuthSecret": "prometheus"}}
    assert "Prometheus cannot scrape /metrics until" in render({"mlflow": {"metrics": metrics}}).notes


def test_ingress_host_is_an_allowed_host_of_the_server():
    rendered = render({"mlflow": {"ingress": {"enabled": True, "host": "mlflow.corp.example", "className": "nginx"}}})
    ingress = rendered.one("Ingress")
    assert (
        ingress["spec"]["rules"][0]["host"] == "mlflow.corp.example" and ingress["spec"]["ingressClassName"] == "nginx"
    )
    args = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")["args"]
    assert "mlflow.corp.example" in args[args.index("--allowed-hosts") + 1].split(",")
    assert "http://mlflow.corp.example/" in rendered.notes


# -- secure by default: a login, secrets only from Secrets ---------------------------------------------------
def secret_ref(value) -> tuple[str, str] | None:
    return (value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]) if isinstance(value, dict) else None


def test_the_server_asks_for_a_login_by_default_with_an_admin_from_a_generated_secret():
    rendered = render()
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    assert mlflow["args"][mlflow["args"].index("--app-name") + 1] == "basic-auth"
    variables = env(mlflow)
    secret = f"{FULLNAME}-mlflow-auth"
    assert secret_ref(variables["MLFLOW_AUTH_ADMIN_USERNAME"]) == (secret, "username")
    assert secret_ref(variables["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (secret, "password")
    assert secret_ref(variables["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == (secret, "flask-secret-key")
    assert variables["KFOPT_AUTH_CONFIG"] == "/etc/kfopt/basic_auth.ini"
    generated = rendered.one("Secret")
    assert generated["metadata"]["name"] == secret and set(generated["data"]) == {
        "username",
        "password",
        "flask-secret-key",
    }
    assert base64.b64decode(generated["data"]["username"]) == b"admin"
    assert len(base64.b64decode(generated["data"]["password"])) >= 12  # MLflow's minimum
    # Kept across upgrades (the template looks it up) and past uninstall: MLflow takes the password only once.
    assert annotations(generated)["helm.sh/resource-policy"] == "keep"
    assert "lookup" in (CHART / "templates" / "mlflow-auth-secret.yaml").read_text()
    ini = rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]["basic_auth.ini"]
    assert "default_permission = READ" in ini and "database_uri = sqlite:////data/basic_auth.db" in ini
    assert "admin_password" not in ini and "password" not in ini.replace("default_permission", "")
    assert f"get secret {secret}" in rendered.notes and "Every request needs a login" in rendered.notes
    assert "pipeline.mlflowSecret is not set" in rendered.notes  # and the notes say how to give the steps one


def test_an_existing_admin_secret_is_used_as_is_and_auth_can_be_turned_off():
    rendered = render({"mlflow": {"auth": {"existingSecret": "mlflow-admin", "passwordKey": "pw"}}})
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    assert secret_ref(env(mlflow)["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("mlflow-admin", "pw")
    assert secret_ref(env(mlflow)["MLFLOW_AUTH_ADMIN_USERNAME"]) == ("mlflow-admin", "username")
    assert set(rendered.one("Secret")["data"]) == {"flask-secret-key"}  # the chart generates only what it must
    off = render({"mlflow": {"auth": {"enabled": False}}})
    mlflow = container(off.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    assert "--app-name" not in mlflow["args"] and not off.all("Secret")
    assert (
        "MLFLOW_AUTH_ADMIN_PASSWORD" not in env(mlflow)
        and "basic_auth.ini" not in off.one("ConfigMap", f"{FULLNAME}-config")["data"]
    )
    assert "anyone who reaches the server can register models and move `champion`" in off.notes


def test_server_env_takes_secret_refs_and_env_from_secrets():
    rendered = render(EVERYTHING)
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    assert secret_ref(env(mlflow)["AZURE_STORAGE_CONNECTION_STRING"]) == ("azure", "connection-string")
    assert mlflow["envFrom"] == [{"secretRef": {"name": "mlflow-extra"}}]
    assert env(mlflow)["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # plain values stay plain


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "api_token", "GCS_KEY"])
def test_a_plain_credential_is_refused_even_without_the_schema(name, tmp_path):
    with pytest.raises(HelmFailed, match=rf"mlflow.env.{name} looks like a credential and must not be a plain value"):
        render_without_schema({"mlflow": {"env": {name: "x"}}}, tmp_path)


def rendered_text(rendered: Rendered) -> str:
    return yaml.safe_dump_all(rendered.docs) + rendered.notes


def test_no_credential_of_an_external_uri_reaches_any_argument_or_the_notes(tmp_path):
    uri = "https://bob:hunter2-secret@mlflow.example.com:8443/mlflow"
    values = {"mlflow": {"external": {"uri": uri}}, "schedule": {"enabled": True}}
    with pytest.raises(HelmFailed, match="at '/mlflow/external/uri'"):
        render(values)  # the schema refuses it: a login in values is a secret in plain text
    # Past the schema (helm install --skip-schema-validation), the templates drop the login themselves.
    rendered = render_without_schema(values, tmp_path)
    text = rendered_text(rendered)
    assert "hunter2" not in text and "bob" not in text
    stripped = "https://mlflow.example.com:8443/mlflow"
    args = container(rendered.pod_specs()[f"CronJob/{FULLNAME}-schedule"], "submit")["args"]
    assert args[args.index("--tracking-uri") + 1] == stripped
    assert (
        f"tracking_uri = {stripped}" in rendered.notes
        and "the login in mlflow.external.uri was dropped" in rendered.notes
    )


def test_no_secret_value_in_any_argument_or_plain_env_of_any_pod():
    for values in (EVERYTHING, POSTGRES_S3, {"schedule": {"enabled": True}, "pipeline": {"mlflowSecret": "login"}}):
        rendered = render(values)
        for where, pod in rendered.pod_specs().items():
            for c in pod.get("initContainers", []) + pod["containers"]:
                for arg in c.get("command", []) + c.get("args", []):
                    assert not re.search(r"://[^/@\s]*:[^/@\s]*@", arg), (where, arg)
                for e in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN$|KEY_ID|_KEY$|CREDENTIAL|CONNECTION_STRING", e["name"]):
                        assert "valueFrom" in e, (where, e)


def test_the_pipeline_steps_login_secret_reaches_compile_and_submit():
    rendered = render({"pipeline": {"mlflowSecret": "mlflow-login"}, "schedule": {"enabled": True}})
    for where, name in ((f"Job/{FULLNAME}-register", "compile"), (f"CronJob/{FULLNAME}-schedule", "submit")):
        args = container(rendered.pod_specs()[where], name)["args"]
        assert args[args.index("--mlflow-secret") + 1] == "mlflow-login", where
    assert "log in with Secret mlflow-login (keys username, password) in namespace kubeflow" in rendered.notes
    assert "--mlflow-secret mlflow-login" in rendered.notes


def compiled_platform(path: Path) -> tuple[dict, dict]:
    pipeline, platform = yaml.safe_load_all(path.read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compile_with_mlflow_secret_gives_the_mlflow_steps_the_login_and_every_step_a_non_root_user(tmp_path):
    path = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(path), "--mlflow-secret", "mlflow-creds"])
    assert result.exit_code == 0, result.output
    assert "MLflow login: Secret mlflow-creds" in result.output
    pipeline, executors = compiled_platform(path)
    talks_to_mlflow = {
        pipeline["components"][name]["executorLabel"]
        for name, component in pipeline["components"].items()
        if "tracking_uri" in component.get("inputDefinitions", {}).get("parameters", {})
    }
    assert "exec-promote" in talks_to_mlflow
    login = [
        {
            "secretName": "mlflow-creds",
            "secretNameParameter": {"runtimeValue": {"constant": "mlflow-creds"}},
            "keyToEnv": [
                {"secretKey": "username", "envVar": "MLFLOW_TRACKING_USERNAME"},
                {"secretKey": "password", "envVar": "MLFLOW_TRACKING_PASSWORD"},
            ],
            "optional": False,
        }
    ]
    for name in pipeline["deploymentSpec"]["executors"]:
        executor = executors[name]
        assert (executor.get("secretAsEnv") == login) == (name in talks_to_mlflow), name
        assert executor["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}, name
    # The login is never a run parameter or in the pipeline spec: only the Secret's name is.
    assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps(pipeline)
    result = CliRunner().invoke(main, ["compile", "--output", str(path)])
    assert result.exit_code == 0 and not any("secretAsEnv" in e for e in compiled_platform(path)[1].values())
    result = CliRunner().invoke(main, ["compile", "--output", str(path), "--mlflow-secret", "MLflow_Creds"])
    assert result.exit_code == 2 and "is not a Kubernetes Secret name" in result.output
    assert "--mlflow-secret" in CliRunner().invoke(main, ["submit", "--help"]).output


# -- upgrades: schema migration, disruption budget, metrics, probes, scheduling, pinned images ------------------
def test_postgresql_migration_is_a_pre_install_pre_upgrade_hook_that_runs_before_the_deployment():
    rendered = render(POSTGRES_S3)
    job = rendered.one("Job", f"{FULLNAME}-mlflow-migrate")
    hooks = annotations(job)
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert hooks["helm.sh/hook-delete-policy"] == "before-hook-creation"
    # Helm applies every pre-* hook, by weight, before the release's other objects: the Deployment is not a
    # hook, so the schema is upgraded before a new server starts; the Job's launcher comes in an earlier hook.
    assert "helm.sh/hook" not in annotations(rendered.one("Deployment"))
    launcher = rendered.one("ConfigMap", f"{FULLNAME}-mlflow-migrate")
    assert annotations(launcher)["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook_weight(launcher) < hook_weight(job)
    assert launcher["data"]["serve-mlflow.py"] == (CHART / "files" / "serve-mlflow.py").read_text()
    pod = job["spec"]["template"]["spec"]
    migrate = container(pod, "migrate")
    assert migrate["command"] == ["python3", "/etc/kfopt/serve-mlflow.py", "migrate"] and "args" not in migrate
    assert secret_ref(env(migrate)["KFOPT_DB_PASSWORD"]) == ("mlflow-db", "password")
    assert env(migrate)["KFOPT_DB_HOST"] == "pg.db.svc"
    assert "serviceAccountName" not in pod  # the release's ServiceAccount does not exist yet on a first install
    check_kubernetes_objects(rendered)
    unmigrated = render(POSTGRES_S3 | {"mlflow": {**POSTGRES_S3["mlflow"], "migration": {"enabled": False}}})
    assert [j["metadata"]["name"] for j in unmigrated.all("Job")] == [f"{FULLNAME}-register"]


def test_sqlite_migration_runs_in_the_server_pod_before_the_server():
    pod = render().one("Deployment")["spec"]["template"]["spec"]
    [migrate] = pod["initContainers"]
    assert migrate["name"] == "migrate" and migrate["command"][-1] == "migrate"
    assert {m["name"]: m["mountPath"] for m in migrate["volumeMounts"]}["data"] == "/data"
    assert env(migrate)["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////data/mlflow.db"
    assert not [j for j in render().all("Job") if "migrate" in j["metadata"]["name"]]
    assert (
        "initContainers"
        not in render({"mlflow": {"migration": {"enabled": False}}}).one("Deployment")["spec"]["template"]["spec"]
    )


def test_a_disruption_budget_guards_several_replicas():
    assert not render().all("PodDisruptionBudget")  # one replica: a budget would block node drains
    pdb = render(POSTGRES_S3).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kfopt",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "mlflow",
    }
    off = POSTGRES_S3 | {"mlflow": {**POSTGRES_S3["mlflow"], "podDisruptionBudget": {"enabled": False}}}
    assert not render(off).all("PodDisruptionBudget")
    assert render({"mlflow": {"podDisruptionBudget": {"enabled": True, "minAvailable": 0}}}).one("PodDisruptionBudget")
    # Several replicas prefer different nodes unless an affinity is set.
    affinity = render(POSTGRES_S3).one("Deployment")["spec"]["template"]["spec"]["affinity"]
    term = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"


def test_prometheus_metrics_and_the_service_monitor():
    rendered = render(EVERYTHING)
    args = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")["args"]
    assert args[args.index("--expose-prometheus") + 1] == "/tmp/prometheus"  # an emptyDir
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == rendered.one("Service")["spec"]["selector"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["basicAuth"] == {
        "username": {"name": "mlflow-prometheus", "key": "username"},
        "password": {"name": "mlflow-prometheus", "key": "password"},
    }
    assert (
        "--expose-prometheus" not in container(render().one("Deployment")["spec"]["template"]["spec"], "mlflow")["args"]
    )


def test_probes_resources_and_scheduling_of_the_server_are_values():
    values = {
        "tolerations": [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}],
        "mlflow": {
            "probes": {"readiness": {"periodSeconds": 3, "initialDelaySeconds": 2}, "liveness": {"enabled": False}},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            "nodeSelector": {"pool": "system"},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            },
        },
    }
    rendered = render(values)
    check_kubernetes_objects(rendered)
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    mlflow = container(pod, "mlflow")
    assert mlflow["readinessProbe"] == {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": 3,
        "initialDelaySeconds": 2,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert "livenessProbe" not in mlflow and mlflow["startupProbe"]["failureThreshold"] == 60
    assert mlflow["resources"] == values["mlflow"]["resources"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["affinity"] == values["mlflow"]["affinity"]
    assert pod["tolerations"] == values["tolerations"]  # the chart-wide ones, since the server sets none
    job = rendered.one("Job")["spec"]["template"]["spec"]
    assert "nodeSelector" not in job and "affinity" not in job  # the server's own values stay its own


def test_images_can_be_pinned_by_digest():
    rendered = render(EVERYTHING)
    pinned = f"ghcr.io/kfopt/kfopt:0.1.0@{DIGEST}"
    for where, pod in rendered.pod_specs().items():
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == pinned, (where, c["name"])
    args = container(rendered.one("Job", f"{FULLNAME}-register")["spec"]["template"]["spec"], "compile")["args"]
    assert args[args.index("--image") + 1] == pinned  # the pipeline steps too
    other = render({"image": {"digest": DIGEST}, "mlflow": {"image": {"tag": "0.1.1"}}})
    assert (
        container(other.one("Deployment")["spec"]["template"]["spec"], "mlflow")["image"] == "ghcr.io/kfopt/kfopt:0.1.1"
    )
    own = {"image": {"repository": "r/mlflow", "digest": DIGEST}}
    assert container(render({"mlflow": own}).one("Deployment")["spec"]["template"]["spec"], "mlflow")["image"] == (
        f"r/mlflow:0.1.0@{DIGEST}"
    )


# -- the values schema --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"mlflow": {"backendStore": {"type": "mysql"}}},
            "at '/mlflow/backendStore/type': value must be one of 'sqlite', 'postgresql'",
        ),
        (
            {"placement": {"accelerator": {"cuont": 2}}},
            "at '/placement/accelerator': additional properties 'cuont' not allowed",
        ),
        ({"placement": {"accelerator": {"count": 0}}}, "at '/placement/accelerator/count': minimum: got 0, want 1"),
        ({"placement": {"cpu": {"memory": "8 GB"}}}, "'8 GB' does not match pattern"),
        (
            {"placement": {"cpu": {"tolerations": [{"key": "k", "operator": "Maybe"}]}}},
            "value must be one of 'Equal', 'Exists'",
        ),
        (
            {"mlflow": {"backendStore": {"type": "postgresql"}}},
            "at '/mlflow/backendStore/postgresql': missing properties 'host', 'existingSecret'",
        ),
        ({"mlflow": {"artifactStore": {"type": "s3"}}}, "at '/mlflow/artifactStore/s3': missing property 'bucket'"),
        ({"mlflow": {"artifactStore": {"proxied": False}}}, "at '/mlflow/artifactStore/proxied': value must be true"),
        ({"mlflow": {"replicas": 3}}, "at '/mlflow/replicas': maximum: got 3, want 1"),
        ({"kfp": {"host": "ml-pipeline:8888"}}, "at '/kfp/host'"),
        ({"schedule": {"arguments": {"objective": "speed"}}}, "value must be one of 'size', 'latency'"),
        ({"mlflow": {"external": {"uri": "mlflow:5000"}}}, "at '/mlflow/external/uri'"),
        ({"podSecurityContext": {"runAsUser": 0}}, "at '/podSecurityContext/runAsUser': minimum: got 0, want 1"),
        ({"mlflow": {"password": "hunter2"}}, "at '/mlflow': additional properties 'password' not allowed"),
        # Credentials are never plain values: a credential-named variable must be a secretKeyRef ...
        (
            {"mlflow": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}},
            "at '/mlflow/env/AWS_SECRET_ACCESS_KEY': got string, want object",
        ),
        ({"mlflow": {"env": {"MLFLOW_TRACKING_PASSWORD": "x"}}}, "at '/mlflow/env/MLFLOW_TRACKING_PASSWORD': got"),
        ({"mlflow": {"env": {"DATABRICKS_TOKEN": "x"}}}, "at '/mlflow/env/DATABRICKS_TOKEN': got string, want object"),
        ({"mlflow": {"env": {"pg_password": 1234}}}, "at '/mlflow/env/pg_password': got number, want object"),
        (
            {"mlflow": {"env": {"AWS_ACCESS_KEY_ID": "x"}}},
            "at '/mlflow/env/AWS_ACCESS_KEY_ID': got string, want object",
        ),
        (
            {"mlflow": {"env": {"AZURE_STORAGE_CONNECTION_STRING": "x"}}},
            "at '/mlflow/env/AZURE_STORAGE_CONNECTION_STRING': got string",
        ),
        (
            {"mlflow": {"env": {"AWS_SECRET_ACCESS_KEY": {"secretKeyRef": {"name": "s3"}}}}},
            "at '/mlflow/env/AWS_SECRET_ACCESS_KEY/secretKeyRef': missing property 'key'",
        ),
        # ... and no value carries a login in a URI.
        (
            {"mlflow": {"env": {"MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db/mlflow"}}},
            "at '/mlflow/env/MLFLOW_BACKEND",
        ),
        ({"mlflow": {"extraArgs": ["--backend-store-uri=postgresql://u:pw@db/m"]}}, "at '/mlflow/extraArgs/0'"),
        ({"mlflow": {"external": {"uri": "https://bob:pw@mlflow.example.com"}}}, "at '/mlflow/external/uri'"),
        ({"kfp": {"host": "https://bob:pw@kubeflow.example.com"}}, "at '/kfp/host'"),
        ({"schedule": {"arguments": {"model": "https://bob:pw@host/m.keras"}}}, "at '/schedule/arguments/model'"),
        ({"pipeline": {"mlflowSecret": "MLflow Login"}}, "at '/pipeline/mlflowSecret'"),
        ({"image": {"digest": "latest"}}, "at '/image/digest': 'latest' does not match pattern"),
        (
            {"mlflow": {"auth": {"defaultPermission": "ALL"}}},
            "at '/mlflow/auth/defaultPermission': value must be one of",
        ),
        (
            {"mlflow": {"podDisruptionBudget": {"enabled": "yes"}}},
            "at '/mlflow/podDisruptionBudget/enabled': value must be one of 'auto', true, false",
        ),
        ({"mlflow": {"probes": {"liveness": {"periodSeconds": 0}}}}, "at '/mlflow/probes/liveness/periodSeconds'"),
        ({"mlflow": {"probes": {"liveness": {"path": "/"}}}}, "additional properties 'path' not allowed"),
        ({"mlflow": {"metrics": {"serviceMonitor": {"interval": "often"}}}}, "at '/mlflow/metrics/serviceMonitor"),
    ],
)
def test_schema_rejects_a_wrong_value_with_a_message_that_names_it(values, message):
    with pytest.raises(HelmFailed) as failed:
        render(values)
    errors = [text for level, text in ENGINE.lint(values) if level == 3]
    assert errors, "helm lint --strict passed a wrong value"
    where = re.search(r"at '(/[^']*)'", message)
    if isinstance(ENGINE, _SdkEngine):  # Helm 4's wording, exactly
        assert message in str(failed.value) and any(message in text for text in errors)
    elif where:  # another Helm: at least the offending key is named
        assert where[1] in str(failed.value) or where[1][1:].replace("/", ".") in str(failed.value)


def test_existing_claims_replace_the_chart_claims():
    rendered = render(
        {
            "mlflow": {
                "backendStore": {"sqlite": {"persistence": {"existingClaim": "mlflow-db-old"}}},
                "artifactStore": {"pvc": {"existingClaim": "mlflow-artifacts-old"}},
            }
        }
    )
    assert not rendered.all("PersistentVolumeClaim")
    check_kubernetes_objects(rendered, existing_claims=("mlflow-db-old", "mlflow-artifacts-old"))
    volumes = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} == {
        "mlflow-db-old",
        "mlflow-artifacts-old",
    }


def test_template_rules_the_schema_cannot_state():
    with pytest.raises(HelmFailed, match="needs mlflow.metrics.enabled=true"):
        render({"mlflow": {"metrics": {"serviceMonitor": {"enabled": True}}}})
    with pytest.raises(
        HelmFailed, match="basicAuthSecret is required with mlflow.auth.enabled: /metrics needs a login"
    ):
        render({"mlflow": {"metrics": {"enabled": True, "serviceMonitor": {"enabled": True}}}})
    with pytest.raises(HelmFailed, match="accessModes \\[ReadWriteMany\\]"):
        render({"mlflow": {"replicas": 2, "backendStore": POSTGRES_S3["mlflow"]["backendStore"]}})
    rendered = render(
        {
            "mlflow": {
                "replicas": 2,
                "backendStore": POSTGRES_S3["mlflow"]["backendStore"],
                "artifactStore": {"pvc": {"accessModes": ["ReadWriteMany"]}},
            }
        }
    )
    assert rendered.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_schema_is_closed_and_documented_at_every_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{where}: additionalProperties must be false"
                for key, sub in node["properties"].items():
                    assert "description" in sub or "$ref" in sub, f"{where}.{key}: no description"
            for key, sub in node.items():
                walk(sub, f"{where}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(schema, "$")
    # Every default value is described by the schema (and so is every example).
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(node, prefix=""):
        for key, value in node.items():
            yield prefix + key
            if isinstance(value, dict) and key not in ("nodeSelector", "annotations", "env"):
                yield from keys(value, prefix + key + ".")

    for key in keys(values):
        node = schema
        for part in key.split("."):
            node = node["properties"][part] if "properties" in node else node
        assert "description" in node or "$ref" in node or "allOf" in node, key


def test_chart_app_version_is_the_kfopt_version():
    from kfopt import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"].startswith(">=1.25")


# -- placement: values -> ConfigMap -> load_placement -> compiled pipeline ----------------------------------
def load_placement_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "placement.yaml"
        path.write_text(text)
        return load_placement(path)


def test_the_gke_examples_are_kfopts_builtin_placements():
    gpu = load_placement_text(render(example("gke-l4.yaml")).placement_file())
    assert gpu.model_dump() == load_placement("gke").model_dump()
    tpu = load_placement_text(render(example("gke-tpu-v5e.yaml")).placement_file())
    assert tpu.model_dump() == load_placement("gke-tpu").model_dump()


def test_default_placement_is_one_nvidia_gpu_for_fine_tuning_on_any_cluster():
    placement = load_placement_text(render().placement_file())
    assert placement.accelerator.accelerator.model_dump() == {"type": "nvidia.com/gpu", "count": 1}
    assert placement.accelerator.node_selector == {}  # no cloud-specific label: the GPU request and toleration place it
    assert [t.model_dump() for t in placement.accelerator.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": None, "effect": "NoSchedule"}
    ]
    assert (placement.cpu.cpu, placement.cpu.memory) == ("2", "8Gi")
    # A default nodeSelector key can be dropped with null (Helm merges maps).
    values = {"placement": {"cpu": {"nodeSelector": {"pool": "cpu"}}}}
    assert load_placement_text(render(values).placement_file()).cpu.node_selector == {"pool": "cpu"}
    values["placement"]["cpu"]["nodeSelector"]["pool"] = None
    assert load_placement_text(render(values).placement_file()).cpu.node_selector == {}


@pytest.mark.parametrize("name", ["gke-l4.yaml", "gke-t4.yaml", "gke-tpu-v5e.yaml", "nvidia-gpu.yaml", "cpu-only.yaml"])
def test_placement_values_reach_the_configmap_and_load_back(name):
    values = example(name)["placement"]
    placement = load_placement_text(render({"placement": values}).placement_file())
    accelerator = values["accelerator"]
    if not accelerator["enabled"]:
        assert placement.accelerator is None
    else:
        pool = placement.accelerator
        assert (pool.accelerator.type, pool.accelerator.count) == (accelerator["type"], accelerator["count"])
        assert pool.node_selector == accelerator["nodeSelector"]
        assert [t.model_dump(exclude_none=True) for t in pool.tolerations] == accelerator["tolerations"]
        assert (pool.cpu, pool.memory, pool.memory_limit) == (
            accelerator["cpu"],
            accelerator["memory"],
            accelerator.get("memoryLimit"),
        )
    assert (placement.cpu.cpu, placement.cpu.memory) == (values["cpu"]["cpu"], values["cpu"]["memory"])
    assert placement.cpu.node_selector == values["cpu"].get("nodeSelector", {})


def test_numbers_and_limits_in_placement_values_become_the_strings_kfopt_expects():
    values = {
        "placement": {
            "accelerator": {
                "type": "amd.com/gpu",
                "count": 2,
                "cpu": 6,
                "memory": "24Gi",
                "cpuLimit": 8,
                "memoryLimit": "32Gi",
                "nodeSelector": {"pool": "mi300"},
                "tolerations": [],
            },
            "cpu": {
                "cpu": 0.5,
                "memory": "2Gi",
                "tolerations": [{"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
            },
        }
    }
    placement = load_placement_text(render(values).placement_file())
    assert placement.accelerator.accelerator.model_dump() == {"type": "amd.com/gpu", "count": 2}
    assert (placement.accelerator.cpu, placement.accelerator.cpu_limit, placement.accelerator.memory_limit) == (
        "6",
        "8",
        "32Gi",
    )
    assert placement.accelerator.tolerations == [] and placement.cpu.cpu == "0.5"
    assert placement.cpu.tolerations[0].model_dump() == {
        "key": "spot",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    }


def test_the_rendered_placement_compiles_into_the_pipeline(tmp_path):
    from kfopt.pipelines.runners import compile_for_cluster

    (tmp_path / "placement.yaml").write_text(render(example("gke-tpu-v5e.yaml")).placement_file())
    summary = compile_for_cluster(
        tmp_path / "pipeline.yaml",
        placement=tmp_path / "placement.yaml",
        search=None,
        image="r/kfopt:1",
        accelerator_image="r/kfopt:tpu",
    )
    assert "accelerator pool (4 x google.com/tpu)" in summary["description"] and summary["accelerator_recipes"]
    compiled = (tmp_path / "pipeline.yaml").read_text()
    assert "cloud.google.com/gke-tpu-topology: 2x2" in compiled and "tpu-v5-lite-podslice" in compiled
    assert "r/kfopt:tpu" in compiled


# -- the MLflow server the chart runs ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_mlflow_builds_the_postgres_uris_from_the_environment(tmp_path):
    """serve-mlflow.py from the rendered ConfigMap, with a stand-in `mlflow` that records what it got."""
    config = render(POSTGRES_S3 | {"mlflow": {**POSTGRES_S3["mlflow"], "auth": {"postgresql": {"database": "auth"}}}})
    data = config.one("ConfigMap", f"{FULLNAME}-config")["data"]
    script = tmp_path / "serve-mlflow.py"
    script.write_text(data["serve-mlflow.py"])
    (tmp_path / "basic_auth.ini").write_text(data["basic_auth.ini"])
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, stat, sys\n"
        "auth = os.environ.get('MLFLOW_AUTH_CONFIG_PATH')\n"
        f"json.dump({{'argv': sys.argv[1:], 'uri': os.environ.get('MLFLOW_BACKEND_STORE_URI'), "
        f"'password_left': 'KFOPT_DB_PASSWORD' in os.environ, 'auth': auth, "
        f"'auth_mode': stat.S_IMODE(os.stat(auth).st_mode)}}, open({str(tmp_path / 'got.json')!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "KFOPT_DB_HOST": "pg.db.svc",
        "KFOPT_DB_PORT": "5432",
        "KFOPT_DB_NAME": "mlflow",
        "KFOPT_DB_USER": "ml flow",
        "KFOPT_DB_PASSWORD": "p@ss:w/rd#1%",
        "KFOPT_DB_SSLMODE": "require",
        "KFOPT_AUTH_CONFIG": str(tmp_path / "basic_auth.ini"),
        "KFOPT_AUTH_DB_NAME": "auth",
    }
    done = subprocess.run(
        [sys.executable, str(script), "--host", "0.0.0.0", "--port", "5000", "--app-name", "basic-auth"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["argv"] == ["server", "--host", "0.0.0.0", "--port", "5000", "--app-name", "basic-auth"]
    quoted = "ml%20flow:p%40ss%3Aw%2Frd%231%25@pg.db.svc:5432"
    assert got["uri"] == f"postgresql://{quoted}/mlflow?sslmode=require"
    assert not got["password_left"]
    assert "p@ss" not in done.stdout + done.stderr  # the password is never printed
    # The users database: its URI (password and all) only in a private copy of basic_auth.ini, which MLflow
    # reads with its own config reader.
    from mlflow.server.auth import config as auth_config

    assert got["auth"].startswith(str(tmp_path)) and got["auth_mode"] == 0o600
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = got["auth"]
    try:
        read = auth_config.read_auth_config()
    finally:
        del os.environ["MLFLOW_AUTH_CONFIG_PATH"]
    assert read.database_uri == f"postgresql://{quoted}/auth?sslmode=require"
    assert read.default_permission == "READ" and read.admin_password is None  # the admin comes from a Secret


@pytest.mark.slow
def test_serve_mlflow_migrate_upgrades_an_old_schema_that_the_server_would_refuse(tmp_path):
    """The migration container's command on an MLflow database of an older schema: the server accepts it after."""
    import sqlalchemy
    from mlflow.exceptions import MlflowException
    from mlflow.store.db import utils as db_utils

    rendered = render()
    [migrate] = rendered.one("Deployment")["spec"]["template"]["spec"]["initContainers"]
    data = rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]
    (tmp_path / "serve-mlflow.py").write_text(data["serve-mlflow.py"])
    (tmp_path / "basic_auth.ini").write_text(
        data["basic_auth.ini"].replace("sqlite:////data/", f"sqlite:///{tmp_path}/")
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    engine = sqlalchemy.create_engine(uri)
    db_utils.InitialBase.metadata.create_all(engine)  # the first schema MLflow ever had
    with pytest.raises(MlflowException, match="Detected out-of-date database schema"):
        db_utils._verify_schema(engine)  # what `mlflow server` meets after an upgrade without a migration
    environment = {
        **os.environ,
        **{k: v for k, v in env(migrate).items() if isinstance(v, str)},
        "MLFLOW_BACKEND_STORE_URI": uri,
        "KFOPT_AUTH_CONFIG": str(tmp_path / "basic_auth.ini"),
        "TMPDIR": str(tmp_path),
        "HOME": str(tmp_path),
    }
    command = [sys.executable, str(tmp_path / "serve-mlflow.py"), *migrate["command"][2:]]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "database schemas are up to date" in done.stdout
    db_utils._verify_schema(engine)  # no exception: the schema is at MLflow's head revision
    tables = sqlalchemy.inspect(sqlalchemy.create_engine(f"sqlite:///{tmp_path}/basic_auth.db")).get_table_names()
    assert {"users", "alembic_version_auth"} <= set(tables)
    assert not list(tmp_path.glob("basic_auth-*.ini"))  # the private copy is gone
    again = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # an up-to-date schema: a no-op, every upgrade


@pytest.mark.slow
def test_the_chart_command_starts_a_real_mlflow_server_that_asks_for_a_login(tmp_path):
    """The Deployment's migrate and server containers, run here (paths under tmp_path; the Secret's values in the
    environment): /health is open, every API call needs the admin login, and the Host check stays on."""
    port = _free_port()
    rendered = render({"mlflow": {"port": port, "service": {"port": 5000}, "metrics": {"enabled": True}}})
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    data = rendered.one("ConfigMap", f"{FULLNAME}-config")["data"]
    paths = {
        "/etc/kfopt/": f"{tmp_path}/etc/",
        "/artifacts": str(tmp_path / "artifacts"),
        "/tmp/prometheus": str(tmp_path / "prometheus"),
        "sqlite:////data/": f"sqlite:///{tmp_path}/",
        "0.0.0.0": "127.0.0.1",
    }  # loopback only

    def local(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    (tmp_path / "etc").mkdir()
    for name, text in data.items():
        (tmp_path / "etc" / name).write_text(local(text))
    secret = {k: base64.b64decode(v).decode() for k, v in rendered.one("Secret")["data"].items()}
    password = secret["password"]

    def environment_of(c: dict) -> dict:
        variables = {
            **os.environ,
            "HOME": str(tmp_path),
            "TMPDIR": str(tmp_path),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        for name, value in env(c).items():
            variables[name] = local(value) if isinstance(value, str) else secret[value["secretKeyRef"]["key"]]
        variables.pop("MLFLOW_TRACKING_URI", None)
        return variables

    def command_of(c: dict) -> list[str]:
        return [sys.executable if part == "python3" else local(part) for part in c["command"] + c.get("args", [])]

    [migrate] = pod["initContainers"]
    done = subprocess.run(command_of(migrate), env=environment_of(migrate), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    mlflow = container(pod, "mlflow")
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            command_of(mlflow),
            env=environment_of(mlflow),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (
                "no /health within 120 s: " + (tmp_path / "server.log").read_text()[-2000:]
            )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break  # the probes' path needs no login
            except OSError:
                time.sleep(0.2)

        def status(host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1", login=None) -> int:
            headers = {"Host": host}
            if login:
                headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
            request = urllib.request.Request(f"{url}{path}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        service = f"{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:5000"  # how pipeline steps reach it
        admin = ("admin", password)
        assert status(service) == 401  # no login, no access
        assert status(service, login=("admin", "not-the-password")) == 401
        assert status(service, login=admin) == 200
        assert status(f"{FULLNAME}-mlflow:5000", login=admin) == 200 and status("localhost:5000", login=admin) == 200
        assert status("attacker.example.com", login=admin) == 403  # MLflow's DNS-rebinding protection stays on
        assert status(service, "/metrics") == 401 and status(service, "/metrics", login=admin) == 200
        assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "basic_auth.db").is_file()
        assert password not in (tmp_path / "server.log").read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# -- the image: the same tag holds the same versions -----------------------------------------------------
CONSTRAINTS = ROOT / "constraints.txt"
GPU_SECTION = "# VARIANT=gpu"
CONSTRAINTS_HEADER = """\
# The exact versions of everything the kfopt image installs (Dockerfile: pip install -c constraints.txt),
# the ones kfopt's tests run with: `.venv/bin/pip freeze --exclude-editable` filtered to the distributions
# `pip install ".[server]"` brings in. A tag built from this file always holds the same packages (pip,
# setuptools and wheel come with the base image: pin it with --build-arg BASE=python:3.11-slim@sha256:...).
# After a dependency change in pyproject.toml (and `make install`), regenerate the part above the GPU section:
#   KFOPT_WRITE_CONSTRAINTS=1 .venv/bin/pytest -q tests/test_chart.py -k constraints
"""


def image_pins() -> list[str]:
    """`pip freeze --exclude-editable` lines of every distribution that `pip install ".[server]"` installs.

    The set is pyproject's dependencies and server extra, closed over the installed distributions'
    requirements (markers evaluated here: Linux, the image's Python).
    """
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["server"]]
    needed, seen = set(), set()
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.add(key[0])
        for line in importlib.metadata.distribution(requirement.name).requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in requirement.extras | {""}):
                todo.append(sub)
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return sorted(
        (line for line in freeze if "==" in line and canonicalize_name(line.split("==")[0]) in needed),
        key=lambda line: canonicalize_name(line.split("==")[0]),
    )


def test_constraints_pin_every_distribution_the_image_installs_at_the_tested_versions():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cpu, gpu = CONSTRAINTS.read_text().split(GPU_SECTION)
    expected = image_pins()
    if os.environ.get("KFOPT_WRITE_CONSTRAINTS"):
        CONSTRAINTS.write_text(CONSTRAINTS_HEADER + "\n".join(expected) + "\n\n" + GPU_SECTION + gpu)
        cpu = CONSTRAINTS.read_text().split(GPU_SECTION)[0]
    pinned = [line for line in cpu.splitlines() if line and not line.startswith("#")]
    assert pinned == expected, (
        f"constraints.txt is not what the image installs at the tested versions: missing or changed "
        f"{sorted(set(expected) - set(pinned))}, extra {sorted(set(pinned) - set(expected))}. Regenerate it: "
        "KFOPT_WRITE_CONSTRAINTS=1 .venv/bin/pytest -q tests/test_chart.py -k constraints"
    )
    assert any(line.startswith(("mlflow==", "tensorflow==", "kfp==", "flask-wtf==")) for line in pinned)
    # VARIANT=gpu: TensorFlow's CUDA libraries, pinned inside the ranges the pinned TensorFlow asks for.
    gpu_pins = dict(line.split("==") for line in gpu.splitlines() if "==" in line and not line.startswith("#"))
    cuda = [
        Requirement(line)
        for line in importlib.metadata.distribution("tensorflow").requires
        if Requirement(line).marker
        and Requirement(line).marker.evaluate({"extra": "and-cuda"})
        and not Requirement(line).marker.evaluate({"extra": ""})
    ]
    assert cuda and {canonicalize_name(r.name) for r in cuda} == set(gpu_pins)
    for requirement in cuda:
        assert requirement.specifier.contains(gpu_pins[canonicalize_name(requirement.name)]), requirement
    # Both variants install through the constraints.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md constraints.txt ./" in dockerfile
    assert re.search(r'cpu\) pip install -c constraints.txt "\.\[server\]" ;;', dockerfile)
    assert re.search(r'gpu\) pip install -c constraints.txt "\.\[server\]" "tensorflow\[and-cuda\]" ;;', dockerfile)


# -- kfopt publish ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "pipeline.yaml"
    result = CliRunner().invoke(main, ["compile", "--output", str(path), "--placement", "gke"])
    assert result.exit_code == 0, result.output
    return path


def publish_cli(*args):
    result = CliRunner().invoke(main, ["publish", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--host", "kubeflow.local", "--name", "k"], "--host 'kubeflow.local' is not an http(s) URL"),
        (["--host", "http://127.0.0.1:9", "--name", " "], "--name is empty"),
        (["--host", "http://127.0.0.1:9", "--name", "k", "--version", ""], "--version is empty"),
    ],
)
def test_publish_argument_errors_are_one_line_with_exit_2(package, args, message):
    code, output = publish_cli("--package", str(package), *args)
    assert code == 2 and output.count("\n") == 1 and output.startswith("error: ") and message in output, output


def test_publish_refuses_what_is_not_a_compiled_pipeline(tmp_path):
    code, output = publish_cli("--package", str(tmp_path / "none.yaml"), "--host", "http://127.0.0.1:9", "--name", "k")
    assert code == 2 and "does not exist" in output
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    code, output = publish_cli("--package", str(tmp_path / "other.yaml"), "--host", "http://127.0.0.1:9", "--name", "k")
    assert code == 2 and "is not a compiled KFP pipeline" in output and output.count("\n") == 1


def test_publish_to_an_unreachable_host_is_one_line_with_exit_2(package):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    code, output = publish_cli("--package", str(package), "--host", f"http://127.0.0.1:{port}", "--name", "kfopt")
    assert code == 2 and output.count("\n") == 1, output
    assert output.startswith(f"error: Publishing 'kfopt' to Kubeflow Pipelines at http://127.0.0.1:{port} failed (")
    assert "Connection refused" in output and "Fix: check --host" in output
    assert time.monotonic() - started < 30
    # The installed console script says the same (no traceback), and exits 2.
    done = subprocess.run(
        [KFOPT, "publish", "--package", str(package), "--host", f"http://127.0.0.1:{port}", "--name", "kfopt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Connection refused" in done.stdout + done.stderr


class FakeKfpApi(BaseHTTPRequestHandler):
    """The part of the KFP v2beta1 REST API that `kfopt publish` uses, in memory (no KFP server here)."""

    pipelines: dict = {}
    versions: dict = {}
    calls: list = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.calls.append(("GET", url.path, self.headers.get("Authorization")))
        if url.path == "/apis/v2beta1/healthz":
            return self._reply(200, {"multi_user": False})
        if url.path == "/apis/v2beta1/pipelines":
            wanted = None
            if query.get("filter"):
                wanted = json.loads(query["filter"])["predicates"][0]["stringValue"]
            found = [p for p in self.pipelines.values() if wanted in (None, p["display_name"])]
            return self._reply(200, {"pipelines": found, "total_size": len(found)} if found else {})
        match = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", url.path)
        if match:
            items = self.versions.get(match[1], [])
            start, size = int(query.get("page_token") or 0), int(query.get("page_size") or 10)
            page = items[start : start + size]
            more = start + size < len(items)
            return self._reply(
                200,
                {
                    "pipeline_versions": page,
                    "total_size": len(items),
                    **({"next_page_token": str(start + size)} if more else {}),
                },
            )
        self._reply(404, {"message": "not found"})

    def do_POST(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(("POST", url.path, self.headers.get("Authorization")))
        assert b"pipelineInfo" in body  # the package is uploaded
        if url.path == "/apis/v2beta1/pipelines/upload":
            pid = f"p{len(self.pipelines) + 1}"
            pipeline = {
                "pipeline_id": pid,
                "name": query["name"],
                "display_name": query["name"],
                "description": query.get("description", ""),
                "namespace": query.get("namespace", ""),
            }
            self.pipelines[pid] = pipeline
            self.versions[pid] = [
                {
                    "pipeline_id": pid,
                    "pipeline_version_id": f"{pid}v1",
                    "name": query["name"],
                    "display_name": query["name"],
                    "description": query.get("description", ""),
                }
            ]
            return self._reply(200, pipeline)
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            pid, name = query["pipelineid"], query["name"]
            if any(v["display_name"] == name for v in self.versions[pid]):
                return self._reply(409, {"message": "Failed to create a pipeline version", "code": 6})
            version = {
                "pipeline_id": pid,
                "pipeline_version_id": f"{pid}v{len(self.versions[pid]) + 1}",
                "name": name,
                "display_name": name,
                "description": query.get("description", ""),
            }
            self.versions[pid].append(version)
            return self._reply(200, version)
        self._reply(404, {"message": "not found"})


@pytest.fixture
def kfp_api():
    FakeKfpApi.pipelines, FakeKfpApi.versions, FakeKfpApi.calls = {}, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfpApi
    server.shutdown()
    server.server_close()


def test_publish_creates_then_adds_versions_only_when_the_package_changed(kfp_api, package, tmp_path, monkeypatch):
    from kfopt.pipelines.runners import package_version, publish

    host, api = kfp_api
    token = tmp_path / "token"
    token.write_text("sa-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))  # where the hook Job's projected token is

    first = publish(package, host=host, name="kfopt")
    assert first["action"] == "created" and first["version"] == package_version(package) == first["version"]
    assert first["url"] == f"{host}/#/pipelines/details/p1/version/p1v1"
    assert all(auth == "Bearer sa-token" for _, _, auth in api.calls)
    again = publish(package, host=host, name="kfopt")  # the hook re-run: same package
    assert again["action"] == "unchanged" and again["version_id"] == "p1v1"

    changed = tmp_path / "changed.yaml"
    changed.write_text(package.read_text().replace("ghcr.io/kfopt/kfopt:0.1.0", "ghcr.io/kfopt/kfopt:0.2.0"))
    upgraded = publish(changed, host=host, name="kfopt")  # helm upgrade with a new image
    assert upgraded["action"] == "new-version" and upgraded["version"] == package_version(changed) != first["version"]
    assert publish(changed, host=host, name="kfopt")["action"] == "unchanged"
    assert [v["display_name"] for v in api.versions["p1"]] == ["kfopt", upgraded["version"]]

    code, output = publish_cli("--package", str(package), "--host", host, "--name", "kfopt", "--version", "v2")
    assert (
        code == 0
        and output.strip() == f"Uploaded version v2 of pipeline 'kfopt': {host}/#/pipelines/details/p1/version/p1v3"
    )
    code, output = publish_cli("--package", str(package), "--host", host, "--name", "kfopt", "--version", "v2")
    assert code == 0 and "already has version v2: nothing uploaded" in output
    code, output = publish_cli("--package", str(package), "--host", host, "--name", "other", "--json")
    assert code == 0 and json.loads(output)["action"] == "created" and len(api.pipelines) == 2


def test_publish_reports_what_the_api_refused(kfp_api, package):
    host, api = kfp_api
    with pytest.raises(KfoptError, match=r"HTTP 404 Not Found: not found"):
        from kfopt.pipelines.runners import publish

        publish(package, host=host + "/nowhere", name="kfopt", namespace="team-a")
