# The image every kfopt pipeline step runs in (kfopt + kfp; nothing is installed when a step starts), and the
# Helm chart's MLflow server.
#
#   docker build -t REGISTRY/kfopt:0.1.0 .                              # CPU (default)
#   docker build -t REGISTRY/kfopt:0.1.0-gpu --build-arg VARIANT=gpu .  # NVIDIA GPU: tensorflow[and-cuda]
#   kfopt compile --output pipeline.yaml --image REGISTRY/kfopt:0.1.0 --accelerator-image REGISTRY/kfopt:0.1.0-gpu
#
# Every Python package comes at the version constraints.txt pins (the versions kfopt's tests run with), so a
# tag always holds the same packages; pin the base image too for a fully repeatable build:
#   docker build --build-arg BASE=python:3.11-slim@sha256:... .
# and deploy by digest (the chart's image.digest).
#
# KFP runs lightweight components as `sh -c ... python3 -m kfp.dsl.executor_main`,
# so the image needs python3 and kfp on PATH; the ENTRYPOINT only serves `docker run IMAGE --help`.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg

WORKDIR /opt/kfopt
COPY pyproject.toml README.md constraints.txt ./
COPY kfopt ./kfopt
COPY plugins ./plugins
COPY components ./components
COPY pipelines ./pipelines

# A regular (non-editable) install; the GPU variant adds TensorFlow's CUDA libraries (pinned in constraints.txt too).
# The `server` extra adds what the Helm chart's MLflow server needs: psycopg2 (PostgreSQL), boto3 (S3/MinIO),
# MLflow's basic-auth app and its Prometheus exporter. `pip check`: the pinned set is consistent.
# The KFP v2 launcher keeps artifacts under /gcs, /minio and /s3 (a fixed contract); newer
# backends mount emptyDirs there, older ones need the folders writable by the non-root user.
RUN case "$VARIANT" in \
      cpu) pip install -c constraints.txt ".[server]" ;; \
      gpu) pip install -c constraints.txt ".[server]" "tensorflow[and-cuda]" ;; \
      *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip check \
    && python -c "import kfopt.cli, kfopt.components.ops, kfp.dsl.executor_main, psycopg2, boto3, google.cloud.storage, flask_wtf, prometheus_flask_exporter" \
    && useradd --create-home --uid 1000 kfopt \
    && mkdir -p /gcs /minio /s3 && chown kfopt /gcs /minio /s3

# Steps write only to their artifact paths and temp dirs; MLflow's default SQLite store goes to the home directory.
# uid 1000 is the user the chart's pods and the compiled pipeline's steps run as (runAsUser).
USER kfopt
WORKDIR /home/kfopt
ENTRYPOINT ["kfopt"]
CMD ["--help"]
