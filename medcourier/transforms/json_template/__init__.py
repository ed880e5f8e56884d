"""Vendor JSON: a document rendered through a route's own jinja2 template.

Every EHR vendor with a JSON import API wants its own field names and nesting, so the mapping is
not code but a template the hospital's integrator writes and names in the route's YAML
(``format: json-template``). The format guarantees what a template alone cannot: the output is
well-formed JSON (and matches the route's JSON Schema when one is given) before anything is sent,
and the template cannot reach outside the data it is given. See :mod:`.plugin` for the template's
scope and the options.
"""
