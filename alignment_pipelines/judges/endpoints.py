"""Where an OpenAI-compatible judge may send requests, and where its key comes from: decided by the deployment's
environment, never by a run's config.

A run config that could name the endpoint and the key's variable could send any secret of the process anywhere
(``base_url: http://attacker/v1`` with the Postgres password as the key). So the key is read from one variable
fixed here, :data:`JUDGE_API_KEY_ENV`, and an endpoint is allowed only if it is on this host's loopback (any
scheme: a local vLLM) or is ``https`` on a host listed in :data:`JUDGE_ALLOWED_HOSTS_ENV`. Host names are taken
literally: a name that resolves to loopback today is not loopback (it may resolve elsewhere tomorrow).

The evaluation's judge (``resources/judge.py``) and online DPO's annotator both go through :func:`check_endpoint`
(``OpenAICompatibleJudge`` calls it) and :func:`judge_api_key`.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

JUDGE_API_KEY_ENV = "ALIGNMENT_PIPELINES_JUDGE_API_KEY"
"""The only variable an OpenAI-compatible judge's key is read from."""
JUDGE_ALLOWED_HOSTS_ENV = "ALIGNMENT_PIPELINES_JUDGE_ALLOWED_HOSTS"
"""Comma-separated hosts (``host`` or ``host:port``) an https judge endpoint may be on, beside loopback."""


class EndpointNotAllowed(ValueError):
    """A judge endpoint outside the deployment's allow-list."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(environ=None) -> set[str]:
    """The hosts named in :data:`JUDGE_ALLOWED_HOSTS_ENV`, lower-cased."""
    value = (environ if environ is not None else os.environ).get(JUDGE_ALLOWED_HOSTS_ENV, "")
    return {host.strip().lower() for host in value.split(",") if host.strip()}


def check_endpoint(base_url: str | None, environ=None) -> str:
    """``base_url`` if a judge may call it, else :class:`EndpointNotAllowed` naming the rule it broke."""
    parts = urlsplit(base_url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointNotAllowed(f"judge endpoint {base_url!r}: must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise EndpointNotAllowed(f"judge endpoint {parts.hostname!r}: credentials in the URL are refused; the key "
                                 f"comes from {JUDGE_API_KEY_ENV}")
    host = parts.hostname.lower()
    if is_loopback(host):
        return base_url
    listed = allowed_hosts(environ)
    with_port = f"{host}:{parts.port}" if parts.port else host
    if parts.scheme != "https":
        raise EndpointNotAllowed(f"judge endpoint {base_url!r}: only loopback may be plain http; use https")
    if host not in listed and with_port not in listed:
        raise EndpointNotAllowed(f"judge endpoint {base_url!r}: host {with_port!r} is not in "
                                 f"{JUDGE_ALLOWED_HOSTS_ENV} ({', '.join(sorted(listed)) or 'empty'}); the "
                                 "deployment lists the hosts a judge may call")
    return base_url


def judge_api_key(environ=None) -> str | None:
    """The judge's key from :data:`JUDGE_API_KEY_ENV`, or None (then no Authorization header is sent)."""
    return (environ if environ is not None else os.environ).get(JUDGE_API_KEY_ENV) or None
