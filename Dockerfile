# falhook: `docker build -t falhook .` then
#   docker run -p 8000:8000 -v falhook-data:/data falhook
# Deliveries are stored in SQLite on the /data volume unless FALHOOK_DATABASE_URL
# names PostgreSQL (postgresql+psycopg://…; the driver is installed).

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/falhook
COPY pyproject.toml README.md ./
COPY falhook ./falhook
COPY verify ./verify
COPY receiver ./receiver
RUN /opt/falhook/bin/pip install '.[postgres,archive]'

FROM python:3.11-slim
ENV PATH=/opt/falhook/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FALHOOK_DATABASE_URL=sqlite:////data/falhook.db
RUN groupadd --system --gid 10001 falhook \
    && useradd --system --uid 10001 --gid falhook --home-dir /data --no-create-home falhook \
    && mkdir /data \
    && chown falhook:falhook /data
COPY --from=builder /opt/falhook /opt/falhook
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["falhook", "serve", "--host", "0.0.0.0", "--port", "8000"]
