import pytest

from proxy.errors import BadCommandError
from proxy.settings import env_name, load_config_file, overlay, parse_go_bool


def test_env_names():
    assert env_name("auto-iam-authn") == "ALLOYDB_PROXY_AUTO_IAM_AUTHN"


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_true(text):
    assert parse_go_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_false(text):
    assert parse_go_bool(text) is False


@pytest.mark.parametrize("text", ["yes", "tRuE", "", "2"])
def test_go_bool_rejects(text):
    with pytest.raises(ValueError):
        parse_go_bool(text)


def test_env_beats_file_and_empty_env_is_unset():
    result = overlay(
        {"port": int, "address": str},
        environ={"ALLOYDB_PROXY_PORT": "7000", "ALLOYDB_PROXY_ADDRESS": ""},
        file_values={"port": "6000", "address": "0.0.0.0"},
    )
    assert result.values == {"port": 7000, "address": "0.0.0.0"}


def test_invalid_values_become_warnings():
    result = overlay({"port": int}, environ={"ALLOYDB_PROXY_PORT": "abc"}, file_values={})
    assert result.values == {}
    assert result.warnings[0].startswith(
        'Ignoring invalid value "abc" of environment variable ALLOYDB_PROXY_PORT'
    )


def test_instance_uris_env_then_file():
    env = {"ALLOYDB_PROXY_INSTANCE_URI_0": "a", "ALLOYDB_PROXY_INSTANCE_URI_2": "c"}
    assert overlay({}, environ=env, file_values={}).instances == ["a"]
    env = {"ALLOYDB_PROXY_INSTANCE_URI": "a", "ALLOYDB_PROXY_INSTANCE_URI_1": "b"}
    assert overlay({}, environ=env, file_values={"instance-uri": "x"}).instances == ["a", "b"]
    files = {"instance-uri": "x", "instance-uri-1": "y"}
    assert overlay({}, environ={}, file_values=files).instances == ["x", "y"]


def test_config_file_keys_are_case_insensitive_and_stringified(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"Port": 5555, "Auto-IAM-AuthN": true, "nested": {"x": 1}}')
    assert load_config_file(str(path)) == {"port": "5555", "auto-iam-authn": "true"}


def test_config_file_parse_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("port: [unclosed\n")
    with pytest.raises(BadCommandError, match=f"failed to load configuration from {path}"):
        load_config_file(str(path))
