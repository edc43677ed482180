"""``--static-connection-info``: connection info read from a JSON file (development).

The file replaces both Admin API calls. Its shape, as the Go connector reads it:

  {"publicKey": "<PEM>", "privateKey": "<PEM>",
   "projects/P/locations/R/clusters/C/instances/I": {
       "ipAddress": "10.0.0.2", "publicIpAddress": "…",
       "pscInstanceConfig": {"pscDnsName": "…"},
       "pemCertificateChain": ["<client>", "<intermediate>", "<CA>"],
       "caCert": "<CA>"}}

Every problem is reported at start-up, naming the file and what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.cache import ConnectionInfo
from proxy.config import InstanceURI
from proxy.dataplane import plane
from proxy.errors import ConfigError


class StaticInfoError(Exception):
    """The file cannot be used; the message names the file and the reason."""


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise StaticInfoError(f'{where}: "{key}" is missing or not a string')
    return value


def load(path: str) -> dict[str, ConnectionInfo]:
    """Instance name -> ConnectionInfo, for every instance in the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise StaticInfoError(f"open {path}: {(exc.strerror or str(exc)).lower()}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StaticInfoError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StaticInfoError(f"{path}: expected a JSON object")
    private_key = _text(data, "privateKey", path)
    infos: dict[str, ConnectionInfo] = {}
    for name, entry in data.items():
        if name in ("publicKey", "privateKey"):
            continue
        where = f'{path}: instance "{name}"'
        if not isinstance(entry, dict):
            raise StaticInfoError(f"{where}: expected a JSON object")
        chain = entry.get("pemCertificateChain")
        if not isinstance(chain, list) or not chain or not all(isinstance(p, str) for p in chain):
            raise StaticInfoError(f'{where}: "pemCertificateChain" must be a list of PEM strings')
        ca = _text(entry, "caCert", where)
        psc = entry.get("pscInstanceConfig") or {}
        found = {
            "PRIVATE": entry.get("ipAddress") or "",
            "PUBLIC": entry.get("publicIpAddress") or "",
            "PSC": psc.get("pscDnsName", "") if isinstance(psc, dict) else "",
        }
        addresses = {kind: addr for kind, addr in found.items() if isinstance(addr, str) and addr}
        if not addresses:
            raise StaticInfoError(f"{where}: no ipAddress, publicIpAddress or pscDnsName")
        pem_chain = "".join(p if p.endswith("\n") else p + "\n" for p in chain)
        try:
            from cryptography import x509  # not at start-up: about 13 ms

            leaf = x509.load_pem_x509_certificate(chain[0].encode())
            context = plane.TLSClientContext(pem_chain.encode(), private_key.encode(), ca.encode())
        except ValueError as exc:
            raise StaticInfoError(f"{where}: {exc}") from None
        infos[name] = ConnectionInfo(addresses, context, leaf.not_valid_after_utc.timestamp())
    return infos


class StaticCache:
    """The ConnectionInfoCache of one instance under --static-connection-info."""

    def __init__(self, uri: InstanceURI, infos: dict[str, ConnectionInfo]) -> None:
        self._uri = uri
        self._info = infos.get(uri.name)

    async def connection_info(self) -> ConnectionInfo:
        if self._info is None:
            raise ConfigError("instance not found in --static-connection-info", self._uri.short)
        return self._info

    def force_refresh(self) -> None:
        """Nothing to refresh: the file is the only source."""

    def close(self) -> None:
        """Nothing to stop."""
