"""Start `mlflow server` (arguments: those of `mlflow server`) with its backend store URI built here.

With PostgreSQL the URI is assembled from KFOPT_DB_* variables, the password coming from a
Secret through the environment, URL-quoted so any character works. It is handed to MLflow
as MLFLOW_BACKEND_STORE_URI: it is never in a ConfigMap, the pod spec, argv or the log.
"""

import os
import sys
from urllib.parse import quote


def backend_store_uri(env) -> str | None:
    host = env.get("KFOPT_DB_HOST")
    if not host:
        return None  # sqlite: MLFLOW_BACKEND_STORE_URI is set in the pod spec (no secret in it)
    user = quote(env.get("KFOPT_DB_USER", ""), safe="")
    password = quote(env.get("KFOPT_DB_PASSWORD", ""), safe="")
    database = quote(env.get("KFOPT_DB_NAME", "mlflow"), safe="")
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address
    uri = f"postgresql://{user}:{password}@{host}:{env.get('KFOPT_DB_PORT', '5432')}/{database}"
    if env.get("KFOPT_DB_SSLMODE"):
        uri += "?sslmode=" + quote(env["KFOPT_DB_SSLMODE"], safe="")
    return uri


if __name__ == "__main__":
    uri = backend_store_uri(os.environ)
    if uri:
        os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    os.environ.pop("KFOPT_DB_PASSWORD", None)  # the server needs the URI, not the parts
    print(f"kfopt: starting mlflow server {' '.join(sys.argv[1:])}", flush=True)
    os.execvp("mlflow", ["mlflow", "server", *sys.argv[1:]])
