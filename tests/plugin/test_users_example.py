"""What a user's own test looks like with ``-p proxy.testing`` (copy it as it is)."""

import psycopg

pytest_plugins = ["proxy.testing"]


def test_my_query_runs_against_alloydb(alloydb_proxy, alloydb_emulator):
    db = alloydb_emulator
    with psycopg.connect(
        alloydb_proxy.dsn(user=db.user, password=db.password, dbname=db.dbname)
    ) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] >= 1
    alloydb_proxy.connection_test()  # the Admin API, TLS and the metadata exchange, once more
