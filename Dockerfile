# One image for both roles; the container's command picks leader:app or follower:app.
#
#   docker build -t replicated-kv .                                  # from the public slim image
#   docker build --build-arg BASE=my-local-python -t replicated-kv . # from a base made locally
#
# With a wheels/ folder in the context (pip download -d wheels -r requirements.txt),
# the install uses only those wheels (--no-index), so the build needs no network.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The requirements layer comes first, so a code change rebuilds in seconds.
# "wheel[s]" copies the folder's contents when it exists and nothing when it does not.
COPY requirements.txt wheel[s] /tmp/build/
RUN set -eu; \
    sed '/^# -- not in the image/,$d' /tmp/build/requirements.txt > /tmp/build/service.txt; \
    python3 -m venv "$VIRTUAL_ENV"; \
    if ls /tmp/build/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /tmp/build -r /tmp/build/service.txt; \
    else \
        pip install --no-cache-dir -r /tmp/build/service.txt; \
    fi; \
    rm -rf /tmp/build

WORKDIR /app
# Only the service: the two apps and the package (see .dockerignore).
COPY leader.py follower.py ./
COPY kv/ ./kv/

# DATA_DIR lives here: a named volume mounted on it starts owned by the service's uid.
RUN mkdir /data && chown 10001:10001 /data
VOLUME /data

# Not root: a fixed unprivileged uid works on any base, with or without useradd.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "uvicorn", "leader:app", "--host", "0.0.0.0", "--port", "8000"]
