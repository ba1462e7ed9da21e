"""A stand-in for CI's job query API on loopback: CI itself cannot be reached from here.

Written from Tencent's documentation (CI "DescribeMediaJobs", "DescribeMediaJob", the
workflow execution list and detail pages, the moderation job queries, and COS's
"Request Signature" page), not from the SDK the receiver uses:

- `Host: <BucketName-APPID>.ci.<Region>.myqcloud.com` names the bucket; another host is
  refused.
- `Authorization` is checked by the documented algorithm: KeyTime (`q-key-time`, the
  same as `q-sign-time`) must hold the present; SignKey = HMAC-SHA1(SecretKey, KeyTime);
  the parameters and headers named in `q-url-param-list` / `q-header-list` (lower-cased,
  URL-encoded keys and values, sorted) make HttpParameters and HttpHeaders; HttpString =
  `method\\npath\\nHttpParameters\\nHttpHeaders\\n`; StringToSign =
  `sha1\\nKeyTime\\nSHA1(HttpString)\\n`; q-signature = HMAC-SHA1(SignKey, StringToSign).
  Stricter than CI on one point, to catch a client that signs too little: every query
  parameter and the Host header must be signed. A temporary key needs its token in
  `x-ci-security-token`.
- `GET /jobs?tag=&queueId=&states=&startCreationTime=&endCreationTime=&orderByTime=
  &size=&nextToken=` pages jobs (size at most 100, NextToken empty on the last page);
  `GET /jobs/<id>[,<id>...]` answers JobsDetail and NonExistJobIds;
  `GET /workflowexecution?workflowId=...` pages WorkflowExecutionList summaries;
  `GET /workflowexecution/<RunId>` answers one WorkflowExecution;
  `GET /<image|video|audio|text|document|webpage>/auditing/<JobId>` one moderation job.
- Errors are XML `<Response><Code/><Message/><RequestId/></Response>` with the HTTP status;
  `fail_next()` makes the next requests fail (throttling, 5xx, a dropped connection).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import xmltodict

# The bucket and key pair the tests' configs name; the `ci` fixture's stand-in
# (tests/conftest.py) accepts the pair.
BUCKET, REGION = "media-1250000000", "ap-guangzhou"
SECRET_ID, SECRET_KEY = "AKIDreconciletest", "the-secret-key"

CI_TIME = "%Y-%m-%dT%H:%M:%S%z"
BEIJING = timezone(timedelta(hours=8))
JOB_STATES = ("Submitted", "Running", "Success", "Failed", "Pause", "Cancel")
MODERATION_FAMILIES = ("image", "video", "audio", "text", "document", "webpage")


@dataclass
class Failure:
    """What the next request gets instead of its answer."""

    status: int = 503
    code: str = "SlowDown"
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    bucket: str | None
    status: int


@dataclass
class CiApiServer:
    """Keys: `credentials` (SecretId -> SecretKey), `tokens` (SecretId -> the token its
    temporary key needs). Data: `jobs`, `executions`, `moderation` per bucket."""

    credentials: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    executions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    moderation: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server._serve(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> CiApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def fail_next(self, *failures: Failure) -> None:
        with self._lock:
            self.failures.extend(failures)

    def add_jobs(self, bucket: str, *details: dict[str, Any]) -> None:
        with self._lock:
            self.jobs.setdefault(bucket, []).extend(details)

    def served(self, path_prefix: str = "/") -> list[Seen]:
        """The requests answered with 200 whose path starts so."""
        with self._lock:
            return [s for s in self.requests if s.status == 200 and s.path.startswith(path_prefix)]

    # --- one request -------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in handler.headers.items()}
        bucket = _bucket(headers.get("host", ""))
        with self._lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None and failure.drop:
            self._record(handler, path, query, bucket, 0)
            handler.close_connection = True
            handler.connection.close()
            return
        if failure is not None:
            status, body = _error(failure.status, failure.code, "injected failure")
        elif bucket is None:
            status, body = _error(400, "InvalidURI", "the host is not <bucket>.ci.<region>...")
        elif refused := self._refusal(handler.command, path, parts.query, headers):
            status, body = _error(403, *refused)
        else:
            status, body = self._answer(bucket, path, query)
        self._record(handler, path, query, bucket, status)
        data = body.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("x-ci-request-id", f"stand-in-{next(self._request_ids)}")
        handler.end_headers()
        handler.wfile.write(data)

    def _record(self, handler: Any, path: str, query: dict[str, str], bucket: str | None,
                status: int) -> None:  # fmt: skip
        with self._lock:
            self.requests.append(Seen(handler.command, path, query, bucket, status))

    def _refusal(
        self, method: str, path: str, raw_query: str, headers: dict[str, str]
    ) -> tuple[str, str] | None:
        fields = dict(parse_qsl(headers.get("authorization", ""), keep_blank_values=True))
        if fields.get("q-sign-algorithm") != "sha1":
            return "AccessDenied", "q-sign-algorithm must be sha1"
        secret_id = fields.get("q-ak", "")
        secret_key = self.credentials.get(secret_id)
        if secret_key is None:
            return "InvalidAccessKeyId", "the SecretId does not exist"
        if (
            secret_id in self.tokens
            and headers.get("x-ci-security-token") != self.tokens[secret_id]
        ):
            return "InvalidAccessKeyId", "a temporary key needs its x-ci-security-token"
        key_time = fields.get("q-key-time", "")
        if fields.get("q-sign-time") != key_time:
            return "AccessDenied", "q-sign-time and q-key-time differ"
        try:
            start, end = (int(t) for t in key_time.split(";"))
        except ValueError:
            return "AccessDenied", "q-key-time is not start;end"
        if not start <= time.time() <= end:
            return "AccessDenied", "Request has expired"
        signed_params = [k for k in fields.get("q-url-param-list", "").split(";") if k]
        signed_headers = [k for k in fields.get("q-header-list", "").split(";") if k]
        params = {_encode(k).lower(): v for k, v in parse_qsl(raw_query, keep_blank_values=True)}
        if set(params) - set(signed_params) or "host" not in signed_headers:
            return "AccessDenied", "every query parameter and the host header must be signed"
        try:
            http_parameters = _canonical({k: params[k] for k in signed_params})
            http_headers = _canonical({k: headers[k] for k in signed_headers})
        except KeyError as missing:
            return "AccessDenied", f"signed {missing} is not in the request"
        http_string = f"{method.lower()}\n{path}\n{http_parameters}\n{http_headers}\n"
        string_to_sign = f"sha1\n{key_time}\n{hashlib.sha1(http_string.encode()).hexdigest()}\n"
        sign_key = hmac.new(secret_key.encode(), key_time.encode(), hashlib.sha1).hexdigest()
        expected = hmac.new(sign_key.encode(), string_to_sign.encode(), hashlib.sha1).hexdigest()
        if not hmac.compare_digest(expected, fields.get("q-signature", "")):
            return "SignatureDoesNotMatch", "the signature does not match"
        return None

    def _answer(self, bucket: str, path: str, query: dict[str, str]) -> tuple[int, str]:
        with self._lock:
            jobs = list(self.jobs.get(bucket, ()))
            executions = list(self.executions.get(bucket, ()))
        if path == "/jobs":
            return self._list_jobs(jobs, query)
        if path.startswith("/jobs/"):
            wanted = path.removeprefix("/jobs/").split(",")
            found = [j for j in jobs if j["JobId"] in wanted]
            missing = [i for i in wanted if i not in {j["JobId"] for j in found}]
            response: dict[str, Any] = {"JobsDetail": found}
            if missing:
                response["NonExistJobIds"] = ",".join(missing)
            return 200, _xml(response)
        if path == "/workflowexecution":
            return self._list_executions(executions, query)
        if path.startswith("/workflowexecution/"):
            run_id = path.removeprefix("/workflowexecution/")
            found = [e for e in executions if e["RunId"] == run_id]
            if not found:
                return _error(404, "NoSuchKey", f"no workflow execution {run_id}")
            return 200, _xml({"WorkflowExecution": found[0]})
        family, _, job_id = path.strip("/").partition("/auditing/")
        if family in MODERATION_FAMILIES and job_id:
            with self._lock:
                found = [
                    j for j in self.moderation.get((bucket, family), ()) if j["JobId"] == job_id
                ]
            if not found:
                return _error(404, "NoSuchKey", f"no {family} moderation job {job_id}")
            return 200, _xml({"JobsDetail": found[0]})
        return _error(404, "NoSuchKey", f"no API at {path}")

    def _list_jobs(self, jobs: list[dict[str, Any]], query: dict[str, str]) -> tuple[int, str]:
        if not query.get("tag"):
            return _error(400, "InvalidArgument", "tag is required")
        states = _states(query.get("states", "All"))
        if states is None:
            return _error(400, "InvalidArgument", "states: All, Submitted, Running, ...")
        selected = [
            j for j in jobs
            if j["Tag"] == query["tag"]
            and (not query.get("queueId") or j.get("QueueId") == query["queueId"])
            and (not states or j["State"] in states)
        ]  # fmt: skip
        return _page(selected, "CreationTime", "JobsDetail", query)

    def _list_executions(
        self, executions: list[dict[str, Any]], query: dict[str, str]
    ) -> tuple[int, str]:
        if not query.get("workflowId"):
            return _error(400, "InvalidArgument", "workflowId is required")
        states = _states(query.get("states", "All"))
        if states is None:
            return _error(400, "InvalidArgument", "states: All, Success, Failed, Running, Cancel")
        selected = [
            {k: e.get(k) for k in ("RunId", "WorkflowId", "Object", "CreateTime", "State")}
            for e in executions
            if e["WorkflowId"] == query["workflowId"] and (not states or e["State"] in states)
        ]
        return _page(selected, "CreateTime", "WorkflowExecutionList", query)


def _page(
    entries: list[dict[str, Any]], time_field: str, node: str, query: dict[str, str]
) -> tuple[int, str]:
    try:
        since = _time(query.get("startCreationTime"))
        until = _time(query.get("endCreationTime"))
        size = int(query.get("size") or 10)
        offset = int(query.get("nextToken") or 0)
    except ValueError as exc:
        return _error(400, "InvalidArgument", str(exc))
    if not 1 <= size <= 100:
        return _error(400, "InvalidArgument", "size is 1 to 100")
    entries = [
        e for e in entries
        # As CI documents them, both bounds are strict: created "大于" (after) the start
        # and "小于" (before) the end.
        if (since is None or _time(e[time_field]) > since)
        and (until is None or _time(e[time_field]) < until)
    ]  # fmt: skip
    entries.sort(key=lambda e: _time(e[time_field]), reverse=query.get("orderByTime") != "Asc")
    page = entries[offset : offset + size]
    more = offset + size < len(entries)
    return 200, _xml({node: page, "NextToken": str(offset + size) if more else None})


def _states(value: str) -> set[str] | None:
    """The states asked for; an empty set for All; None for a value CI does not know."""
    states = {s for s in value.split(",") if s}
    if states <= {"All"}:
        return set()
    return states if states <= set(JOB_STATES) else None


def _time(value: str | None) -> datetime | None:
    return datetime.strptime(value, CI_TIME) if value else None


def _bucket(host: str) -> str | None:
    name, _, domain = host.partition(".")
    parts = domain.split(".")
    ok = len(parts) == 4 and parts[0] == "ci" and parts[2:] == ["myqcloud", "com"]
    return name if ok and name else None


def _encode(value: str) -> str:
    """UrlEncode as the signature page defines it: all but A-Z a-z 0-9 - _ . ~."""
    return quote(value, safe="-_.~")


def _canonical(pairs: dict[str, str]) -> str:
    encoded = {_encode(k).lower(): _encode(v) for k, v in pairs.items()}
    return "&".join(f"{k}={encoded[k]}" for k in sorted(encoded))


def _xml(response: dict[str, Any]) -> str:
    return xmltodict.unparse({"Response": response})


def _error(status: int, code: str, message: str) -> tuple[int, str]:
    return status, _xml({"Code": code, "Message": message, "RequestId": "stand-in"})


# --- what tests put in it ----------------------------------------------------------------

# How long each job runs; and, unless a test says when, how long ago it was created: its
# callback is then long due, and the reconciler takes it as settled.
RAN = timedelta(seconds=30)
CREATED_AGO = timedelta(minutes=10)


def _times(created: datetime | None, ended: datetime | None) -> tuple[datetime, datetime]:
    if ended is None:
        created = created or datetime.now(timezone.utc) - CREATED_AGO
        ended = created + RAN
    created = created or ended - RAN
    return created.astimezone(BEIJING), ended.astimezone(BEIJING)


def job(
    n: int,
    bucket: str,
    region: str,
    *,
    tag: str = "Transcode",
    state: str = "Success",
    queue_id: str = "p0123456789abcdef0123456789abcdef",
    created: datetime | None = None,
    ended: datetime | None = None,
) -> dict[str, Any]:
    """A JobsDetail as CI documents it for a Transcode job (code, times, input, output)."""
    created, ended = _times(created, ended)
    failed = state == "Failed"
    return {
        "Code": "InternalError" if failed else "Success",
        "Message": "transcode failed" if failed else None,
        "JobId": f"j{n:032x}",
        "Tag": tag,
        "State": state,
        "CreationTime": created.strftime(CI_TIME),
        "StartTime": (created + timedelta(seconds=1)).strftime(CI_TIME),
        "EndTime": ended.strftime(CI_TIME),
        "QueueId": queue_id,
        "Input": {"BucketId": bucket, "Region": region, "Object": f"input/video-{n}.mp4"},
        "Operation": {
            "TemplateId": "t0123456789abcdef0123456789abcdef",
            "Output": {"Bucket": bucket, "Region": region, "Object": f"output/video-{n}.mp4"},
            "MediaResult": None if failed else {
                "OutputFile": {
                    "Bucket": bucket, "Region": region, "ObjectName": f"output/video-{n}.mp4",
                    "ObjectPrefix": None,
                },
            },
            "UserData": f"job {n}",
        },
    }  # fmt: skip


def execution(
    n: int, bucket: str, region: str, workflow_id: str, *, state: str = "Success",
    created: datetime | None = None, ended: datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A WorkflowExecution with one Transcode task, as the WorkflowFinish callback has it."""
    created, ended = _times(created, ended)
    return {
        "RunId": f"i{n:032x}",
        "BucketId": bucket,
        "Object": f"input/video-{n}.mp4",
        "WorkflowId": workflow_id,
        "WorkflowName": "transcode-all",
        "CreateTime": created.strftime(CI_TIME),
        "State": state,
        "Tasks": {
            "Type": "Transcode",
            "JobId": f"j{n + 1000:032x}",
            "State": state,
            "StartTime": created.strftime(CI_TIME),
            "EndTime": ended.strftime(CI_TIME),
            "ResultInfo": {
                "ObjectCount": "1",
                "ObjectInfo": {
                    "ObjectName": f"output/video-{n}.mp4",
                    "ObjectUrl": f"https://{bucket}.cos.{region}.myqcloud.com/output/video-{n}.mp4",
                },
            },
        },
    }


def callback_body(detail: dict[str, Any]) -> bytes:
    """The XML TaskFinish callback CI posts for this job."""
    return xmltodict.unparse(
        {"Response": {"EventName": "TaskFinish", "JobsDetail": detail}}
    ).encode()
