"""`ci-receiver check-config` as a user runs it: what it prints of the config, and the
errors it gives for a misspelt key, handler type or handler name (each naming the file
once, routes counted from 1)."""

from __future__ import annotations

import orjson

from tests.support.cli import ci_receiver


def check(tmp_path, text: str, *options: str, env: dict[str, str] | None = None):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(text)
    return ci_receiver(config, "check-config", *options, env=env, text=True)


def error_line(result) -> str:
    """The command's one line of error: it must have failed with it, and no traceback."""
    assert result.returncode == 1, result.stdout
    [line] = result.stderr.splitlines()
    return line


def test_prints_the_keys_set_in_the_file_or_environment_and_all_with_all(tmp_path):
    text = '[http]\nport = 9000\ntokens = ["hunter2"]\n[handlers.jobs]\ntype = "jsonl"\n'
    text += 'path = "jobs.jsonl"\n'
    shown = check(tmp_path, text, env={"CI_RECEIVER_LOG__LEVEL": "debug"})
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout) == {
        "http": {"port": 9000, "tokens": ["**********"]},
        "log": {"level": "debug"},
        "handlers": {"jobs": {"type": "jsonl", "path": "jobs.jsonl"}},
    }
    every = orjson.loads(check(tmp_path, text, "--all").stdout)
    assert every["http"]["host"] == "0.0.0.0"
    assert every["admin"]["port"] == 8081
    assert every["handlers"]["jobs"]["max_attempts"] == 10
    assert every["handlers"]["jobs"]["rate"] == "off"


def test_an_unknown_key_gets_the_closest_known_one(tmp_path):
    misspelt = check(tmp_path, "[http]\nprot = 9000\n")
    assert error_line(misspelt).endswith("http.prot: unknown key (did you mean 'port'?)")
    in_a_route = check(tmp_path, '[[routes]]\nmatch = { stat = "Failed" }\nhandlers = ["log"]\n')
    assert error_line(in_a_route).endswith(
        "routes[1].match.stat: unknown key (did you mean 'state'?)"
    )
    nothing_close = check(tmp_path, "[http]\ncolour = 1\n")
    assert error_line(nothing_close).endswith("http.colour: unknown key")


def test_an_unknown_handler_type_gets_the_closest_known_one(tmp_path):
    line = error_line(check(tmp_path, '[handlers.hook]\ntype = "webhok"\n'))
    assert "handlers.hook: unknown handler type 'webhok' (did you mean 'webhook'?)" in line


def test_routes_are_counted_from_one_in_errors_and_warnings(tmp_path):
    text = '[handlers.chat]\ntype = "log"\n[handlers.db]\ntype = "log"\n'
    text += '[[routes]]\nmatch = { tag = "SmartCovr" }\nhandlers = ["chat"]\n'
    text += '[[routes]]\nhandlers = ["dbb"]\n'
    line = error_line(check(tmp_path, text))
    assert line.endswith(
        "routes[2] names handler 'dbb', which is not configured (did you mean 'db'?);"
        " configured: chat, db"
    )
    warned = check(tmp_path, text.replace('"dbb"', '"db"'))
    assert warned.returncode == 0, warned.stderr
    assert "warning: routes[1].match.tag: CI is not known to send 'SmartCovr'" in warned.stderr


def test_every_error_names_the_file_once_after_one_config_prefix(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    # A handler's options are checked after the config loads, when the handler is made.
    options = check(tmp_path, '[handlers.events]\ntype = "jsonl"\n')
    assert error_line(options).startswith(
        f"Error: config: {config}: handlers.events: bad options for handler type 'jsonl': path:"
    )
    validation = check(tmp_path, "[[routes]]\nhandlers = ['nope']\n")
    assert error_line(validation).startswith(
        f"Error: config: {config}: routes[1] names handler 'nope'"
    )
    environment = check(tmp_path, "", env={"CI_RECEIVER_HTTP__PORT": "eighty"})
    assert error_line(environment).startswith(f"Error: config: {config}: http.port: ")
    assert "(from the environment variable CI_RECEIVER_HTTP__PORT)" in error_line(environment)
    # With no file, the routes from the environment: still one prefix.
    alone = ci_receiver(
        None, "check-config", env={"CI_RECEIVER_ROUTES": '[{"handlers": ["nope"]}]'}, text=True
    )
    assert error_line(alone).startswith("Error: config: routes[1] names handler 'nope'")


def test_the_running_commands_name_the_file_of_what_stops_them(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[handlers.events]\ntype = "jsonl"\n')
    served = ci_receiver(config, "serve", text=True)
    assert f"Error: config: {config}: handlers.events: bad options" in error_line(served)
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    consumed = ci_receiver(config, "consume", text=True)
    assert error_line(consumed).startswith(f"Error: config: {config}: nothing to consume: ")
