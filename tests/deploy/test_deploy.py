"""The Dockerfile and deploy/ files hold together: there is no Docker engine here to run
them, so they are parsed and what they name is checked against the code."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import typing
import uuid
from pathlib import Path

import promql_parser
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from receiver.cli import main as cli
from receiver.config import Config, load_config
from receiver.sources.http_server import MOST_CONNECTIONS, connection_limits
from tests.support.databases import require_server
from tests.support.processes import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY = REPO / "deploy"
ROUTES = {"/callbacks", "/healthz", "/readyz"}  # on the public port
ADMIN_ROUTES = {"/metrics", "/readyz", "/healthz"}
SECRETS = {
    "CI_CALLBACK_TOKEN": "token",
    "CI_ADMIN_TOKEN": "admin-token",
    "POSTGRES_PASSWORD": "password",
    "WECOM_WEBHOOK_URL": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k",
    "CI_RECEIVER_TDMQ__TOKEN": "eyJhbGciOiJIUzI1NiJ9.e30.token",
}


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ci-receiver check-config` on a deploy file, with its secrets set. A PostgreSQL inbox
    is pointed at the machine's server, in a schema nothing uses (check-config only looks),
    since the deploy file's host does not exist here. Every key is printed, defaults too."""
    environment = {**os.environ, **SECRETS, **(env or {}), "PYTHONPATH": str(REPO)}
    if tomllib.loads(path.read_text()).get("inbox", {}).get("url"):
        environment["CI_RECEIVER_INBOX__URL"] = require_server("postgresql")
        environment["CI_RECEIVER_INBOX__POSTGRES_SCHEMA"] = f"unused_{uuid.uuid4().hex[:8]}"
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--all", "--config", str(path)],
        capture_output=True,
        text=True,
        env=environment,
    )


def assert_command(argv: list[str]) -> None:
    """argv (after `ci-receiver`) names a real command with real options."""
    command = cli.commands[argv[0]]
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for word in argv[1:]:
        if word.startswith("--"):
            assert word in options, f"{argv[0]} has no option {word}"


def assert_env_keys(env: dict[str, str]) -> None:
    """Every CI_RECEIVER_* variable is a config key (the environment overrides keys)."""
    for name in env:
        if not name.startswith("CI_RECEIVER_"):
            continue
        path = name.removeprefix("CI_RECEIVER_").lower().split("__")
        fields = Config.model_fields
        for part in path:
            assert part in fields, f"{name}: no config key {part!r}"
            annotation = fields[part].annotation
            if typing.get_origin(annotation) is dict:
                break  # [handlers.NAME]: any name, options of the handler's own
            fields = getattr(annotation, "model_fields", {})


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(REPO / "Dockerfile"))


def instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_dockerfile_runs_ci_receiver_as_a_user_on_the_default_port(dockerfile):
    assert dockerfile.baseimage.startswith("python:3.")
    assert instructions(dockerfile, "ENTRYPOINT") == ['["ci-receiver"]']
    assert instructions(dockerfile, "CMD") == ['["serve"]']
    assert instructions(dockerfile, "USER") == ["ci-receiver"]
    assert instructions(dockerfile, "EXPOSE") == [str(Config().http.port)]
    assert instructions(dockerfile, "STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    assert re.search(rf"127\.0\.0\.1:{Config().http.port}/healthz", healthcheck)


def test_dockerfile_copies_what_exists_and_installs_real_extras(dockerfile):
    for value in instructions(dockerfile, "COPY"):
        if value.startswith("--from"):
            continue
        for source in value.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for run in instructions(dockerfile, "RUN"):
        for named in re.findall(r"\[([a-z,]+)\]", run):
            assert set(named.split(",")) <= set(extras), f"RUN names unknown extras: {named}"
    env = dict(
        pair.split("=", 1)
        for value in instructions(dockerfile, "ENV")
        for pair in shlex.split(value)
    )
    assert_env_keys(env)


def test_the_example_configs_pass_check_config():
    for config in ("ci-receiver.toml", "compose.toml"):
        result = check_config(DEPLOY / config)
        assert result.returncode == 0, (config, result.stderr)


def test_compose_runs_receivers_and_consumers_on_one_postgresql_inbox():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    ours = {name: s for name, s in services.items() if s.get("image") == "ci-receiver:latest"}
    assert set(ours) == {"receiver", "consumer"}
    for name, service in ours.items():
        assert (DEPLOY / service["build"] / "Dockerfile").exists()
        assert_command(service["command"])
        assert service["command"][0] == {"receiver": "serve", "consumer": "consume"}[name]
        assert service["deploy"]["replicas"] >= 2
        assert_env_keys(service["environment"])
        for dependency in service["depends_on"]:
            assert dependency in services
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (DEPLOY / source).exists(), volume
        # Descriptors for every connection the receiver takes when max_connections is
        # unset (as many as fit, up to MOST_CONNECTIONS).
        connections = connection_limits(service["ulimits"]["nofile"]["soft"], None)
        assert connections.serve == MOST_CONNECTIONS
        assert not connections.lowered
        # The admin listener is not published: it stays on the container's loopback.
        assert all(str(Config().admin.port) not in port for port in service.get("ports", []))
    # consume has no public port: its health check asks the admin listener.
    (probe,) = [word for word in ours["consumer"]["healthcheck"]["test"] if "urlopen" in word]
    assert f"127.0.0.1:{Config().admin.port}/healthz" in probe
    # One config for all (the same handlers and routes), on the compose PostgreSQL.
    configs = {mounted_config(service) for service in ours.values()}
    assert len(configs) == 1
    config_file = configs.pop()
    text = config_file.read_text()
    assert 'url = "postgresql://ci:${POSTGRES_PASSWORD}@postgres:5432/ci"' in text
    postgres = services["postgres"]["environment"]
    checked = {}
    for name, service in ours.items():
        assert service["environment"]["POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
        checked[name] = check_config(config_file, env=service["environment"])
        assert checked[name].returncode == 0, checked[name].stderr
    assert '"service_url": "pulsar://pulsar:6650"' in checked["consumer"].stdout
    # The load balancer spreads over every receiver replica, on the port they listen on.
    balancer = services["lb"]
    assert balancer["ports"] == [f"{Config().http.port}:{Config().http.port}"]
    caddyfile = next(
        DEPLOY / v.split(":")[0] for v in balancer["volumes"] if v.endswith("Caddyfile:ro")
    )
    upstream = re.search(r"dynamic a (\S+) (\d+)", caddyfile.read_text())
    assert upstream is not None
    assert upstream.groups() == ("receiver", str(Config().http.port))


def mounted_config(service: dict) -> Path:
    """The deploy file a compose service runs with (its --config, mounted from deploy/)."""
    command = service["command"]
    inside = command[command.index("--config") + 1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    return (DEPLOY / mounted[inside]).resolve()


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def secret_command_keys(name: str) -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret` commands in the comments."""
    comments = " ".join(
        line.lstrip("# ").rstrip("\\")
        for line in (DEPLOY / name).read_text().splitlines()
        if line.startswith("#")
    )
    found: dict[str, set[str]] = {}
    commands = r"kubectl create secret (generic|tls) ([\w-]+)(.*?)(?=kubectl|$)"
    for kind, secret, options in re.findall(commands, comments):
        keys = re.findall(r"--from-(?:literal|file)=([\w.-]+)=", options)
        found[secret] = {"tls.crt", "tls.key"} if kind == "tls" else set(keys)
    return found


def check_pod(
    template: dict, config_map: dict, secrets: dict[str, set[str]], tmp_path: Path
) -> None:
    """Each container runs a real command on the mounted config, reads only secrets the
    comments tell how to create, and the config passes check-config with that env."""
    defaults = Config()
    pod = template["spec"]
    for container in pod["containers"]:
        args = container["args"]
        assert_command(args)
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1], image
        assert not image.endswith(":latest"), image
        mount = args[args.index("--config") + 1]
        assert any(mount.startswith(m["mountPath"]) for m in container["volumeMounts"])
        env = {}
        for variable in container.get("env", []):
            reference = variable["valueFrom"]["secretKeyRef"]
            assert reference["key"] in secrets.get(reference["name"], set()), reference
            env[variable["name"]] = SECRETS.get(variable["name"], "secret")
        assert_env_keys(env)
        config = tmp_path / "ci-receiver.toml"
        config.write_text(config_map["data"]["ci-receiver.toml"])
        # Every ${VAR} the config reads is set in the pod.
        assert set(re.findall(r"\$\{(\w+)\}", config.read_text())) <= set(env)
        result = check_config(config, env=env)
        assert result.returncode == 0, result.stderr
        effective = json.loads(result.stdout)
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        # Prometheus scrapes the admin listener, exposed beyond the pod's loopback: so
        # with a token, from the secret.
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert ports["admin"] == effective["admin"]["port"]
            assert annotations["prometheus.io/port"] == str(effective["admin"]["port"])
            assert annotations["prometheus.io/path"] in ADMIN_ROUTES
            assert effective["admin"]["host"] == "0.0.0.0"
            assert effective["admin"]["token"] == "**********"
            assert "CI_ADMIN_TOKEN" in env
        if args[0] == "serve":
            assert ports["http"] == effective["http"]["port"]
            assert container["readinessProbe"]["httpGet"]["port"] == "http"  # no credentials
            assert container["ports"][0]["containerPort"] == defaults.http.port
            assert container["livenessProbe"]["httpGet"]["path"] in ROUTES
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            # Long enough for the drain: HTTP graceful timeout plus dispatcher drain.
            assert pod["terminationGracePeriodSeconds"] > (
                defaults.http.graceful_timeout + defaults.dispatch.drain_timeout
            )


def test_kubernetes_scale_out_on_postgresql(tmp_path):
    docs = documents("kubernetes.yaml")
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert set(by_kind) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Ingress"}
    (config_map,) = by_kind["ConfigMap"]
    assert "postgresql://" in config_map["data"]["ci-receiver.toml"]
    secrets = secret_command_keys("kubernetes.yaml")
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    receivers = deployments["ci-receiver"]
    assert receivers["spec"]["replicas"] >= 2
    assert receivers["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = receivers["spec"]["template"]["metadata"]["labels"]
    assert receivers["spec"]["selector"]["matchLabels"] == labels
    for deployment in deployments.values():
        check_pod(deployment["spec"]["template"], config_map, secrets, tmp_path)
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert (
        deployments["ci-receiver-consumer"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
        == "consume"
    )
    # The budget, the Service and the Ingress all reach the receivers.
    (budget,) = by_kind["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert 1 <= budget["spec"]["minAvailable"] < receivers["spec"]["replicas"]
    (service,) = by_kind["Service"]
    assert service["spec"]["selector"] == labels
    container_ports = {
        p["name"] for p in receivers["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    (ingress,) = by_kind["Ingress"]
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] in secrets
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in tls["hosts"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/callbacks"  # only the callbacks are public
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_kubernetes_single_node_on_sqlite(tmp_path):
    docs = documents("kubernetes-sqlite.yaml")
    kinds = {doc["kind"]: doc for doc in docs}
    assert set(kinds) == {"ConfigMap", "Service", "StatefulSet"}
    statefulset = kinds["StatefulSet"]
    assert statefulset["spec"]["replicas"] == 1  # SQLite: one writer node
    template = statefulset["spec"]["template"]
    check_pod(template, kinds["ConfigMap"], secret_command_keys("kubernetes-sqlite.yaml"), tmp_path)
    (container,) = template["spec"]["containers"]
    config = tomllib.loads(kinds["ConfigMap"]["data"]["ci-receiver.toml"])
    # The inbox is on the volume that outlives the pod.
    assert any(m["mountPath"] == config["data_dir"] for m in container["volumeMounts"])


def test_systemd_unit_runs_real_commands():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "ci-receiver.service")
    service = unit["Service"]
    program, *argv = shlex.split(service["ExecStart"])
    assert program.endswith("/bin/ci-receiver")
    assert_command(argv)
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 20
    # `systemctl reload`: the signal the runner reloads handlers and routes on, sent
    # only once the process said it is ready (tests/runtime/test_reload.py checks it does).
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert service["Type"] == "notify"
    # READY=1 waits for the inbox's database: no start timeout kills it meanwhile, and
    # no check-config before it fails the start while the database is away.
    assert service["TimeoutStartSec"] == "infinity"
    assert "ExecStartPre" not in service


def test_the_env_key_check_catches_a_wrong_key_and_reads_as_load_config_does(monkeypatch):
    with pytest.raises(AssertionError, match="no config key 'prot'"):
        assert_env_keys({"CI_RECEIVER_HTTP__PROT": "1"})
    keys = {"CI_RECEIVER_HTTP__PORT": "9001", "CI_RECEIVER_HANDLERS__DB__TYPE": "log"}
    assert_env_keys(keys)
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert (config.http.port, config.handlers["db"].type) == (9001, "log")


# --- monitoring: alert rules and the Grafana dashboard --------------------------------

MONITORING = DEPLOY / "monitoring"
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def every_series(tmp_path: Path) -> set[str]:
    """The series names a fully configured ci-receiver exposes: a service on a PostgreSQL
    inbox (not connected to) with [ci] and verification, both consumers and the
    reconciler, built in-process on one registry."""
    from receiver.inbox.factory import open_inbox
    from receiver.runtime.service import Service
    from receiver.sources.cmq import CmqConsumer
    from receiver.sources.reconcile import Reconciler
    from receiver.sources.tdmq import TdmqConsumer

    config = Config(
        data_dir=tmp_path,
        inbox={"url": "postgresql://ci@db.example:5432/ci"},
        http={"verify": "ci-api"},
        ci={
            "secret_id": "id",
            "secret_key": "key",
            "buckets": [{"name": "media-1250000000", "region": "ap-guangzhou", "tags": ["T"]}],
        },
        tdmq={"service_url": "pulsar://127.0.0.1:1", "topics": ["persistent://t/n/x"]},
        cmq={"region": "gz", "secret_id": "id", "secret_key": "key", "queues": ["q"]},
    )
    service = Service(config)
    TdmqConsumer(config.tdmq, service.ingestor, service.metrics)
    CmqConsumer(config.cmq, service.ingestor, service.metrics)
    assert service.ci_api is not None
    Reconciler(
        config.ci, service.ci_api, open_inbox(config), service.ingestor, service.metrics.registry
    )
    names = set()
    for family in service.metrics.registry.collect():
        suffixes = SERIES_SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    found = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    found += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return found


def test_alert_rules_and_dashboard_name_only_metrics_that_exist(tmp_path):
    for expr in expressions():
        promql_parser.parse(expr)  # a ValueError names what Prometheus would refuse
    series = every_series(tmp_path)
    named = {name for expr in expressions() for name in re.findall(r"ci_receiver_\w+", expr)}
    assert named, "no ci_receiver metric named"
    assert named <= series, sorted(named - series)
    # What the rules are for: each kind of trouble has one.
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    alerted = " ".join(rule["expr"] for rule in rules)
    for metric in (
        "ci_receiver_dead_letters",
        "ci_receiver_pending_runs",
        "ci_receiver_oldest_due_seconds",
        "ci_receiver_handler_up",
        'ci_receiver_callbacks_total{outcome="rejected"}',
        'ci_receiver_callbacks_total{outcome="unavailable"}',
        'ci_receiver_callbacks_total{outcome="busy"}',
        "ci_receiver_inbox_unreachable_total",
    ):
        assert metric in alerted, metric
    # And the dashboard shows them, and the fields of callbacks it could not read.
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    shown = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    for metric in (
        "ci_receiver_inbox_unreachable_total",
        'ci_receiver_callbacks_total{outcome="busy"}',
        "ci_receiver_field_warnings_total",
    ):
        assert metric in shown, metric
    for rule in rules:
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}


# --- traces: deploy/otel/collector.yaml, its compose and Kubernetes setups --------------

OTLP_HTTP_PORT = 4318  # where ci-receiver's OTLP/HTTP exporter sends, as the collector says


def collector_config() -> dict:
    return yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())


def test_the_collector_takes_otlp_http_and_forwards_every_span():
    config = collector_config()
    endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint == f"0.0.0.0:{OTLP_HTTP_PORT}"
    (pipeline,) = config["service"]["pipelines"].values()
    # Every component the pipeline names is defined, of the kinds the collector has.
    for kind in ("receivers", "processors", "exporters"):
        assert pipeline[kind], kind
        assert set(pipeline[kind]) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    # memory_limiter first, as the collector's docs ask, then batch.
    assert pipeline["processors"] == ["memory_limiter", "batch"]
    variables = set(
        re.findall(r"\$\{env:(\w+)\}", (DEPLOY / "otel" / "collector.yaml").read_text())
    )
    assert variables == {"TRACES_BACKEND", "TRACES_BACKEND_INSECURE"}


def test_compose_sends_traces_to_its_collector_and_links_jaeger():
    base = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.otel.yml").read_text())
    services = compose["services"]
    collector = services["otel-collector"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in collector["volumes"]}
    inside = collector["command"][0].removeprefix("--config=")
    assert (DEPLOY / mounted[inside]).resolve() == DEPLOY / "otel" / "collector.yaml"
    # The collector forwards to the Jaeger of this file, on its OTLP gRPC port.
    host, port = collector["environment"]["TRACES_BACKEND"].split(":")
    assert host in services
    assert port == "4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    for service in (collector, services["jaeger"]):
        assert not service["image"].endswith(":latest"), service["image"]
    for name in ("receiver", "consumer"):
        assert name in base  # the override merges into the base file's services
        env = services[name]["environment"]
        assert_env_keys(env)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{OTLP_HTTP_PORT}"
        config = Config.model_validate(
            {
                "otel": {
                    "enabled": env["CI_RECEIVER_OTEL__ENABLED"],
                    "trace_url": env["CI_RECEIVER_OTEL__TRACE_URL"],
                }
            }
        )
        assert config.otel.enabled
        assert config.otel.link("abc") == "http://127.0.0.1:16686/trace/abc"  # Jaeger's page
        assert services[name]["depends_on"]["otel-collector"]


def test_kubernetes_collector_runs_the_same_config_and_the_pods_reach_it():
    docs = {doc["kind"]: doc for doc in documents("kubernetes-otel.yaml")}
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}
    inlined = yaml.safe_load(docs["ConfigMap"]["data"]["collector.yaml"])
    assert inlined == collector_config()  # deploy/otel/collector.yaml, in step
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert not container["image"].endswith(":latest")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["otlp-http"] == OTLP_HTTP_PORT
    health = collector_config()["extensions"]["health_check"]["endpoint"]
    assert ports["health"] == int(health.rsplit(":", 1)[1])
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert {e["name"] for e in container["env"]} == {"TRACES_BACKEND", "TRACES_BACKEND_INSECURE"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    service = docs["Service"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    # The `kubectl set env` the comments give: real keys, and the Service's address.
    comments = " ".join(
        line.lstrip("# ").rstrip("\\")
        for line in (DEPLOY / "kubernetes-otel.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    command = re.search(r"kubectl set env (.*?)(?= The image| $)", comments)[1]
    words = shlex.split(command)
    deployments = {
        doc["metadata"]["name"]
        for doc in documents("kubernetes.yaml")
        if doc["kind"] == "Deployment"
    }
    assert {
        w.removeprefix("deployment/") for w in words if w.startswith("deployment/")
    } == deployments
    env = dict(w.split("=", 1) for w in words if "=" in w)
    assert_env_keys(env)
    assert env["CI_RECEIVER_OTEL__ENABLED"] == "true"
    name = service["metadata"]["name"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{name}:{port['port']}"
    assert port["port"] == OTLP_HTTP_PORT


def test_the_image_can_trace(dockerfile):
    for run in instructions(dockerfile, "RUN"):
        if "pip install" in run or "pip wheel" in run:
            assert "otel" in re.search(r"\[([a-z,]+)\]", run)[1].split(",")
