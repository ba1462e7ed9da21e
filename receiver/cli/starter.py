"""The config `ci-receiver init` writes: what a first receiver needs, set; everything else
there as a comment, one line on what it does, to uncomment when wanted."""

from __future__ import annotations

import secrets
from pathlib import Path

import orjson

# Bytes of randomness in the path token: 32 make 43 URL-safe characters, beyond guessing.
TOKEN_BYTES = 32

TEMPLATE = """\
# ci-receiver's config, written by `ci-receiver init`. Check it after each edit:
#   ci-receiver check-config --config @CONFIG@
# Every key can also come from the environment (CI_RECEIVER_HTTP__PORT=9000 sets
# [http] port), and "${NAME}" inside a string reads the variable NAME: a way to keep
# secrets out of this file.

# The folder of the inbox, the SQLite file that keeps every callback received.
data_dir = @DATA_DIR@

[http]
# The listener CI posts its callbacks to.
host = "0.0.0.0"
port = 8080
# Only POST /callbacks/<one of these> is accepted: this one is in the CallBack URL that
# `init` printed. It is a secret (this file is readable by its owner only); to keep it
# out of the file: tokens = ["${CI_CALLBACK_TOKEN}"], and set that variable.
tokens = [@TOKEN@]

# What is done with each event: `log` writes a line about it to the log.
[handlers.log]
type = "log"

# --- Optional: uncomment what you need, then run check-config. ---------------------

# A PostgreSQL inbox instead of the SQLite file, which any number of receivers share:
# [inbox]
# url = "postgresql://ci:${PG_PASSWORD}@db.example.com:5432/ci"

# The JSON admin API and the inspector pages (events, failures, replays) on the admin
# listener, http://127.0.0.1:8081/inspector (which already serves /metrics and /readyz):
# [admin]
# inspector = true

# Post each event as JSON to a URL of yours, signed with the secret:
# [handlers.hook]
# type = "webhook"
# url = "https://example.com/ci-events"
# secret = "${WEBHOOK_SECRET}"

# A message in a WeCom group (also: dingtalk, feishu, slack) for each event routed to it:
# [handlers.chat]
# type = "wecom"
# url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=${WECOM_KEY}"

# Which handlers get which events (without [[routes]], every handler gets every one):
# [[routes]]
# match = { state = "Failed" }
# handlers = ["chat"]

# Callbacks CI delivers to TDMQ for Pulsar, read by `ci-receiver consume`:
# [tdmq]
# service_url = "http://pulsar-xxxxxxxx.tdmq.ap-gz.public.tencenttdmq.com:8080"
# token = "${TDMQ_TOKEN}"
# topics = ["persistent://pulsar-xxxxxxxx/ci/callbacks"]

# Callbacks CI delivers to TDMQ for CMQ queues, read by `ci-receiver consume`:
# [cmq]
# region = "gz"
# secret_id = "${CMQ_SECRET_ID}"
# secret_key = "${CMQ_SECRET_KEY}"
# queues = ["ci-callbacks"]

# Reconcile: `serve` asks CI's job API every 5 minutes for jobs whose callback never came:
# [ci]
# secret_id = "${CI_SECRET_ID}"
# secret_key = "${CI_SECRET_KEY}"
# [[ci.buckets]]
# name = "media-1250000000"
# region = "ap-guangzhou"
# tags = ["Transcode", "SmartCover"]

# OpenTelemetry traces of each callback (the `otel` extra; the OTEL_* variables say where):
# [otel]
# enabled = true
"""


def new_token() -> str:
    """A path token: long, random, and made of the characters a URL path keeps as is."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def starter_config(config: Path, token: str) -> str:
    """The text of the starter config to be written at `config`: its inbox in the folder
    beside it, wherever the receiver is started from."""
    data_dir = config.resolve().parent / "ci-receiver-data"
    return (
        TEMPLATE.replace("@CONFIG@", str(config))
        .replace("@DATA_DIR@", _toml_string(str(data_dir)))
        .replace("@TOKEN@", _toml_string(token))
    )


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string: the same quotes and escapes.
    return orjson.dumps(text).decode()
