"""A local AlloyDB emulator in front of a real PostgreSQL, for tests and CI.

    from proxy.emulator import Emulator, PostgresCluster, Principal

    pg = PostgresCluster().start()
    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port,
                   tokens={"tok": Principal("app-sa@proj.iam.gserviceaccount.com")})
    inst = emu.add_instance("projects/p/locations/r/clusters/c/instances/i", public_ip=True, psc=True)
    emu.start()        # own thread; emu.admin_url is the --alloydbadmin-api-endpoint
    ...
    emu.stop(); pg.stop()

Fault switches: ``emu.faults`` / ``inst.faults`` (see faults.py). Logs:
``emu.admin_requests``, ``emu.mdx_requests``, ``emu.connections`` (instance, local IP reached).
The ``alloydb-emulator`` command runs the same from a shell.
"""

from proxy.emulator.adminapi import AdminRequest
from proxy.emulator.emulator import Emulator
from proxy.emulator.faults import Faults
from proxy.emulator.instance import Instance, db_user_for
from proxy.emulator.pgcluster import PostgresCluster
from proxy.emulator.principals import Principal

__all__ = [
    "AdminRequest",
    "Emulator",
    "Faults",
    "Instance",
    "PostgresCluster",
    "Principal",
    "db_user_for",
]
