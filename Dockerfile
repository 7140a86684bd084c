# embedserve images. GPU host (the default target):
#   docker build -t embedserve .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v embedserve-data:/data embedserve
# CPU-only host: docker build --target cpu -t embedserve:cpu .
#
# The torch, DALI (cuda130) and cuML (cu13) wheels that pip installs each bring their own CUDA 13 libraries
# (torch >= 2.11 from PyPI is built for CUDA 13.0); the host needs an NVIDIA driver for CUDA 13. The CUDA base
# image adds the CUDA 13 user-space runtime beside them. Triton compiles a small C launcher the first time a
# kernel runs, so the GPU image keeps a C compiler and the Python headers.

ARG PYTHON_BASE=ubuntu:24.04
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${PYTHON_BASE} AS cpu-base
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_BASE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# -- CPU image ------------------------------------------------------------------------------------------------------
FROM cpu-base AS cpu
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY kernels ./kernels
COPY bench ./bench
COPY protos ./protos
RUN pip install -c constraints.txt . \
    && python -c "import faiss, torch; print('torch', torch.__version__, 'faiss', faiss.__version__)"
# Listen on all interfaces inside the container; set EMBEDSERVE_SERVER_AUTH_TOKEN (and TLS) when the
# port is reachable from other hosts.
ENV EMBEDSERVE_SERVER_HOST=0.0.0.0 EMBEDSERVE_SERVER_METRICS_HOST=0.0.0.0 EMBEDSERVE_DATA_DIR=/data \
    EMBEDSERVE_SERVER_METRICS_PORT=9464
EXPOSE 50051 9464
RUN mkdir -p /data && chown 1000:1000 /data
VOLUME ["/data"]
USER 1000:1000
# /readyz on the metrics port: 200 once the model is loaded and the server serves, 503 while draining or broken.
# Plain urllib (no torch import, so the check costs milliseconds, not seconds).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, sys, urllib.request as u; p = os.environ.get('EMBEDSERVE_SERVER_METRICS_PORT', '9464'); sys.exit(u.urlopen(f'http://127.0.0.1:{p}/readyz', timeout=4).status != 200)"
CMD ["embedserve", "serve"]

# -- GPU image (default) --------------------------------------------------------------------------------------------
FROM gpu-base AS gpu
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY kernels ./kernels
COPY bench ./bench
COPY protos ./protos
# The build has no GPU: check what can be checked without one. torch must be the CUDA 13 build; cuML must import;
# faiss.get_num_gpus() is printed (0 at build time; > 0 only with a faiss-gpu build on a GPU host, which the
# gpu extra does not install, see pyproject.toml).
RUN pip install -c constraints.txt ".[gpu-cu13]" \
    && python -c "import torch; v = torch.version.cuda or ''; print('torch', torch.__version__, 'CUDA', v); assert v.startswith('13'), 'torch is not the CUDA 13 build'" \
    && python -c "import cuml; print('cuml', cuml.__version__)" \
    && python -c "import faiss; print('faiss', faiss.__version__, 'GPUs visible to faiss:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
ENV EMBEDSERVE_SERVER_HOST=0.0.0.0 EMBEDSERVE_SERVER_METRICS_HOST=0.0.0.0 EMBEDSERVE_DATA_DIR=/data \
    EMBEDSERVE_SERVER_METRICS_PORT=9464
EXPOSE 50051 9464
RUN mkdir -p /data && chown 1000:1000 /data
VOLUME ["/data"]
USER 1000:1000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, sys, urllib.request as u; p = os.environ.get('EMBEDSERVE_SERVER_METRICS_PORT', '9464'); sys.exit(u.urlopen(f'http://127.0.0.1:{p}/readyz', timeout=4).status != 200)"
CMD ["embedserve", "serve"]
