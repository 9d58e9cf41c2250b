"""Request bodies generated from an OpenAPI document, and single-field mutations.

DocumentStrategies builds Hypothesis strategies for the request body of
each operation of a document: from the document crate_operator builds
(test_validation) or the one a running operator serves (test_http,
test_hostile). Fields with a format get the strategies of
FORMAT_STRATEGIES, which a caller may replace, for example to point URLs
only at the test's own peers. Everything else follows type, bounds,
pattern and enum. Mutator lists the changes of one field that the
document declares invalid, with the error path the validator must name.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, NamedTuple

from hypothesis import strategies as st

import crate_operator as co
import harness

METHODS = ("get", "put", "post", "delete", "patch", "head", "options",
           "trace")
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
# Maximum entries of a generated map or list beyond its minimum, which keeps
# bodies small and the run fast.
MAX_GENERATED_ENTRIES = 3


# === Document helpers ===

def iter_refs(node):
    """Yield every "$ref" value inside node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def pointer_target(document: dict, ref: str):
    """Resolve a local JSON pointer (RFC 6901) such as #/components/x."""
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, ref
        node = node[part]
    return node


def operations(document: dict):
    """Yield (path, method, operation) for every operation of document."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def iter_schemas(schema: dict):
    """Yield schema and every subschema inside it (without resolving $ref)."""
    yield schema
    for name in ("items", "additionalProperties", "propertyNames"):
        if isinstance(schema.get(name), dict):
            yield from iter_schemas(schema[name])
    for branch in schema.get("anyOf", []):
        yield from iter_schemas(branch)
    for field_schema in schema.get("properties", {}).values():
        yield from iter_schemas(field_schema)


def json_type(value) -> str:
    """Return the JSON Schema type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def type_allowed(kinds: list, value) -> bool:
    kind = json_type(value)
    return kind in kinds or (kind == "integer" and "number" in kinds)


# === Format strategies ===
# Each takes the field's schema and returns a strategy of valid values.

LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
TOP_LABEL = st.from_regex(r"[a-z][a-z0-9]{1,5}", fullmatch=True)
PORT_TEXT = st.integers(1, 65535).map(str)
IPV4 = st.tuples(*[st.integers(0, 255)] * 4).map(
    lambda parts: ".".join(map(str, parts)))


@st.composite
def plain_domains(draw):
    labels = draw(st.lists(LABEL, min_size=1, max_size=3))
    return ".".join(labels + [draw(TOP_LABEL)])


@st.composite
def domains(draw, schema=None):
    name = draw(plain_domains())
    if draw(st.booleans()):
        name = name.upper()
    if draw(st.booleans()):
        name += "."
    return name


@st.composite
def http_urls(draw, schema=None):
    scheme = draw(st.sampled_from(["http", "https", "HTTPS"]))
    host = draw(st.one_of(plain_domains(), IPV4, st.just("[::1]")))
    port = draw(st.one_of(st.just(""), PORT_TEXT.map(":{}".format)))
    path = draw(st.from_regex(r"(?:/[A-Za-z0-9._~%-]{0,10}){0,3}",
                              fullmatch=True))
    query = draw(st.one_of(st.just(""), st.just("?a=1&b=%20")))
    return f"{scheme}://{host}{port}{path}{query}"


@st.composite
def registry_hosts(draw, schema=None):
    host = draw(st.one_of(plain_domains(), IPV4, st.just("localhost")))
    port = draw(st.one_of(st.just(""), PORT_TEXT.map(":{}".format)))
    return host + port


IMAGE_COMPONENT = st.from_regex(
    r"[a-z0-9]{1,6}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,6}){0,2}", fullmatch=True)
DOTLESS_COMPONENT = st.from_regex(
    r"[a-z0-9]{1,6}(?:(?:_|__|-{1,3})[a-z0-9]{1,6}){0,2}", fullmatch=True)


@st.composite
def image_names(draw, schema=None):
    # Docker reads a first component with "." or ":" as a registry host, so
    # without a host the first of several components must have no ".".
    host = draw(st.one_of(st.none(), registry_hosts()))
    components = draw(st.lists(IMAGE_COMPONENT, min_size=1, max_size=3))
    if host is None and len(components) > 1:
        components[0] = draw(DOTLESS_COMPONENT)
    return "/".join(([host] if host else []) + components)


SEGMENT = st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True)


@st.composite
def volume_specs(draw, schema=None):
    if draw(st.booleans()):
        source = draw(st.from_regex(co.ID_PATTERN, fullmatch=True))
    else:
        segments = draw(st.lists(SEGMENT, min_size=1, max_size=3))
        source = draw(st.sampled_from(["./", "", "data/"])) + "/".join(
            segments)
        if "/" not in source:
            source = "./" + source
    target = "/" + "/".join(draw(st.lists(SEGMENT, min_size=1, max_size=3)))
    mode = draw(st.sampled_from(["", ":ro", ":rw"]))
    return f"{source}:{target}{mode}"


def volume_lists(schema=None):
    return st.lists(volume_specs(), max_size=MAX_GENERATED_ENTRIES,
                    unique_by=lambda spec: spec.split(":")[1])


def canary_steps(schema=None):
    return st.lists(st.integers(1, 99), unique=True, max_size=9).map(
        lambda steps: sorted(steps) + [100])


def env_names(schema):
    return st.from_regex(schema["pattern"], fullmatch=True).filter(
        lambda name: name != "PORT" and not name.startswith("CRATE_"))


FORMAT_STRATEGIES: dict[str, Callable] = {
    "http-url": http_urls,
    "domain-name": domains,
    "env-name": env_names,
    "registry-host": registry_hosts,
    "image-name": image_names,
    "volume-spec": volume_specs,
    "volume-list": volume_lists,
    "canary-steps": canary_steps,
}
# Formats that only bound an integer, so they need no strategy of their own.
BOUND_FORMATS = {"int32": (INT32_MIN, INT32_MAX)}


# === Cross-field rules ===
# A schema names its cross-field rules in x-crate-rules. Each function
# adjusts a generated body to satisfy one: (strategies, draw, body).

def distinct_ports(strategies, draw, body) -> None:
    entries = [entry for field in ("slots", "instances")
               for entry in (body.get(field) or {}).values()]
    port = strategies.resolve(
        strategies.document["components"]["schemas"]["InstancePort"])
    bounds = port["properties"]["port"]
    ports = draw(st.lists(st.integers(bounds["minimum"], bounds["maximum"]),
                          min_size=len(entries), max_size=len(entries),
                          unique=True))
    for entry, number in zip(entries, ports):
        entry["port"] = number


def slot_count_for_strategy(strategies, draw, body) -> None:
    if len(body["slots"]) != 2 and body["deployment_strategy"] != "immediate":
        body["deployment_strategy"] = "immediate"


def small_env(strategies, draw, body) -> None:
    # Generated maps contain a few short values, far below the total limit.
    assert len(json.dumps(body.get("env_vars") or {})) < 100_000


RULE_ADJUSTMENTS: dict[str, Callable] = {
    "distinct-ports": distinct_ports,
    "strategy-slot-count": slot_count_for_strategy,
    "env-total-size": small_env,
}


# === Strategies from a document ===

class DocumentStrategies:
    """Hypothesis strategies for the request bodies of an OpenAPI document.

    formats and rules replace entries of FORMAT_STRATEGIES and
    RULE_ADJUSTMENTS for this instance. Strategies of all request bodies
    are built once here, because building them (regexes above all) costs
    more than drawing from them.
    """

    def __init__(self, document: dict, formats: dict | None = None,
                 rules: dict | None = None):
        self.document = document
        self.formats = dict(FORMAT_STRATEGIES, **(formats or {}))
        self.rules = dict(RULE_ADJUSTMENTS, **(rules or {}))
        self.requests = {}
        for _, _, operation in operations(document):
            if "requestBody" in operation:
                content = operation["requestBody"]["content"]["application/json"]
                self.requests[operation["operationId"]] = self.resolve(
                    content["schema"])
        self.bodies = {name: self.for_schema(schema)
                       for name, schema in self.requests.items()}

    def request_schema(self, operation_id: str) -> dict:
        return self.requests[operation_id]

    def body(self, operation_id: str):
        """Return the strategy of one operation's body, before x-crate-rules."""
        return self.bodies[operation_id]

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = pointer_target(self.document, schema["$ref"])
        return schema

    def types(self, schema: dict) -> list:
        schema = self.resolve(schema)
        if "anyOf" in schema:
            return [kind for branch in schema["anyOf"]
                    for kind in self.types(branch)]
        kinds = schema.get("type", [])
        return [kinds] if isinstance(kinds, str) else list(kinds)

    def for_schema(self, schema: dict):
        schema = self.resolve(schema)
        if "anyOf" in schema:
            return st.one_of([self.for_schema(branch)
                              for branch in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        return st.one_of([self.typed(schema, kind)
                          for kind in self.types(schema)])

    def typed(self, schema: dict, kind: str):
        low, high = BOUND_FORMATS.get(schema.get("format"), (None, None))
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return st.integers(low, high)
        if kind == "number":
            return st.one_of(st.integers(low, high), st.floats(
                low, high, allow_nan=False, allow_infinity=False))
        if kind == "string":
            return self.strings(schema)
        if kind == "array":
            return self.arrays(schema)
        return self.objects(schema)

    def format_strategy(self, schema: dict):
        name = schema["format"]
        assert name in self.formats, (
            f"format {name!r} of the document has no strategy; add one to "
            f"FORMAT_STRATEGIES in openapi_bodies.py")
        return self.formats[name](schema)

    def strings(self, schema: dict):
        if "format" in schema:
            strategy = self.format_strategy(schema)
        elif "pattern" in schema:
            strategy = st.from_regex(schema["pattern"], fullmatch=True)
        else:
            strategy = st.text(max_size=20)
        low = schema.get("minLength", 0)
        high = schema.get("maxLength", math.inf)
        return strategy.filter(lambda text: low <= len(text) <= high)

    def arrays(self, schema: dict):
        if "format" in schema:
            return self.format_strategy(schema)
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", math.inf),
                   low + MAX_GENERATED_ENTRIES)
        return st.lists(self.for_schema(schema.get("items", {})),
                        min_size=low, max_size=high,
                        unique=schema.get("uniqueItems", False))

    def objects(self, schema: dict):
        if "properties" in schema:
            required = set(schema.get("required", []))
            fields = {name: self.for_schema(sub)
                      for name, sub in schema["properties"].items()}
            return st.fixed_dictionaries(
                {name: fields[name] for name in fields if name in required},
                optional={name: fields[name] for name in fields
                          if name not in required})
        keys = self.strings(dict(schema.get("propertyNames", {}),
                                 type="string"))
        low = schema.get("minProperties", 0)
        high = min(schema.get("maxProperties", math.inf),
                   low + MAX_GENERATED_ENTRIES)
        return st.dictionaries(
            keys, self.for_schema(schema.get("additionalProperties", {})),
            min_size=low, max_size=high)


@st.composite
def valid_bodies(draw, strategies: DocumentStrategies, operation_id: str,
                 prepare: Callable[[dict], dict] | None = None):
    """Draw a body that satisfies the schema and its x-crate-rules.

    prepare, when given, changes the drawn body before the rules run (for
    example to put in the test's own ids, ports and URLs).
    """
    body = draw(strategies.body(operation_id))
    if prepare is not None:
        body = prepare(body)
    for rule in strategies.request_schema(operation_id).get("x-crate-rules", {}):
        assert rule in strategies.rules, (
            f"rule {rule!r} of the document has no adjustment; add one to "
            f"RULE_ADJUSTMENTS in openapi_bodies.py")
        strategies.rules[rule](strategies, draw, body)
    return body


# === Bodies that reach only the test's own peers ===

class SafeTargets(NamedTuple):
    """Where generated requests may point: only peers of the test session.

    callback_url is the callback receiver, asset_url a path that the asset
    server does not have (so every download fails before a change), and
    closed_port a loopback port nothing listens on, for registry hosts.
    """

    callback_url: str
    asset_url: str
    closed_port: int
    server_id: str


def free_ports(count: int) -> list:
    ports: set = set()
    while len(ports) < count:
        ports.add(harness.free_port())
    return sorted(ports)


def make_safe(body: dict, targets: SafeTargets, app_id: int) -> dict:
    """Point a generated body at app_id, free ports and the test's peers only.

    Every change keeps the body valid: app_id (also as deployment_id), ports
    from free_port, the test peers as URLs and the operator's server_id.
    """
    body["app_id"] = app_id
    if body.get("deployment_id") is not None:
        body["deployment_id"] = app_id
    for field in ("callback_url", "asset_url"):
        if field in body:
            body[field] = getattr(targets, field)
    if "server_id" in body:
        body["server_id"] = targets.server_id
    if "domain" in body:
        body["domain"] = f"h{app_id}.{body['domain']}"
    entries = [entry for field in ("slots", "instances")
               for entry in (body.get(field) or {}).values()]
    for entry, port in zip(entries, free_ports(len(entries))):
        entry["port"] = port
    return body


def check_distinct_ports(body: dict) -> None:
    ports = [entry["port"] for field in ("slots", "instances")
             for entry in (body.get(field) or {}).values()]
    assert len(ports) == len(set(ports))


def safe_strategies(document: dict, targets: SafeTargets) -> DocumentStrategies:
    """Return body strategies whose URLs and registries are only SafeTargets.

    make_safe gives every slot and instance its own free port, so the
    distinct-ports rule only checks that here.
    """
    image_names = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True).map(
        lambda name: f"127.0.0.1:{targets.closed_port}/crate-test/{name}")
    return DocumentStrategies(
        document,
        formats={
            "http-url": lambda schema: st.sampled_from(
                [targets.callback_url, targets.asset_url]),
            "registry-host": lambda schema: st.just(
                f"127.0.0.1:{targets.closed_port}"),
            "image-name": lambda schema: image_names,
        },
        rules={"distinct-ports":
               lambda strategies, draw, body: check_distinct_ports(body)})


def safe_bodies(strategies: DocumentStrategies, operation_id: str,
                targets: SafeTargets, next_id: Callable[[], int]):
    """Return a strategy of valid bodies that make_safe gave an id from next_id."""
    return valid_bodies(strategies, operation_id,
                        prepare=lambda body: make_safe(body, targets, next_id()))


# === Mutations: one field at a time ===

WRONG_TYPES = [True, 1.5, "text", 7, [], {}, None]
BAD_STRINGS = ["", " ", "a b", "-x", "\x00", "#", "../x", "x" * 300, "ü",
               "x\n", "PORT", "A=B", "1X"]
BAD_FORMATS = {
    "http-url": ["ftp://x.example.test/", "https://u:p@x.example.test/",
                 "https:///x"],
    "domain-name": ["bad domain", "x.example.test:8080",
                    "https://x.example.test/", "localhost"],
    "env-name": ["PORT", "CRATE_SECRET"],
    "registry-host": ["https://r.example.test", "r.example.test:0"],
    "image-name": ["team/app:1.0", "Team/App", "app@sha256:" + "a" * 64],
    "volume-spec": ["/etc:/x", "../up:/x", "data:/"],
    "canary-steps": [[50, 10], [10, 50]],
    "volume-list": [["a:/x", "b:/x"]],
}
MISSING = object()  # marks a field to delete


class Site(NamedTuple):
    """One value inside a body: its error path, schema, parent and key."""

    path: str
    schema: dict
    parent: Any
    key: Any
    required: bool


def child_path(path: str, key) -> str:
    """Return the error path of key below path, as the validator writes it."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


class Mutator:
    """Single-field mutations of a body that its schema declares invalid."""

    def __init__(self, strategies: DocumentStrategies):
        self.strategies = strategies

    def effective(self, schema: dict, value) -> dict:
        """Resolve schema and pick the anyOf branch whose type fits value."""
        schema = self.strategies.resolve(schema)
        for branch in schema.get("anyOf", []):
            if type_allowed(self.strategies.types(branch), value):
                return self.strategies.resolve(branch)
        return schema

    def walk(self, schema, value, path, parent=None, key=None,
             required=False):
        yield Site(path, schema, parent, key, required)
        current = self.effective(schema, value)
        if isinstance(value, dict) and "properties" in current:
            names = set(current.get("required", []))
            for name, sub in current["properties"].items():
                if name in value:
                    yield from self.walk(sub, value[name],
                                         child_path(path, name), value, name,
                                         name in names)
        elif isinstance(value, dict):
            for name, item in value.items():
                yield from self.walk(current.get("additionalProperties", {}),
                                     item, child_path(path, name), value, name)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from self.walk(current.get("items", {}), item,
                                     child_path(path, index), value, index)

    def mutations(self, body: dict, schema: dict) -> list:
        """Return (label, site, new value, expected error path) tuples.

        Each mutation changes one value, deletes one required field or
        renames one map key. The sites point into body, so apply at most
        one mutation per copy.
        """
        found = []
        for site in self.walk(schema, body, "$"):
            if site.parent is None:
                continue
            found += [(label, site, value, site.path)
                      for label, value in self.value_mutations(site)]
            if site.required:
                found.append(("missing", site, MISSING, site.path))
            found += self.key_mutations(site)
        return found

    def value_mutations(self, site: Site) -> list:
        """Return (label, new value) pairs that make the value at site invalid."""
        value = site.parent[site.key]
        schema = self.effective(site.schema, value)
        kinds = self.strategies.types(site.schema)
        found = [("wrong type", wrong) for wrong in WRONG_TYPES
                 if kinds and not type_allowed(kinds, wrong)]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema:
                found.append(("below minimum", schema["minimum"] - 1))
            if "maximum" in schema:
                found.append(("above maximum", schema["maximum"] + 1))
            elif schema.get("format") == "int32":
                found.append(("above int32", INT32_MAX + 1))
        if isinstance(value, str):
            found += self.string_mutations(schema)
        if isinstance(value, list):
            found += self.array_mutations(schema, value)
        if isinstance(value, dict) and schema.get("minProperties", 0) >= 1:
            found.append(("too few entries", {}))
        if "enum" in schema and isinstance(value, str):
            found.append(("not in enum", "not-a-choice"))
        return found

    @staticmethod
    def string_mutations(schema: dict) -> list:
        found = []
        if schema.get("minLength", 0) >= 1:
            found.append(("too short", ""))
        if "maxLength" in schema:
            found.append(("too long", "a" * (schema["maxLength"] + 1)))
        for bad in BAD_FORMATS.get(schema.get("format"), []):
            found.append(("bad format", bad))
        if "pattern" in schema:
            found += [("bad pattern", bad) for bad in BAD_STRINGS
                      if not re.fullmatch(schema["pattern"], bad)]
        return found

    @staticmethod
    def array_mutations(schema: dict, value: list) -> list:
        found = []
        if schema.get("minItems", 0) >= 1:
            found.append(("too few items", []))
        if "maxItems" in schema and value:
            found.append(("too many items", value * (schema["maxItems"] + 1)))
        for bad in BAD_FORMATS.get(schema.get("format"), []):
            found.append(("bad format", bad))
        return found

    def key_mutations(self, site: Site) -> list:
        value = site.parent[site.key]
        current = self.effective(site.schema, value)
        key_schema = current.get("propertyNames")
        if not isinstance(value, dict) or not value or key_schema is None:
            return []
        bad_keys = [key for key in BAD_STRINGS + BAD_FORMATS.get(
            key_schema.get("format"), []) if self.key_is_bad(key_schema, key)]
        return [("bad key", site, ("rename", key), child_path(site.path, key))
                for key in bad_keys if key not in value]

    @staticmethod
    def key_is_bad(key_schema: dict, key: str) -> bool:
        if not re.fullmatch(key_schema["pattern"], key):
            return True
        return key_schema.get("format") == "env-name" and (
            key == "PORT" or key.startswith("CRATE_"))


def apply_mutation(site: Site, new_value) -> None:
    """Apply one mutation of Mutator.mutations to the body its site points into."""
    if new_value is MISSING:
        del site.parent[site.key]
    elif isinstance(new_value, tuple) and new_value[0] == "rename":
        mapping = site.parent[site.key]
        mapping[new_value[1]] = mapping.pop(next(iter(mapping)))
    else:
        site.parent[site.key] = new_value
