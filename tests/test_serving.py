"""A registered champion serves where kfopt is not installed: a fresh venv, `mlflow models serve`, HTTP.

The venv gets only what the logged model's requirements.txt lists (mlflow,
numpy, LiteRT for a TFLite model), installed with pip (its cache makes reruns
quick). The served predictions are compared with the candidate as kfopt
measured it, in-process. Models with several inputs and SavedModel champions
are loaded by MLflow in a process where importing kfopt fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kfopt.engine import optimize
from kfopt.evaluate import runner_for
from kfopt.plugins.technique import ModelHandle
from kfopt.rundir import tracking_uri

pytestmark = pytest.mark.slow

BUDGET = 0.05


def track(uri: str, name: str) -> dict:
    return {"registered_model": name, "tracking_uri": uri}


def champion_requirements(uri: str, name: str) -> Path:
    import mlflow

    with tracking_uri(uri):
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion")) / "requirements.txt"


def clean_env(**extra) -> dict[str, str]:
    """A shell's environment without this test's Python (no venv, no PYTHONPATH) and without kfopt's settings."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "SSL_CERT_FILE")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}  # pip's index and cache settings
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def free_port() -> int:
    from mlflow_server import free_port as port

    return port()


def post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_tflite_champion_serves_over_http_from_a_fresh_venv_without_kfopt(mlflow_server, tmp_path):
    started = time.monotonic()
    name, uri = "digits-served", mlflow_server.uri
    result = optimize(
        "demo:mlp",
        "digits",
        "quantize(mode=int8)",
        tmp_path / "run",
        epochs=3,
        max_accuracy_drop=BUDGET,
        tracking=track(uri, name),
    )
    assert result.registered_model.promoted, result.registered_model
    candidate = result.candidates[0]
    requirements = champion_requirements(uri, name)
    listed = requirements.read_text()
    assert "kfopt" not in listed and "ai-edge-litert" in listed and "mlflow==" in listed, listed

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    python = venv / "bin" / "python"
    # As a user with the venv activated: its bin/ first on PATH (mlflow models serve runs its uvicorn from there).
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r", str(requirements)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repository: its kfopt/ folder would be importable from the working directory
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    installed_at = time.monotonic()
    probe = "import importlib.util as u; print(u.find_spec('kfopt') is None, u.find_spec('tensorflow') is None)"
    assert subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path
    ).stdout.split() == [
        "True",
        "True",
    ]  # neither kfopt nor TensorFlow: LiteRT runs the model

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (the server writes to it)
    server = subprocess.Popen(
        [
            str(venv / "bin" / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{name}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow models serve did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:])
        from kfopt.data import load_data

        x, y = load_data("digits", input_shape=(64,), seed=0, validation_from="train").test.arrays()
        served = np.asarray(post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})["predictions"])
    finally:
        import signal

        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
    measured = runner_for(ModelHandle("tflite", path=candidate.artifact))(x)
    assert served.shape == measured.shape == (len(x), 10)
    np.testing.assert_allclose(served, measured, atol=1e-5)
    assert (served.argmax(axis=1) == y).mean() == pytest.approx(candidate.accuracy, abs=1e-9)
    print(f"\nfresh venv: install {installed_at - started:.0f}s since start, total {time.monotonic() - started:.0f}s")


#: Run first in a process that must not see kfopt: importing it fails there as where it is not installed.
NO_KFOPT = """
import importlib.abc, sys

class NoKfopt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kfopt" or name.startswith("kfopt."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoKfopt())
"""

PREDICT = """
import json, sys
import mlflow, numpy as np

model = mlflow.pyfunc.load_model(sys.argv[1])
x = dict(np.load(sys.argv[2]))
out = model.predict(x)
np.save(sys.argv[3], out)
print(json.dumps({"kfopt_loaded": any(m == "kfopt" or m.startswith("kfopt.") for m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "recipe,format", [("quantize(mode=int8)", "tflite"), ("accelerate(backend=xla)", "saved_model")]
)
def test_a_two_input_champion_has_named_inputs_and_loads_without_kfopt(mlflow_server, tmp_path, recipe, format):
    """Several inputs: the signature names each (from real test rows, in their dtype); MLflow alone serves it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo_models import two_inputs

    model, arrays = two_inputs(tmp_path)
    data = tmp_path / "two.npz"
    np.savez(data, **arrays)
    name, uri = f"two-inputs-{format.replace('_', '-')}", mlflow_server.uri
    result = optimize(model, str(data), recipe, tmp_path / "run", max_accuracy_drop=BUDGET, tracking=track(uri, name))
    assert result.registered_model.promoted, result.registered_model
    candidate = result.candidates[0]
    assert candidate.format == format

    import mlflow

    with tracking_uri(uri):
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
    schema = info.signature.inputs
    assert sorted(schema.input_names()) == ["left", "right"]
    assert {str(t.type) for t in schema.inputs} == {"float32"}
    assert requirements_of(uri, name).count("kfopt") == 0

    x = {side: arrays[f"x_test_{side}"][:50] for side in ("left", "right")}
    np.savez(tmp_path / "x.npz", **x)
    script = tmp_path / "predict.py"
    script.write_text(NO_KFOPT + PREDICT)
    done = subprocess.run(
        [sys.executable, str(script), f"models:/{name}@champion", str(tmp_path / "x.npz"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert not said["kfopt_loaded"]
    served = np.load(tmp_path / "y.npy")
    from kfopt.data import Inputs

    measured = runner_for(ModelHandle.load(candidate.artifact))(Inputs(x))
    np.testing.assert_allclose(served, measured, atol=1e-5)


def requirements_of(uri: str, name: str) -> str:
    return champion_requirements(uri, name).read_text()
