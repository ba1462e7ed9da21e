"""Configuration: TOML, environment overrides, ${ENV}, defaults, and errors naming the key."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from receiver.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "ci-receiver.toml"
    path.write_text(text)
    return path


def error(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_the_embedded_default(monkeypatch):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    config = load_config()
    assert config.http.port == 8080
    assert str(config.inbox_path) == "ci-receiver-data/inbox.db"
    assert {name: h.type for name, h in config.handlers.items()} == {"log": "log"}
    assert config.routes is None


def test_a_file_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CI_RECEIVER_CONFIG", str(write(tmp_path, "[http]\nport = 9100\n")))
    assert load_config().http.port == 9100


def test_environment_overrides_the_file_key_by_key(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        '[http]\nhost = "127.0.0.1"\nport = 9000\n[handlers.db]\ntype = "sqlite"\npath = "a.db"\n',
    )
    monkeypatch.setenv("CI_RECEIVER_HTTP__PORT", "9001")
    monkeypatch.setenv("CI_RECEIVER_HANDLERS__DB__MAX_ATTEMPTS", "3")
    monkeypatch.setenv("CI_RECEIVER_DATA_DIR", "/srv/ci")
    config = load_config(path)
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9001)
    assert config.handlers["db"].max_attempts == 3
    assert config.handlers["db"].options == {"path": "a.db"}
    assert str(config.inbox_path) == "/srv/ci/inbox.db"


def test_env_references_in_strings(tmp_path, monkeypatch):
    monkeypatch.setenv("DB_DIR", "/var/lib/jobs")
    path = write(tmp_path, '[handlers.db]\ntype = "sqlite"\npath = "${DB_DIR}/jobs.db"\n')
    assert load_config(path).handlers["db"].options["path"] == "/var/lib/jobs/jobs.db"


def test_a_missing_env_reference_names_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_SECRET", raising=False)
    path = write(tmp_path, '[handlers.hook]\ntype = "log"\nsecret = "${NOPE_SECRET}"\n')
    assert error(path) == "handlers.hook.secret: environment variable NOPE_SECRET is not set"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[http]\nprot = 1\n", "http.prot: unknown key"),
        ("colour = 'red'\n", "colour: unknown key"),
        ('[http]\nport = "x"\n', "http.port: Input should be a valid integer"),
        ("[http]\nport = 70000\n", "http.port: Input should be less than or equal to 65535"),
        (
            '[inbox]\nsynchronous = "sometimes"\n',
            "inbox.synchronous: Input should be 'full' or 'normal'",
        ),
        ('[handlers.x]\npath = "a"\n', "handlers.x.type: Field required"),
        (
            "[[routes]]\nhandlers = ['nope']\n",
            "routes[0] names handler 'nope', which is not configured",
        ),
        (
            "[[routes]]\nmatch = { colour = 'x' }\nhandlers = ['log']\n",
            "routes[0].match.colour: unknown key",
        ),
        ("[http\n", "not valid TOML"),
        ('[http]\ntokens = [""]\n', "http.tokens: token 0 must be letters, digits"),
        ('[http]\ntokens = ["a/b"]\n', "http.tokens: token 0 must be letters, digits"),
        (
            "[limits]\nmax_depth = 300\n",
            "limits.max_depth: Input should be less than or equal to 200",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    assert message in error(write(tmp_path, text))


def test_a_bad_value_from_the_environment_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CI_RECEIVER_HTTP__PORT", "eighty")
    assert "(from the environment variable CI_RECEIVER_HTTP__PORT)" in error(write(tmp_path, ""))


def test_a_missing_file_is_an_error(tmp_path):
    assert error(tmp_path / "nope.toml").endswith("nope.toml: no such config file")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", *args], capture_output=True, text=True, env=env
    )


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path):
    path = write(
        tmp_path,
        '[http]\ntokens = ["hunter2"]\n'
        '[handlers.jobs]\ntype = "sqlite"\npath = "jobs.db"\n'
        '[handlers.events]\ntype = "jsonl"\npath = "e.jsonl"\n',
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    printed = orjson.loads(result.stdout)
    assert printed["http"]["tokens"] == ["**********"]
    assert "hunter2" not in result.stdout
    assert printed["handlers"]["jobs"] == {
        "type": "sqlite",
        "timeout": 30.0,
        "max_attempts": 10,
        "backoff_initial": 1.0,
        "backoff_max": 600.0,
        "concurrency": 8,
        # check-config shows every option as the handler will use it, defaults included,
        # and only options the handler takes
        "path": "jobs.db",
        "table": "jobs",
        "history": False,
        "events_table": "events",
        "include_raw": False,
    }
    assert "config OK" in result.stderr


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "jsonl"\n', "handlers.bad: bad options for handler type 'jsonl'"),
        ('type = "log"\nlevel = "loud"\n', "handlers.bad: bad options for handler type 'log'"),
        ('type = "nosuch"\n', "handlers.bad: unknown handler type 'nosuch'"),
        (
            'type = "nosuch.module:Handler"\n',
            "handlers.bad: cannot import handler 'nosuch.module:Handler'",
        ),
    ],
)
def test_check_config_validates_each_handler(tmp_path, table, message):
    result = run_cli("check-config", "--config", str(write(tmp_path, "[handlers.bad]\n" + table)))
    assert result.returncode == 1
    assert message in result.stderr
