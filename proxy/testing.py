"""A pytest plugin for programs that use AlloyDB: enable it with ``-p proxy.testing``.

Fixtures (off unless the plugin is enabled):

* ``alloydb_emulator``: a running emulator in front of a temporary PostgreSQL
  (session-wide), with one instance. Its ``uri``, ``admin_url``, ``token`` and
  the database's ``user``, ``password`` and ``dbname`` are attributes of the
  fixture's value.
* ``alloydb_proxy``: a ``proxy.Proxy`` started against it for the test.

Needs the PostgreSQL server binaries (``initdb``, ``pg_ctl``) on the machine;
as root, PostgreSQL runs as the ``postgres`` user.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

URI = "projects/test-project/locations/us-central1/clusters/test/instances/primary"
TOKEN = "test-token"
USER, PASSWORD, DBNAME = "app", "app-password", "app"


@dataclass
class EmulatedAlloyDB:
    uri: str
    admin_url: str
    token: str
    user: str
    password: str
    dbname: str
    emulator: Any  # proxy.emulator.Emulator: fault switches, request logs


@pytest.fixture(scope="session")
def alloydb_emulator() -> Iterator[EmulatedAlloyDB]:
    from proxy.emulator import Emulator, PostgresCluster, Principal

    cluster = PostgresCluster()
    cluster.start()
    try:
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DBNAME, USER)
        principal = Principal("test-sa@test-project.iam.gserviceaccount.com")
        emulator = Emulator(
            postgres_host=cluster.host, postgres_port=cluster.port, tokens={TOKEN: principal}
        )
        emulator.add_instance(URI)
        emulator.start()
        try:
            yield EmulatedAlloyDB(URI, emulator.admin_url, TOKEN, USER, PASSWORD, DBNAME, emulator)
        finally:
            emulator.stop()
    finally:
        cluster.stop()


@pytest.fixture
def alloydb_proxy(alloydb_emulator: EmulatedAlloyDB) -> Iterator[Any]:
    from proxy.inprocess import Proxy

    with Proxy(
        alloydb_emulator.uri,
        token=alloydb_emulator.token,
        alloydbadmin_api_endpoint=alloydb_emulator.admin_url,
    ) as started:
        yield started
