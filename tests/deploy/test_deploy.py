"""The Dockerfile and deploy/ files hold together: there is no Docker engine here to run
them, so they are parsed and what they name is checked against the code."""

from __future__ import annotations

import configparser
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import promql_parser
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from receiver.admin.auth import PROBES
from receiver.cli import main as cli
from receiver.config import CONFIG_ENV, Config, load_config
from receiver.sources.http_auth import open_to_anyone_refusal
from receiver.sources.http_server import MOST_CONNECTIONS, connection_limits
from tests.support.databases import require_server
from tests.support.processes import REPO

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
        if not name.startswith("CI_RECEIVER_") or name == CONFIG_ENV:
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
    # The health check asks the port the config names (tests/cli/test_health.py).
    (healthcheck,) = instructions(dockerfile, "HEALTHCHECK")
    program, *argv = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert program == "ci-receiver"
    assert argv[0] == "health"
    assert_command(argv)


def test_dockerfile_copies_what_exists_and_sets_real_config_keys(dockerfile):
    for value in instructions(dockerfile, "COPY"):
        if value.startswith("--from"):
            continue
        for source in value.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert_env_keys(image_environment())
    # Open to the world only when asked for (tests/sources/test_senders.py).
    assert image_environment()["CI_RECEIVER_HTTP__REQUIRE_AUTH"] == "true"


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
        # The config from the environment, which the image's health check reads too.
        assert "--config" not in service["command"]
        assert service["deploy"]["replicas"] >= 2
        assert_env_keys(service["environment"])
        assert_compose_hardened(service)
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
    # serve: the image's health check; consume has no public port: its asks the admin
    # listener (tests/cli/test_health.py).
    assert "healthcheck" not in ours["receiver"]
    kind, program, *argv = ours["consumer"]["healthcheck"]["test"]
    assert (kind, program, argv) == ("CMD", "ci-receiver", ["health", "--admin"])
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
        env = compose_environment(service)
        checked[name] = check_config(config_file, env=env)
        assert checked[name].returncode == 0, checked[name].stderr
        assert_serves_with_the_image_environment(service["command"][0], config_file, env)
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
    """The deploy file a compose service runs with (its CI_RECEIVER_CONFIG, mounted from
    deploy/)."""
    inside = service["environment"][CONFIG_ENV]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    return (DEPLOY / mounted[inside]).resolve()


def compose_environment(service: dict) -> dict[str, str]:
    """A compose service's environment as compose sets it: `${NAME:?why}` (compose refuses
    to start while NAME is unset) is given the test's value of that secret."""
    env = {}
    for name, value in service["environment"].items():
        required = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", value)
        env[name] = SECRETS[required[1]] if required else value
    return env


def assert_compose_hardened(service: dict) -> None:
    """No write but to volumes, no capability, no privilege gained by a setuid binary."""
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


@functools.cache
def image_environment() -> dict[str, str]:
    """The CI_RECEIVER_* variables the image sets (its ENV); read once, not to be changed."""
    dockerfile = DockerfileParser(path=str(REPO / "Dockerfile"))
    return {k: v for k, v in dockerfile.envs.items() if k.startswith("CI_RECEIVER_")}


def assert_serves_with_the_image_environment(command: str, config: Path, env: dict) -> None:
    """Under the image's [http] require_auth, a deploy config's `serve` starts: its
    public port has sender authentication."""
    environment = {**image_environment(), **env}
    assert environment["CI_RECEIVER_HTTP__REQUIRE_AUTH"] == "true"
    with mock.patch.dict(os.environ, environment):
        loaded = load_config(config)
    assert loaded.http.require_auth
    if command in ("serve", "run"):
        assert open_to_anyone_refusal(loaded.http) is None


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
        assert_probes_reach_what_it_serves(container, args[0], effective)
        assert_serves_with_the_image_environment(args[0], config, env)
        # Nothing written but to volumes (readOnlyRootFilesystem): /tmp is one.
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
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


def assert_probes_reach_what_it_serves(container: dict, command: str, effective: dict) -> None:
    """A liveness and a readiness probe, each an HTTP GET of a path the listener on its
    port serves, to a request without credentials (a kubelet sends none)."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listeners = {}
    if command in ("serve", "run"):
        listeners[effective["http"]["port"]] = ROUTES
    if effective["admin"]["enabled"]:
        # With a token, the admin listener answers these alone without one.
        open_admin = not (effective["admin"]["token"] or effective["admin"]["basic_auth"])
        listeners[effective["admin"]["port"]] = ADMIN_ROUTES if open_admin else PROBES
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        port = ports.get(probe["port"], probe["port"])  # a port's name, or its number
        assert port in listeners, (command, kind, probe)
        assert probe["path"] in listeners[port], (command, kind, probe)
        assert "httpHeaders" not in probe  # no credentials written into the manifest
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def workloads() -> list[tuple[str, dict]]:
    """(file, Deployment or StatefulSet) of every Kubernetes file in deploy/."""
    return [
        (path.name, doc)
        for path in sorted(DEPLOY.glob("kubernetes*.yaml"))
        for doc in documents(path.name)
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]


def test_every_pod_runs_restricted():
    """Kubernetes' "restricted" Pod Security Standard, and a read-only root file system,
    for every container of every workload."""
    found = workloads()
    assert {(name, doc["metadata"]["name"]) for name, doc in found} >= {
        ("kubernetes.yaml", "ci-receiver"),
        ("kubernetes.yaml", "ci-receiver-consumer"),
        ("kubernetes-sqlite.yaml", "ci-receiver"),
        ("kubernetes-otel.yaml", "otel-collector"),
    }
    for name, workload in found:
        pod = workload["spec"]["template"]["spec"]
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), name
        for container in pod["containers"]:
            where = (name, workload["metadata"]["name"], container["name"])
            # The container's own settings, over the pod's.
            security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert security["runAsNonRoot"] is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "privileged" not in security, where
            # Probed, and what it writes is on volumes of the pod.
            assert {"livenessProbe", "readinessProbe"} <= set(container), where
            volumes = {v["name"] for v in pod.get("volumes", [])} | {
                claim["metadata"]["name"]
                for claim in workload["spec"].get("volumeClaimTemplates", [])
            }
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (where, mount)


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
            if "configMap" in volume:
                assert volume["configMap"]["name"] == config_map["metadata"]["name"]
            else:  # scratch: /tmp
                assert volume["emptyDir"]["sizeLimit"], volume
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


def test_the_image_can_trace():
    assert "otel" in LOCKS["image.txt"]


# --- what the image is built from: a base image by digest, packages by hash ------------

LOCKED = REPO / "requirements"
# Each lock: the extras of pyproject.toml it holds, and whether it holds what builds the
# project ([build-system] requires).
LOCKS = {
    "dev.txt": ("test",),  # `make` (the Makefile)
    "image.txt": ("postgres", "mysql", "otel"),  # the image's venv (the Dockerfile)
    "build.txt": (),  # the image's wheel of the project
}
BUILDS = {"dev.txt", "build.txt"}  # make builds the editable install from dev.txt's
# Where every lock is for: the image's Python on Linux x86_64 (the Makefile's LOCK_FOR).
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.15",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: list[str]


def read_lock(text: str) -> dict[str, Pin]:
    """A requirements file as pip reads it with --require-hashes: one requirement a
    logical line (continued by backslashes), with its --hash options."""
    pins = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *hashes = re.split(r"\s+--hash=", line)
        requirement = Requirement(head)
        pins[canonicalize_name(requirement.name)] = Pin(requirement, hashes)
    return pins


def wanted(extras: tuple[str, ...], builds: bool) -> list[Requirement]:
    """What pyproject.toml asks for on the target: the project's dependencies and those
    of `extras` (and of the extras they name of ci-receiver itself), or with none, none;
    with `builds`, [build-system] requires too."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    found = [Requirement(r) for r in project["dependencies"]] if extras else []
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "ci-receiver":
                todo.extend(requirement.extras)
            else:
                found.append(requirement)
    if builds:
        found += [Requirement(r) for r in pyproject["build-system"]["requires"]]
    return [r for r in found if r.marker is None or r.marker.evaluate(TARGET)]


def lock_problems(pins: dict[str, Pin], requirements: list[Requirement]) -> list[str]:
    """What keeps `pip install --require-hashes` of the lock from installing what the
    requirements ask for: an entry not pinned to one version or without a hash, a
    requirement the lock lacks or pins outside its range."""
    problems = []
    for name, pin in pins.items():
        (specifier, *more) = pin.requirement.specifier or [None]
        if specifier is None or more or specifier.operator != "==" or "*" in specifier.version:
            problems.append(f"{name}: not pinned to one version")
        if not pin.hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes):
            problems.append(f"{name}: no sha256 hash")
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement}: not in the lock")
            continue
        version = next(iter(pin.requirement.specifier)).version
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: the lock has {version}")
    return problems


def pinned(name: str) -> dict[str, str]:
    """name -> version, of a lock in requirements/."""
    return {
        key: next(iter(pin.requirement.specifier)).version
        for key, pin in read_lock((LOCKED / name).read_text()).items()
    }


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_lock_holds_what_pyproject_asks_for_each_with_its_hashes(lock):
    pins = read_lock((LOCKED / lock).read_text())
    assert pins
    assert lock_problems(pins, wanted(LOCKS[lock], lock in BUILDS)) == []


def test_the_image_runs_what_make_tests():
    dev, image, build = pinned("dev.txt"), pinned("image.txt"), pinned("build.txt")
    assert image.items() <= dev.items()  # the same versions, and no package dev lacks
    assert build.items() <= dev.items()
    assert "pytest" not in image  # no test tool in the image


def test_the_lock_check_catches_what_pip_would_refuse():
    sha = "--hash=sha256:" + "a" * 64
    pins = read_lock(
        f"# a comment\nclick==8.1.0 \\\n    {sha}\nhttpx>=0.27 {sha}\norjson==3.9.0\n"
        f"uvicorn==0.54.0 {sha}\n"
    )
    problems = lock_problems(
        pins,
        [Requirement(r) for r in ("click>=8.1", "orjson>=3.9", "uvicorn>=0.55", "jinja2>=3")],
    )
    assert problems == [
        "httpx: not pinned to one version",
        "orjson: no sha256 hash",
        "uvicorn>=0.55: the lock has 0.54.0",
        "jinja2>=3: not in the lock",
    ]
    # Markers are read for the target: Python 3.11 needs no tomli.
    assert wanted(("test",), True)
    assert "tomli" not in {r.name for r in wanted(("test",), True)}


def test_make_and_the_image_install_the_locks_by_hash_and_make_lock_writes_them(dockerfile):
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements/dev.txt" in makefile
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in makefile
    # Every pip of the image checks hashes, or installs the project's own wheel alone.
    runs = " ".join(instructions(dockerfile, "RUN"))
    commands = re.findall(r"pip (install|wheel) ([^&]*)", runs)
    assert commands
    for verb, options in commands:
        assert "--require-hashes -r requirements/" in options or "--no-deps" in options, options
        if verb == "wheel":
            assert "--no-build-isolation" in options
    assert {m for m in re.findall(r"-r (requirements/\S+)", runs)} == {
        "requirements/image.txt",
        "requirements/build.txt",
    }
    # `make lock` compiles each lock from the extras this test holds it to, for the
    # Python of the image's base (python:3.11...).
    recipe = makefile.split("\nlock:", 1)[1].replace("\\\n", " ")
    for line in recipe.splitlines():
        written = re.search(r"-o requirements/(\S+)", line)
        if written:
            assert tuple(re.findall(r"--extra (\w+)", line)) == LOCKS[written[1]], line
    target = re.search(r"--python-version (\S+) --python-platform (\S+)", makefile)
    assert target.groups() == (TARGET["python_version"], "x86_64-manylinux_2_28")
    for base in instructions(dockerfile, "FROM"):
        assert base.startswith(f"python:{TARGET['python_full_version']}-"), base


def test_every_base_image_is_pinned_by_digest(dockerfile):
    bases = instructions(dockerfile, "FROM")
    assert len(bases) == 2  # the build stage and the image
    for base in bases:
        image = base.split()[0]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), base
    assert len({base.split()[0] for base in bases}) == 1  # both stages on the same one
