"""Method configs: validation, JSON round-trip, registry."""

from __future__ import annotations

import pytest

import spotattn
from spotattn import DualTopP, MethodConfig, OracleConfig, TopK, make_config


def test_json_round_trip():
    config = OracleConfig(budget=DualTopP(0.8, sink=64), block_size=32, granularity="shared")
    again = MethodConfig.from_json(config.to_json())
    assert again == config and isinstance(again, OracleConfig)


def test_make_config_and_registry():
    assert {"dense", "oracle"} <= set(spotattn.available_methods())
    assert make_config("oracle", budget=TopK(256)).budget == TopK(256)
    with pytest.raises(ValueError, match="unknown method 'nope'; available methods"):
        make_config("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        make_config("oracle", bogus=1)


def test_config_validation_names_parameter():
    with pytest.raises(ValueError, match="OracleConfig.block_size must be one of"):
        OracleConfig(block_size=48)
    with pytest.raises(ValueError, match="OracleConfig.granularity must be one of"):
        OracleConfig(granularity="head")
    with pytest.raises(ValueError, match="OracleConfig.budget must be"):
        OracleConfig(budget=0.9)


def test_new_method_is_one_class_and_one_decorator():
    from dataclasses import dataclass

    from spotattn.methods.base import _REGISTRY, Method

    @dataclass
    class EverythingConfig(MethodConfig):
        pass

    @spotattn.register_method("test-everything")
    class Everything(Method):
        Config = EverythingConfig

    try:
        assert make_config("test-everything").method == "test-everything"
        with pytest.raises(ValueError, match="already registered"):
            spotattn.register_method("test-everything")(Everything)
    finally:
        _REGISTRY.pop("test-everything")


def test_compose_config_round_trip_and_validation():
    from spotattn import ComposeConfig

    config = ComposeConfig(prefill=OracleConfig(block_size=128), decode=OracleConfig(budget=TopK(512)))
    assert MethodConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="ComposeConfig.decode must be a"):
        ComposeConfig(decode="quest")
