"""Config and policy validation: errors name file, key path and problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers.configs import gateway_config, policy, tenant
from servers.gateway import write_config

from gateway.cli import key_hash, main
from gateway.config import ConfigError, load_config, load_policy
from gateway.config.env import substitute

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, cfg: dict, pol: dict) -> Path:
    return write_config(tmp_path, cfg, {"main": pol})


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_policy(load_config(path))
    return exc.value.problems


def test_shipped_examples_are_valid() -> None:
    loaded = load_config(REPO / "config" / "gateway.yaml")
    pol = load_policy(loaded)
    assert "acme" in pol.tenants and "auto" in pol.routes


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    cfg = gateway_config()
    cfg["models"]["mock-chat"]["prise"] = 1
    path = write(tmp_path, cfg, policy({"t": tenant("k")}))
    (p,) = problems(path)
    assert str(path) in p and "models.mock-chat.prise" in p and "unknown key" in p


def test_policy_problems_name_file_and_key(tmp_path: Path) -> None:
    pol = policy(
        {"t": tenant("k", budgets={"daily_usd": -1}, models=["nope"])},
        {
            "auto": {
                "rules": [{"name": "r", "when": {"user_message_regex": "("}, "use": "x"}],
                "default": "mock-chat",
            }
        },
    )
    path = write(tmp_path, gateway_config(), pol)
    found = "\n".join(problems(path))
    pfile = str(tmp_path / "policies" / "main.yaml")
    assert pfile in found
    assert "tenants.t.budgets.daily_usd" in found
    assert "routes.auto.rules.0.when.user_message_regex" in found
    assert "invalid regular expression" in found


def test_cross_references(tmp_path: Path) -> None:
    pol = policy(
        {"t": tenant("k", models=["ghost"]), "u": tenant("k")},
        {"auto": {"rules": [{"name": "r", "use": "missing"}], "default": "mock-chat"}},
    )
    found = "\n".join(problems(write(tmp_path, gateway_config(), pol)))
    assert "tenants.t.models.0: unknown model or route 'ghost'" in found
    assert "routes.auto.rules.0.use: unknown model 'missing'" in found
    assert "this key already belongs to tenant 't'" in found


def test_deployment_references(tmp_path: Path) -> None:
    cfg = gateway_config()
    cfg["models"]["mock-chat"]["fallbacks"] = ["nothing"]
    cfg["models"]["x"] = {"provider": "nobody", "price": {"input": 1}}
    cfg["aliases"] = {"y": "zzz"}
    found = "\n".join(problems(write(tmp_path, cfg, policy({}))))
    assert "unknown provider 'nobody'" in found
    assert "models.mock-chat.fallbacks: unknown model 'nothing'" in found
    assert "aliases.y: unknown model 'zzz'" in found


def test_a_redis_url_whose_tls_files_cannot_be_used_is_a_config_problem(tmp_path: Path) -> None:
    """Found at load (and by ``gateway check``), naming the parameter, rather than as a
    crash or a 503 on every request later."""
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    cases = {
        f"rediss://r:6380/0?ssl_ca_certs={tmp_path / 'missing.pem'}": (
            f"ssl_ca_certs in the state URL names {tmp_path / 'missing.pem'}, which cannot be "
            "read (No such file or directory)"
        ),
        f"rediss://r:6380/0?ssl_ca_certs={not_pem}": "TLS settings in the state URL cannot be used",
        "rediss://r:6380/0?ssl_cert_reqs=sometimes": "Invalid SSL Certificate Requirements",
        "redis://r:6379/0?socket_timout=1": "a parameter 'socket_timout' that the Redis client",
        f"redis://r:6379/0?ssl_ca_certs={not_pem}": "ssl_* parameters need rediss://",
    }
    for url, says in cases.items():
        cfg = gateway_config()
        cfg["state"] = url
        (p,) = problems(write(tmp_path, cfg, policy({})))
        assert "state" in p and says in p, p
    cfg = gateway_config()
    cfg["state"] = "rediss://r:6380/0?ssl_cert_reqs=required&socket_timeout=1"
    load_config(write(tmp_path, cfg, policy({})))  # valid: nothing is connected at load


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert substitute({"a": ["${X}", "${Y:-dflt}", "$${literal}"]}, "f", {"X": "1"}) == {
        "a": ["1", "dflt", "${literal}"]
    }
    with pytest.raises(ConfigError) as exc:
        substitute({"p": {"key": "${NOPE_NOT_SET}"}}, "f.yaml", {})
    assert exc.value.problems == ["f.yaml: p.key: environment variable NOPE_NOT_SET is not set"]
    monkeypatch.setenv("GW_TEST_KEY", "sk-from-env")
    cfg = gateway_config("http://127.0.0.1:1/v1")
    cfg["providers"]["fake"]["api_key"] = "${GW_TEST_KEY}"
    loaded = load_config(write(tmp_path, cfg, policy({})))
    key = loaded.gateway.providers["fake"].api_key
    assert key is not None and key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(loaded.gateway)  # secrets never print


def test_yaml_errors(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_config(), policy({}))
    (tmp_path / "policies" / "bad.yaml").write_text("tenants:\n  a: 1\n  a: 2\n")
    found = "\n".join(problems(path))
    assert "bad.yaml" in found and "duplicate key 'a'" in found
    (tmp_path / "policies" / "bad.yaml").write_text("tenants: [unclosed\n")
    found = "\n".join(problems(path))
    assert "bad.yaml: line" in found and "invalid YAML" in found


def test_budget_precision_and_limits(tmp_path: Path) -> None:
    pol = policy(
        {
            "t": tenant("k", budgets={"daily_usd": "0.0000000001"}),
            "u": tenant("j", budgets={"total_usd": 10_000_000}),
        }
    )
    found = "\n".join(problems(write(tmp_path, gateway_config(), pol)))
    assert "tenants.t.budgets.daily_usd" in found and "nano-dollar" in found
    assert "tenants.u.budgets.total_usd" in found and "exactly" in found


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good", gateway_config(), policy({"t": tenant("k")}))
    assert main(["check", "--config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = write(tmp_path / "bad", gateway_config(), policy({"t": {"keys": ["plain-text"]}}))
    assert main(["check", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "tenants.t.keys.0" in err


def test_keys_new(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("sk-gw-"))
    assert key_hash(key) in out
    assert len(key) > 40


def test_console_script_runs() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check",
            "--config",
            str(REPO / "config" / "gateway.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load((REPO / "config" / "gateway.openai.yaml").read_text())
    assert data["providers"]["openai"]["api_key"] == "${OPENAI_API_KEY}"
