"""The operator's settings from the env the chart renders: every value reaches a Default or a setting."""

from __future__ import annotations

import logging

import pytest

from dhad_operator.config import Settings, log_level


@pytest.mark.parametrize("text,level", [("info", "INFO"), ("INFO", "INFO"), ("Debug", "DEBUG"), ("warn", "WARNING"),
                                        ("warning", "WARNING"), (" error ", "ERROR"), ("", "INFO"), (None, "INFO")])
def test_log_level_is_accepted_in_any_case(text, level):
    assert log_level(text) == level
    logging.getLogger("dhad.test.config").setLevel(log_level(text))  # what basicConfig does with it: no ValueError


def test_the_charts_default_log_level_reaches_logging_without_the_old_crash():
    with pytest.raises(ValueError, match="Unknown level: 'info'"):  # what `python -m dhad_operator` did with logLevel: info
        logging.getLogger("dhad.test.config").setLevel("info")
    assert logging.getLevelName(log_level("info")) == logging.INFO


def test_unknown_log_level_names_what_is_accepted():
    with pytest.raises(ValueError, match="DHAD_LOG_LEVEL='loud': use one of debug, info, warning, error"):
        log_level("loud")


def test_every_chart_env_reaches_the_settings():
    settings = Settings.from_env({
        "DHAD_TRAINER_IMAGE": "registry.example.com/dhad/trainer:1.2", "DHAD_DEFAULT_STORAGE_ENDPOINT": "https://minio:9000",
        "DHAD_DEFAULT_STORAGE_SECRET": "platform-s3", "DHAD_ALLOW_PRIVILEGED_PODS": "true",
        "DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": '{"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}',
        "DHAD_METRICS_PORT": "9090", "DHAD_METRICS_ADDRESS": "10.0.0.7", "DHAD_LEADER_ELECTION": "true",
        "DHAD_LEASE_NAME": "dhad-lease", "DHAD_LEASE_DURATION_SECONDS": "20", "POD_NAMESPACE": "ops", "POD_NAME": "dhad-abc",
        "DHAD_LOG_LEVEL": "warning",
    })
    d = settings.defaults
    assert (d.trainer_image, d.storage_endpoint, d.storage_secret, d.allow_privileged) == (
        "registry.example.com/dhad/trainer:1.2", "https://minio:9000", "platform-s3", True)
    assert d.service_account_annotations == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
    assert (settings.metrics_port, settings.metrics_address, settings.leader_election) == (9090, "10.0.0.7", True)
    assert (settings.lease_name, settings.lease_seconds, settings.lease_namespace, settings.identity) == ("dhad-lease", 20, "ops", "dhad-abc")
    assert settings.log_level == "WARNING"


def test_empty_chart_values_mean_the_defaults():
    """The chart renders every env var, empty when its value is empty: empty means unset."""
    settings = Settings.from_env({"DHAD_DEFAULT_STORAGE_ENDPOINT": "", "DHAD_DEFAULT_STORAGE_SECRET": "",
                                  "DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": "", "DHAD_ALLOW_PRIVILEGED_PODS": "",
                                  "DHAD_METRICS_ADDRESS": "", "DHAD_TRAINER_IMAGE": ""})
    d = settings.defaults
    assert (d.storage_endpoint, d.storage_secret, d.service_account_annotations, d.allow_privileged) == (None, None, {}, False)
    assert settings.metrics_address == "0.0.0.0" and d.trainer_image == "ghcr.io/dhad/trainer:0.1.0"


def test_annotations_must_be_a_json_object_of_strings():
    with pytest.raises(ValueError, match="DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS must be a JSON object of strings"):
        Settings.from_env({"DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": '["a"]'})
