"""Shared fixtures: a real PostgreSQL (one per session) and the AlloyDB emulator in front of it."""

from __future__ import annotations

import pytest

from proxy.emulator import Emulator, PostgresCluster, Principal

PROJECT = "project-id"
URI = f"projects/{PROJECT}/locations/us-central1/clusters/clust/instances/inst"

TOKEN_APP = "tok-app"
TOKEN_IAM = "tok-iam"
TOKEN_DENIED = "tok-denied"
SA_EMAIL = f"sa-name@{PROJECT}.iam.gserviceaccount.com"
IAM_DB_USER = f"sa-name@{PROJECT}.iam"
DB_USER, DB_PASSWORD, DB_NAME = "app", "app-secret", "appdb"


@pytest.fixture(scope="session")
def pg():
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
def emulator(pg):
    emu = Emulator(
        postgres_host=pg.host,
        postgres_port=pg.port,
        tokens={
            TOKEN_APP: Principal(f"app-sa@{PROJECT}.iam.gserviceaccount.com"),
            TOKEN_IAM: Principal(SA_EMAIL),
            TOKEN_DENIED: Principal(f"denied@{PROJECT}.iam.gserviceaccount.com", can_connect=False),
        },
        admin_port=0,
    )
    emu.add_instance(URI, public_ip=True, psc=True)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()
