# GPU image for train.py (NVIDIA GPUs). Build and run:
#   docker build -t esm-speedrun .
#   docker run --gpus all --ipc=host -v $PWD/cache:/app/cache -v $PWD/logs:/app/logs \
#       -v $PWD/checkpoints:/app/checkpoints esm-speedrun                # 8-GPU speedrun
#   docker run --gpus all --ipc=host esm-speedrun --nproc_per_node=1 train.py --config config/sample.yaml
# Arguments after the image name replace the default torchrun arguments below.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
# torch.compile (on by default on CUDA) has Triton build a small C launcher against Python.h at
# the first kernel, and a runtime base image has no C compiler: build-essential (gcc and the C
# library headers) and python3-dev (Python.h of the python3 the venv below is made from).
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt .
# The default Linux torch wheel bundles its CUDA libraries; the image only needs the driver,
# which `docker run --gpus all` provides.
RUN pip install --no-cache-dir -r requirements.txt
COPY . .

ENTRYPOINT ["torchrun", "--standalone"]
CMD ["--nproc_per_node=gpu", "train.py", "--config", "config/speedrun.yaml", "--device", "cuda"]
