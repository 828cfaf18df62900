# The gateway with its embedded CPU engine. GPU workers (vLLM, LMDeploy) run in their own
# images and are attached by URL (engine: vllm / lmdeploy with `endpoints:`).
#
#   docker build -t llm-gateway .
#   docker run -p 8000:8000 llm-gateway
FROM python:3.11-slim

# Where to get torch 2.13.0 from: a CPU-only wheel index keeps the image small; left
# empty, pip takes PyPI's default build.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_CACHE_DIR=/var/cache/llm-gateway \
    GATEWAY_CONFIG=/app/models.yaml \
    HF_HUB_OFFLINE=1

WORKDIR /app
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL"; \
    else pip install torch==2.13.0; fi

COPY pyproject.toml README.md ./
COPY gateway gateway
COPY engines engines
# The simulator (`gateway sim`, the compose fleet's workers) and the load generator
# (`gateway bench`) are packages of their own; so is the pipeline (`gateway merge/eval/quantize`),
# which the CLI imports.
COPY simulator simulator
COPY loadgen loadgen
COPY pipeline pipeline
RUN pip install . && useradd --uid 10001 --create-home gateway \
    && mkdir -p /var/cache/llm-gateway && chown gateway /var/cache/llm-gateway
COPY models.yaml ./

USER 10001
# Fetch and convert the default models at build time, so a container starts in seconds
# and needs no network.
RUN gateway pull --config /app/models.yaml

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["gateway", "serve"]
