"""Scenario data and the validation every entry point shares."""

import pytest

from usmlab.errors import UsageError
from usmlab.scenarios import (
    DEFAULT_PATHS,
    SCENARIOS,
    check_url,
    get_scenario,
    parse_duration,
    parse_paths,
)


def test_seed_scenarios_carry_the_seed_parameters_and_goals():
    assert SCENARIOS["scenario1"].params.count == 10
    assert SCENARIOS["scenario1"].params.interval == 1.0
    assert SCENARIOS["scenario2"].params.count == 0
    assert SCENARIOS["scenario2"].params.interval == 0.5
    assert SCENARIOS["scenario3"].params.count == 100
    assert SCENARIOS["scenario3"].params.interval == 0.1
    assert SCENARIOS["scenario1"].goal == "Verify eBPF captures requests with correct PID"
    assert len(DEFAULT_PATHS) == 8


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("500ms", 0.5),
        ("0.1", 0.1),
        ("1m", 60.0),
        ("250us", 0.00025),
        (".5", 0.5),
        ("1m30s", 90.0),
        ("1h", 3600.0),
    ],
)
def test_durations_accept_go_style_and_plain_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "", "1d", "-1s", "1.2.3", "ms"])
def test_malformed_durations_are_usage_errors(text):
    with pytest.raises(UsageError) as err:
        parse_duration(text)
    assert "\n" not in str(err.value)


def test_overrides_apply_and_none_keeps_defaults():
    params = get_scenario("scenario3").with_overrides(count=5, interval=None)
    assert params.count == 5
    assert params.interval == 0.1


@pytest.mark.parametrize(
    "overrides",
    [
        {"count": -1},
        {"interval": -0.5},
        {"concurrency": 0},
        {"connection": "sometimes"},
        {"url": "http://127.0.0.1:8443"},
        {"url": "notaurl"},
        {"url": "https://127.0.0.1:notaport"},
        {"duration": 0},
        {"paths": ("no-slash",)},
    ],
)
def test_bad_overrides_are_rejected(overrides):
    with pytest.raises(UsageError):
        get_scenario("scenario1").with_overrides(**overrides)


def test_unknown_scenario_names_the_known_ones():
    with pytest.raises(UsageError, match="scenario1"):
        get_scenario("scenario9")


@pytest.mark.parametrize("url", ["https://10.0.0.1:8443", "https://example.com", "https://[::2]/"])
def test_only_loopback_urls_are_allowed(url):
    with pytest.raises(UsageError, match="loopback"):
        check_url(url)


def test_loopback_forms_are_allowed():
    assert check_url("https://127.0.0.2:9443") == ("127.0.0.2", 9443)
    assert check_url("https://[::1]:8443/x") == ("::1", 8443)
    assert check_url("https://localhost") == ("localhost", 443)


def test_client_args_round_trip_the_parameters():
    params = get_scenario("scenario2").with_overrides(
        duration=3.0, paths=parse_paths("/api/v1/namespaces, /api/v1/persistentvolumes")
    )
    args = params.client_args(["https://127.0.0.1:8443", "https://127.0.0.1:9443"])
    assert args[args.index("-count") + 1] == "0"
    assert args[args.index("--duration") + 1] == "3.0"
    assert args[args.index("--paths") + 1] == "/api/v1/namespaces,/api/v1/persistentvolumes"
    assert args[args.index("-url") + 1] == "https://127.0.0.1:8443,https://127.0.0.1:9443"


def test_go_only_options_need_the_go_client():
    with pytest.raises(UsageError, match="--skip-close: only the Go client"):
        get_scenario("scenario1").with_overrides(skip_close=0.2)
    params = get_scenario("scenario1").with_overrides(client="go", skip_close=0.2, gc_every=5)
    assert "--skip-close" in params.client_args(["https://127.0.0.1:8443"])


def test_every_scenario_states_its_hypothesis_and_is_valid():
    for scenario in SCENARIOS.values():
        assert scenario.goal and scenario.description
        scenario.params.validate()
    assert SCENARIOS["churn"].params.ports == (8443, 9443)
    assert SCENARIOS["churn"].params.client == "go"


def test_a_sweep_names_a_parameter_and_converts_each_value():
    from usmlab.run.sweep import parse_sweep

    assert parse_sweep("skip-close=0,0.1,1") == ("skip_close", [0.0, 0.1, 1.0])
    assert parse_sweep("gc_every=0,10") == ("gc_every", [0, 10])
    assert parse_sweep("close_nothing=false,true") == ("close_nothing", [False, True])
    assert parse_sweep("interval=10ms,1s") == ("interval", [0.01, 1.0])


@pytest.mark.parametrize("text", ["nope=1,2", "skip_close", "skip_close=0.1", "gc_every=a,b"])
def test_a_bad_sweep_is_a_usage_error(text):
    from usmlab.run.sweep import parse_sweep

    with pytest.raises(UsageError):
        parse_sweep(text)


def test_every_setting_of_a_sweep_is_checked_before_any_run():
    from usmlab.run.sweep import sweep_params

    params = get_scenario("address-reuse").params
    with pytest.raises(UsageError, match="skip-close must be between 0 and 1"):
        sweep_params(params, "skip_close", [0.0, 2.0])
