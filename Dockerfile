# Sheepdog: one image for every role (worker-stream, worker-batch, beat, flower, simulator, migrate).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PATH="/app/.venv/bin:$PATH"

RUN pip install --no-cache-dir "uv==0.13.9"
WORKDIR /app

# Dependencies first (cached layer), exactly as uv.lock pins them; then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN uv sync --frozen --no-dev

RUN useradd --create-home --uid 10001 sheepdog && mkdir -p /data && chown sheepdog /data
USER sheepdog

ENTRYPOINT ["sheepdog"]
CMD ["--help"]
