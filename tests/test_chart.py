"""The Helm chart (charts/kfopt) through the real Helm engine, and `kfopt publish` that its hook Job runs.

Helm: the `helm` binary when it is on PATH, else helm-python-sdk (Helm's Go SDK in a
shared library, a dev dependency), so no binary is needed. Every rendered document is
checked against Kubernetes' own JSON schemas (kubernetes-validate, offline, strict: an
unknown field is an error) for the oldest and the newest Kubernetes the chart supports,
plus a few rules those schemas do not carry. The placement ConfigMap is loaded back with
kfopt's own load_placement and compiled into a pipeline.
"""

from __future__ import annotations

import copy
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

    def render(self, values: dict) -> tuple[dict[str, str], str]:
        with self.helm.Chart.load(str(CHART)) as chart:
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

    def render(self, values: dict) -> tuple[dict[str, str], str]:
        done = self._run("template", RELEASE, str(CHART), values=values)
        if done.returncode:
            raise HelmFailed(done.stderr.strip())
        files: dict[str, str] = {}
        for part in re.split(r"^---\s*$", done.stdout, flags=re.M):
            source = re.search(r"^# Source: (\S+)", part, flags=re.M)
            if source:
                files[source[1]] = files.get(source[1], "") + "\n---\n" + part
        installed = self._run("install", RELEASE, str(CHART), "--dry-run=client", values=values)
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
        return self.one("ConfigMap")["data"]["placement.yaml"]

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


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / name).read_text())


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


EVERYTHING = {  # every optional resource of the chart at once
    "schedule": {"enabled": True},
    "rbac": {"create": True},
    "pipeline": {
        "search": [
            "quantize(mode=int8)",
            {"name": "student", "steps": [{"distill": {"width": 0.5}}, "quantize(mode=int8)"]},
        ]
    },
    "mlflow": {"ingress": {"enabled": True, "tlsSecretName": "tls"}, "networkPolicy": {"enabled": True}},
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
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUBERNETES = ["1.25", "latest"]  # Chart.yaml's kubeVersion floor, and the newest schemas shipped


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
        ("Deployment", f"{FULLNAME}-mlflow"),
        ("Service", f"{FULLNAME}-mlflow"),
        ("PersistentVolumeClaim", f"{FULLNAME}-mlflow-db"),
        ("PersistentVolumeClaim", f"{FULLNAME}-mlflow-artifacts"),
        ("Job", f"{FULLNAME}-register"),
    }
    check_kubernetes_objects(rendered)
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    args = mlflow["args"]
    assert mlflow["command"] == ["python3", "/etc/kfopt/serve-mlflow.py"]
    assert args[args.index("--artifacts-destination") + 1] == "/artifacts" and "--serve-artifacts" in args
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
    (tmp_path / "search.yaml").write_text(rendered.one("ConfigMap")["data"]["search.yaml"])
    assert [r.label for r in load_search(tmp_path / "search.yaml")] == ["quantize(mode=int8)", "student"]
    assert {kind for kind, _ in rendered.kinds()} == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Job",
        "CronJob",
        "Ingress",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
    }
    check_kubernetes_objects(rendered)


def test_external_mlflow_deploys_no_server_and_the_runs_log_there():
    uri = "http://mlflow.mlflow.svc.cluster.local:5000"
    rendered = render({"mlflow": {"external": {"uri": uri}}, "schedule": {"enabled": True}})
    assert not {kind for kind, _ in rendered.kinds()} & {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Ingress",
        "NetworkPolicy",
    }
    assert "serve-mlflow.py" not in rendered.one("ConfigMap")["data"]
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
    }
    assert yaml.safe_load(rendered.one("ConfigMap")["data"]["search.yaml"]) == ["quantize(mode=int8)"]
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
            }
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
    assert options["--tracking-uri"] == f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert options["--placement"] == "/etc/kfopt/placement.yaml" and options["--host"].startswith(
        "http://ml-pipeline.kubeflow"
    )
    # Every option the CronJob passes is one `kfopt submit` accepts.
    result = CliRunner().invoke(main, ["submit", "--help"])
    assert all(option in result.output for option in options)


def test_network_policy_admits_the_release_and_the_configured_peers():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow-user"}}}
    rendered = render({"mlflow": {"networkPolicy": {"enabled": True, "from": [peer]}}})
    policy = rendered.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rule = policy["spec"]["ingress"][0]
    assert rule["from"][0] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kfopt", "app.kubernetes.io/instance": RELEASE}}
    }
    assert rule["from"][1] == peer and rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    check_kubernetes_objects(rendered)


def test_ingress_host_is_an_allowed_host_of_the_server():
    rendered = render({"mlflow": {"ingress": {"enabled": True, "host": "mlflow.corp.example", "className": "nginx"}}})
    ingress = rendered.one("Ingress")
    assert (
        ingress["spec"]["rules"][0]["host"] == "mlflow.corp.example" and ingress["spec"]["ingressClassName"] == "nginx"
    )
    args = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")["args"]
    assert "mlflow.corp.example" in args[args.index("--allowed-hosts") + 1].split(",")
    assert "http://mlflow.corp.example/" in rendered.notes


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


def test_serve_mlflow_builds_the_postgres_uri_from_the_environment(tmp_path):
    """serve-mlflow.py from the rendered ConfigMap, with a stand-in `mlflow` that records what it got."""
    script = tmp_path / "serve-mlflow.py"
    script.write_text(render(POSTGRES_S3).one("ConfigMap")["data"]["serve-mlflow.py"])
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'uri': os.environ.get('MLFLOW_BACKEND_STORE_URI'), "
        f"'password_left': 'KFOPT_DB_PASSWORD' in os.environ}}, open({str(tmp_path / 'got.json')!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "KFOPT_DB_HOST": "pg.db.svc",
        "KFOPT_DB_PORT": "5432",
        "KFOPT_DB_NAME": "mlflow",
        "KFOPT_DB_USER": "ml flow",
        "KFOPT_DB_PASSWORD": "p@ss:w/rd#1%",
        "KFOPT_DB_SSLMODE": "require",
    }
    done = subprocess.run(
        [sys.executable, str(script), "--host", "0.0.0.0", "--port", "5000"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "got.json").read_text())
    assert got["argv"] == ["server", "--host", "0.0.0.0", "--port", "5000"]
    assert got["uri"] == "postgresql://ml%20flow:p%40ss%3Aw%2Frd%231%25@pg.db.svc:5432/mlflow?sslmode=require"
    assert not got["password_left"]
    assert "p@ss" not in done.stdout + done.stderr  # the password is never printed


@pytest.mark.slow
def test_the_chart_command_starts_a_real_mlflow_server_that_answers_on_its_service_name(tmp_path):
    """The Deployment's command, args and env, run here (paths under tmp_path): /health, and the Host check."""
    port = _free_port()
    rendered = render({"mlflow": {"port": port, "service": {"port": 5000}}})
    mlflow = container(rendered.one("Deployment")["spec"]["template"]["spec"], "mlflow")
    (tmp_path / "serve-mlflow.py").write_text(rendered.one("ConfigMap")["data"]["serve-mlflow.py"])
    paths = {
        "/etc/kfopt/serve-mlflow.py": str(tmp_path / "serve-mlflow.py"),
        "/artifacts": str(tmp_path / "artifacts"),
        "sqlite:////data/": f"sqlite:///{tmp_path}/",
        "0.0.0.0": "127.0.0.1",
    }  # loopback only

    def local(text: str) -> str:
        for old, new in paths.items():
            text = text.replace(old, new)
        return text

    command = [sys.executable if c == "python3" else local(c) for c in mlflow["command"]] + [
        local(a) for a in mlflow["args"]
    ]
    environment = {
        **os.environ,
        **{k: local(v) for k, v in env(mlflow).items() if isinstance(v, str)},
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    environment.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (
                "no /health within 90 s: " + (tmp_path / "server.log").read_text()[-2000:]
            )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)

        def status(host: str) -> int:
            request = urllib.request.Request(
                f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status(f"{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:5000") == 200  # how pipeline steps reach it
        assert (
            status(f"{FULLNAME}-mlflow:5000") == 200 and status("localhost:5000") == 200
        )  # same namespace; port-forward
        assert status("attacker.example.com") == 403  # MLflow's DNS-rebinding protection stays on
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


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
