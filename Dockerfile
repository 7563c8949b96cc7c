# Sheepdog: one image for every role (worker-stream, worker-batch, beat, flower, simulator, migrate).
#
# Build arguments:
#   PYTHON_IMAGE  the Python base (default python:3.11-slim; deploy/compose.sh passes a local
#                 Debian-built stand-in when Docker Hub cannot be reached)
#   UV_VERSION    the uv that installs exactly what uv.lock pins
# Extra CA certificates: put *.crt files in deploy/ca-certificates/ (deploy/compose.sh copies the
# host's /usr/local/share/ca-certificates there) and both stages trust them: package downloads
# behind a TLS-intercepting proxy, and a provider reached through one.
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: the virtual environment, from the lock ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
LABEL sheepdog.stage=build
ARG UV_VERSION=0.13.9
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null \
 && python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir --quiet "uv==${UV_VERSION}"
WORKDIR /app
# Dependencies first (a layer reused until the lock changes), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --python python3
COPY . .
RUN /opt/uv/bin/uv sync --frozen --no-dev --python python3 \
 && rm -f deploy/ca-certificates/*.crt

# -- run: the environment and the source, nothing else ---------------------------------------
FROM ${PYTHON_IMAGE}
LABEL sheepdog.stage=runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/app/.venv/bin:$PATH"
COPY deploy/ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null \
 && useradd --create-home --uid 10001 sheepdog \
 && mkdir -p /data/batches /data/simulator && chown -R sheepdog /data
COPY --from=build /app /app
WORKDIR /app
USER sheepdog

ENTRYPOINT ["sheepdog"]
CMD ["--help"]
