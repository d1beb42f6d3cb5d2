# The image every kfopt pipeline step runs in (kfopt + kfp; nothing is installed when a step starts).
#
#   docker build -t REGISTRY/kfopt:0.1.0 .                              # CPU (default)
#   docker build -t REGISTRY/kfopt:0.1.0-gpu --build-arg VARIANT=gpu .  # NVIDIA GPU: tensorflow[and-cuda]
#   kfopt compile --output pipeline.yaml --image REGISTRY/kfopt:0.1.0 --accelerator-image REGISTRY/kfopt:0.1.0-gpu
#
# KFP runs lightweight components as `sh -c ... python3 -m kfp.dsl.executor_main`,
# so the image needs python3 and kfp on PATH; the ENTRYPOINT only serves `docker run IMAGE --help`.
FROM python:3.11-slim

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg

WORKDIR /opt/kfopt
COPY pyproject.toml README.md ./
COPY kfopt ./kfopt
COPY plugins ./plugins
COPY components ./components
COPY pipelines ./pipelines

# A regular (non-editable) install; the GPU variant swaps in TensorFlow with its CUDA libraries.
# The KFP v2 launcher keeps artifacts under /gcs, /minio and /s3 (a fixed contract); newer
# backends mount emptyDirs there, older ones need the folders writable by the non-root user.
# The `server` extra adds what the Helm chart's MLflow server needs: psycopg2 (PostgreSQL) and boto3 (S3/MinIO).
RUN case "$VARIANT" in \
      cpu) pip install ".[server]" ;; \
      gpu) pip install ".[server]" "tensorflow[and-cuda]>=2.21,<2.22" ;; \
      *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && python -c "import kfopt.cli, kfopt.components.ops, kfp.dsl.executor_main, psycopg2, boto3, google.cloud.storage" \
    && useradd --create-home --uid 1000 kfopt \
    && mkdir -p /gcs /minio /s3 && chown kfopt /gcs /minio /s3

# Steps write only to their artifact paths and temp dirs; MLflow's default SQLite store goes to the home directory.
USER kfopt
WORKDIR /home/kfopt
ENTRYPOINT ["kfopt"]
CMD ["--help"]
