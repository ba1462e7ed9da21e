"""`ci-receiver init` and `send --config`, as a newcomer uses them: a starter config that
a real `serve` runs, and a sample posted to it with the config's own token."""

from __future__ import annotations

import re
import stat
import tomllib

import orjson

from receiver.config import load_config
from tests.support.callbacks import load
from tests.support.callbacks import path as fixture
from tests.support.cli import ci_receiver
from tests.support.processes import Receiver


def init(folder, *args: str, ok: bool = True):
    return ci_receiver(None, "init", *args, env={"HOME": str(folder)}, text=True, ok=ok, cwd=folder)


def token_of(config) -> str:
    [token] = tomllib.loads(config.read_text())["http"]["tokens"]
    return token


def test_init_writes_a_private_config_that_serves_what_send_posts(tmp_path):
    written = init(tmp_path)
    config = tmp_path / "ci-receiver.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    token = token_of(config)
    assert len(token) >= 40
    assert re.search(rf"http://\S+:8080/callbacks/{token}\n", written.stdout)
    assert f"ci-receiver serve --config {config.name}" in written.stdout
    assert f"ci-receiver send --config {config.name} --sample smartcover" in written.stdout
    # It loads with nothing in the environment, and check-config passes.
    checked = ci_receiver(config, "check-config", "--config", str(config), text=True, ok=True)
    assert "config OK" in checked.stderr

    receiver = Receiver(config).start()  # serve, on a free port (CI_RECEIVER_HTTP__PORT)
    port = {"CI_RECEIVER_HTTP__PORT": str(receiver.port)}
    try:
        assert receiver.post(load("smartcover.xml")).status_code == 401
        sent = ci_receiver(
            None, "send", "--config", str(config), "--sample", "smartcover", env=port, text=True
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr.strip() == "200 OK"
        [event_id] = orjson.loads(sent.stdout)["ids"]
        # A file, and --url winning over the config (here: no token, refused).
        again = ci_receiver(
            None, "send", "--config", str(config), str(fixture("transcode.xml")), env=port
        )
        assert again.returncode == 0, again.stderr
        refused = ci_receiver(
            None, "send", "--config", str(config), "--sample", "transcode",
            "--url", receiver.url + "/callbacks", text=True,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.startswith("401")
    finally:
        assert receiver.terminate() == 0
    listed = ci_receiver(None, "events", "list", "--config", str(config), "--json", text=True)
    stored = [orjson.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert event_id in stored
    assert len(stored) == 2
    assert (tmp_path / "ci-receiver-data" / "inbox.db").exists()


def test_init_keeps_an_existing_file_unless_forced(tmp_path):
    config = tmp_path / "mine.toml"
    config.write_text("# mine\n")
    config.chmod(0o644)
    refused = init(tmp_path, str(config), ok=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"Error: {config} exists: --force to overwrite it"
    assert config.read_text() == "# mine\n"
    with config.open() as reader:  # someone reading the old file while it is replaced
        init(tmp_path, str(config), "--force")
        assert reader.read() == "# mine\n"  # reads the old file, never the token
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert load_config(config).http.tokens
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mine")] == []


def test_every_optional_section_of_the_starter_is_valid_once_uncommented(tmp_path):
    init(tmp_path)
    config = tmp_path / "ci-receiver.toml"
    lines = config.read_text().splitlines()
    # The commented-out config lines: `# [table]`, `# key = value`, after the divider.
    divider = next(i for i, line in enumerate(lines) if line.startswith("# --- Optional"))
    uncommented = [
        line[2:] if re.match(r"# (\[|[a-z_]+ = )", line) and i > divider else line
        for i, line in enumerate(lines)
    ]
    config.write_text("\n".join(uncommented) + "\n")
    # The secrets they read are unset: check-config --no-connect warns, and passes.
    checked = ci_receiver(None, "check-config", "--no-connect", "--config", str(config), text=True)
    assert checked.returncode == 0, checked.stderr
    shown = orjson.loads(checked.stdout)
    assert set(shown) == {
        "data_dir", "http", "inbox", "admin", "handlers", "routes", "tdmq", "cmq", "ci", "otel"
    }  # fmt: skip
    assert set(shown["handlers"]) == {"log", "hook", "chat"}
    assert "environment variable WEBHOOK_SECRET is not set" in checked.stderr


def test_send_posts_with_basic_auth_when_the_config_has_no_token(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[http]\nbasic_auth = {{ ci = "${{CI_PASSWORD}}" }}\n'
    )
    receiver = Receiver(config).start(env={"CI_PASSWORD": "s3cret"})
    env = {"CI_RECEIVER_HTTP__PORT": str(receiver.port), "CI_PASSWORD": "s3cret"}
    try:
        sent = ci_receiver(None, "send", "--config", str(config), "--sample", "snapshot", env=env)
        assert sent.returncode == 0, sent.stderr
        wrong = ci_receiver(
            None, "send", "--config", str(config), "--sample", "snapshot",
            env={**env, "CI_PASSWORD": "wrong"}, text=True,
        )  # fmt: skip
        assert wrong.stderr.startswith("401")
    finally:
        receiver.stop()


def test_send_takes_a_file_or_a_sample(tmp_path):
    neither = ci_receiver(None, "send", text=True)
    assert neither.returncode == 2
    assert "give a callback FILE or --sample NAME" in neither.stderr
    unknown = ci_receiver(None, "send", "--sample", "nope", text=True)
    assert unknown.returncode == 2
    assert "'smartcover'" in unknown.stderr
