"""``alloydb-auth-proxy doctor`` against the emulator: one test per trap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import (
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    IAM_DB_USER,
    SA_EMAIL,
    TOKEN_APP,
    TOKEN_IAM,
    URI,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doctor(emulator, *args: str, fmt: str = "json", env: dict[str, str] | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "PG"))}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", *args, "--format", fmt,
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT,
    )  # fmt: skip
    if fmt == "json":
        return proc.returncode, json.loads(proc.stdout), proc
    return proc.returncode, proc.stdout, proc


def by_check(report) -> dict[str, dict]:
    return {c["check"]: c for c in report["checks"]}


def test_all_seven_checks_pass_with_an_iam_login(emulator):
    code, report, proc = doctor(
        emulator, URI, "--token", TOKEN_IAM, "--auto-iam-authn", "--db-user", IAM_DB_USER,
        "--db-name", DB_NAME,
    )  # fmt: skip
    assert code == 0, proc.stdout + proc.stderr
    checks = by_check(report)
    assert report["ok"] is True
    assert [c["status"] for c in report["checks"]] == ["pass"] * 7
    assert "Authorizing with OAuth2 token" in checks["credentials"]["detail"]
    assert "TLSv1.3" in checks["tls"]["detail"] and "IP SAN" in checks["tls"]["detail"]
    assert checks["metadata_exchange"]["detail"] == "OK (AUTO_IAM)"
    assert IAM_DB_USER in checks["login"]["detail"]
    assert TOKEN_IAM not in proc.stdout + proc.stderr


def test_a_database_user_with_a_password_logs_in_by_scram(emulator):
    code, report, proc = doctor(
        emulator, URI, "--token", TOKEN_APP, "--db-user", DB_USER, "--db-name", DB_NAME,
        env={"PGPASSWORD": DB_PASSWORD},
    )  # fmt: skip
    assert code == 0, proc.stdout
    assert by_check(report)["login"]["status"] == "pass"
    assert DB_PASSWORD not in proc.stdout + proc.stderr


def test_a_wrong_instance_name_is_a_404_with_its_fix(emulator):
    wrong = URI.replace("instances/inst", "instances/nope")
    code, report, _ = doctor(emulator, wrong, "--token", TOKEN_APP)
    checks = by_check(report)
    assert code == 1 and report["ok"] is False
    assert checks["admin_api"]["status"] == "fail" and "404" in checks["admin_api"]["detail"]
    assert "instance URI is wrong" in checks["admin_api"]["fix"]
    assert {checks[c]["status"] for c in ("address", "network", "tls")} == {"skip"}
    code, text, _ = doctor(emulator, wrong, "--token", TOKEN_APP, fmt="text")
    assert code == 1 and "FAIL  admin_api" in text and "fix: the instance URI is wrong" in text


def test_psc_asked_of_an_instance_without_it(make_emulator):
    emu = make_emulator(instances={URI: {}})
    code, report, _ = doctor(emu, URI, "--token", TOKEN_APP, "--psc")
    address = by_check(report)["address"]
    assert code == 1 and address["status"] == "fail"
    assert 'does not have IP of type "PSC"' in address["detail"]
    assert "PRIVATE (use neither --public-ip nor --psc)" in address["detail"]


def test_nothing_listening_on_5433_is_a_refusal(make_emulator):
    emu = make_emulator(instances={URI: {"serve": False}})
    code, report, _ = doctor(emu, URI, "--token", TOKEN_APP)
    network = by_check(report)["network"]
    assert code == 1 and network["status"] == "fail" and "refused" in network["detail"]
    assert "nothing listens on 5433" in network["fix"]


def test_a_service_account_email_as_database_user_gets_the_iam_name(emulator):
    code, report, _ = doctor(
        emulator, URI, "--token", TOKEN_IAM, "--auto-iam-authn", "--db-user", SA_EMAIL
    )
    login = by_check(report)["login"]
    assert code == 1 and login["status"] == "fail"
    assert IAM_DB_USER in login["fix"]


def test_an_unknown_iam_user_gets_the_create_user_hint(emulator):
    code, report, _ = doctor(
        emulator, URI, "--token", TOKEN_IAM, "--auto-iam-authn", "--db-user", "ghost@project-id.iam",
        "--db-name", DB_NAME,
    )  # fmt: skip
    login = by_check(report)["login"]
    assert code == 1 and login["status"] == "fail", report
    assert "gcloud alloydb users create" in login["fix"]


def test_no_credentials_fail_first_and_skip_the_rest(emulator, tmp_path):
    code, report, _ = doctor(
        emulator, URI, env={"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "g"),
                            "GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "true"},
    )  # fmt: skip
    assert code == 1
    assert report["checks"][0]["check"] == "credentials"
    assert report["checks"][0]["status"] == "fail"
    assert all(c["status"] == "skip" for c in report["checks"][1:])
