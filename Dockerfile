# maskrcnn serve in a container (CPU). Build and run:
#   docker build -t maskrcnn-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo:/models:ro" maskrcnn-serve --weights /models/best.pth
#   docker run --rm -p 8000:8000 -e HF_TOKEN maskrcnn-serve --weights hf://owner/name
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # glibc gives each thread its own malloc arena; two keep a long-running server's memory flat
    MALLOC_ARENA_MAX=2 \
    HF_HOME=/cache/huggingface

WORKDIR /app
# torch first, in a layer of its own, so that a change to the code does not download it again.
COPY constraints.txt ./
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu ".[serve,hub]" \
    && useradd --create-home --uid 10001 maskrcnn \
    && mkdir -p /cache/huggingface && chown maskrcnn /cache/huggingface

USER maskrcnn
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# 0.0.0.0 inside the container: the port is published by docker run -p, which decides who can reach it.
ENTRYPOINT ["maskrcnn", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--weights", "/models/model.safetensors"]
