"""Configuration: TOML, environment overrides, ${ENV}, defaults, and errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from receiver.config import Config, ConfigError, load_config


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


def test_log_handlers_run_64_at_once_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    assert load_config().handlers["log"].concurrency == 64
    text = '[handlers.a]\ntype = "log"\n[handlers.b]\ntype = "log"\nconcurrency = 3\n'
    text += '[handlers.c]\ntype = "jsonl"\npath = "e.jsonl"\n'
    handlers = load_config(write(tmp_path, text)).handlers
    assert {name: h.concurrency for name, h in handlers.items()} == {"a": 64, "b": 3, "c": 8}


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
    assert error(path) == (
        f"{path}: handlers.hook.secret: environment variable NOPE_SECRET is not set"
    )


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
            "routes[1] names handler 'nope', which is not configured",
        ),
        (
            "[[routes]]\nmatch = { colour = 'x' }\nhandlers = ['log']\n",
            "routes[1].match.colour: unknown key",
        ),
        # The keys of a list's item are known too.
        (
            "[[routes]]\nmatch = { stat = 'Failed' }\nhandlers = ['log']\n",
            "routes[1].match.stat: unknown key (did you mean 'state'?)",
        ),
        ("[http\n", "not valid TOML"),
        ('[http]\ntokens = [""]\n', "http.tokens: token 1 must be letters, digits"),
        ('[http]\ntokens = ["a/b"]\n', "http.tokens: token 1 must be letters, digits"),
        (
            "[limits]\nmax_depth = 300\n",
            "limits.max_depth: Input should be less than or equal to 200",
        ),
        # TOML has them; a lease of `inf` seconds would be no lease (stored NULL).
        ('[handlers.log]\ntype = "log"\ntimeout = inf\n', "handlers.log.timeout: Input should be"),
        ("[dispatch]\npoll_interval = nan\n", "dispatch.poll_interval: Input should be"),
        ("[http]\nheader_timeout = inf\n", "http.header_timeout: Input should be"),
        # Pruned events would look missing, be recovered and handled again.
        (
            '[retention]\nevents = "12h"\n[ci]\nsecret_id = "i"\nsecret_key = "k"\n'
            '[[ci.buckets]]\nname = "b-1250000000"\nregion = "ap-guangzhou"\n'
            'tags = ["Transcode"]\n',
            "ci.window (86400 s) reaches back as far as retention.events keeps handled events"
            " (43200 s)",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    assert message in error(write(tmp_path, text))


def test_a_bad_value_from_the_environment_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CI_RECEIVER_HTTP__PORT", "eighty")
    assert "(from the environment variable CI_RECEIVER_HTTP__PORT)" in error(write(tmp_path, ""))


@pytest.mark.parametrize("tokens", ["abc,def", " abc , def ", '["abc", "def"]'])
def test_a_list_of_strings_from_the_environment_comma_separated_or_json(monkeypatch, tokens):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    monkeypatch.setenv("CI_RECEIVER_HTTP__TOKENS", tokens)
    monkeypatch.setenv("CI_RECEIVER_TDMQ__TOPICS", "persistent://t/ns/a,persistent://t/ns/b")
    config = load_config()
    assert [t.get_secret_value() for t in config.http.tokens] == ["abc", "def"]
    assert config.tdmq.topics == ["persistent://t/ns/a", "persistent://t/ns/b"]


def test_tables_and_lists_of_tables_from_the_environment_in_json(tmp_path, monkeypatch):
    path = write(tmp_path, '[handlers.hook]\ntype = "log"\n')
    monkeypatch.setenv(
        "CI_RECEIVER_ROUTES", '[{"match": {"state": "failed"}, "handlers": ["hook"]}]'
    )
    monkeypatch.setenv("CI_RECEIVER_HANDLERS__HOOK__HEADERS", '{"Authorization": "Bearer x"}')
    # a handler's options are not typed here: a string stays a string
    monkeypatch.setenv("CI_RECEIVER_HANDLERS__HOOK__TEMPLATE", "[CI] $title")
    monkeypatch.setenv("CI_RECEIVER_HTTP", '{"host": "127.0.0.1"}')
    monkeypatch.setenv("CI_RECEIVER_HTTP__PORT", "9002")  # a key inside the table above
    config = load_config(path)
    assert config.routes is not None
    assert config.routes[0].match.state == "Failed"
    assert config.handlers["hook"].options == {
        "headers": {"Authorization": "Bearer x"},
        "template": "[CI] $title",
    }
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9002)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "CI_RECEIVER_ROUTES",
            "failed:log",
            "CI_RECEIVER_ROUTES: takes JSON here: an array like",
        ),
        ("CI_RECEIVER_TDMQ__TOPICS", '["a",', "CI_RECEIVER_TDMQ__TOPICS: not valid JSON"),
        (
            "CI_RECEIVER_ROUTES",
            '[{"match": {"colour": "red"}, "handlers": ["log"]}]',
            "routes[1].match.colour: unknown key (from the environment variable"
            " CI_RECEIVER_ROUTES)",
        ),
        (
            "CI_RECEIVER_HTTP__TOKENS",
            "a/b",
            "http.tokens: token 1 must be letters, digits, '-', '_', '.' or '~' (it is a path"
            " segment), and not empty (from the environment variable CI_RECEIVER_HTTP__TOKENS)",
        ),
        (
            "CI_RECEIVER_HANDLERS__LOG__MAX_ATTEMPTS",
            "many",
            "handlers.log.max_attempts: Input should be a valid integer, unable to parse string"
            " as an integer (from the environment variable"
            " CI_RECEIVER_HANDLERS__LOG__MAX_ATTEMPTS)",
        ),
        ("CI_RECEIVER_HTTP____PORT", "1", "CI_RECEIVER_HTTP____PORT: an empty level"),
    ],
)
def test_a_bad_environment_value_is_an_error_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    monkeypatch.setenv(name, value)
    assert message in error(None)


def test_every_bad_variable_is_named_at_once(monkeypatch):
    monkeypatch.delenv("CI_RECEIVER_CONFIG", raising=False)
    monkeypatch.setenv("CI_RECEIVER_ROUTES", "x")
    monkeypatch.setenv("CI_RECEIVER_TDMQ__TOPICS", "[")
    assert error(None).count("CI_RECEIVER_") == 2


def test_every_missing_env_reference_is_reported_at_once(tmp_path, monkeypatch):
    for name in ("NOPE_A", "NOPE_B"):
        monkeypatch.delenv(name, raising=False)
    path = write(
        tmp_path,
        '[http]\ntokens = ["${NOPE_A}"]\n[handlers.hook]\ntype = "log"\nsecret = "${NOPE_B}"\n',
    )
    assert error(path) == (
        f"{path}: http.tokens[1]: environment variable NOPE_A is not set;"
        " handlers.hook.secret: environment variable NOPE_B is not set"
    )


def test_a_missing_file_is_an_error(tmp_path):
    assert error(tmp_path / "nope.toml").endswith("nope.toml: no such config file")


def test_a_file_that_cannot_be_read_as_text_is_a_config_error(tmp_path):
    """Not a traceback: a reload (SIGHUP) counts it as refused and says why."""
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert error(folder) == f"{folder}: cannot be read: Is a directory"
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[handlers.caf\xe9]\ntype = "log"\n')
    assert error(latin).startswith(f"{latin}: not UTF-8 text:")


def test_a_handler_not_in_the_config_never_makes_the_receiver_unready():
    """The verification step, or a handler a reload is taking out while /readyz asks."""
    config = Config(dispatch={"unready_on_handler_error": True})
    assert config.required("log") is True
    assert config.required("gone") is False


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", *args], capture_output=True, text=True, env=env
    )


def checked(path, *options: str) -> tuple[dict, subprocess.CompletedProcess]:
    """check-config of the file, which must pass: the effective config it printed."""
    result = run_cli("check-config", "--config", str(path), *options)
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout), result


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path):
    path = write(
        tmp_path,
        '[http]\ntokens = ["hunter2"]\n'
        '[handlers.jobs]\ntype = "sqlite"\npath = "jobs.db"\n'
        '[handlers.events]\ntype = "jsonl"\npath = "e.jsonl"\n',
    )
    printed, result = checked(path, "--all")
    assert printed["http"]["tokens"] == ["**********"]
    assert "hunter2" not in result.stdout
    assert printed["handlers"]["jobs"] == {
        "type": "sqlite",
        "timeout": 30.0,
        "max_attempts": 10,
        "backoff_initial": 1.0,
        "backoff_max": 600.0,
        "concurrency": 8,
        "batch_size": 100,
        "batch_wait": 0.2,
        "rate": "off",
        "required": False,
        # check-config shows every option as the handler will use it, defaults included,
        # and only options the handler takes
        "path": "jobs.db",
        "table": "ci_jobs",
        "history": False,
        "events_table": "ci_events",
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


def test_check_config_with_lists_from_the_environment_and_its_errors(tmp_path):
    env = {**os.environ, "CI_RECEIVER_HTTP__TOKENS": "abc,def"}
    env.pop("CI_RECEIVER_CONFIG", None)
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["http"]["tokens"] == ["**********", "**********"]
    env["CI_RECEIVER_ROUTES"] = "not json"
    result = run_cli("check-config", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "CI_RECEIVER_ROUTES: takes JSON here" in result.stderr


def test_check_config_warns_of_routes_that_miss(tmp_path):
    path = write(
        tmp_path,
        '[handlers.db]\ntype = "log"\n[handlers.chat]\ntype = "log"\n'
        '[[routes]]\nmatch = { state = "failed", tag = "Smartcover" }\nhandlers = ["chat"]\n',
    )
    printed, result = checked(path)
    assert printed["routes"][0]["match"]["state"] == "Failed"
    assert "warning: handlers.db: no route sends it anything" in result.stderr
    assert "warning: routes[1].match.tag" not in result.stderr  # a known tag in another case
    path.write_text(path.read_text().replace('"failed"', '"done"'))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "routes[1].match.state: 'done' can never match: CI sends Submitted" in result.stderr


def test_check_config_shows_each_handlers_rate_and_batches_where_it_takes_them(tmp_path):
    path = write(
        tmp_path,
        '[handlers.robot]\ntype = "wecom"\nurl = "https://example.invalid/hook"\n'
        '[handlers.slower]\ntype = "feishu"\nurl = "https://example.invalid/h"\nrate = "1/s"\n'
        '[handlers.events]\ntype = "jsonl"\npath = "e.jsonl"\nbatch_size = 500\n',
    )
    shown = checked(path, "--all")[0]["handlers"]
    assert shown["robot"]["rate"] == ["20/min"]  # the vendor's documented limit
    assert shown["slower"]["rate"] == ["1/s"]
    assert "batch_size" not in shown["robot"]
    assert (shown["events"]["batch_size"], shown["events"]["rate"]) == (500, "off")


def test_a_rate_that_cannot_be_read_is_a_config_error(tmp_path):
    path = write(tmp_path, '[handlers.robot]\ntype = "log"\nrate = "20 a minute"\n')
    assert "rate '20 a minute': write it as COUNT/UNIT" in error(path)


def test_a_refusal_waits_in_its_queue_unless_a_dead_letter_topic_takes_it():
    assert Config().refusals_wait_in() == {"cmq", "tdmq"}
    dead_letters = Config(tdmq={"dead_letter_topic": "persistent://public/default/dead"})
    assert dead_letters.refusals_wait_in() == {"cmq"}
