"""Every HTTP endpoint, declared once, next to its handler: method, path, listener, who may call it,
its parameters and its answers.

The routers are built from these declarations (:func:`routes`) and so is the API reference
(``docs/reference/api.md``, ``make docs``): an endpoint cannot be served without being described,
nor described without being served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

# Who may call an endpoint.
TOKEN = "API token"  # Authorization: Bearer <data_dir/api-token>
WEBHOOK = "API token or webhook token"  # the webhook token (data_dir/webhook-token) is good for this endpoint only
SESSION = "API token or the page's session cookie"  # the capture page: a login form trades the token for a cookie
NONE = "none"
BASIC = "basic auth of --web.config.file, if it names users"

LISTENERS = ("metrics", "api")  # metrics_listen (/metrics) and api_listen (the API and the capture page)

H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Param:
    """One parameter of an endpoint: in the path, the query string, the JSON body or a form."""

    name: str
    where: str  # path, query, body, form
    help: str


@dataclass(frozen=True)
class Endpoint:
    """One method and path, as served and as documented."""

    method: str
    path: str
    summary: str
    listener: str = "api"
    auth: str = TOKEN
    params: tuple[Param, ...] = ()
    answers: tuple[tuple[int, str], ...] = ()  # (status, what it holds)


def endpoint(
    method: str,
    path: str,
    summary: str,
    *,
    listener: str = "api",
    auth: str = TOKEN,
    params: tuple[Param, ...] = (),
    answers: tuple[tuple[int, str], ...] = (),
) -> Callable[[H], H]:
    """Declare that the decorated handler serves ``method path`` (stack several for several paths)."""
    if listener not in LISTENERS:
        raise ValueError(f"unknown listener {listener!r}")
    declared = Endpoint(method, path, summary, listener, auth, params, answers)

    def mark(handler: H) -> H:
        # Decorators apply bottom-up: prepend, so the endpoints keep the order they are written in.
        handler.__endpoints__ = (declared, *getattr(handler, "__endpoints__", ()))  # type: ignore[attr-defined]
        return handler

    return mark


def endpoints(cls: type) -> list[tuple[str, Endpoint]]:
    """(handler name, endpoint) for every endpoint the class's handlers declare, in the order written."""
    out = []
    for name, value in vars(cls).items():
        for declared in getattr(value, "__endpoints__", ()):
            out.append((name, declared))
    return out


def routes(owner: object, listener: str = "api") -> list[web.RouteDef]:
    """The aiohttp routes of ``owner``'s handlers on ``listener``."""
    out = []
    for name, declared in endpoints(type(owner)):
        if declared.listener != listener:
            continue
        handler = getattr(owner, name)
        if declared.method == "GET":
            out.append(web.get(declared.path, handler))  # answers HEAD too, as aiohttp's add_get does
        else:
            out.append(web.route(declared.method, declared.path, handler))
    return out


__all__ = ["BASIC", "Endpoint", "LISTENERS", "NONE", "Param", "SESSION", "TOKEN", "WEBHOOK", "endpoint", "endpoints", "routes"]
