"""Every credential source through the real CLI, against loopback fakes of the identity services."""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest

from proxy.credentials import parse_impersonation_chain
from proxy.emulator import Principal
from proxy.mdx import AUTO_IAM

from .. import leakcheck
from .conftest import DB_NAME, IAM_DB_USER, SA_EMAIL, URI, psql
from .fakes import ConnectProxy, aws_external_account_info, service_account_info
from .proxyproc import ProxyProcess, free_port_block

GCLOUD_TOKEN = leakcheck.secret("gcloud-user-token", "the token gcloud hands out")


@pytest.fixture
def home(tmp_path):
    """A HOME and gcloud config dir with nothing in them, unless a test puts it there."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def run_proxy(cred_emulator, home):
    started = []

    def start(*args, env=None, ready=True, instance=URI, **kwargs):
        full_env = {"HOME": str(home), "CLOUDSDK_CONFIG": str(home / "gcloud")}
        full_env.update(env or {})
        port = free_port_block(2)
        proc = ProxyProcess(
            [
                instance,
                *args,
                "--port",
                str(port),
                "--alloydbadmin-api-endpoint",
                cred_emulator.admin_url,
            ],
            env=full_env,
            **kwargs,
        )
        proc.port = port
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop()


def tokens_seen(emulator):
    api = [r.token for r in emulator.admin_requests]
    mdx = [r.oauth2_token for _, r in emulator.mdx_requests]
    return api, mdx


def assert_iam_login(proxy) -> None:
    """psql through the proxy as the IAM user, with no password, lands as that user."""
    result = psql(
        "SELECT current_user",
        host="127.0.0.1",
        port=proxy.port,
        user=IAM_DB_USER,
        password=None,
        dbname=DB_NAME,
    )
    assert result.stdout.strip() == IAM_DB_USER


def auth_types(emulator) -> list[int]:
    return [r.auth_type for _, r in emulator.mdx_requests]


def assert_no_secret_logged(proxy, fakes):
    for token in fakes.issued:
        assert token not in proxy.output


def test_credentials_file_relative_path(run_proxy, cred_emulator, fakes, tmp_path):
    (tmp_path / "key.json").write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy("--credentials-file", "key.json", "--debug-logs", cwd=str(tmp_path))
    assert 'Authorizing with the credentials file at "key.json"' in proxy.output
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    api, mdx = tokens_seen(cred_emulator)
    assert api and all(t.startswith("sa|cloud-platform|") for t in api)
    assert mdx == [t for t in mdx if t.startswith("sa|alloydb.login|")] and mdx
    assert_no_secret_logged(proxy, fakes)


def test_json_credentials(run_proxy, cred_emulator, fakes):
    info = json.dumps(service_account_info(f"{fakes.url}/token"))
    proxy = run_proxy("--json-credentials", info)
    assert "Authorizing with JSON credentials environment variable" in proxy.output
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    assert tokens_seen(cred_emulator)[1][0].startswith("sa|alloydb.login|")


def test_google_application_credentials(run_proxy, cred_emulator, fakes, tmp_path):
    key = tmp_path / "adc.json"
    key.write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy(env={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    assert "Authorizing with Application Default Credentials" in proxy.output
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    assert tokens_seen(cred_emulator)[0][0].startswith("sa|cloud-platform|")


def test_gcloud_application_default_credentials_file(run_proxy, cred_emulator, fakes, home):
    (home / "gcloud").mkdir()
    (home / "gcloud" / "application_default_credentials.json").write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "id",
                "client_secret": "secret",
                "refresh_token": leakcheck.secret("refresh-secret", "a user refresh token"),
                "token_uri": f"{fakes.url}/token",
            }
        )
    )
    proxy = run_proxy()
    assert "Authorizing with Application Default Credentials" in proxy.output
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    api, mdx = tokens_seen(cred_emulator)
    assert api[0].startswith("user|cloud-platform|") and mdx[0].startswith("user|alloydb.login|")
    assert "refresh-secret" not in proxy.output


def test_compute_engine_metadata_server(run_proxy, cred_emulator, fakes):
    host = f"127.0.0.1:{fakes.port}"
    proxy = run_proxy(
        env={"NO_GCE_CHECK": "false", "GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}
    )
    assert "Authorizing with Application Default Credentials" in proxy.output
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port).stdout.strip() == "1"
    api, mdx = tokens_seen(cred_emulator)
    assert api[0].startswith("gce|cloud-platform|") and mdx[0].startswith("gce|alloydb.login|")


def fake_gcloud(directory, body: str):
    script = directory / "gcloud"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_gcloud_auth_runs_config_helper(run_proxy, cred_emulator, tmp_path):
    args = tmp_path / "args"
    env = fake_gcloud(
        tmp_path,
        f'''echo "$@" > "{args}"
cat <<EOF
{{"credential": {{"access_token": "{GCLOUD_TOKEN}", "token_expiry": "2099-01-01T00:00:00Z"}}}}
EOF
''',
    )
    proxy = run_proxy("--gcloud-auth", "--auto-iam-authn", env=env)
    assert "Authorizing with gcloud user credentials" in proxy.output
    assert (
        "Note: reusing the configured API credential for IAM database authentication login"
        in proxy.output
    )
    assert args.read_text().split() == [
        "--format",
        "json",
        "config",
        "config-helper",
        "--min-expiry",
        "1h",
    ]
    assert (
        psql(
            "SELECT current_user",
            host="127.0.0.1",
            port=proxy.port,
            user="person@example.com",
            password=None,
            check=False,
        ).returncode
        != 0
    )  # no such database user; the tunnel worked:
    assert tokens_seen(cred_emulator)[1] == ["gcloud-user-token"]
    assert "gcloud-user-token" not in proxy.output


def test_gcloud_failure_is_a_startup_error(run_proxy, tmp_path):
    env = fake_gcloud(
        tmp_path, 'echo "ERROR: (gcloud) You do not currently have an active account" >&2\nexit 1\n'
    )
    proxy = run_proxy("--gcloud-auth", env=env, ready=False)
    assert proxy.wait_exit() == 1
    assert "error reading config: exit status 1; stderr was:" in proxy.output
    assert "You do not currently have an active account" in proxy.output


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs a private mount namespace (root) for /etc/hosts"
)
def test_ec2_workload_identity_federation_to_iam_login_over_psc(
    run_proxy, cred_emulator, fakes, tmp_path
):
    """The seed scenario: EC2 role → STS → impersonated service account → AUTO_IAM over PSC."""
    (tmp_path / "wif.json").write_text(json.dumps(aws_external_account_info(fakes.url, SA_EMAIL)))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "\n".join(cred_emulator.hosts_entries()) + "\n")
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"',
    ]
    proxy = run_proxy(
        "--credentials-file", str(tmp_path / "wif.json"), "--auto-iam-authn", "--psc", prefix=prefix
    )
    assert_iam_login(proxy)
    api, mdx = tokens_seen(cred_emulator)
    # The Admin API saw the impersonated cloud-platform token; the exchange the login-scoped one.
    assert api and all(t.startswith("imp|cloud-platform|") for t in api)
    assert mdx[0].startswith("imp|alloydb.login|")
    assert auth_types(cred_emulator) == [AUTO_IAM]
    paths = fakes.paths()
    assert "/latest/api/token" in paths and "/v1/token" in paths
    assert any(p.endswith(f"{SA_EMAIL}:generateAccessToken") for p in paths)
    assert cred_emulator.connections[-1][1] == cred_emulator.instances[URI].psc_ip
    assert_no_secret_logged(proxy, fakes)


def test_imdsv2_missing_from_config_gets_a_hint(run_proxy, fakes, tmp_path):
    (tmp_path / "wif.json").write_text(
        json.dumps(aws_external_account_info(fakes.url, SA_EMAIL, imdsv2=False))
    )
    proxy = run_proxy("--credentials-file", str(tmp_path / "wif.json"))
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port, check=False).returncode != 0
    line = proxy.wait_for("failed to connect to instance", stream="stderr")
    assert f"{fakes.url}/latest/meta-data/placement/availability-zone" in line
    assert "imdsv2_session_token_url" in line


def test_sts_failure_names_the_url(run_proxy, fakes, tmp_path):
    fakes.sts_error = "The audience does not match"
    (tmp_path / "wif.json").write_text(json.dumps(aws_external_account_info(fakes.url, SA_EMAIL)))
    proxy = run_proxy("--credentials-file", str(tmp_path / "wif.json"))
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port, check=False).returncode != 0
    line = proxy.wait_for("failed to connect to instance", stream="stderr")
    assert f"{fakes.url}/v1/token" in line and "invalid_grant" in line


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "open {path}: no such file or directory"),
        ("{not json", "{path}: invalid JSON"),
        ('{"type": "alien"}', "{path}: unsupported credentials type 'alien'"),
    ],
)
def test_bad_credentials_file(run_proxy, tmp_path, content, reason):
    path = tmp_path / "creds.json"
    if content is not None:
        path.write_text(content)
    proxy = run_proxy("--credentials-file", str(path), ready=False)
    assert proxy.wait_exit() == 1
    assert (
        "The proxy has encountered a terminal error: unable to start: error initializing dialer: "
        f"config error: {reason.format(path=path)}"
    ) in proxy.output


def test_permission_denied_names_the_roles(run_proxy, cred_emulator):
    cred_emulator.tokens = {"denied-token": Principal("nobody@example.com", can_connect=False)}
    proxy = run_proxy("--token", "denied-token")
    assert psql("SELECT 1", host="127.0.0.1", port=proxy.port, check=False).returncode != 0
    line = proxy.wait_for("failed to connect to instance", stream="stderr")
    assert "Error 403" in line
    assert "roles/alloydb.client" in line and "roles/serviceusage.serviceUsageConsumer" in line


def test_service_account_user_with_full_email_gets_a_hint(run_proxy):
    proxy = run_proxy("--token", "static-token", "--auto-iam-authn")
    user = "sa-name@project-id.iam.gserviceaccount.com"
    assert (
        psql(
            "SELECT 1", host="127.0.0.1", port=proxy.port, user=user, password=None, check=False
        ).returncode
        != 0
    )
    proxy.wait_for(
        rf'IAM database user "{re.escape(user)}" ends in \.gserviceaccount\.com: .*'
        r'log in as "sa-name@project-id\.iam"',
        stream="stderr",
    )


def test_login_token_is_used_for_iam_logins(run_proxy, cred_emulator):
    proxy = run_proxy("--token", "static-api", "--login-token", "static-login", "--auto-iam-authn")
    assert "Authenticating IAM database logins with the login token" in proxy.output
    psql(
        "SELECT 1",
        host="127.0.0.1",
        port=proxy.port,
        user="person@example.com",
        password=None,
        check=False,
    )
    api, mdx = tokens_seen(cred_emulator)
    assert api == ["static-api", "static-api"] and mdx == ["static-login"]


def test_tokens_are_refreshed_before_they_expire(run_proxy, cred_emulator, fakes, tmp_path):
    # 6 s tokens, 6 logins 1.5 s apart: each token is renewed once half its life is
    # gone, in the background, and none is sent in its last quarter of the margin.
    fakes.expires_in = 6
    (tmp_path / "key.json").write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy("--credentials-file", str(tmp_path / "key.json"))
    started = connect_repeatedly(proxy, 6, 1.5)
    mdx = tokens_seen(cred_emulator)[1]
    assert len(mdx) == 6 and len(set(mdx)) >= 2
    for token, when in zip(mdx, started, strict=True):
        assert fakes.expires[token] > when + 0.5, "an expiring token was sent"
    logins = [t for t in fakes.issued if t.startswith("sa|alloydb.login|")]
    assert len(logins) <= 5  # renewed ahead of expiry, not fetched for every login


def test_long_lived_tokens_are_fetched_once_per_scope(run_proxy, cred_emulator, fakes, tmp_path):
    (tmp_path / "key.json").write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    proxy = run_proxy("--credentials-file", str(tmp_path / "key.json"))
    for n in range(3):
        assert psql(f"SELECT {n}", host="127.0.0.1", port=proxy.port).stdout.strip() == str(n)
    assert sorted(t.rsplit("|", 1)[0] for t in fakes.issued) == [
        "sa|alloydb.login",
        "sa|cloud-platform",
    ]
    assert len(set(tokens_seen(cred_emulator)[1])) == 1  # one login token, three logins


def test_impersonation_chain_order():
    # The first account is the target; the delegates follow in reverse, as in the Go proxy.
    target, delegates = parse_impersonation_chain("sa1@p.iam.gserviceaccount.com, sa2@p, sa3@p")
    assert target == "sa1@p.iam.gserviceaccount.com"
    assert delegates == ["projects/-/serviceAccounts/sa3@p", "projects/-/serviceAccounts/sa2@p"]


@pytest.fixture
def iam_credentials(fakes, tmp_path):
    """The IAM Credentials host is fixed in google-auth, so a loopback HTTPS proxy
    stands in for it (nothing leaves this machine); yields the proxy's environment."""
    from proxy.emulator.pki import ClusterCA, key_pem, pem

    ca = ClusterCA("projects/test/locations/x/clusters/iam-fake")
    cert, key = ca.server_certificate([], ["iamcredentials.googleapis.com"], "iam")
    files = {name: tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem")}
    files["ca.pem"].write_text(ca.root_pem)
    files["cert.pem"].write_text(pem(cert))
    files["key.pem"].write_bytes(key_pem(key))
    https_proxy = ConnectProxy(fakes, "iamcredentials.googleapis.com", *map(str, files.values()))
    yield {
        "HTTPS_PROXY": https_proxy.url,
        "NO_PROXY": "127.0.0.1,localhost",
        "REQUESTS_CA_BUNDLE": str(files["ca.pem"]),
    }
    https_proxy.close()
    assert https_proxy.refused == []


def test_impersonation_flag_with_delegates(run_proxy, cred_emulator, fakes, iam_credentials):
    delegate = "delegate@project-id.iam.gserviceaccount.com"
    proxy = run_proxy(
        "--token",
        "base-token",
        "--impersonate-service-account",
        f"{SA_EMAIL},{delegate}",
        "--auto-iam-authn",
        env=iam_credentials,
    )
    assert "Impersonating service account with OAuth2 token" in proxy.output
    assert (
        "Note: reusing the configured API credential for IAM database authentication login"
        in proxy.output
    )
    assert_iam_login(proxy)
    api, mdx = tokens_seen(cred_emulator)
    assert api[0].startswith("imp|cloud-platform|") and mdx == [api[0]]
    assert auth_types(cred_emulator) == [AUTO_IAM]
    calls = [
        (path, body) for method, path, _, body in fakes.log if path.endswith(":generateAccessToken")
    ]
    assert calls[0][0] == f"/v1/projects/-/serviceAccounts/{SA_EMAIL}:generateAccessToken"
    assert json.loads(calls[0][1])["delegates"] == [f"projects/-/serviceAccounts/{delegate}"]
    assert_no_secret_logged(proxy, fakes)


def short_lived_gcloud(directory, prefix: str, lifetime: int) -> dict[str, str]:
    """A fake gcloud whose N-th run prints token ``<prefix>N-<expiry epoch>``, valid ``lifetime`` s."""
    counter = directory / "gcloud-runs"
    return fake_gcloud(
        directory,
        f"""n=$(( $(cat "{counter}" 2>/dev/null || echo 0) + 1 )); echo $n > "{counter}"
expiry=$(( $(date +%s) + {lifetime} ))
cat <<EOF
{{"credential": {{"access_token": "{prefix}$n-$expiry",
  "token_expiry": "$(date -u -d @$expiry +%Y-%m-%dT%H:%M:%SZ)"}}}}
EOF
""",
    )


def connect_repeatedly(proxy, count: int, pause: float, **login) -> list[float]:
    """``count`` logins through the proxy, ``pause`` s apart; when each one started."""
    started = []
    for n in range(count):
        started.append(time.time())
        result = psql(f"SELECT {n}", host="127.0.0.1", port=proxy.port, **login)
        assert result.stdout.strip() == str(n)
        time.sleep(pause)
    return started


def test_gcloud_tokens_are_renewed_across_expiries(run_proxy, cred_emulator, tmp_path):
    # 10 s tokens, 6 logins 2.5 s apart: the login token runs out about twice.
    env = short_lived_gcloud(tmp_path, "gcloud-", lifetime=10)
    proxy = run_proxy("--gcloud-auth", env=env)
    started = connect_repeatedly(proxy, 6, 2.5)
    mdx = tokens_seen(cred_emulator)[1]
    assert len(mdx) == 6 and len(set(mdx)) >= 2
    for token, when in zip(mdx, started, strict=True):
        assert int(token.rsplit("-", 1)[1]) > when + 0.5, "an expiring token was sent"
    runs = int((tmp_path / "gcloud-runs").read_text())
    # Renewed ahead of expiry, not run again for every token use (6 logins, 2+ API calls).
    assert 2 <= runs <= 5


def test_gcloud_with_impersonation_survives_the_gcloud_token_expiring(
    run_proxy, cred_emulator, fakes, tmp_path, iam_credentials
):
    """The impersonated token is renewed with a fresh gcloud token each time."""
    fakes.expires_in = 10
    env = short_lived_gcloud(tmp_path, "base-gcloud-", lifetime=10)
    proxy = run_proxy(
        "--gcloud-auth",
        "--impersonate-service-account",
        SA_EMAIL,
        "--auto-iam-authn",
        env={**env, **iam_credentials},
    )
    assert "Impersonating service account with gcloud user credentials" in proxy.output
    connect_repeatedly(proxy, 6, 2.5, user=IAM_DB_USER, password=None)
    sources = [
        headers.get("Authorization")
        for _, path, headers, _ in fakes.log
        if path.endswith(":generateAccessToken")
    ]
    assert len(sources) >= 2 and len(set(sources)) == len(sources)  # a new gcloud token each
    assert not any("failed" in line for line in proxy.stderr)
    assert_no_secret_logged(proxy, fakes)
