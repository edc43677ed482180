"""Where the proxy's OAuth2 tokens come from.

Two tokens are in play, as in the Go proxy:
  * the API token (scope cloud-platform) authorizes Admin API calls;
  * the login token (scope alloydb.login) goes into every metadata exchange,
    where the server uses it for the connect permission check and, with
    AUTO_IAM, to log the database user in.
A static ``--token``, gcloud or an impersonated account serve both.

Sources, in the Go proxy's order: ``--token``, ``--credentials-file``,
``--json-credentials``, ``--gcloud-auth``, then Application Default
Credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file, the
Compute Engine metadata server. ADC is walked here step by step rather than
through ``google.auth.default()``, which looks up project IDs over the
network and ignores the ``token_uri`` of user credentials. Credential files
are built with google-auth's type-specific constructors. Blocking refreshes
run in a worker thread; no token ever reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from proxy import workers
from proxy.errors import CredentialsError, StartupError
from proxy.log import get_logger

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
LOGIN_SCOPE = "https://www.googleapis.com/auth/alloydb.login"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

#: Refresh a token this long before it expires, so no connection ever sends a
#: token that dies in flight.
REFRESH_MARGIN = dt.timedelta(minutes=4)
#: Longest wait between two attempts after failed token fetches.
BACKOFF_MAX = 60.0

ADC_HELP = (
    "credentials: could not find default credentials. See "
    "https://cloud.google.com/docs/authentication/external/set-up-adc for more information"
)
IMDSV2_HINT = (
    'the AWS instance metadata service requires IMDSv2 session tokens: add "imdsv2_session_token_url": '
    '"http://169.254.169.254/latest/api/token" to credential_source in the credentials file'
)

# google-auth warns through the logging module (e.g. "Authentication failed
# using Compute Engine ..."); we report failures ourselves, in our format.
logging.getLogger("google.auth").setLevel(logging.ERROR)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


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


class _RefreshingTokenSource:
    """Caches one token and refreshes it ahead of expiry, at most one fetch at a time.

    A token is *due* for refresh when less than REFRESH_MARGIN is left (half
    its lifetime, for tokens that live shorter than twice that, so a source of
    short tokens does not refetch on every call). While the cached token is
    still *usable* (more than a quarter of its margin left), callers get it at
    once, on the loop, and a due refresh runs in the background: a failing
    token endpoint then costs nothing until the token really runs out. After a
    failed fetch the next one waits (1 s, doubling up to BACKOFF_MAX); callers
    with no usable token meanwhile get the same error without a new request.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._lock = threading.Lock()  # one fetch at a time: prime() runs off the loop
        # (token, refresh margin in seconds): one attribute, so the loop never
        # pairs a token with another token's margin while a worker stores both.
        self._cached: tuple[Token, float] | None = None
        self._refresh: asyncio.Task[Token] | None = None
        self._failures = 0
        self._retry_at = 0.0  # time.monotonic() before which no fetch starts
        self._last_error: CredentialsError | None = None

    def _fetch(self) -> Token:
        raise NotImplementedError

    def fetch_now(self) -> Token:
        """Fetch and cache a token, blocking: in a worker thread, or at start-up."""
        with self._lock:
            token = self._fetch()
            lifetime = _seconds_left(token, _utcnow())
            margin = REFRESH_MARGIN.total_seconds()
            if lifetime is not None:
                margin = min(margin, max(lifetime, 0.0) / 2)
            self._cached = (token, margin)
            return token

    def cached(self) -> Token | None:
        return self._cached[0] if self._cached else None

    def prime(self) -> Token:
        """Fetch once now (blocking), to fail fast at start-up."""
        return self.fetch_now()

    async def token(self) -> Token:
        if self._cached is not None:
            cached, margin = self._cached
            left = _seconds_left(cached, _utcnow())
            if left is None or left > margin:
                return cached  # the common case: no thread hop, no task
            if left > margin / 4:
                self._start_refresh()  # due: refresh behind the caller's back
                return cached
        if self._refresh is None and self._last_error and time.monotonic() < self._retry_at:
            # Backing off: the same error, no new request (and a fresh
            # traceback, so repeated raises do not pile frames onto it).
            raise self._last_error.with_traceback(None)
        # shield: one caller's timeout must not cancel the fetch others wait for.
        return await asyncio.shield(self._start_refresh(force=True))

    def _start_refresh(self, force: bool = False) -> asyncio.Task[Token]:
        running = self._refresh
        if running is None and (force or time.monotonic() >= self._retry_at):
            running = self._refresh = asyncio.get_running_loop().create_task(self._refresh_once())
            # A background refresh's failure is for the next callers; don't warn about it.
            running.add_done_callback(lambda t: t.cancelled() or t.exception())
        return running  # type: ignore[return-value]  # None only when not forced

    async def _refresh_once(self) -> Token:
        try:
            token = await workers.TOKENS.run(self.fetch_now)
        except Exception as exc:
            if isinstance(exc, CredentialsError):
                error = exc
            else:  # a library's own bug: still one clear error, still backed off
                error = CredentialsError(
                    f"failed to get an OAuth2 token ({self.origin}): {type(exc).__name__}: {exc}"
                )
            self._failures += 1
            self._retry_at = time.monotonic() + min(BACKOFF_MAX, 2.0 ** (self._failures - 1))
            self._last_error = error
            get_logger().debug(
                "Token refresh failed (%s); next attempt in %ds",
                self.origin,
                int(self._retry_at - time.monotonic()),
            )
            if error is exc:
                raise
            raise error from None
        finally:
            self._refresh = None
        self._failures = 0
        self._last_error = None
        return token


def _seconds_left(token: Token, now: dt.datetime) -> float | None:
    return None if token.expiry is None else (token.expiry - now).total_seconds()


def _library_message(exc: Exception) -> str:
    """google-auth's own message: its RefreshError carries (message, response body),
    whose str() is a tuple's repr, and words an absent error description as None."""
    if len(exc.args) > 1 and isinstance(exc.args[0], str):
        return exc.args[0].removesuffix(": None")
    return str(exc)


class GoogleAuthTokenSource(_RefreshingTokenSource):
    """Wraps a google-auth ``Credentials`` object."""

    def __init__(self, creds: Any, origin: str, info: dict[str, Any] | None = None) -> None:
        super().__init__(origin)
        self._creds = creds
        self._info = info or {}

    def _fetch(self) -> Token:
        from google.auth import exceptions
        from google.auth.transport.requests import Request

        try:
            # refresh() rather than before_request(): the latter also starts
            # a background lookup against a fixed Google host.
            self._creds.refresh(Request())
        except (exceptions.GoogleAuthError, OSError, ValueError) as exc:
            raise CredentialsError(self._explain(exc)) from None
        except Exception as exc:  # a credential library's own bug: still one clear error
            raise CredentialsError(self._explain(exc)) from None
        return Token(self._creds.token, getattr(self._creds, "expiry", None))

    def _explain(self, exc: Exception) -> str:
        """The failure, the URL it concerns when we can tell, and a hint where one helps."""
        text = _library_message(exc)
        message = f"failed to get an OAuth2 token ({self.origin}): {text}"
        source = self._info.get("credential_source") or {}
        lowered = text.lower()
        url = ""
        if "region" in lowered:
            url = source.get("region_url", "")
        elif "security credentials" in lowered or "role" in lowered:
            url = source.get("url", "")
        elif "sts" in lowered or "token exchange" in lowered or "invalid_grant" in lowered:
            url = self._info.get("token_url", "")
        elif "impersonat" in lowered or "generateaccesstoken" in lowered:
            url = self._info.get("service_account_impersonation_url", "")
        if url:
            message += f" (request to {url})"
        if (
            str(source.get("environment_id", "")).startswith("aws")
            and not source.get("imdsv2_session_token_url")
            and ("401" in text or "unauthorized" in lowered)
        ):
            message += f"; hint: {IMDSV2_HINT}"
        return message


class GcloudTokenSource(_RefreshingTokenSource):
    """gcloud's logged-in user, through ``gcloud config config-helper`` as the Go proxy does."""

    command = ["gcloud", "--format", "json", "config", "config-helper", "--min-expiry", "1h"]

    def __init__(self) -> None:
        super().__init__("gcloud user credentials")

    def _fetch(self) -> Token:
        try:
            result = subprocess.run(
                self.command,
                capture_output=True,
                text=True,
                errors="replace",
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CredentialsError(f"error reading config: {exc}; stderr was:\n") from None
        if result.returncode != 0:
            raise CredentialsError(
                f"error reading config: exit status {result.returncode}; stderr was:\n{result.stderr}"
            )
        try:
            credential = json.loads(result.stdout)["credential"]
            expiry = dt.datetime.fromisoformat(credential["token_expiry"].replace("Z", "+00:00"))
            return Token(
                credential["access_token"], expiry.astimezone(dt.timezone.utc).replace(tzinfo=None)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialsError(
                f"error reading config: unexpected gcloud output: {exc}"
            ) from None

    def google_credentials(self) -> Any:
        """This source as a google-auth credential that refreshes by running gcloud
        again, as the base of impersonation (a plain token would die in an hour)."""
        from google.auth import credentials as google_credentials

        source = self

        class GcloudCredentials(google_credentials.Credentials):
            def __init__(self) -> None:
                super().__init__()
                cached = source.cached()
                if cached is not None:
                    self.token, self.expiry = cached.value, cached.expiry

            def refresh(self, request: Any) -> None:
                from google.auth import exceptions

                try:
                    fresh = source.fetch_now()
                except CredentialsError as exc:
                    raise exceptions.RefreshError(str(exc)) from None
                self.token, self.expiry = fresh.value, fresh.expiry

        return GcloudCredentials()


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

        # Built by hand: from_authorized_user_info() ignores the file's token_uri.
        return user_credentials.Credentials(
            None,
            refresh_token=info["refresh_token"],
            token_uri=info.get("token_uri") or GOOGLE_TOKEN_URI,
            client_id=info["client_id"],
            client_secret=info["client_secret"],
            scopes=scopes,
            quota_project_id=info.get("quota_project_id"),
        )
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


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(os.path.abspath(path), encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise StartupError(
            f"error initializing dialer: config error: open {path}: {reason}"
        ) from None
    return _load_json(text, path)


def parse_impersonation_chain(chain: str) -> tuple[str, list[str]]:
    """The first account is the target; the rest are delegates, in reverse order."""
    accounts = [a.strip() for a in chain.split(",") if a.strip()]
    target, rest = accounts[0], accounts[1:]
    return target, [f"projects/-/serviceAccounts/{d}" for d in reversed(rest)]


def _impersonate(base: Any, chain: str) -> Any:
    from google.auth import impersonated_credentials

    target, delegates = parse_impersonation_chain(chain)
    return impersonated_credentials.Credentials(
        source_credentials=base,
        target_principal=target,
        delegates=delegates,
        target_scopes=[CLOUD_PLATFORM_SCOPE],
        lifetime=3600,
    )


def _built(
    info: dict[str, Any], origin: str
) -> tuple[GoogleAuthTokenSource, GoogleAuthTokenSource, Any]:
    try:
        api = _from_info(info, [CLOUD_PLATFORM_SCOPE])
        login = _from_info(info, [LOGIN_SCOPE])
    except (ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"error initializing dialer: config error: {origin}: {exc}") from None
    return GoogleAuthTokenSource(api, origin, info), GoogleAuthTokenSource(login, origin, info), api


def _application_default() -> tuple[GoogleAuthTokenSource, GoogleAuthTokenSource, Any]:
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return _built(_read_file(path), path)
    from google.auth import _cloud_sdk

    well_known = _cloud_sdk.get_application_default_credentials_path()
    if os.path.isfile(well_known):
        return _built(_read_file(well_known), well_known)
    from google.auth import compute_engine
    from google.auth.compute_engine import _metadata
    from google.auth.transport.requests import Request

    if _metadata.is_on_gce(Request()):
        api = compute_engine.Credentials(scopes=[CLOUD_PLATFORM_SCOPE])
        login = compute_engine.Credentials(scopes=[LOGIN_SCOPE])
        origin = "the Compute Engine metadata server"
        return GoogleAuthTokenSource(api, origin), GoogleAuthTokenSource(login, origin), api
    raise StartupError(f"error initializing dialer: {ADC_HELP}")


def resolve(
    *,
    token: str = "",
    credentials_file: str = "",
    json_credentials: str = "",
    gcloud_auth: bool = False,
    impersonate: str = "",
    login_token: str = "",
    auto_iam: bool = False,
) -> CredentialSet:
    """Pick the credential source in the Go proxy's order and log which one."""
    log = get_logger()
    verb = "Impersonating service account with" if impersonate else "Authorizing with"
    api: TokenSource
    login: TokenSource
    base: Any = None
    if token:
        description = f"{verb} OAuth2 token"
        log.info(description)
        api = login = StaticTokenSource(token)
        if impersonate:
            from google.oauth2 import credentials as user_credentials

            base = user_credentials.Credentials(token=token)
    elif credentials_file:
        description = f'{verb} the credentials file at "{credentials_file}"'
        log.info(description)
        api, login, base = _built(_read_file(credentials_file), credentials_file)
    elif json_credentials:
        description = f"{verb} JSON credentials environment variable"
        log.info(description)
        api, login, base = _built(
            _load_json(json_credentials, "--json-credentials"), "--json-credentials"
        )
    elif gcloud_auth:
        description = f"{verb} gcloud user credentials"
        log.info(description)
        gcloud = GcloudTokenSource()
        try:
            gcloud.prime()
        except CredentialsError as exc:
            raise StartupError(f"error initializing dialer: {exc}") from None
        api = login = gcloud
        if impersonate:
            base = gcloud.google_credentials()
    else:
        description = f"{verb} Application Default Credentials"
        log.info(description)
        api, login, base = _application_default()

    reused = False
    if impersonate:
        api = GoogleAuthTokenSource(_impersonate(base, impersonate), f"impersonating {impersonate}")
        login, reused = api, True
    elif token or gcloud_auth:
        reused = True
    if login_token:
        login = StaticTokenSource(login_token)
        if auto_iam:
            log.info("Authenticating IAM database logins with the login token")
    elif auto_iam and reused:
        log.info(
            "Note: reusing the configured API credential for IAM database authentication login"
        )
    return CredentialSet(api, login, description)
