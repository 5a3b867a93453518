# gatekeeper: a small image that runs the gateway as a non-root user.
#   docker build -t gatekeeper .
#   docker run -p 8080:8080 -e OPENAI_API_KEY -e GATEKEEPER_CLIENT_KEY -e GATEKEEPER_ADMIN_KEY gatekeeper
# The config comes from environment variables only (deploy/gatekeeper.toml, baked in as
# /etc/gatekeeper/config.toml, reads them) or from your own file mounted over it.
# See docs/deployment.md.
FROM python:3.11-slim AS build
# Optional extras to bake in: --build-arg EXTRAS=uvloop,tracing adds the tracing plugin's OpenTelemetry.
ARG EXTRAS=uvloop
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY gatekeeper ./gatekeeper
COPY plugins ./plugins
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

FROM python:3.11-slim
# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can check it, and fsGroup 10001 gives a
# sidecar's app container the same group on the shared socket volume.
RUN groupadd --system --gid 10001 gatekeeper \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gatekeeper --create-home gatekeeper \
 && mkdir -p /etc/gatekeeper /run/gatekeeper /var/lib/gatekeeper/audit \
 && chown gatekeeper:gatekeeper /run/gatekeeper /var/lib/gatekeeper/audit
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --disable-pip-version-check /wheels/*.whl && rm -rf /wheels
COPY deploy/gatekeeper.toml /etc/gatekeeper/config.toml
COPY deploy/healthcheck.py /usr/local/bin/gatekeeper-healthcheck
WORKDIR /var/lib/gatekeeper
USER 10001:10001
ENV PYTHONUNBUFFERED=1 \
    GATEKEEPER_CONFIG=/etc/gatekeeper/config.toml
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "/usr/local/bin/gatekeeper-healthcheck", "--path", "/health"]
CMD ["gatekeeper", "serve", "--config", "/etc/gatekeeper/config.toml"]
