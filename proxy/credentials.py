"""Where the proxy's OAuth2 tokens come from.

Two tokens are in play, as in the Go proxy:
  * the API token (scope cloud-platform) authorizes Admin API calls;
  * the login token (scope alloydb.login) goes into every metadata exchange,
    where the server uses it for the connect permission check and, with
    AUTO_IAM, to log the database user in.
A static ``--token``, gcloud or an impersonated account serve both.

Credential files are parsed by type and built with google-auth's type-specific
constructors, never with the generic loaders, because those look up a project
ID over the network at load time. google-auth's blocking refreshes run in a
thread so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import StartupError
from proxy.log import get_logger

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
LOGIN_SCOPE = "https://www.googleapis.com/auth/alloydb.login"

#: Refresh a token this long before it expires, so no connection ever sends a
#: token that dies in flight.
REFRESH_MARGIN = dt.timedelta(minutes=4)

ADC_HELP = (
    "credentials: could not find default credentials. See "
    "https://cloud.google.com/docs/authentication/external/set-up-adc for more information"
)


@dataclass(frozen=True)
class Token:
    value: str
    expiry: dt.datetime | None  # naive UTC like google-auth, None = unknown/never

    def describe(self) -> str:
        """Size and expiry for debug logs: never the token itself."""
        expiry = self.expiry.strftime("%Y-%m-%dT%H:%M:%SZ") if self.expiry else "unknown"
        return f"token expiry = {expiry}, token size = {len(self.value)}"


class TokenSource(Protocol):
    async def token(self) -> Token: ...


class StaticTokenSource:
    """A token given on the command line: never refreshed, like the Go proxy."""

    def __init__(self, value: str) -> None:
        self._token = Token(value, None)

    async def token(self) -> Token:
        return self._token


class GoogleAuthTokenSource:
    """Wraps a google-auth ``Credentials`` object; refreshes ahead of expiry."""

    def __init__(self, creds: Any) -> None:
        self._creds = creds
        self._lock = threading.Lock()

    def _fresh_token(self) -> Token:
        from google.auth.transport.requests import Request

        with self._lock:
            creds = self._creds
            expiry = getattr(creds, "expiry", None)
            stale = (
                not creds.token
                or expiry is None
                and not creds.valid
                or expiry is not None
                and expiry - REFRESH_MARGIN <= dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            )
            if stale:
                # refresh() rather than before_request(): the latter starts a
                # background lookup against a fixed Google host.
                creds.refresh(Request())
            return Token(creds.token, getattr(creds, "expiry", None))

    async def token(self) -> Token:
        return await asyncio.get_running_loop().run_in_executor(None, self._fresh_token)


@dataclass(frozen=True)
class CredentialSet:
    api: TokenSource
    login: TokenSource
    description: str  # the Go proxy's "Authorizing with ..." line


def _from_info(info: dict[str, Any], scopes: list[str]) -> Any:
    """Build google-auth credentials for one JSON credential document."""
    kind = info.get("type")
    if kind == "service_account":
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    if kind == "authorized_user":
        from google.oauth2 import credentials as user_credentials

        return user_credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
    if kind == "external_account":
        source = info.get("credential_source") or {}
        if info.get("subject_token_type") == "urn:ietf:params:aws:token-type:aws4_request" or (
            str(source.get("environment_id", "")).startswith("aws")
        ):
            from google.auth import aws

            return aws.Credentials.from_info(info, scopes=scopes)
        if "executable" in source:
            from google.auth import pluggable

            return pluggable.Credentials.from_info(info, scopes=scopes)
        from google.auth import identity_pool

        return identity_pool.Credentials.from_info(info, scopes=scopes)
    if kind == "external_account_authorized_user":
        from google.auth import external_account_authorized_user as eaau

        return eaau.Credentials.from_info(info, scopes=scopes)
    if kind == "impersonated_service_account":
        from google.auth import impersonated_credentials

        return impersonated_credentials.Credentials.from_impersonated_service_account_info(
            info, scopes=scopes
        )
    raise ValueError(f"unsupported credentials type {kind!r}")


def _load_json(text: str, origin: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StartupError(
            f"error initializing dialer: config error: {origin}: invalid JSON: {exc}"
        ) from None
    if not isinstance(info, dict):
        raise StartupError(
            f"error initializing dialer: config error: {origin}: expected a JSON object"
        )
    return info


def _impersonate(base: Any, chain: str, scopes: list[str]) -> Any:
    """The first account is the target; the rest are delegates in reverse order."""
    from google.auth import impersonated_credentials

    accounts = [a.strip() for a in chain.split(",") if a.strip()]
    target, rest = accounts[0], accounts[1:]
    delegates = [f"projects/-/serviceAccounts/{d}" for d in reversed(rest)]
    return impersonated_credentials.Credentials(
        source_credentials=base,
        target_principal=target,
        delegates=delegates,
        target_scopes=scopes,
        lifetime=3600,
    )


def resolve(
    *,
    token: str = "",
    credentials_file: str = "",
    json_credentials: str = "",
    impersonate: str = "",
    login_token: str = "",
) -> CredentialSet:
    """Pick the credential source in the Go proxy's order and log which one."""
    log = get_logger()
    verb = "Impersonating service account with" if impersonate else "Authorizing with"

    def build(info_or_none: dict[str, Any] | None) -> tuple[Any, Any]:
        if info_or_none is None:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                api, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
                login, _ = google.auth.default(scopes=[LOGIN_SCOPE])
            except DefaultCredentialsError:
                raise StartupError(f"error initializing dialer: {ADC_HELP}") from None
            return api, login
        try:
            return (
                _from_info(info_or_none, [CLOUD_PLATFORM_SCOPE]),
                _from_info(info_or_none, [LOGIN_SCOPE]),
            )
        except (ValueError, KeyError) as exc:
            raise StartupError(f"error initializing dialer: config error: {exc}") from None

    if token:
        log.info("%s OAuth2 token", verb)
        from google.oauth2 import credentials as user_credentials

        if impersonate:
            base = user_credentials.Credentials(token=token)
            api_src: TokenSource = GoogleAuthTokenSource(
                _impersonate(base, impersonate, [CLOUD_PLATFORM_SCOPE])
            )
            return CredentialSet(api_src, api_src, f"{verb} OAuth2 token")
        static = StaticTokenSource(token)
        login_src: TokenSource = StaticTokenSource(login_token) if login_token else static
        return CredentialSet(static, login_src, f"{verb} OAuth2 token")

    if credentials_file:
        log.info('%s the credentials file at "%s"', verb, credentials_file)
        path = os.path.abspath(credentials_file)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise StartupError(
                f"error initializing dialer: config error: open {credentials_file}: "
                f"{exc.strerror.lower() if exc.strerror else exc}"
            ) from None
        api, login = build(_load_json(text, credentials_file))
        description = f'{verb} the credentials file at "{credentials_file}"'
    elif json_credentials:
        log.info("%s JSON credentials environment variable", verb)
        api, login = build(_load_json(json_credentials, "--json-credentials"))
        description = f"{verb} JSON credentials environment variable"
    else:
        log.info("%s Application Default Credentials", verb)
        api, login = build(None)
        description = f"{verb} Application Default Credentials"

    if impersonate:
        imp = GoogleAuthTokenSource(_impersonate(api, impersonate, [CLOUD_PLATFORM_SCOPE]))
        return CredentialSet(
            imp, StaticTokenSource(login_token) if login_token else imp, description
        )
    login_source: TokenSource = (
        StaticTokenSource(login_token) if login_token else GoogleAuthTokenSource(login)
    )
    return CredentialSet(GoogleAuthTokenSource(api), login_source, description)
