# ci-receiver: receive Tencent Cloud Infinite callbacks.
#   docker build -t ci-receiver .
#   docker run -p 8080:8080 -v ci-data:/var/lib/ci-receiver ci-receiver
# Any other command: docker run ci-receiver check-config --config /etc/ci-receiver/ci-receiver.toml

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
COPY handlers ./handlers
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,mysql,otel]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/ci-receiver --create-home ci-receiver
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels ci-receiver[postgres,mysql,otel] \
    && rm -rf /wheels
USER ci-receiver
WORKDIR /var/lib/ci-receiver
# The inbox (and any file a handler writes) lives in this volume.
ENV CI_RECEIVER_DATA_DIR=/var/lib/ci-receiver \
    CI_RECEIVER_LOG__FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/ci-receiver"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM drains: in-flight requests and running handler attempts finish first.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ci-receiver"]
CMD ["serve"]
