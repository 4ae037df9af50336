# reprogram-server: a frozen image classifier behind the Open Inference Protocol (KServe V2).
#   docker build -t reprogram-server .
#   docker run -p 8000:8000 reprogram-server
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# CPU-only PyTorch first, at the versions pyproject.toml pins, so `pip install .` keeps them.
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY reprogram ./reprogram
COPY server ./server
RUN pip install ".[redis]" \
    && useradd --create-home --uid 10001 app

# Hosted prompts are written to ./prompts, i.e. /home/app/prompts (mount a volume to keep them).
USER app
WORKDIR /home/app
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

CMD ["reprogram-server", "--host", "0.0.0.0", "--port", "8000"]
