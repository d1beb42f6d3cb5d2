"""Start `mlflow server` (arguments: those of `mlflow server`) with its store URIs built here, or, given
`migrate`, upgrade the database schemas (`mlflow db upgrade`) and exit.

With PostgreSQL the URI is assembled from KFOPT_DB_* variables, the password coming from a
Secret through the environment, URL-quoted so any character works. It is handed to MLflow
as MLFLOW_BACKEND_STORE_URI: it is never in a ConfigMap, the pod spec, argv or the log.

With MLflow's basic-auth app (KFOPT_AUTH_CONFIG: the chart's basic_auth.ini), the users database
of a PostgreSQL install is on the same server (KFOPT_AUTH_DB_NAME, else the tracking database), so
its URI holds the password too: it is filled into a private copy of the file (mode 0600, in TMPDIR)
that MLFLOW_AUTH_CONFIG_PATH points MLflow to. The admin login comes from the environment
(MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD, from a Secret).
"""

import configparser
import os
import shutil
import sys
import tempfile
from urllib.parse import quote


def backend_store_uri(env, database: str | None = None) -> str | None:
    host = env.get("KFOPT_DB_HOST")
    if not host:
        return None  # sqlite: MLFLOW_BACKEND_STORE_URI is set in the pod spec (no secret in it)
    user = quote(env.get("KFOPT_DB_USER", ""), safe="")
    password = quote(env.get("KFOPT_DB_PASSWORD", ""), safe="")
    database = quote(database or env.get("KFOPT_DB_NAME", "mlflow"), safe="")
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address
    uri = f"postgresql://{user}:{password}@{host}:{env.get('KFOPT_DB_PORT', '5432')}/{database}"
    if env.get("KFOPT_DB_SSLMODE"):
        uri += "?sslmode=" + quote(env["KFOPT_DB_SSLMODE"], safe="")
    return uri


def auth_config(env) -> tuple[str, str] | None:
    """Write MLflow's auth config with its database URI; return (its path, that URI), or None without auth."""
    template = env.get("KFOPT_AUTH_CONFIG")
    if not template:
        return None
    config = configparser.ConfigParser()  # MLflow reads it with this parser: '%' must be written as '%%'
    config.read(template)
    uri = backend_store_uri(env, env.get("KFOPT_AUTH_DB_NAME"))
    if uri:
        config["mlflow"]["database_uri"] = uri.replace("%", "%%")
    fd, path = tempfile.mkstemp(prefix="basic_auth-", suffix=".ini")  # 0600: only this user reads it
    with os.fdopen(fd, "w") as file:
        config.write(file)
    return path, config["mlflow"]["database_uri"]


def migrate(env) -> None:
    """`mlflow db upgrade URI` for the tracking store (and the auth app's own upgrade), in this process.

    Run in-process rather than as `mlflow db upgrade URI` so the URI, password included, is never an argument.
    """
    import mlflow.db
    from mlflow.server.auth.db.cli import upgrade as upgrade_auth

    print("kfopt: upgrading the tracking database schema (mlflow db upgrade)", flush=True)
    mlflow.db.upgrade.main([backend_store_uri(env) or env["MLFLOW_BACKEND_STORE_URI"]], standalone_mode=False)
    auth = auth_config(env)
    if auth:
        path, uri = auth
        os.remove(path)
        print("kfopt: upgrading the users database schema (basic-auth app)", flush=True)
        upgrade_auth.main(["--url", uri], standalone_mode=False)
    print("kfopt: database schemas are up to date", flush=True)


def clear_prometheus_dir(args: list[str]) -> None:
    """Metric files of processes that are gone would be summed again after a restart: start empty."""
    if "--expose-prometheus" in args[:-1]:
        directory = args[args.index("--expose-prometheus") + 1]
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, exist_ok=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        migrate(os.environ)
        sys.exit(0)
    uri = backend_store_uri(os.environ)
    if uri:
        os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    auth = auth_config(os.environ)
    if auth:
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = auth[0]
    os.environ.pop("KFOPT_DB_PASSWORD", None)  # the server needs the URI, not the parts
    clear_prometheus_dir(sys.argv[1:])
    print(f"kfopt: starting mlflow server {' '.join(sys.argv[1:])}", flush=True)
    os.execvp("mlflow", ["mlflow", "server", *sys.argv[1:]])
