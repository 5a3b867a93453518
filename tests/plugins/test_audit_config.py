"""The [audit] section: validated with errors that name the key and file; paths relative to the config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gatekeeper.config import ConfigError, load_config, parse_config
from gatekeeper.plugins import build_hooks
from gatekeeper.testing.kit import UPSTREAM_KEY

ROOT = Path(__file__).resolve().parents[2]


def audit_plugin(config):
    plugin_set = build_hooks(config)
    return next(p.instance for p in plugin_set.loaded if p.name == "audit")


def config_with(audit: dict, path: str = "/etc/gatekeeper/config.toml"):
    return parse_config({"upstream": {"api_key": UPSTREAM_KEY}, "audit": audit}, path=path)


def test_a_relative_log_path_is_taken_from_the_config_files_folder():
    plugin = audit_plugin(config_with({"path": "audit/log.jsonl"}, "/srv/gk/config.toml"))
    assert plugin.path == Path("/srv/gk/audit/log.jsonl")


def test_an_unknown_audit_key_is_an_error_naming_key_and_file():
    with pytest.raises(ConfigError, match=r"/etc/gatekeeper/config.toml: \[audit.fsynk\]"):
        build_hooks(config_with({"fsynk": "always"}))


def test_fsync_accepts_only_always_or_batch():
    with pytest.raises(ConfigError, match=r"\[audit.fsync\]"):
        build_hooks(config_with({"fsync": "sometimes"}))


def test_rotate_bytes_must_be_positive():
    with pytest.raises(ConfigError, match=r"\[audit.rotate_bytes\]"):
        build_hooks(config_with({"rotate_bytes": 0}))


def test_a_checkpoint_table_must_be_a_plain_table_name():
    with pytest.raises(ConfigError, match=r"\[audit.checkpoint_table\]"):
        build_hooks(config_with({"checkpoint_table": "t; DROP TABLE users"}))


def test_an_empty_hmac_key_means_a_plain_sha256_chain():
    assert audit_plugin(config_with({"hmac_key": ""})).key is None
    assert audit_plugin(config_with({"hmac_key": "k" * 32})).key == b"k" * 32


def test_the_shipped_audit_section_is_valid_with_every_commented_key_set(tmp_path):
    shipped = (ROOT / "config.toml").read_text()
    start = shipped.index("\n[audit]\n") + 1
    following = re.search(r"(?m)^(# )?\[", shipped[start + 1:])  # a commented-out section ends it too
    section = shipped[start:start + 1 + following.start()] if following else shipped[start:]
    uncommented = re.sub(r"(?m)^# (?=[a-z_]+ = )", "", section)
    assert uncommented.count("checkpoint_") >= 3
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[upstream]\napi_key = "{UPSTREAM_KEY}"\n' + uncommented)
    config = load_config(config_file, environ={"GATEKEEPER_AUDIT_KEY": "shipped-section-key"})
    plugin = audit_plugin(config)
    assert plugin.settings.fsync == "always" and plugin.settings.required is True
    assert plugin.settings.log_prompts is False and plugin.settings.rotate_bytes == 104857600
    assert plugin.settings.checkpoint_dsn == "postgresql://audit@db/compliance"
    assert plugin.key == b"shipped-section-key"
    assert plugin.path == tmp_path / "audit" / "gatekeeper-audit.jsonl"
