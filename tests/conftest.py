"""Shared fixtures: a real PostgreSQL (one per session) and the AlloyDB emulator in front of it."""

from __future__ import annotations

import pytest

from proxy.emulator import Emulator, PostgresCluster, Principal

from . import leakcheck

PROJECT = "project-id"
URI = f"projects/{PROJECT}/locations/us-central1/clusters/clust/instances/inst"

TOKEN_APP = "tok-app"
TOKEN_IAM = "tok-iam"
TOKEN_DENIED = "tok-denied"
SA_EMAIL = f"sa-name@{PROJECT}.iam.gserviceaccount.com"
IAM_DB_USER = f"sa-name@{PROJECT}.iam"
DB_USER, DB_PASSWORD, DB_NAME = "app", "app-secret", "appdb"

TOKENS = {
    TOKEN_APP: Principal(f"app-sa@{PROJECT}.iam.gserviceaccount.com"),
    TOKEN_IAM: Principal(SA_EMAIL),
    TOKEN_DENIED: Principal(f"denied@{PROJECT}.iam.gserviceaccount.com", can_connect=False),
}


for _token in TOKENS:
    leakcheck.secret(_token, f"the OAuth2 token {_token[:3]}…")
leakcheck.secret(DB_PASSWORD, "the database password")
leakcheck.watch_in_process_logs()
leakcheck.watch_subprocesses()


_worker_findings: list[str] = []
_worker_summaries: list[str] = []


def pytest_testnodedown(node, error) -> None:
    """xdist controller: collect each worker's scan (a worker's own report is not shown)."""
    out = getattr(node, "workeroutput", None) or {}
    _worker_findings.extend(out.get("leakcheck_findings", []))
    if "leakcheck_summary" in out:
        _worker_summaries.append(f"{node.gateway.id}: {out['leakcheck_summary']}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite-wide secret scan (tests/leakcheck.py): a secret in any output fails the run."""
    found = leakcheck.findings()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the scan to the controller
        workeroutput["leakcheck_findings"] = found
        workeroutput["leakcheck_summary"] = leakcheck.summary()
        return
    found += _worker_findings
    summary = "; ".join([leakcheck.summary(), *_worker_summaries])
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if found:
        lines = ["secrets found in the proxy's output (tests/leakcheck.py):", *found[:50]]
        if session.exitstatus == pytest.ExitCode.OK:  # an interruption or usage error stays one
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        lines = [f"secret scan: {summary}, nothing found"]
    if reporter is not None:
        reporter.write_sep("=", "secret scan", red=bool(found))
        reporter.write_line("\n".join(lines))
    else:
        print("\n".join(lines))


@pytest.fixture(scope="session")
def pg():
    """One real PostgreSQL for the session, with a native and an IAM user; always stopped."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        cluster.create_user(DB_USER, DB_PASSWORD)
        cluster.create_database(DB_NAME, DB_USER)
        cluster.create_iam_user(IAM_DB_USER)
        cluster.psql(f'GRANT ALL ON DATABASE {DB_NAME} TO "{IAM_DB_USER}"')
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_emulator(pg):
    """Factory: ``make_emulator(tokens=..., instances={URI: {"psc": True}})`` -> started
    Emulator in front of the session PostgreSQL; every one is stopped at teardown."""
    started: list[Emulator] = []

    def make(*, tokens=TOKENS, instances=None, **kwargs) -> Emulator:
        tokens = dict(tokens) if tokens is not None else None  # tests may edit theirs
        emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=tokens, **kwargs)
        started.append(emu)
        for uri, options in (instances or {URI: {"public_ip": True, "psc": True}}).items():
            emu.add_instance(uri, **options)
        return emu.start()

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator(make_emulator):
    """The default emulator: URI with private and public IPs and PSC, the TOKENS principals."""
    return make_emulator()
