"""``alloydb-auth-proxy doctor`` against the emulator: one test per trap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .. import leakcheck
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
    """Run doctor; for JSON, run it in text too and hold the two to the same verdict,
    failing checks and fixes."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "PG"))}
    full_env.update(env or {})

    def run(output: str):
        return subprocess.run(
            [sys.executable, "-m", "proxy", "doctor", *args, "--format", output,
             "--alloydbadmin-api-endpoint", emulator.admin_url],
            capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT,
        )  # fmt: skip

    proc = run(fmt)
    if fmt != "json":
        return proc.returncode, proc.stdout, proc
    report = json.loads(proc.stdout)
    text = run("text")
    assert text.returncode == proc.returncode
    for check in report["checks"]:
        if check["status"] == "fail":
            assert f"FAIL  {check['check']}" in text.stdout
            assert f"fix: {check['fix']}" in text.stdout or not check["fix"]
    return proc.returncode, report, proc


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
    assert "gcloud alloydb users create" in login["fix"], login


def test_no_credentials_fail_first_and_skip_the_rest(emulator, tmp_path):
    code, report, _ = doctor(
        emulator, URI, env={"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "g"),
                            "GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "true"},
    )  # fmt: skip
    assert code == 1
    assert report["checks"][0]["check"] == "credentials"
    assert report["checks"][0]["status"] == "fail"
    assert all(c["status"] == "skip" for c in report["checks"][1:])


def test_permission_denied_names_the_two_roles_and_the_project(emulator):
    emulator.faults.set(admin_status=403)
    code, report, proc = doctor(emulator, URI, "--token", TOKEN_APP)
    admin = by_check(report)["admin_api"]
    assert code == 1 and admin["status"] == "fail" and "403" in admin["detail"]
    assert "roles/alloydb.client" in admin["fix"]
    assert "roles/serviceusage.serviceUsageConsumer" in admin["fix"]
    assert "'project-id'" in admin["fix"]
    code, text, _ = doctor(emulator, URI, "--token", TOKEN_APP, fmt="text")
    assert code == 1 and "roles/alloydb.client" in text


def test_a_server_certificate_for_another_address_fails_tls(emulator):
    emulator.faults.set(wrong_san=True)
    code, report, _ = doctor(emulator, URI, "--token", TOKEN_APP)
    tls = by_check(report)["tls"]
    assert code == 1 and tls["status"] == "fail"
    assert "certificate verify failed" in tls["detail"]
    assert by_check(report)["metadata_exchange"]["status"] == "skip"


def test_the_servers_metadata_exchange_error_is_shown(emulator):
    emulator.faults.set(mdx_error="IAM principal lacks alloydb.instances.connect")
    code, report, _ = doctor(emulator, URI, "--token", TOKEN_IAM, "--auto-iam-authn")
    mdx = by_check(report)["metadata_exchange"]
    assert code == 1 and mdx["status"] == "fail"
    assert "IAM principal lacks alloydb.instances.connect" in mdx["detail"]
    assert "alloydb.login" in mdx["fix"]


# ---------------------------------------------------------------- credentials


def test_imds_without_a_session_token_gets_the_imdsv2_fix(cred_emulator, fakes, tmp_path):
    from .fakes import aws_external_account_info

    (tmp_path / "wif.json").write_text(
        json.dumps(aws_external_account_info(fakes.url, SA_EMAIL, imdsv2=False))
    )
    code, report, proc = doctor(
        cred_emulator, URI, "--credentials-file", str(tmp_path / "wif.json")
    )
    creds = report["checks"][0]
    assert code == 1 and creds["check"] == "credentials" and creds["status"] == "fail"
    assert "imdsv2" in (creds["detail"] + creds["fix"]).lower()


def test_an_sts_refusal_names_the_exchange(cred_emulator, fakes, tmp_path):
    from .fakes import aws_external_account_info

    fakes.sts_error = "The audience does not match"
    (tmp_path / "wif.json").write_text(json.dumps(aws_external_account_info(fakes.url, SA_EMAIL)))
    code, report, _ = doctor(cred_emulator, URI, "--credentials-file", str(tmp_path / "wif.json"))
    creds = report["checks"][0]
    assert code == 1 and creds["status"] == "fail"
    assert f"{fakes.url}/v1/token" in creds["detail"]
    assert "workload identity pool provider" in creds["fix"]


def test_the_seed_ec2_scenario_passes_all_seven_checks(cred_emulator, fakes, tmp_path):
    """EC2 role -> IMDSv2 -> STS -> impersonated service account -> PSC -> AUTO_IAM login."""
    from .fakes import aws_external_account_info

    (tmp_path / "wif.json").write_text(json.dumps(aws_external_account_info(fakes.url, SA_EMAIL)))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "\n".join(cred_emulator.hosts_entries()) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "PG"))}
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"',
         sys.executable, "-m", "proxy", "doctor", URI, "--credentials-file",
         str(tmp_path / "wif.json"), "--auto-iam-authn", "--psc", "--db-user", IAM_DB_USER,
         "--db-name", DB_NAME, "--format", "json",
         "--alloydbadmin-api-endpoint", cred_emulator.admin_url],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["status"] for c in report["checks"]] == ["pass"] * 7
    checks = by_check(report)
    assert f"principal {SA_EMAIL}" in checks["credentials"]["detail"]
    assert "PSC" in checks["address"]["detail"] and "DNS SAN" in checks["tls"]["detail"]
    for token in fakes.issued:
        assert token not in proc.stdout + proc.stderr


def test_an_unreachable_admin_api_names_the_endpoint_and_proxy_settings(emulator):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "PG"))}
    password = leakcheck.secret("s3cret-pw", "a proxy password")
    full_env["HTTPS_PROXY"] = f"http://alice:{password}@proxy.example:3128"
    full_env["NO_PROXY"] = "127.0.0.1"
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", URI, "--token", TOKEN_APP, "--format", "json",
         "--alloydbadmin-api-endpoint", "http://127.0.0.1:9/"],
        capture_output=True, text=True, timeout=180, env=full_env, cwd=ROOT,
    )  # fmt: skip
    admin = by_check(json.loads(proc.stdout))["admin_api"]
    assert proc.returncode == 1 and admin["status"] == "fail"
    assert "http://127.0.0.1:9" in admin["fix"]
    assert "HTTPS_PROXY=http://proxy.example:3128" in admin["fix"]
    assert "s3cret-pw" not in proc.stdout + proc.stderr  # a proxy password is never printed


def test_text_format_prints_no_secret(emulator):
    code, text, proc = doctor(
        emulator, URI, "--token", TOKEN_APP, "--db-user", DB_USER, "--db-name", DB_NAME,
        fmt="text", env={"PGPASSWORD": DB_PASSWORD},
    )  # fmt: skip
    assert code == 0 and "ok    login" in text
    assert TOKEN_APP not in text + proc.stderr and DB_PASSWORD not in text + proc.stderr
    assert "\033[" not in text  # no colour when not on a terminal


def test_a_refused_token_gets_the_401_fix(emulator):
    code, report, proc = doctor(emulator, URI, "--token", "expired-or-bogus")
    admin = by_check(report)["admin_api"]
    assert code == 1 and admin["status"] == "fail" and "401" in admin["detail"], report
    assert "invalid or expired" in admin["fix"]
    assert "expired-or-bogus" not in proc.stdout + proc.stderr


def test_a_server_closing_during_the_exchange_is_not_blamed_on_the_san(emulator):
    emulator.faults.set(close_during_mdx=True)
    code, report, _ = doctor(emulator, URI, "--token", TOKEN_APP)
    mdx = by_check(report)["metadata_exchange"]
    assert code == 1 and mdx["status"] == "fail"
    assert "refused client certificate" in mdx["fix"] and "SAN" not in mdx["fix"]


def test_an_ignored_environment_value_is_reported(emulator):
    code, report, proc = doctor(emulator, URI, "--token", TOKEN_APP,
                                env={"ALLOYDB_PROXY_PSC": "yess"})  # fmt: skip
    assert code == 0 and "ALLOYDB_PROXY_PSC" in proc.stderr


def test_an_unknown_flag_is_a_bad_command(emulator):
    code, _, proc = doctor(emulator, URI, "--token", TOKEN_APP, "--no-such-flag", fmt="text")
    assert code == 1 and "unknown flag: --no-such-flag" in proc.stderr


def test_scram_refuses_a_server_that_cannot_prove_the_password():
    from proxy.doctor import _Failed, _Scram

    scram = _Scram("pw")
    nonce = scram.nonce + "server"
    scram.final(f"r={nonce},s=c2FsdA==,i=4096".encode())
    with pytest.raises(_Failed, match="signature is wrong"):
        scram.verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    assert not scram.verified
    scram.verify(f"v={scram.expected}".encode())
    assert scram.verified


def test_ctrl_c_exits_130_like_the_command(emulator):
    import signal
    import time

    emulator.faults.set(admin_latency=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOYDB_PROXY_", "PG"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "doctor", URI, "--token", TOKEN_APP,
         "--alloydbadmin-api-endpoint", emulator.admin_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
