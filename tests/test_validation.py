import crate_operator as co

import copy
import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import openapi_bodies
from openapi_bodies import (BAD_FORMATS, BOUND_FORMATS, FORMAT_STRATEGIES,
                            METHODS, MISSING, RULE_ADJUSTMENTS,
                            DocumentStrategies, Mutator, apply_mutation,
                            iter_refs, iter_schemas, operations,
                            pointer_target)

# === Fixtures: one valid body per endpoint ===

URL = "https://platform.example.test/callbacks/7"
ASSET = "https://cdn.example.test/releases/app-1.2.3.tar.gz"

COMMON = {
    "app_id": 7,
    "callback_url": URL,
    "deployment_id": 42,
    "deployment_strategy": "bluegreen",
    "domain": "shop.example.test",
    "environment_id": 3,
    "team_id": "team-1",
}
SLOTS = {"blue": {"port": 18101}, "green": {"port": 18102}}
INSTANCES = {"inst-1": {"port": 18101}, "inst-2": {"port": 18102}}
TARGET = {
    "app_id": 7,
    "callback_url": URL,
    "domain": "shop.example.test",
    "environment_id": 3,
    "instance_id": "inst-1",
    "team_id": "team-1",
}
BODIES = {
    "deploy_binary_slots": dict(
        COMMON, asset_url=ASSET, env_vars={"APP_ENV": "prod"}, slots=SLOTS,
        target_version="1.2.3"),
    "deploy_docker_slots": dict(
        COMMON, env_vars={"APP_ENV": "prod"},
        image="registry.example.test/team/app", image_tag="v1.2.3",
        slots=SLOTS, target_version="1.2.3"),
    "deploy_binary_instances": dict(
        COMMON, deployment_strategy="immediate", asset_url=ASSET,
        env_vars={"APP_ENV": "prod"}, instances=INSTANCES),
    "deploy_docker_instances": dict(
        COMMON, deployment_strategy="immediate",
        image="registry.example.test/team/app", image_tag="v1.2.3",
        instances=INSTANCES),
    "delete": dict(
        {key: COMMON[key] for key in (
            "app_id", "callback_url", "domain", "environment_id", "team_id")},
        instance_ids=["blue", "green"]),
    "domain_update": {
        "app_id": 7,
        "environment_id": 3,
        "new_domain": "new.example.test",
        "old_domain": "old.example.test",
        "server_id": "server-1",
        "team_id": "team-1",
    },
    "start": TARGET,
    "stop": TARGET,
    "restart": TARGET,
}
DEPLOYS = [name for name in BODIES if name.startswith("deploy_")]
SLOT_DEPLOYS = ["deploy_binary_slots", "deploy_docker_slots"]
INSTANCE_DEPLOYS = ["deploy_binary_instances", "deploy_docker_instances"]
DOCKER_DEPLOYS = ["deploy_docker_slots", "deploy_docker_instances"]
BINARY_DEPLOYS = ["deploy_binary_slots", "deploy_binary_instances"]


def valid_body(endpoint):
    return copy.deepcopy(BODIES[endpoint])


def path_of(keys):
    """Build the error path of keys the way the validator documents it."""
    path = "$"
    for key in keys:
        if isinstance(key, int):
            path += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            path += "." + key
        else:
            path += "[" + json.dumps(key) + "]"
    return path


def set_field(body, keys, value):
    target = body
    for key in keys[:-1]:
        target = target[key]
    if value is MISSING:
        target.pop(keys[-1], None)
    else:
        target[keys[-1]] = value
    return body


def validate_with(endpoint, keys, value, **changes):
    """Validate the fixture of endpoint with one field set to value."""
    body = set_field(valid_body(endpoint), keys, value)
    body.update(changes)
    return co.validate_body(endpoint, body)


def reasons(result):
    return {error["field"]: error["reason"] for error in result.errors}


def assert_valid(result):
    assert result.errors == []
    assert result.value is not None


def assert_invalid_at(result, path):
    assert path in reasons(result), result.errors
    assert result.value is None


def cases(fields, values):
    return [(*field, value) for field, value in itertools.product(fields,
                                                                  values)]


# === Fixtures and basics ===


@pytest.mark.parametrize("endpoint", sorted(BODIES))
def test_fixture_body_valid(endpoint):
    assert_valid(co.validate_body(endpoint, valid_body(endpoint)))


@pytest.mark.parametrize("body", [[], "x", None, 5, True, [{"app_id": 1}]])
def test_non_object_body_one_error(body):
    result = co.validate_body("start", body)
    assert len(result.errors) == 1
    assert result.errors[0]["field"] == "$"
    assert "JSON object" in result.errors[0]["reason"]
    assert result.value is None


def test_unknown_endpoint_raises():
    with pytest.raises(ValueError):
        co.validate_body("nope", {})
    with pytest.raises(ValueError):
        co.validate_body("status_legacy", {})
    with pytest.raises(ValueError):
        co.validate_path_param("start", "1")


def test_result_ok_property():
    assert co.validate_body("start", valid_body("start")).ok
    assert not co.validate_body("start", {}).ok


# === int32 ids ===

INT32_FIELDS = [
    ("deploy_binary_slots", "app_id"),
    ("deploy_binary_slots", "deployment_id"),
    ("deploy_binary_slots", "environment_id"),
    ("deploy_docker_instances", "app_id"),
    ("delete", "app_id"),
    ("domain_update", "app_id"),
    ("domain_update", "environment_id"),
    ("start", "environment_id"),
]


@pytest.mark.parametrize("endpoint,field,value",
                         cases(INT32_FIELDS, [0, 1, 2147483647]))
def test_int32_accepts(endpoint, field, value):
    result = validate_with(endpoint, [field], value)
    assert_valid(result)
    assert result.value[field] == value


@pytest.mark.parametrize("endpoint,field,value", cases(INT32_FIELDS, [
    -1, -2147483648, 2147483648, 2 ** 63, True, False, 1.0, 1.5, "1", None,
    [1], {"id": 1}, float("nan"),
]))
def test_int32_rejects(endpoint, field, value):
    assert_invalid_at(validate_with(endpoint, [field], value), "$." + field)


@pytest.mark.parametrize("endpoint,field", INT32_FIELDS)
def test_int32_missing_is_required(endpoint, field):
    result = validate_with(endpoint, [field], MISSING)
    assert reasons(result)["$." + field] == "is required"


def test_bool_reason_names_type():
    result = validate_with("start", ["app_id"], True)
    assert reasons(result)["$.app_id"] == "must be an integer, got boolean"


def test_whole_float_reason():
    result = validate_with("start", ["app_id"], 1.0)
    assert "decimal point" in reasons(result)["$.app_id"]


def test_count_reason_singular():
    result = validate_with("delete", ["instance_ids"], [])
    assert reasons(result)["$.instance_ids"] == "must have at least 1 item"


def test_negative_id_reason():
    result = validate_with("start", ["app_id"], -1)
    assert reasons(result)["$.app_id"] == "must be at least 0"


# === team_id and server_id ===

TEXT_ID_FIELDS = [
    ("deploy_binary_slots", "team_id"),
    ("delete", "team_id"),
    ("domain_update", "team_id"),
    ("domain_update", "server_id"),
]


@pytest.mark.parametrize("endpoint,field,value", cases(
    TEXT_ID_FIELDS, ["t", "x" * 128, "Team Ü 1", "a b", "42"]))
def test_text_id_accepts(endpoint, field, value):
    assert_valid(validate_with(endpoint, [field], value))


@pytest.mark.parametrize("endpoint,field,value", cases(TEXT_ID_FIELDS, [
    "", "x" * 129, "a\nb", "a\x00b", "a\x7fb", "a\x85b", "a\tb", "\ud800",
    5, None, ["t"],
]))
def test_text_id_rejects(endpoint, field, value):
    assert_invalid_at(validate_with(endpoint, [field], value), "$." + field)


# === URLs ===

URL_FIELDS = [
    ("deploy_binary_slots", "asset_url"),
    ("deploy_binary_instances", "asset_url"),
    ("deploy_docker_slots", "callback_url"),
    ("delete", "callback_url"),
    ("restart", "callback_url"),
]


@pytest.mark.parametrize("endpoint,field,value", cases(URL_FIELDS, [
    "https://cdn.example.test/app.tar.gz",
    "http://127.0.0.1:8080/hook?attempt=1#frag",
    "https://[::1]:8443/a",
    "HTTPS://Example.TEST/",
    "https://cdn.example.test/a%20b",
    "https://x.example.test/" + "a" * (2048 - 23),
]))
def test_url_accepts(endpoint, field, value):
    assert_valid(validate_with(endpoint, [field], value))


@pytest.mark.parametrize("endpoint,field,value", cases(URL_FIELDS, [
    "ftp://x.example.test/a", "file:///etc/passwd",
    "https://user:pw@x.example.test/", "https://user@x.example.test/",
    "https:///path", "//x.example.test/a", "x.example.test/a",
    "https://x.example.test/a b", "https://x.example.test/\n",
    "https://x.example.test/\x00", "https://exämple.test/",
    "https://x.example.test\\@evil.example.test/",
    "https://x.example.test:99999/", "https://x.example.test:0/",
    "https://x.example.test:port/", "http://[::1/",
    "https://x.example.test/" + "a" * 2048, "", 5, None,
]))
def test_url_rejects(endpoint, field, value):
    assert_invalid_at(validate_with(endpoint, [field], value), "$." + field)


def test_url_credentials_reason():
    result = validate_with("start", ["callback_url"], "https://u:p@x.test/")
    assert "credentials" in reasons(result)["$.callback_url"]
    assert "u:p" not in json.dumps(result.errors)


# === Domains ===

DOMAIN_FIELDS = [
    ("deploy_binary_slots", "domain"),
    ("deploy_docker_instances", "domain"),
    ("delete", "domain"),
    ("stop", "domain"),
    ("domain_update", "new_domain"),
    ("domain_update", "old_domain"),
]
DOMAIN_NORMAL_FORMS = [
    ("SHOP.Example.Test.", "shop.example.test"),
    ("shop.example.test", "shop.example.test"),
    ("shop.example.test.", "shop.example.test"),
    ("xn--80ak6aa92e.example.test", "xn--80ak6aa92e.example.test"),
    ("a.b", "a.b"),
    ("1a.example.test", "1a.example.test"),
    ("a-b--c.example.t1", "a-b--c.example.t1"),
    ("x" * 63 + ".test", "x" * 63 + ".test"),
    (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + [
        "b" * 61])),
]
BAD_DOMAINS = [
    "https://x.example.test/", "x.example.test:8080", "bad domain", "",
    "\u0435xample.test", "\u212aexample.test", "shop.example.tést",
    "localhost", "-a.example.test", "a-.example.test", "a..example.test",
    "x.example.test..", ".example.test", "a_b.example.test",
    "*.example.test", "1.2.3.4", "x" * 64 + ".test", " x.example.test",
    "x.example.test ", "x.example.test/", "x.example.test\n",
    ".".join(["a" * 63] * 3 + ["b" * 62]), "example.123", ".", 5, None,
]


@pytest.mark.parametrize("endpoint,field,pair",
                         cases(DOMAIN_FIELDS, DOMAIN_NORMAL_FORMS))
def test_domain_cleaned_to_normal_form(endpoint, field, pair):
    raw, normal = pair
    result = validate_with(endpoint, [field], raw)
    assert_valid(result)
    assert result.value[field] == normal


@pytest.mark.parametrize("endpoint,field,value",
                         cases(DOMAIN_FIELDS, BAD_DOMAINS))
def test_domain_rejects(endpoint, field, value):
    assert_invalid_at(validate_with(endpoint, [field], value), "$." + field)


@pytest.mark.parametrize("raw,normal", DOMAIN_NORMAL_FORMS)
def test_domain_error_none_for_valid(raw, normal):
    assert co.domain_error(raw) is None
    assert co.normalise_domain(raw) == normal


@pytest.mark.parametrize("value", BAD_DOMAINS)
def test_domain_error_reason(value):
    assert isinstance(co.domain_error(value), str)


def test_normalise_domain_only_ascii():
    assert co.normalise_domain("\u212a.TEST") == "\u212a.test"
    assert co.normalise_domain("x.test..") == "x.test."


def test_domain_reasons_name_problem():
    assert "scheme" in co.domain_error("https://x.example.test/")
    assert "port" in co.domain_error("x.example.test:8080")
    assert "whitespace" in co.domain_error("bad domain")
    assert "empty" in co.domain_error("")
    assert "ASCII" in co.domain_error("\u0435xample.test")
    assert "IP address" in co.domain_error("1.2.3.4")


# === deployment_strategy ===


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", ["immediate", "bluegreen", "canary"])
def test_strategy_accepts(endpoint, value):
    assert_valid(validate_with(endpoint, ["deployment_strategy"], value))


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", [
    "rolling", "", "Immediate", "blue-green", None, 1, ["canary"]])
def test_strategy_rejects(endpoint, value):
    result = validate_with(endpoint, ["deployment_strategy"], value)
    assert_invalid_at(result, "$.deployment_strategy")


# === Instance ids and slot names ===

GOOD_IDS = ["blue", "a", "0", "A.b_c-1", "x" * 63, "inst-1"]
BAD_IDS = ["", "-a", ".a", "_a", "a/b", "a b", "x" * 64, "a:b", "ü",
           "a@b", "..", "a\n"]


@pytest.mark.parametrize("endpoint,name", cases(
    [(e,) for e in SLOT_DEPLOYS + INSTANCE_DEPLOYS], GOOD_IDS))
def test_map_key_accepts(endpoint, name):
    field = "slots" if endpoint in SLOT_DEPLOYS else "instances"
    result = validate_with(endpoint, [field], {name: {"port": 18101}},
                           deployment_strategy="immediate")
    assert_valid(result)
    assert list(result.value[field]) == [name]


@pytest.mark.parametrize("endpoint,name", cases(
    [(e,) for e in SLOT_DEPLOYS + INSTANCE_DEPLOYS], BAD_IDS))
def test_map_key_rejects(endpoint, name):
    field = "slots" if endpoint in SLOT_DEPLOYS else "instances"
    result = validate_with(endpoint, [field], {name: {"port": 18101}},
                           deployment_strategy="immediate")
    assert_invalid_at(result, path_of([field, name]))
    assert reasons(result)[path_of([field, name])].startswith(
        ("slot name", "instance id"))


@pytest.mark.parametrize("endpoint", ["start", "stop", "restart"])
@pytest.mark.parametrize("value", GOOD_IDS)
def test_instance_id_accepts(endpoint, value):
    assert_valid(validate_with(endpoint, ["instance_id"], value))


@pytest.mark.parametrize("endpoint", ["start", "stop", "restart"])
@pytest.mark.parametrize("value", BAD_IDS + [None, 5, MISSING])
def test_instance_id_rejects(endpoint, value):
    result = validate_with(endpoint, ["instance_id"], value)
    assert_invalid_at(result, "$.instance_id")


# === target_version ===

GOOD_VERSIONS = ["1.2.3", "v1.2.3+build.5", "2024-01-01_rc1", "x" * 128, "7"]
BAD_VERSIONS = ["", "-1", "+1", ".1", "1 2", "x" * 129, "1/2", "1:2", "ü",
                5]


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", GOOD_VERSIONS)
def test_target_version_accepts(endpoint, value):
    result = validate_with(endpoint, ["target_version"], value)
    assert_valid(result)
    assert result.value["target_version"] == value


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", BAD_VERSIONS)
def test_target_version_rejects(endpoint, value):
    result = validate_with(endpoint, ["target_version"], value)
    assert_invalid_at(result, "$.target_version")


@pytest.mark.parametrize("endpoint", SLOT_DEPLOYS)
@pytest.mark.parametrize("value", [None, MISSING])
def test_target_version_required_in_slots(endpoint, value):
    result = validate_with(endpoint, ["target_version"], value)
    assert_invalid_at(result, "$.target_version")


@pytest.mark.parametrize("endpoint", INSTANCE_DEPLOYS)
@pytest.mark.parametrize("value", [None, MISSING])
def test_target_version_optional_in_instances(endpoint, value):
    result = validate_with(endpoint, ["target_version"], value)
    assert_valid(result)
    assert result.value["target_version"] is None


# === Ports, slot and instance counts ===

PORT_PATHS = [
    ("deploy_binary_slots", ("slots", "blue", "port")),
    ("deploy_docker_slots", ("slots", "green", "port")),
    ("deploy_binary_instances", ("instances", "inst-1", "port")),
    ("deploy_docker_instances", ("instances", "inst-2", "port")),
]


@pytest.mark.parametrize("endpoint,keys,value",
                         cases(PORT_PATHS, [1024, 30000, 65535]))
def test_port_accepts(endpoint, keys, value):
    assert_valid(validate_with(endpoint, list(keys), value))


@pytest.mark.parametrize("endpoint,keys,value", cases(PORT_PATHS, [
    1023, 80, 0, -1, 65536, 2 ** 40, True, 18101.0, "18103", None, MISSING,
]))
def test_port_rejects(endpoint, keys, value):
    result = validate_with(endpoint, list(keys), value)
    assert_invalid_at(result, path_of(keys))


def test_port_missing_is_required():
    result = validate_with("deploy_binary_slots", ["slots", "blue", "port"],
                           MISSING)
    assert reasons(result) == {"$.slots.blue.port": "is required"}


@pytest.mark.parametrize("endpoint", SLOT_DEPLOYS)
def test_duplicate_slot_ports_rejected(endpoint):
    result = validate_with(endpoint, ["slots", "green", "port"], 18101)
    assert_invalid_at(result, "$.slots.green.port")
    assert "$.slots.blue.port" in reasons(result)["$.slots.green.port"]


@pytest.mark.parametrize("endpoint", INSTANCE_DEPLOYS)
def test_duplicate_instance_ports_rejected(endpoint):
    result = validate_with(endpoint, ["instances", "inst-2", "port"], 18101)
    assert_invalid_at(result, '$.instances["inst-2"].port')


@pytest.mark.parametrize("endpoint", SLOT_DEPLOYS)
@pytest.mark.parametrize("count", [0, 3])
def test_slot_count_limits(endpoint, count):
    slots = {f"s{i}": {"port": 20000 + i} for i in range(count)}
    result = validate_with(endpoint, ["slots"], slots,
                           deployment_strategy="immediate")
    assert_invalid_at(result, "$.slots")


@pytest.mark.parametrize("endpoint", INSTANCE_DEPLOYS)
@pytest.mark.parametrize("count,ok", [(0, False), (1, True), (64, True),
                                      (65, False)])
def test_instance_count_limits(endpoint, count, ok):
    instances = {f"i{i}": {"port": 20000 + i} for i in range(count)}
    result = validate_with(endpoint, ["instances"], instances)
    if ok:
        assert_valid(result)
    else:
        assert_invalid_at(result, "$.instances")


@pytest.mark.parametrize("endpoint", SLOT_DEPLOYS)
@pytest.mark.parametrize("strategy", ["bluegreen", "canary"])
def test_two_slot_strategy_needs_two_slots(endpoint, strategy):
    result = validate_with(endpoint, ["slots"], {"blue": {"port": 18101}},
                           deployment_strategy=strategy)
    assert_invalid_at(result, "$.deployment_strategy")
    assert "exactly 2 slots" in reasons(result)["$.deployment_strategy"]


@pytest.mark.parametrize("endpoint", SLOT_DEPLOYS)
def test_immediate_accepts_one_slot(endpoint):
    result = validate_with(endpoint, ["slots"], {"blue": {"port": 18101}},
                           deployment_strategy="immediate")
    assert_valid(result)


@pytest.mark.parametrize("endpoint", INSTANCE_DEPLOYS)
def test_bluegreen_instances_any_count(endpoint):
    result = validate_with(endpoint, ["instances"], {"a": {"port": 18101}},
                           deployment_strategy="bluegreen")
    assert_valid(result)


# === env_vars ===

ENV_ENDPOINTS = ["deploy_binary_slots", "deploy_docker_slots",
                 "deploy_binary_instances", "deploy_docker_instances"]
GOOD_ENV_NAMES = ["A", "_", "_x1", "port", "CRATEX", "APP_CRATE_X",
                  "a" * 200, "Port"]
BAD_ENV_NAMES = ["BAD KEY", "1X", "A=B", "", "X-Y", "X.Y", "ÄB", "A\nB",
                 "PORT", "CRATE_TOKEN", "CRATE_"]
GOOD_ENV_VALUES = [
    "with spaces", "a=b", "", "line1\nline2\n",
    "-----BEGIN KEY-----\nMIIB\n-----END KEY-----\n", "50%", "(uid=%s)",
    "a%20b", "tab\there", "back\\slash\\", 'quo"te', "it's", "ü€", "$HOME",
    "x" * 32768,
]
BAD_ENV_VALUES = ["a\x00b", 5, None, True, ["x"], {"x": "y"}, "x" * 32769,
                  "\udc80"]


@pytest.mark.parametrize("endpoint,name", cases(
    [(e,) for e in ENV_ENDPOINTS], GOOD_ENV_NAMES))
def test_env_name_accepts(endpoint, name):
    result = validate_with(endpoint, ["env_vars"], {name: "v"})
    assert_valid(result)
    assert result.value["env_vars"] == {name: "v"}


@pytest.mark.parametrize("endpoint,name", cases(
    [(e,) for e in ENV_ENDPOINTS], BAD_ENV_NAMES))
def test_env_name_rejects(endpoint, name):
    result = validate_with(endpoint, ["env_vars"], {name: "v", "OK": "v"})
    assert_invalid_at(result, path_of(["env_vars", name]))
    assert reasons(result)[path_of(["env_vars", name])].startswith(
        "variable name")


def test_env_reserved_reason():
    result = validate_with("deploy_binary_slots", ["env_vars"], {"PORT": "1"})
    assert "reserved" in reasons(result)["$.env_vars.PORT"]


def test_env_bad_key_path_quoted():
    result = validate_with("deploy_binary_slots", ["env_vars"],
                           {"BAD KEY": "v", "": "v", "A=B": "v"})
    assert set(reasons(result)) == {
        '$.env_vars["BAD KEY"]', '$.env_vars[""]', '$.env_vars["A=B"]'}


@pytest.mark.parametrize("endpoint,value", cases(
    [(e,) for e in ENV_ENDPOINTS], GOOD_ENV_VALUES))
def test_env_value_accepts(endpoint, value):
    result = validate_with(endpoint, ["env_vars"], {"KEY": value})
    assert_valid(result)
    assert result.value["env_vars"]["KEY"] == value


@pytest.mark.parametrize("endpoint,value", cases(
    [(e,) for e in ENV_ENDPOINTS], BAD_ENV_VALUES))
def test_env_value_rejects(endpoint, value):
    result = validate_with(endpoint, ["env_vars"], {"KEY": value})
    assert_invalid_at(result, "$.env_vars.KEY")


def test_env_value_never_echoed():
    result = validate_with("deploy_binary_slots", ["env_vars"],
                           {"SECRET": "hunter2\x00"})
    assert "hunter2" not in json.dumps(result.errors)


@pytest.mark.parametrize("count,ok", [(256, True), (257, False)])
def test_env_count_limit(count, ok):
    env = {f"V{i}": "x" for i in range(count)}
    result = validate_with("deploy_binary_slots", ["env_vars"], env)
    if ok:
        assert_valid(result)
    else:
        assert_invalid_at(result, "$.env_vars")


def test_env_total_size_limit():
    env = {f"V{i}": "x" * 32000 for i in range(9)}
    result = validate_with("deploy_binary_slots", ["env_vars"], env)
    assert reasons(result).keys() == {"$.env_vars"}
    assert "bytes" in reasons(result)["$.env_vars"]


def test_env_total_counts_utf8_bytes():
    # 131072 characters in total, but 256 KiB of UTF-8 before the names count.
    env = {f"V{i}": "é" * 16384 for i in range(8)}
    result = validate_with("deploy_binary_slots", ["env_vars"], env)
    assert_invalid_at(result, "$.env_vars")


@pytest.mark.parametrize("endpoint", ENV_ENDPOINTS)
@pytest.mark.parametrize("value", [[], "A=B", 5])
def test_env_not_object_rejected(endpoint, value):
    assert_invalid_at(validate_with(endpoint, ["env_vars"], value),
                      "$.env_vars")


@pytest.mark.parametrize("endpoint", ENV_ENDPOINTS[:3])
@pytest.mark.parametrize("value", [None, MISSING])
def test_env_required_except_docker_instances(endpoint, value):
    assert_invalid_at(validate_with(endpoint, ["env_vars"], value),
                      "$.env_vars")


@pytest.mark.parametrize("value", [None, MISSING])
def test_env_optional_docker_instances(value):
    body = valid_body("deploy_docker_instances")
    if value is not MISSING:
        body["env_vars"] = value
    result = co.validate_body("deploy_docker_instances", body)
    assert_valid(result)
    assert result.value["env_vars"] == {}


# === health_check_path ===

GOOD_HEALTH_PATHS = ["/", "/healthz", "/health?full=1", "/a/b%20c",
                     "/" + "a" * 1023, None]
BAD_HEALTH_PATHS = ["healthz", "", "/a b", "/a\tb", "/a#b", "/a\nb", "/ü",
                    "/" + "a" * 1024, "http://x.test/healthz", 5, []]


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", GOOD_HEALTH_PATHS)
def test_health_path_accepts(endpoint, value):
    result = validate_with(endpoint, ["health_check_path"], value)
    assert_valid(result)
    assert result.value["health_check_path"] == value


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", BAD_HEALTH_PATHS)
def test_health_path_rejects(endpoint, value):
    result = validate_with(endpoint, ["health_check_path"], value)
    assert_invalid_at(result, "$.health_check_path")


# === image and image_tag ===

GOOD_IMAGES = [
    "app", "team/app", "registry.example.test/team/app",
    "registry.example.test:5000/team/app", "host:5000/team/app",
    "localhost/app", "localhost:5000/app", "127.0.0.1:5000/team/app",
    "a.b/c__d/e-f/g.h", "my-registry.example.test/x--y", "Registry.Test/app",
    "a" * 255,
]
BAD_IMAGES = [
    "team/app:1.0", "app:latest", "team/app@sha256:" + "a" * 64,
    "registry.example.test:5000/team/app:1.0", "host:5000", "App",
    "team/App", "team//app", "/app", "app/", "", "-app", "app-", "a" * 256,
    "registry.example.test:99999/app", "registry.example.test:/app",
    "reg_istry.example.test/app", "https://registry.example.test/app",
    "ümage", "app name", "a.-b/app", "999.1.1.1/app", 5, None,
]


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", GOOD_IMAGES)
def test_image_accepts(endpoint, value):
    result = validate_with(endpoint, ["image"], value)
    assert_valid(result)
    assert result.value["image"] == value


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", BAD_IMAGES)
def test_image_rejects(endpoint, value):
    assert_invalid_at(validate_with(endpoint, ["image"], value), "$.image")


@pytest.mark.parametrize("value", [
    "team/app:1.0", "app:latest", "team/app@sha256:" + "a" * 64, "host:5000"])
def test_image_with_tag_ambiguous(value):
    result = validate_with("deploy_docker_slots", ["image"], value)
    assert reasons(result)["$.image"].startswith(
        "ambiguous: put the tag in image_tag")


GOOD_TAGS = ["v1.2.3", "latest", "_x", "1", "x" * 128, "A.b-c_d",
             "sha256:" + "0123456789abcdef" * 4]
BAD_TAGS = ["", "-x", ".x", "x" * 129, "a:b", "sha256:" + "A" * 64,
            "sha256:abc", "a/b", "a b", "ü", None, 5]


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", GOOD_TAGS)
def test_image_tag_accepts(endpoint, value):
    assert_valid(validate_with(endpoint, ["image_tag"], value))


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", BAD_TAGS)
def test_image_tag_rejects(endpoint, value):
    assert_invalid_at(validate_with(endpoint, ["image_tag"], value),
                      "$.image_tag")


# === registry_credentials ===

GOOD_CREDENTIALS = [
    {"username": "u", "password": "p"},
    {"username": "u", "password": "p" * 4096},
    {"username": "u", "password": "p", "serveraddress": "registry.test"},
    {"username": "u", "password": "p", "serveraddress": "r.test:5000"},
    {"username": "u", "password": "p", "serveraddress": "localhost:5000"},
    {"username": "u", "password": "p", "serveraddress": "127.0.0.1:5000"},
    {"username": "u", "password": "p", "serveraddress": None},
]
BAD_CREDENTIALS = [
    ({"username": "", "password": "p"}, "username"),
    ({"password": "p"}, "username"),
    ({"username": 5, "password": "p"}, "username"),
    ({"username": "u", "password": ""}, "password"),
    ({"username": "u"}, "password"),
    ({"username": "u", "password": "p" * 4097}, "password"),
    ({"username": "u", "password": "p", "serveraddress": "https://r.test"},
     "serveraddress"),
    ({"username": "u", "password": "p", "serveraddress": "r.test/v2"},
     "serveraddress"),
    ({"username": "u", "password": "p", "serveraddress": "r.test:0"},
     "serveraddress"),
    ({"username": "u", "password": "p", "serveraddress": "r.test:abc"},
     "serveraddress"),
    ({"username": "u", "password": "p", "serveraddress": ""},
     "serveraddress"),
    ({"username": "u", "password": "p", "serveraddress": "r_t.test"},
     "serveraddress"),
]


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", GOOD_CREDENTIALS)
def test_credentials_accept(endpoint, value):
    result = validate_with(endpoint, ["registry_credentials"], value)
    assert_valid(result)
    expected = dict(value)
    expected.setdefault("serveraddress", None)
    assert result.value["registry_credentials"] == expected


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value,field", BAD_CREDENTIALS)
def test_credentials_reject(endpoint, value, field):
    result = validate_with(endpoint, ["registry_credentials"], value)
    assert_invalid_at(result, "$.registry_credentials." + field)


@pytest.mark.parametrize("value", ["user:pw", [], 5])
def test_credentials_not_object(value):
    result = validate_with("deploy_docker_slots", ["registry_credentials"],
                           value)
    assert_invalid_at(result, "$.registry_credentials")


def test_password_never_echoed():
    value = {"username": "u", "password": "hunter2" * 1000}
    result = validate_with("deploy_docker_slots", ["registry_credentials"],
                           value)
    assert_invalid_at(result, "$.registry_credentials.password")
    assert "hunter2" not in json.dumps(result.errors)


# === volumes ===

GOOD_VOLUMES = [
    [], ["data:/var/lib/app"], ["app-data:/data:ro"],
    ["./uploads:/srv/uploads:rw"], ["sub/dir:/x"], ["a/../b:/x"],
    ["cache:/x", "logs:/y"], ["data:/x/./y"], ["data/:/x"],
    [f"v{i}:/m{i}" for i in range(32)],
]
BAD_VOLUMES = [
    ["/etc:/x"], ["../up:/x"], ["a/../../x:/x"], ["./:/x"], ["data"],
    ["data:relative"], ["data:/a/../b"], ["data:/"], ["data:/."],
    ["data:/x:rx"], ["data:/x:ro:extra"], ["da,ta:/x"], ["data:/x,y"],
    ["data:/x\n"], ["-data:/x"], ["a b:/x"], [":/x"], ["data:"],
    ["data:/x", "other:/x"], ["data:/x", "other:/x/"], ["data:/x", "o://x"],
    [f"v{i}:/m{i}" for i in range(33)], [5], [None], "data:/x", {},
]


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", GOOD_VOLUMES)
def test_volumes_accept(endpoint, value):
    result = validate_with(endpoint, ["volumes"], value)
    assert_valid(result)
    assert result.value["volumes"] == value


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", BAD_VOLUMES)
def test_volumes_reject(endpoint, value):
    result = validate_with(endpoint, ["volumes"], value)
    assert result.value is None
    fields = reasons(result)
    assert fields, value
    assert all(field.startswith("$.volumes") for field in fields)


def test_volume_error_at_item():
    result = validate_with("deploy_docker_slots", ["volumes"],
                           ["ok:/x", "/etc:/y"])
    assert list(reasons(result)) == ["$.volumes[1]"]


# === docker_command ===

GOOD_COMMANDS = [["serve"], ["serve", "--port", "8080"], [""], ["x" * 4096],
                 ["a"] * 64, ["50%", "$HOME", "a b"], None]
BAD_COMMANDS = [[], ["a"] * 65, ["a\x00"], ["x" * 4097], [5], [None],
                "serve --port 8080", {"cmd": "x"}]


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", GOOD_COMMANDS)
def test_command_accepts(endpoint, value):
    result = validate_with(endpoint, ["docker_command"], value)
    assert_valid(result)
    assert result.value["docker_command"] == value


@pytest.mark.parametrize("endpoint", DOCKER_DEPLOYS)
@pytest.mark.parametrize("value", BAD_COMMANDS)
def test_command_rejects(endpoint, value):
    result = validate_with(endpoint, ["docker_command"], value)
    assert result.value is None
    assert all(field.startswith("$.docker_command")
               for field in reasons(result))


# === canary ===

GOOD_CANARY = [
    {"steps": [100], "pause_s": 0},
    {"steps": [10, 50, 100], "pause_s": 30},
    {"steps": [1, 2, 3, 4, 5, 6, 7, 8, 9, 100], "pause_s": 3600},
    {"steps": [25, 100], "pause_s": 1.5},
    None,
]
BAD_CANARY = [
    ({"steps": [], "pause_s": 1}, "$.canary.steps"),
    ({"steps": [50], "pause_s": 1}, "$.canary.steps"),
    ({"steps": [50, 10, 100], "pause_s": 1}, "$.canary.steps"),
    ({"steps": [10, 10, 100], "pause_s": 1}, "$.canary.steps"),
    ({"steps": [0, 100], "pause_s": 1}, "$.canary.steps[0]"),
    ({"steps": [10, 101], "pause_s": 1}, "$.canary.steps[1]"),
    ({"steps": list(range(1, 11)) + [100], "pause_s": 1}, "$.canary.steps"),
    ({"steps": [10.0, 100], "pause_s": 1}, "$.canary.steps[0]"),
    ({"steps": [True, 100], "pause_s": 1}, "$.canary.steps[0]"),
    ({"steps": "10,100", "pause_s": 1}, "$.canary.steps"),
    ({"steps": [100], "pause_s": -1}, "$.canary.pause_s"),
    ({"steps": [100], "pause_s": 3601}, "$.canary.pause_s"),
    ({"steps": [100], "pause_s": "30"}, "$.canary.pause_s"),
    ({"steps": [100], "pause_s": True}, "$.canary.pause_s"),
    ({"steps": [100], "pause_s": float("nan")}, "$.canary.pause_s"),
    ({"steps": [100], "pause_s": float("inf")}, "$.canary.pause_s"),
    ({"pause_s": 1}, "$.canary.steps"),
    ({"steps": [100]}, "$.canary.pause_s"),
    ([], "$.canary"),
    ("fast", "$.canary"),
]


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value", GOOD_CANARY)
def test_canary_accepts(endpoint, value):
    result = validate_with(endpoint, ["canary"], value,
                           deployment_strategy="canary")
    assert_valid(result)
    assert result.value["canary"] == value


@pytest.mark.parametrize("endpoint", DEPLOYS)
@pytest.mark.parametrize("value,path", BAD_CANARY)
def test_canary_rejects(endpoint, value, path):
    result = validate_with(endpoint, ["canary"], value,
                           deployment_strategy="canary")
    assert_invalid_at(result, path)


# === asset_sha256 ===


@pytest.mark.parametrize("endpoint", BINARY_DEPLOYS)
@pytest.mark.parametrize("value", ["0123456789abcdef" * 4, None])
def test_sha256_accepts(endpoint, value):
    result = validate_with(endpoint, ["asset_sha256"], value)
    assert_valid(result)
    assert result.value["asset_sha256"] == value


@pytest.mark.parametrize("endpoint", BINARY_DEPLOYS)
@pytest.mark.parametrize("value", ["A" * 64, "a" * 63, "a" * 65, "g" * 64,
                                   "", 5])
def test_sha256_rejects(endpoint, value):
    assert_invalid_at(validate_with(endpoint, ["asset_sha256"], value),
                      "$.asset_sha256")


# === delete ===


@pytest.mark.parametrize("value", [
    ["blue"], ["blue", "green"], [f"i{n}" for n in range(64)]])
def test_delete_ids_accept(value):
    result = validate_with("delete", ["instance_ids"], value)
    assert_valid(result)
    assert result.value["instance_ids"] == value


@pytest.mark.parametrize("value,path", [
    ([], "$.instance_ids"),
    ([f"i{n}" for n in range(65)], "$.instance_ids"),
    (["blue", "green", "blue"], "$.instance_ids[2]"),
    (["blue", "bad id"], "$.instance_ids[1]"),
    (["blue", 5], "$.instance_ids[1]"),
    ("blue", "$.instance_ids"),
    (None, "$.instance_ids"),
    (MISSING, "$.instance_ids"),
])
def test_delete_ids_reject(value, path):
    assert_invalid_at(validate_with("delete", ["instance_ids"], value), path)


@pytest.mark.parametrize("value,expected", [
    (MISSING, None), (None, None), (0, 0), (42, 42)])
def test_delete_deployment_id_optional(value, expected):
    body = dict(valid_body("delete"), deployment_id=1)
    result = co.validate_body("delete",
                              set_field(body, ["deployment_id"], value))
    assert_valid(result)
    assert result.value["deployment_id"] == expected


@pytest.mark.parametrize("value", [-1, 2147483648, "42", 4.2])
def test_delete_deployment_id_rejects(value):
    result = validate_with("delete", ["deployment_id"], value)
    assert_invalid_at(result, "$.deployment_id")


# === Cleaned value, defaults and unknown fields ===

OPTIONAL_DEFAULTS = {
    "deploy_binary_slots": {"health_check_path": None, "asset_sha256": None,
                            "canary": None, "limits": None},
    "deploy_docker_slots": {"docker_command": None, "health_check_path": None,
                            "registry_credentials": None, "volumes": [],
                            "canary": None, "limits": None},
    "deploy_binary_instances": {"health_check_path": None,
                                "asset_sha256": None, "canary": None, "limits": None,
                                "target_version": None},
    "deploy_docker_instances": {"docker_command": None, "env_vars": {},
                                "health_check_path": None,
                                "registry_credentials": None, "volumes": [],
                                "canary": None, "limits": None, "target_version": None},
    "delete": {"deployment_id": None},
    "domain_update": {},
    "start": {},
}


@pytest.mark.parametrize("endpoint", sorted(OPTIONAL_DEFAULTS))
def test_absent_optionals_get_defaults(endpoint):
    body = valid_body(endpoint)
    result = co.validate_body(endpoint, body)
    assert result.value == dict(body, **OPTIONAL_DEFAULTS[endpoint])


@pytest.mark.parametrize("endpoint", sorted(OPTIONAL_DEFAULTS))
def test_null_optionals_get_defaults(endpoint):
    body = valid_body(endpoint)
    body.update(dict.fromkeys(OPTIONAL_DEFAULTS[endpoint]))
    result = co.validate_body(endpoint, body)
    assert result.value == dict(body, **OPTIONAL_DEFAULTS[endpoint])


def test_cleaned_value_is_deep_copy():
    body = valid_body("deploy_docker_slots")
    body["volumes"] = ["data:/x"]
    result = co.validate_body("deploy_docker_slots", body)
    result.value["slots"]["blue"]["port"] = 1
    result.value["env_vars"]["NEW"] = "x"
    result.value["volumes"].append("y:/y")
    assert body == dict(valid_body("deploy_docker_slots"), volumes=["data:/x"])


def test_default_containers_not_shared():
    first = co.validate_body("deploy_docker_instances",
                             valid_body("deploy_docker_instances"))
    first.value["volumes"].append("x:/x")
    first.value["env_vars"]["X"] = "1"
    second = co.validate_body("deploy_docker_instances",
                              valid_body("deploy_docker_instances"))
    assert second.value["volumes"] == []
    assert second.value["env_vars"] == {}


def test_unknown_fields_ignored_and_dropped():
    body = valid_body("deploy_docker_slots")
    body["extra"] = 1
    body["bad key"] = {"deep": [1]}
    body["slots"]["blue"]["weight"] = 50
    body["registry_credentials"] = {"username": "u", "password": "p",
                                    "email": "u@example.test"}
    body["canary"] = {"steps": [100], "pause_s": 0, "jitter": True}
    result = co.validate_body("deploy_docker_slots", body)
    assert result.errors == []
    assert result.ignored == sorted([
        "$.extra", '$["bad key"]', "$.slots.blue.weight",
        "$.registry_credentials.email", "$.canary.jitter"])
    assert "extra" not in result.value
    assert "weight" not in result.value["slots"]["blue"]
    assert "email" not in result.value["registry_credentials"]


def test_ignored_listed_with_errors():
    body = dict(valid_body("start"), extra=1, app_id="x")
    result = co.validate_body("start", body)
    assert result.ignored == ["$.extra"]
    assert list(reasons(result)) == ["$.app_id"]


def test_env_keys_are_not_unknown_fields():
    result = validate_with("deploy_binary_slots", ["env_vars"],
                           {"ANY_NAME": "x"})
    assert result.ignored == []


# === Error reporting ===


def test_all_errors_reported_sorted():
    body = valid_body("deploy_binary_slots")
    body.update(app_id="x", domain="bad domain")
    body["env_vars"] = {"1X": "v"}
    body["slots"]["blue"]["port"] = 80
    del body["team_id"]
    result = co.validate_body("deploy_binary_slots", body)
    fields = [error["field"] for error in result.errors]
    assert fields == sorted([
        "$.app_id", "$.domain", '$.env_vars["1X"]', "$.slots.blue.port",
        "$.team_id"])
    assert reasons(result)["$.team_id"] == "is required"


def test_empty_body_lists_every_required_field():
    result = co.validate_body("deploy_docker_slots", {})
    required = co.ENDPOINTS["deploy_docker_slots"]["body"]["required"]
    assert [error["field"] for error in result.errors] == sorted(
        "$." + name for name in required)
    assert all(error["reason"] == "is required" for error in result.errors)


def test_error_entries_have_field_and_reason():
    result = co.validate_body("deploy_docker_slots", {"app_id": -5})
    for error in result.errors:
        assert set(error) == {"field", "reason"}
        assert isinstance(error["reason"], str)
        assert error["reason"]


def test_error_path_index_and_quotes():
    result = validate_with("delete", ["instance_ids"],
                           ["a", "b", "c", "bad id"])
    assert list(reasons(result)) == ["$.instance_ids[3]"]
    result = validate_with("deploy_binary_instances", ["instances"],
                           {"inst-1": {"port": 80}})
    assert list(reasons(result)) == ['$.instances["inst-1"].port']


def test_error_path_escapes_quotes():
    result = validate_with("deploy_binary_slots", ["env_vars"],
                           {'A"B': "v", "\n": "v"})
    assert set(reasons(result)) == {'$.env_vars["A\\"B"]',
                                    '$.env_vars["\\n"]'}


# === Path parameters ===


@pytest.mark.parametrize("raw,expected", [
    ("42", 42), ("0", 0), ("-5", -5), ("2147483647", 2147483647),
    ("-2147483648", -2147483648), ("007", 7)])
def test_instance_status_id_accepts(raw, expected):
    value, errors = co.validate_path_param("status_instance", raw)
    assert errors == []
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize("raw", [
    "2147483648", "-2147483649", "abc", "", "1.0", "+1", " 1", "1 ", "١",
    "0x10", "1" * 30, "-", "1e3"])
def test_instance_status_id_rejects(raw):
    value, errors = co.validate_path_param("status_instance", raw)
    assert value is None
    assert [error["field"] for error in errors] == ["deployment_id"]


@pytest.mark.parametrize("raw", ["abc-1.2_3", "42", "a" * 128, "A", "a..",
                                 "-1", "_"])
def test_legacy_status_id_accepts(raw):
    assert co.validate_path_param("status_legacy", raw) == (raw, [])


@pytest.mark.parametrize("raw", ["", "a/b", "a b", "a" * 129, "ü", "a\n",
                                 "a%2F", ".", "..", "...", ".hidden"])
def test_legacy_status_id_rejects(raw):
    value, errors = co.validate_path_param("status_legacy", raw)
    assert value is None
    assert [error["field"] for error in errors] == ["deployment_id"]


# === Schema tables ===


REQUEST_SCHEMAS = [endpoint["body"] for endpoint in co.ENDPOINTS.values()
                   if endpoint["body"] is not None]


def test_schemas_use_only_known_keywords():
    for root in co.SCHEMAS.values():
        for schema in iter_schemas(root):
            assert set(schema) <= co.SCHEMA_KEYWORDS, set(schema) - set(
                co.SCHEMA_KEYWORDS)


def test_request_formats_all_checked():
    for root in REQUEST_SCHEMAS:
        for schema in iter_schemas(root):
            if "format" in schema:
                assert schema["format"] in co.FORMAT_CHECKS


def test_patterns_anchored_and_compile():
    for root in co.SCHEMAS.values():
        for schema in iter_schemas(root):
            if "pattern" in schema:
                assert schema["pattern"].startswith("^")
                assert schema["pattern"].endswith("$")
                re.compile(schema["pattern"])


def test_endpoint_table_shape():
    for name, endpoint in co.ENDPOINTS.items():
        assert endpoint["method"] in ("GET", "POST"), name
        assert endpoint["path"].startswith("/"), name
        assert endpoint["summary"], name
        assert endpoint["responses"], name
        assert isinstance(endpoint["params"], list), name
        assert (endpoint["method"] == "POST") == (
            endpoint["body"] is not None), name


# === OpenAPI document: structure ===

DOC = co.openapi_document("1.2.3-test")
COMPONENTS = DOC["components"]["schemas"]
def test_openapi_header():
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["title"] == "crate-operator"
    assert DOC["info"]["version"] == "1.2.3-test"
    json.dumps(DOC)


def test_openapi_refs_resolve():
    refs = list(iter_refs(DOC))
    assert refs
    for ref in refs:
        assert isinstance(pointer_target(DOC, ref), dict)


def test_openapi_components_all_referenced():
    referenced = {ref.rsplit("/", 1)[1] for ref in iter_refs(DOC)}
    assert set(COMPONENTS) <= referenced, set(COMPONENTS) - referenced


def test_openapi_named_components_present():
    for name in ("InstancePort", "BinaryAppInstance",
                 "DockerRegistryCredentials", "CanarySettings",
                 "DeploymentStatus", "Accepted", "Error", "CallbackBody",
                 "DeploymentStrategy"):
        assert name in COMPONENTS


def test_openapi_paths_have_operations():
    for path, item in DOC["paths"].items():
        found = [method for method in METHODS if method in item]
        assert found, path
        for method in found:
            responses = item[method]["responses"]
            assert responses, (path, method)
            for code, response in responses.items():
                assert re.fullmatch(r"[1-5][0-9][0-9]|[1-5]XX", code)
                assert response["description"], (path, method, code)


def test_openapi_security_on_v1_only():
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert "security" not in DOC
    for path, _, operation in operations(DOC):
        if path.startswith("/v1/"):
            assert operation["security"] == [{"bearerAuth": []}], path
        else:
            assert "security" not in operation, path
    assert "/healthz" in DOC["paths"]
    assert "/v1/openapi.json" in DOC["paths"]


def test_openapi_operation_ids_unique():
    ids = [operation["operationId"] for _, _, operation in operations(DOC)]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(co.ENDPOINTS)


def test_openapi_path_parameters_declared():
    for path, _, operation in operations(DOC):
        names = re.findall(r"\{([^}]+)\}", path)
        declared = {param["name"]: param
                    for param in operation.get("parameters", [])
                    if param["in"] == "path"}
        assert set(names) == set(declared), path
        for param in declared.values():
            assert param["required"] is True


def test_openapi_request_bodies_json():
    for _, method, operation in operations(DOC):
        if method == "post":
            content = operation["requestBody"]["content"]
            assert list(content) == ["application/json"]
            assert operation["requestBody"]["required"] is True
        else:
            assert "requestBody" not in operation


@pytest.mark.parametrize("name", DEPLOYS + ["delete", "start", "stop",
                                            "restart"])
def test_openapi_job_responses(name):
    operation = DOC["paths"][co.ENDPOINTS[name]["path"]]["post"]
    codes = set(operation["responses"])
    assert {"202", "400", "401", "409", "413", "415"} <= codes
    accepted = operation["responses"]["202"]["content"]["application/json"]
    assert accepted["schema"] == {"$ref": "#/components/schemas/Accepted"}
    error = operation["responses"]["400"]["content"]["application/json"]
    assert error["schema"] == {"$ref": "#/components/schemas/Error"}


def test_openapi_domain_update_responses():
    operation = DOC["paths"]["/v1/app/domain/update"]["post"]
    assert {"200", "400", "401", "404", "409", "413", "415", "503"} <= set(
        operation["responses"])


def test_openapi_webhook_headers():
    webhook = DOC["webhooks"]["deploymentEvent"]["post"]
    headers = {param["name"]: param for param in webhook["parameters"]}
    assert set(headers) == {"X-Crate-Event", "X-Crate-Delivery",
                            "X-Crate-Signature"}
    assert all(param["in"] == "header" for param in headers.values())
    signature = headers["X-Crate-Signature"]
    assert "HMAC-SHA256" in signature["description"]
    assert re.fullmatch(signature["schema"]["pattern"], "sha256=" + "a" * 64)
    body = webhook["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CallbackBody"}


def test_openapi_extensions_marked():
    def field(request, name):
        return COMPONENTS[request]["properties"][name]

    marked = [
        field("BinarySlotsDeployRequest", "asset_sha256"),
        field("BinarySlotsDeployRequest", "canary"),
        field("DockerSlotsDeployRequest", "canary"),
        field("BinaryInstancesDeployRequest", "target_version"),
        field("DockerInstancesDeployRequest", "target_version"),
        COMPONENTS["CanarySettings"],
    ]
    for schema in marked:
        assert schema["x-crate-extension"] is True
        assert schema["description"]
    assert "x-crate-extension" not in field("BinarySlotsDeployRequest",
                                            "target_version")


def test_openapi_response_shapes():
    status = COMPONENTS["DeploymentStatus"]["properties"]
    assert status["state"]["enum"] == [
        "queued", "running", "succeeded", "failed", "rolled_back",
        "cancelled"]
    assert status["kind"]["enum"] == ["binary", "docker"]
    assert set(COMPONENTS["Accepted"]["required"]) == {
        "deployment_id", "app_id", "state", "status_url", "ignored_fields",
        "duplicate"}
    assert COMPONENTS["Error"]["required"] == ["error"]
    assert set(COMPONENTS["CallbackBody"]["required"]) == {
        "seq", "deployment_seq", "event", "deployment"}


def test_openapi_document_fresh_copy():
    first = co.openapi_document("1")
    first["components"]["schemas"]["Error"]["required"].append("x")
    assert co.openapi_document("1")["components"]["schemas"]["Error"][
        "required"] == ["error"]
    assert co.SCHEMAS["Error"]["required"] == ["error"]


# === Generator built from the OpenAPI document ===
# openapi_bodies builds the strategies and mutations from DOC only.

STRATEGIES = DocumentStrategies(DOC)
REQUESTS = STRATEGIES.requests
MUTATOR = Mutator(STRATEGIES)
resolve = STRATEGIES.resolve


def valid_bodies(operation_id):
    return openapi_bodies.valid_bodies(STRATEGIES, operation_id)


def test_generator_covers_document():
    assert set(REQUESTS) == {name for name, endpoint in co.ENDPOINTS.items()
                             if endpoint["body"] is not None}
    for schema in REQUESTS.values():
        assert set(schema.get("x-crate-rules", {})) <= set(RULE_ADJUSTMENTS)
        for sub in iter_schemas(schema):
            sub = resolve(sub)
            for inner in iter_schemas(sub):
                name = resolve(inner).get("format")
                assert name is None or name in FORMAT_STRATEGIES or (
                    name in BOUND_FORMATS), name


FAST = settings(max_examples=25, derandomize=True, deadline=None)


@pytest.mark.parametrize("operation_id", sorted(REQUESTS))
@FAST
@given(data=st.data())
def test_generated_bodies_valid(operation_id, data):
    body = data.draw(valid_bodies(operation_id))
    result = co.validate_body(operation_id, body)
    assert result.errors == []
    assert result.ignored == []
    again = co.validate_body(operation_id, result.value)
    assert again.errors == []
    assert again.value == result.value


# === Mutations: one field at a time ===

def mutation_failures(operation_id, body):
    """Apply each single-field mutation to a fresh copy of body in turn.

    Returns the mutations whose error list does not name the mutated field.
    """
    schema = REQUESTS[operation_id]
    failures = []
    for index in range(len(MUTATOR.mutations(copy.deepcopy(body), schema))):
        mutated = copy.deepcopy(body)
        label, site, new_value, expected = MUTATOR.mutations(mutated,
                                                             schema)[index]
        apply_mutation(site, new_value)
        result = co.validate_body(operation_id, mutated)
        fields = [error["field"] for error in result.errors]
        if expected not in fields or result.value is not None:
            failures.append((label, expected, new_value, result.errors))
    return failures


@pytest.mark.parametrize("operation_id", sorted(REQUESTS))
@settings(max_examples=12, derandomize=True, deadline=None)
@given(data=st.data())
def test_every_mutation_names_field(operation_id, data):
    body = data.draw(valid_bodies(operation_id))
    assert mutation_failures(operation_id, body) == []


@pytest.mark.parametrize("operation_id", sorted(BODIES))
def test_fixture_mutations_name_field(operation_id):
    assert mutation_failures(operation_id, valid_body(operation_id)) == []


def test_mutation_table_covers_formats():
    for schema in REQUESTS.values():
        for sub in iter_schemas(schema):
            for inner in iter_schemas(resolve(sub)):
                name = resolve(inner).get("format")
                assert name is None or name in BAD_FORMATS or (
                    name in BOUND_FORMATS), name


# === Path parameters generated from the document ===

PATH_PARAMS = {
    operation["operationId"]: operation["parameters"][0]["schema"]
    for _, _, operation in operations(DOC) if "parameters" in operation
}


@pytest.mark.parametrize("operation_id", sorted(PATH_PARAMS))
@FAST
@given(data=st.data())
def test_generated_path_params_valid(operation_id, data):
    schema = PATH_PARAMS[operation_id]
    value = data.draw(STRATEGIES.for_schema(schema))
    value, errors = co.validate_path_param(operation_id, str(value))
    assert errors == []
    assert type(value).__name__ == {"integer": "int", "string": "str"}[
        schema["type"]]
