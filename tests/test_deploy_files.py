"""The Dockerfile and the compose example, checked by reading them (no Docker engine
here): what they copy and mount exists, the image's config finds its policies, the
healthcheck command works against a real gateway, and the services point at each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from servers.gateway import Gateway

from gateway.config import load_config, load_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    out = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    final = max(i for i, (ins, _) in enumerate(out) if ins == "FROM")
    return out[final:]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIG / "docker-compose.yml").read_text())
    return data


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    steps = dockerfile()
    args = dict(steps)
    assert args["FROM"] == "python:3.11-slim"
    assert args["USER"] not in ("root", "0")
    assert args["EXPOSE"] == "8080"
    assert json.loads(args["CMD"]) == [
        "gateway",
        "serve",
        "--config",
        "/etc/gateway/gateway.yaml",
        "--host",
        "0.0.0.0",
    ]
    assert "/healthz" in args["HEALTHCHECK"] and "urllib" in args["HEALTHCHECK"]
    assert "TIKTOKEN_CACHE_DIR" in args["ENV"]
    # the user is switched to after everything that needs root
    assert [ins for ins, _ in steps].index("USER") > max(
        i for i, (ins, _) in enumerate(steps) if ins in ("RUN", "COPY")
    )
    # everything copied from the build context exists
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "gateway" not in ignored and "README.md" not in ignored  # pip install . needs them


def test_the_images_config_finds_its_policies(tmp_path: Path) -> None:
    """The layout the Dockerfile builds: /etc/gateway/gateway.yaml and /etc/policies."""
    etc = tmp_path / "etc"
    (etc / "gateway").mkdir(parents=True)
    shutil.copy(CONFIG / "gateway.yaml", etc / "gateway" / "gateway.yaml")
    shutil.copytree(ROOT / "policies", etc / "policies")
    loaded = load_config(etc / "gateway" / "gateway.yaml")
    assert loaded.policy_dir.resolve() == (etc / "policies").resolve()
    assert load_policy(loaded).tenants


def test_the_healthcheck_command_works(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    args = dict(dockerfile())["HEALTHCHECK"]
    cmd = json.loads(args[args.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    port = gw.url.rsplit(":", 1)[1]
    code = cmd[2].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
    gw.stop()
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode != 0


def test_compose_services_fit_together() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana"}
    gw = services["gateway"]
    assert (
        gw["build"]["context"] == ".." and (CONFIG / gw["build"]["context"] / "Dockerfile").exists()
    )
    assert gw["environment"]["GATEWAY_STATE"].startswith("redis://redis:")
    assert "--workers" in gw["command"]  # several workers: Redis state, multiprocess metrics
    # every bind mount's source exists (relative to the compose file)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (CONFIG / source).exists(), (name, source)
    # the gateway's config and policies land where the image's CMD looks for them
    mounts = dict(v.split(":")[:2] for v in gw["volumes"])
    assert mounts["./gateway.yaml"] == "/etc/gateway/gateway.yaml"
    assert mounts["../policies"] == "/etc/policies"
    # Prometheus scrapes the gateway service and loads the alert rules
    prom_cfg = yaml.safe_load((CONFIG / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom_cfg["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["gateway:8080"]
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    for rule_file in prom_cfg["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prom_mounts.values()
    # Grafana: the data source is the prometheus service, the dashboard is where the
    # provider looks
    ds = yaml.safe_load(
        (CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    provider = yaml.safe_load(
        (CONFIG / "grafana" / "provisioning" / "dashboards" / "gateway.yml").read_text()
    )["providers"][0]
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    dash_target = graf_mounts["./grafana/gateway-dashboard.json"]
    assert Path(dash_target).parent == Path(provider["options"]["path"])
    assert graf_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
