"""Config: TOML decoded into structs; bad or unknown keys name the key and the file."""

from __future__ import annotations

import pytest

from certificates import self_signed
from gatekeeper.cli import main
from gatekeeper.config import ConfigError, load_config, parse_config, resolve_config_path
from gatekeeper.logs import redact_text
from gatekeeper.plugins import build_hooks


def write(tmp_path, text: str):
    path = tmp_path / "gk.toml"
    path.write_text(text)
    return path


def test_pinned_keys_decode_into_typed_structs(tmp_path):
    path = write(tmp_path, """
[server]
host = "0.0.0.0"
port = 9000
max_body_bytes = 1024
[upstream]
base_url = "http://relay.internal/v1"
api_key = "sk-real"
""")
    config = load_config(path)
    assert (config.server.host, config.server.port, config.server.max_body_bytes) == ("0.0.0.0", 9000, 1024)
    assert config.upstream is not None and config.upstream.base_url == "http://relay.internal/v1"
    assert config.secrets() == ["sk-real"]


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    path = write(tmp_path, "[server]\nprot = 8080\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "server.prot" in str(raised.value) and str(path) in str(raised.value)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    path = write(tmp_path, '[server]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(path)


def test_unknown_section_is_an_error_when_plugins_load(tmp_path):
    from gatekeeper.plugins import build_hooks

    config = load_config(write(tmp_path, "[casche]\nttl_s = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown section \[casche\]"):
        build_hooks(config)


def test_env_variables_are_interpolated():
    config = parse_config({"upstream": {"api_key": "${GK_TEST_KEY}", "base_url": "http://${GK_HOST:-localhost}/v1"}},
                          environ={"GK_TEST_KEY": "sk-from-env"})
    assert config.upstream.api_key == "sk-from-env"
    assert config.upstream.base_url == "http://localhost/v1"


def test_missing_env_variable_is_an_error_naming_key_and_variable():
    with pytest.raises(ConfigError, match=r"upstream\.api_key uses \$\{NOPE_UNSET\}"):
        parse_config({"upstream": {"api_key": "${NOPE_UNSET}"}}, environ={})


def test_config_path_comes_from_flag_then_env_then_cwd(monkeypatch):
    monkeypatch.setenv("GATEKEEPER_CONFIG", "/etc/gk.toml")
    assert str(resolve_config_path("cli.toml")) == "cli.toml"
    assert str(resolve_config_path(None)) == "/etc/gk.toml"
    monkeypatch.delenv("GATEKEEPER_CONFIG")
    assert str(resolve_config_path(None)) == "config.toml"


def test_check_config_prints_what_each_plugin_will_do(tmp_path, capsys):
    path = write(tmp_path, '[upstream]\nbase_url = "http://127.0.0.1:1/v1"\napi_key = "sk-x"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK" in out
    assert "forward" in out and "http://127.0.0.1:1/v1" in out
    assert "up to 536870912 bytes: POST /v1/files, /v1/uploads/*/parts, /v1/containers/*/files" in out
    assert "sk-x" not in out


def test_check_config_loads_the_tls_pair_and_says_https(tmp_path, capsys):
    self_signed(tmp_path, "tls")
    path = write(tmp_path, '[server]\nport = 8443\ntls_cert_file = "tls.pem"\ntls_key_file = "tls-key.pem"\n'
                           '[upstream]\napi_key = "sk-x"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    assert "listens on https://127.0.0.1:8443" in capsys.readouterr().out
    (tmp_path / "tls-key.pem").unlink()
    assert main(["check-config", "--config", str(path)]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_passwords_in_connection_urls_never_appear_in_a_log_line_but_where_they_point_does(tmp_path):
    path = write(tmp_path, '[upstream]\napi_key = "sk-x"\n'
                           '[metering]\ndatabase = "postgresql://gk:usage-pw-4417@db.internal:5432/usage"\n'
                           '[cache]\nredis_url = "redis://:cache-pw-5521@redis.internal:6379/0"\n'
                           '[auth]\nredis_url = "redis://limits:limits-pw-6630@redis.internal:6379/1"\n')
    build_hooks(load_config(path))
    line = "postgresql://gk:usage-pw-4417@db.internal:5432/usage, cache-pw-5521, limits-pw-6630"
    assert redact_text(line) == "postgresql://gk:[redacted]@db.internal:5432/usage, [redacted], [redacted]"
    assert redact_text(f"usage rows go to sqlite:///{tmp_path}/usage.db") == f"usage rows go to sqlite:///{tmp_path}/usage.db"


def test_check_config_fails_with_exit_2_on_a_bad_file(tmp_path, capsys):
    path = write(tmp_path, "[server]\nport = [1]\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "server.port" in capsys.readouterr().err


@pytest.mark.parametrize("misplaced", ["sk-proj-misplaced-key-0042", "redis://:misplaced-pw@cache:6379/0"])
def test_a_config_error_never_repeats_a_key_or_password_put_in_the_wrong_setting(tmp_path, capsys, misplaced):
    path = write(tmp_path, f'[audit]\nfsync = "{misplaced}"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "audit.fsync" in error and "[redacted]" in error
    assert "misplaced-key" not in error and "misplaced-pw" not in error


def test_the_shipped_config_toml_is_valid(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-shipped-config-test")
    monkeypatch.setenv("GATEKEEPER_ADMIN_KEY", "sk-admin-shipped-config-test")
    monkeypatch.setenv("GATEKEEPER_AUDIT_KEY", "audit-key-shipped-config-test")
    assert main(["check-config", "--config", "config.toml"]) == 0


def test_an_error_in_a_named_upstream_names_that_upstream(tmp_path):
    path = write(tmp_path, '[upstreams.relay]\nbase_url = "http://relay/v1"\nmax_retrys = 3\n')
    with pytest.raises(ConfigError, match=r"\[upstreams\.relay\.max_retrys\]"):
        load_config(path)
