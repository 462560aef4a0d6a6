# The gateway as a container: slim, non-root, configured by mounted files and env.
#
#   docker build -t llm-cost-gateway .
#   docker run -p 8080:8080 llm-cost-gateway            # the example config: mock provider
#   docker run -p 8080:8080 \
#     -v $PWD/my-config:/etc/gateway:ro -v $PWD/my-policies:/etc/policies:ro \
#     -e OPENAI_API_KEY -e GATEWAY_STATE=redis://redis:6379/0 llm-cost-gateway
#
# /etc/gateway/gateway.yaml is the deployment config; its `policies: ../policies` points
# at /etc/policies (mount the directory, not single files, so hot reload sees edits).
# Secrets come from the environment through ${VAR} in the config. State: set
# GATEWAY_STATE (the example config reads it) to redis://... or keep the default
# sqlite:///./data/gateway.db under /var/lib/gateway (mount a volume there).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIKTOKEN_CACHE_DIR=/opt/tiktoken
COPY --from=build /install /usr/local
# tiktoken's encoding files, fetched once at build time so the gateway counts tokens
# exactly without network access at run time (it falls back to an estimate otherwise).
RUN python -c "import tiktoken; [tiktoken.get_encoding(e) for e in ('o200k_base', 'cl100k_base')]" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway /etc/policies /var/lib/gateway/data \
    && chown gateway:gateway /var/lib/gateway/data
COPY config/gateway.yaml /etc/gateway/gateway.yaml
COPY policies/ /etc/policies/

USER gateway
WORKDIR /var/lib/gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml", "--host", "0.0.0.0"]
