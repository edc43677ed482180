"""The deploy examples (deploy/): each parsed, and its exact arguments run through
the command's own parser (the real click command, stopped before it starts)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex

import pytest
import yaml

from proxy import cli
from proxy.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")


def parse(args: list[str], monkeypatch, env: dict[str, str] | None = None) -> Config:
    """What the command makes of ``args``: its Config, or the test fails with its error."""
    for name in [n for n in os.environ if n.startswith("ALLOYDB_PROXY_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    seen: list[Config] = []

    def fake_run(cfg: Config, warnings=(), reload_source=None) -> int:
        assert not warnings, warnings
        seen.append(cfg)
        return 0

    monkeypatch.setattr(cli, "run", fake_run)
    with pytest.raises(SystemExit) as stop:
        cli.root.main(args, prog_name="alloydb-auth-proxy")
    assert stop.value.code == 0, f"the command refused {args}"
    (cfg,) = seen
    return cfg


def test_dockerfile_runs_the_command_as_non_root(monkeypatch):
    with open(os.path.join(DEPLOY, "Dockerfile")) as fh:
        text = fh.read()
    assert re.search(r"^FROM python:3\.12-slim$", text, flags=re.M)
    user = re.search(r"^USER (\S+)$", text, flags=re.M).group(1)
    assert not user.startswith(("root", "0:", "0 ")) and user != "0"
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, flags=re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))
    assert entrypoint == ["alloydb-auth-proxy"]
    cfg = parse(cmd, monkeypatch)
    assert cfg.address == "0.0.0.0" and cfg.health_check and cfg.port == 5432


def test_kubernetes_native_sidecar_with_probes_and_pre_stop(monkeypatch):
    with open(os.path.join(DEPLOY, "kubernetes", "sidecar.yaml")) as fh:
        manifest = yaml.safe_load(fh)
    spec = manifest["spec"]["template"]["spec"]
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "alloydb-auth-proxy"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    env = {e["name"]: e["value"] for e in sidecar.get("env", [])}
    cfg = parse(sidecar["args"], monkeypatch, env)
    assert cfg.health_check and cfg.exit_zero_sigterm and cfg.quitquitquit
    assert cfg.port == 5432 and cfg.auto_iam_for(cfg.instances[0])
    http_port = int(cfg.http_port)
    for probe, path in (("startupProbe", "/startup"), ("livenessProbe", "/liveness"),
                        ("readinessProbe", "/readiness")):  # fmt: skip
        assert sidecar[probe]["httpGet"] == {"path": path, "port": http_port}
    pre_stop = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["alloydb-auth-proxy", "shutdown"]
    from proxy.subcommands import SUBCOMMANDS

    ctx = SUBCOMMANDS["shutdown"].make_context("shutdown", list(pre_stop[2:]))
    assert int(ctx.params["admin_port"]) == int(cfg.admin_port)
    assert sidecar["securityContext"]["runAsNonRoot"] is True


def test_systemd_unit_notifies_restarts_and_is_hardened(monkeypatch):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive
    unit.read(os.path.join(DEPLOY, "systemd", "alloydb-auth-proxy.service"))
    service = unit["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert service[key] in ("yes", "strict"), key
    argv = shlex.split(service["ExecStart"])
    assert os.path.basename(argv[0]) == "alloydb-auth-proxy"
    cfg = parse(argv[1:], monkeypatch)
    assert cfg.credentials_file == "${CREDENTIALS_DIRECTORY}/key.json"  # systemd expands it
    assert service["LoadCredential"] == "key.json:/etc/alloydb-auth-proxy/key.json"
    assert cfg.address == "127.0.0.1" and cfg.port == 5432
