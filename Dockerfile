# embedserve on a GPU host: `docker build -t embedserve .` then
# `docker run --gpus all -p 50051:50051 -p 9464:9464 -v embedserve-data:/data embedserve`.
# The CUDA runtime base matches the CUDA 13 builds of torch and DALI that pip installs.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY kernels ./kernels
COPY bench ./bench
COPY protos ./protos
RUN pip install -c constraints.txt ".[gpu]"

# Listen on all interfaces inside the container; set EMBEDSERVE_SERVER_AUTH_TOKEN (and TLS) when the
# port is reachable from other hosts.
ENV EMBEDSERVE_SERVER_HOST=0.0.0.0 EMBEDSERVE_SERVER_METRICS_HOST=0.0.0.0 EMBEDSERVE_DATA_DIR=/data
EXPOSE 50051 9464
RUN mkdir -p /data && chown 1000:1000 /data
VOLUME ["/data"]
USER 1000:1000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "from service.client.sync import EmbedClient; import sys; c = EmbedClient('127.0.0.1:50051'); sys.exit(c.health() != 'SERVING')"
CMD ["embedserve", "serve"]
