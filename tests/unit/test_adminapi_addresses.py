"""Addresses from connectionInfo are checked before a dial trusts them (issue 10, finding 6)."""

from __future__ import annotations

import pytest

from proxy.adminapi import _checked_dns_name, _checked_ip
from proxy.errors import AdminAPIError


@pytest.mark.parametrize("value", ["10.0.0.5", "2001:db8::1", ""])
def test_plain_addresses_pass(value):
    assert _checked_ip({"ipAddress": value}, "ipAddress") == value


@pytest.mark.parametrize(
    "value", ["fe80::1%eth0", "10.0.0.5\0", "10.0.0", "host.example", "1.2.3.4 "]
)
def test_anything_else_is_the_apis_error(value):
    with pytest.raises(AdminAPIError, match="ipAddress"):
        _checked_ip({"ipAddress": value}, "ipAddress")


def test_psc_names():
    body = {"pscDnsName": "abc.p1.us-central1.alloydb-psc.goog."}
    assert _checked_dns_name(body, "pscDnsName") == "abc.p1.us-central1.alloydb-psc.goog"
    for bad in ["a\0b.goog", "a b.goog", "x%y.goog", "-a.goog", "a..goog"]:
        with pytest.raises(AdminAPIError, match="pscDnsName"):
            _checked_dns_name({"pscDnsName": bad}, "pscDnsName")
