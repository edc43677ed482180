"""What a reload may change (proxy/reload.py), without a running proxy."""

from __future__ import annotations

import pytest

from proxy.config import Config, parse_instance_arg
from proxy.reload import ReloadRefused, changed_options, next_config

A = "projects/p/locations/r/clusters/c/instances/a"
B = "projects/p/locations/r/clusters/c/instances/b"


def config(*args: str, **options) -> Config:
    return Config(instances=tuple(parse_instance_arg(a) for a in args), **options)


def test_only_the_instance_list_changes():
    old = config(A, port=6000, max_connections=3)
    new = config(A, f"{B}?port=7000", port=5432, max_connections=3, set_options=frozenset({"port"}))
    merged = next_config(old, new)
    assert merged.instances == new.instances
    assert merged.port == 6000
    assert changed_options(old, new) == ["--port"]
    assert changed_options(old, merged) == []


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ((A,), (A, f"{B}?auto-iam-authn=true"), "turns automatic IAM authentication on"),
        ((A, f"{B}?auto-iam-authn=true"), (A,), "turns automatic IAM authentication off"),
        ((A,), (), "has no instance"),
    ],
)
def test_refused(old, new, reason):
    with pytest.raises(ReloadRefused, match=reason):
        next_config(config(*old), config(*new))


def test_global_auto_iam_keeps_any_list():
    merged = next_config(config(A, auto_iam_authn=True), config(B))
    assert [i.uri.instance for i in merged.instances] == ["b"]
