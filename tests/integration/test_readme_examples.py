"""The README's "Use it from Python" examples, run as written against the emulator.

Only the placeholders change (instance URI, key file, users, token, password,
database); each must still be in the README, so an edit that changes the
examples' shape makes this test fail rather than pass on nothing. The one
thing added is the Admin API endpoint, set as a default of ``proxy.Proxy``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import proxy
from proxy.emulator import Emulator

from ..conftest import DB_NAME, DB_PASSWORD, DB_USER, URI
from .fakes import TokensByPrefix, service_account_info

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY_DB_USER = "key-sa@project-id.iam"  # the fakes' service-account key signs in as key-sa@


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3, "the section should hold the sync, async and pytest examples"
    return blocks


def substitute(code: str, replacements: dict[str, str]) -> str:
    for placeholder, value in replacements.items():
        assert placeholder in code, f"README example lost its placeholder {placeholder!r}"
        code = code.replace(placeholder, value)
    return code


@pytest.fixture
def readme_emulator(pg, fakes):
    pg.create_iam_user(KEY_DB_USER)
    emu = Emulator(postgres_host=pg.host, postgres_port=pg.port, tokens=TokensByPrefix(fakes))
    emu.add_instance(URI)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def admin_endpoint_default(readme_emulator, monkeypatch):
    original = proxy.Proxy.__init__

    def init(self, *uris, **options):
        options.setdefault("alloydbadmin_api_endpoint", readme_emulator.admin_url)
        original(self, *uris, **options)

    monkeypatch.setattr(proxy.Proxy, "__init__", init)
    return readme_emulator


def run_example(code: str) -> None:
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_sync_example_with_a_key_file_and_iam_login(
    admin_endpoint_default, fakes, tmp_path, capsys
):
    key = tmp_path / "sa.json"
    key.write_text(json.dumps(service_account_info(f"{fakes.url}/token")))
    sync, _, _ = python_blocks()
    code = substitute(
        sync,
        {
            "projects/P/locations/R/clusters/C/instances/I": URI,
            '"sa.json"': repr(str(key)),
            "sa-name@P.iam": KEY_DB_USER,
        },
    )
    run_example(code)
    assert capsys.readouterr().out.splitlines() == [f"('{KEY_DB_USER}',)", "1"]
    mdx = admin_endpoint_default.mdx_requests
    assert mdx and all(request.auth_type == 2 for _, request in mdx)  # AUTO_IAM


def test_async_example_with_a_token(admin_endpoint_default, capsys):
    _, asynchronous, _ = python_blocks()
    code = substitute(
        asynchronous,
        {
            "projects/P/locations/R/clusters/C/instances/I": URI,
            'token="..."': 'token="static-readme"',
            'password="..."': f"password={DB_PASSWORD!r}",
            'dbname="app"': f"dbname={DB_NAME!r}",
            'user="app"': f"user={DB_USER!r}",
        },
    )
    run_example(code)
    assert capsys.readouterr().out.splitlines() == [DB_USER]


def test_pytest_plugin_example_passes_as_a_users_test_file(tmp_path):
    _, _, example = python_blocks()
    (tmp_path / "test_readme_plugin.py").write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
