"""Route matching: which routes a document goes to.

A route matches when the patient's managingOrganization or the encounter's serviceProvider is one
of its ``match.organizations``. The fallback route (at most one) takes what no other route
matches. No match and no fallback means the document has nowhere to go: the caller refuses it
before anything is stored.
"""

from __future__ import annotations

from collections.abc import Iterable

from medcourier.engine.config import Route


class Router:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._fallback = [r for r in self.routes if r.settings.match.fallback]

    def match(self, organizations: set[str]) -> list[Route]:
        matched = [
            r for r in self.routes if organizations.intersection(r.settings.match.organizations)
        ]
        return matched or list(self._fallback)
