# gatekeeper: a small image that runs the gateway as a non-root user.
#   docker build -t gatekeeper .
#   docker run -p 8080:8080 -v $PWD/config.toml:/etc/gatekeeper/config.toml:ro -e OPENAI_API_KEY gatekeeper
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY gatekeeper ./gatekeeper
COPY plugins ./plugins
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[uvloop]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/gatekeeper --create-home gatekeeper \
 && mkdir -p /etc/gatekeeper /run/gatekeeper \
 && chown gatekeeper /run/gatekeeper
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config.toml /etc/gatekeeper/config.toml
WORKDIR /var/lib/gatekeeper
USER gatekeeper
ENV PYTHONUNBUFFERED=1 \
    GATEKEEPER_CONFIG=/etc/gatekeeper/config.toml
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"
CMD ["gatekeeper", "serve", "--config", "/etc/gatekeeper/config.toml", "--host", "0.0.0.0"]
