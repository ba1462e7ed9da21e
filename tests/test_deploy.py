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
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from receiver.cli import main as cli
from receiver.config import Config, load_config
from tests.processes import REPO

DEPLOY = REPO / "deploy"
ROUTES = {"/callbacks", "/healthz", "/readyz"}  # on the public port
ADMIN_ROUTES = {"/metrics", "/readyz", "/healthz"}
SECRETS = {
    "CI_CALLBACK_TOKEN": "token",
    "CI_ADMIN_TOKEN": "admin-token",
    "POSTGRES_PASSWORD": "password",
    "WECOM_WEBHOOK_URL": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k",
}


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **SECRETS, **(env or {}), "PYTHONPATH": str(REPO)},
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
    import tomllib

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
    for config in ("ci-receiver.toml", "consumer.toml"):
        result = check_config(DEPLOY / config)
        assert result.returncode == 0, (config, result.stderr)


def test_compose_services_run_real_commands_with_real_settings():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    ours = {name: s for name, s in services.items() if s.get("image") == "ci-receiver:latest"}
    assert set(ours) == {"receiver", "consumer"}
    for service in ours.values():
        assert (DEPLOY / service["build"] / "Dockerfile").exists()
        assert_command(service["command"])
        assert_env_keys(service["environment"])
        for dependency in service["depends_on"]:
            assert dependency in services
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (DEPLOY / source).exists(), volume
        # Descriptors for every connection the receiver may hold.
        assert service["ulimits"]["nofile"]["soft"] > 2 * Config().http.max_connections
        # The admin listener is not published: it stays on the container's loopback.
        assert all(str(Config().admin.port) not in port for port in service.get("ports", []))
    # The receiver relays: a topic, and the connection it publishes over.
    receiver = ours["receiver"]["environment"]
    assert receiver["CI_RECEIVER_RELAY__TOPIC"] in receiver["CI_RECEIVER_TDMQ__TOPICS"]
    assert ours["receiver"]["ports"] == [f"{Config().http.port}:{Config().http.port}"]
    # The consumer's config, with the environment compose gives it, is a valid one.
    consumer = ours["consumer"]
    mounted = {
        v.split(":")[1]: DEPLOY / v.split(":")[0] for v in consumer["volumes"] if v.startswith("./")
    }
    config_file = mounted[consumer["command"][consumer["command"].index("--config") + 1]]
    result = check_config(config_file, env=consumer["environment"])
    assert result.returncode == 0, result.stderr
    assert '"service_url": "pulsar://pulsar:6650"' in result.stdout
    # consume has no public port: its health check asks the admin listener.
    (probe,) = [word for word in consumer["healthcheck"]["test"] if "urlopen" in word]
    assert f"127.0.0.1:{Config().admin.port}/healthz" in probe


def test_kubernetes_manifest_probes_and_config(tmp_path):
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"ConfigMap", "Service", "StatefulSet"}
    pod = kinds["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_command(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] in ROUTES
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"  # no credentials needed
    # The Service publishes the public port only; Prometheus scrapes the admin one.
    (published,) = kinds["Service"]["spec"]["ports"]
    assert published["targetPort"] == "http"
    annotations = kinds["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in ADMIN_ROUTES
    # Long enough for the drain: HTTP graceful timeout plus dispatcher drain.
    defaults = Config()
    assert pod["terminationGracePeriodSeconds"] > (
        defaults.http.graceful_timeout + defaults.dispatch.drain_timeout
    )
    config = tmp_path / "ci-receiver.toml"
    config.write_text(kinds["ConfigMap"]["data"]["ci-receiver.toml"])
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert ports == {"http": effective["http"]["port"], "admin": effective["admin"]["port"]}
    assert annotations["prometheus.io/port"] == str(effective["admin"]["port"])
    # Exposed beyond the pod's loopback, so with a token, from the secret.
    assert effective["admin"]["host"] == "0.0.0.0"
    assert effective["admin"]["token"] == "**********"
    secret_names = {env["name"] for env in container["env"] if "secretKeyRef" in env["valueFrom"]}
    assert {"CI_CALLBACK_TOKEN", "CI_ADMIN_TOKEN"} <= secret_names
    mount = container["args"][container["args"].index("--config") + 1]
    assert any(mount.startswith(m["mountPath"]) for m in container["volumeMounts"])


def test_systemd_unit_runs_real_commands():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "ci-receiver.service")
    service = unit["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        program, *argv = shlex.split(service[key])
        assert program.endswith("/bin/ci-receiver")
        assert_command(argv)
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 20
    # Room for the default connection cap next to the inbox and handlers.
    assert int(service["LimitNOFILE"]) > 2 * Config().http.max_connections


def test_the_env_key_check_catches_a_wrong_key_and_reads_as_load_config_does(monkeypatch):
    with pytest.raises(AssertionError, match="no config key 'prot'"):
        assert_env_keys({"CI_RECEIVER_HTTP__PROT": "1"})
    keys = {"CI_RECEIVER_HTTP__PORT": "9001", "CI_RECEIVER_HANDLERS__DB__TYPE": "log"}
    assert_env_keys(keys)
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert (config.http.port, config.handlers["db"].type) == (9001, "log")
