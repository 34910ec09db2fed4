# syntax=docker/dockerfile:1
#
# llm-gateway: the gRPC gateway between agents and LLM providers.
#
#   docker build -t llm-gateway .
#
# AUTHENTICATION (read this before the first `docker run`). The container listens on
# 0.0.0.0:50051, beyond loopback, and keeps the default LLMGW_AUTH=auto: that means keys are
# REQUIRED, and a server with no gateway key at all REFUSES TO START (exit 2, "no gateway key
# exists"). Either create a key first, in the same data volume:
#
#   docker run --rm -v llmgw-data:/var/lib/llm-gateway llm-gateway keys create --org acme --admin
#   docker run -d -p 50051:50051 -v llmgw-data:/var/lib/llm-gateway -e OPENAI_API_KEY llm-gateway
#
# (callers send the printed key as `authorization: Bearer <key>` metadata), or run without
# authentication, deliberately, on a network you trust: `-e LLMGW_AUTH=off`.
#
# Every LLMGW_* variable of the configuration table applies (`docker run ... llm-gateway serve
# --help` lists them). The SQLite store (traces, gateway keys, BYOK providers) lives in the
# /var/lib/llm-gateway volume. BYOK providers also need LLMGW_ENCRYPTION_KEY.

# ---- build: install the project and its dependencies into a virtualenv ----------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/llm-gateway
WORKDIR /src
# Only what the package is built from (see .dockerignore): the checked-in generated code ships,
# so neither protoc nor buf is needed here.
COPY pyproject.toml README.md ./
COPY server ./server
COPY generated ./generated
RUN /opt/llm-gateway/bin/pip install --upgrade pip \
    && /opt/llm-gateway/bin/pip install .

# ---- runtime: the virtualenv alone, run by an unprivileged user -------------------------------
FROM python:3.11-slim

ENV PATH=/opt/llm-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLMGW_LISTEN=0.0.0.0:50051 \
    LLMGW_SQLITE_PATH=/var/lib/llm-gateway/llm-gateway.db

RUN groupadd --system --gid 10001 llmgw \
    && useradd --system --uid 10001 --gid llmgw --home-dir /var/lib/llm-gateway --no-create-home \
       --shell /usr/sbin/nologin llmgw \
    && install -d -o llmgw -g llmgw -m 0750 /var/lib/llm-gateway

COPY --from=build /opt/llm-gateway /opt/llm-gateway

USER 10001:10001
WORKDIR /var/lib/llm-gateway
VOLUME ["/var/lib/llm-gateway"]
EXPOSE 50051

# Standard gRPC health checking on the port of LLMGW_LISTEN (health needs no gateway key).
# With LLMGW_TLS_CERT set, replace this check: it speaks plaintext.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;p=os.environ.get('LLMGW_LISTEN','0.0.0.0:50051').split(',')[0].rsplit(':',1)[1];c=grpc.insecure_channel('127.0.0.1:'+p);sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=4).status==h.HealthCheckResponse.SERVING else 1)"]

# SIGTERM (docker stop) drains in-flight calls for LLMGW_GRACE_PERIOD seconds (default 10), then
# exits 0: keep `docker stop --time` above the grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-gateway"]
CMD ["serve"]
