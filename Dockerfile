# ci-receiver: receive Tencent Cloud Infinite callbacks.
#   docker build -t ci-receiver .
#   token=$(openssl rand -hex 24)   # CI's CallBack URL: http(s)://<host>/callbacks/$token
#   docker run -p 8080:8080 -v ci-data:/var/lib/ci-receiver -e CI_RECEIVER_HTTP__TOKENS="$token" \
#     --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges ci-receiver
# A config file: mount it and name it in CI_RECEIVER_CONFIG (rather than --config), so that
# the health check reads the same one:
#   docker run -v $PWD/ci-receiver.toml:/etc/ci-receiver/ci-receiver.toml:ro \
#     -e CI_RECEIVER_CONFIG=/etc/ci-receiver/ci-receiver.toml ... ci-receiver
# Any other command: docker run ci-receiver check-config --config /etc/ci-receiver/ci-receiver.toml
#
# `serve` and `run` refuse to start here without sender authentication ([http] tokens,
# basic_auth or allow_from): CI_RECEIVER_HTTP__REQUIRE_AUTH=false accepts callbacks from
# anyone who reaches the port, when something in front already keeps strangers out.
#
# What goes in is pinned: the base image by digest (python:3.11.15-slim-bookworm, as
# docker-library/repo-info recorded it; bump both together), every Python package by
# version and hash (requirements/image.txt, requirements/build.txt: `make lock`).

FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3 AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# The dependencies first (a layer kept while only the code changes), into the venv the
# final stage takes; pip refuses any file whose hash the lock does not list.
COPY requirements ./requirements
RUN python -m venv /opt/ci-receiver \
    && /opt/ci-receiver/bin/pip install --require-hashes -r requirements/image.txt \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY receiver ./receiver
COPY handlers ./handlers
# The project's wheel, built by the locked setuptools (no build isolation: that would
# fetch setuptools unchecked), installed without dependencies (all in the lock).
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/ci-receiver/bin/pip install --no-deps /wheels/ci_receiver-*.whl

FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3
RUN useradd --system --uid 10001 --home-dir /var/lib/ci-receiver --create-home ci-receiver
COPY --from=build /opt/ci-receiver /opt/ci-receiver
USER ci-receiver
WORKDIR /var/lib/ci-receiver
# The inbox (and any file a handler writes) lives in this volume. Sender authentication
# is required (see above).
ENV PATH=/opt/ci-receiver/bin:$PATH \
    CI_RECEIVER_DATA_DIR=/var/lib/ci-receiver \
    CI_RECEIVER_LOG__FORMAT=json \
    CI_RECEIVER_HTTP__REQUIRE_AUTH=true \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/ci-receiver"]
EXPOSE 8080
# `ci-receiver health` reads the config as `serve` does (--config, CI_RECEIVER_CONFIG,
# CI_RECEIVER_*) and asks /healthz on the port it is configured to listen on. A container
# running `consume` (no public port) asks its admin listener instead:
# docker run --health-cmd "ci-receiver health --admin" ... ci-receiver consume
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s CMD ["ci-receiver", "health"]
# SIGTERM drains: in-flight requests and running handler attempts finish first.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ci-receiver"]
CMD ["serve"]
