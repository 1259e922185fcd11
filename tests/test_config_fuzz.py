"""A fuzz of the value types in config.json and in profiles (issue 23): whatever a key holds, reading the file
gives a config or a one-line UserError, never another exception (a traceback) and never a silent conversion of a
string or a boolean into a count."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload_moe.errors import UserError
from offload_moe.models import from_hf_config
from offload_moe.models.public import public_config
from offload_moe.options import EngineOptions
from offload_moe.plan import merge_options
from offload_moe.profiles import ENGINE_KEYS, load_profile

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=6), st.lists(st.integers(-2, 4), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BASES = ("Qwen3-30B-A3B", "DeepSeek-V2-Lite", "gpt-oss-20b", "Phi-3.5-MoE-instruct")
COUNTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts_per_tok")


@settings(max_examples=150, deadline=None, derandomize=True,  # the same examples in every run: CI is not a lottery
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(BASES), key=st.data(), value=VALUES)
def test_a_config_value_of_any_type_is_read_or_refused_in_one_line(tmp_path, base, key, value):
    config = json.loads(public_config(base).read_text())
    name = key.draw(st.sampled_from(sorted(config)))
    config[name] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        from_hf_config(path)
    except UserError as e:
        assert "\n" not in str(e)
        return
    if name in COUNTS:  # a count taken: it was a whole number, and it is the config's
        assert not isinstance(value, bool | str) and float(value).is_integer()


@pytest.mark.parametrize("key,value", [("num_hidden_layers", True), ("hidden_size", "2048"), ("rope_theta", "abc"),
                                       ("rms_norm_eps", -1), ("num_experts_per_tok", 2.5)])
def test_the_reported_cases_are_refused(tmp_path, key, value):
    config = json.loads(public_config("Qwen3-30B-A3B").read_text()) | {key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=key):
        from_hf_config(path)


TOML = st.one_of(st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                 st.text(alphabet=st.characters(codec="ascii", exclude_characters='"\\\n\r'), max_size=6),
                 st.lists(st.integers(-2, 9), max_size=4))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return repr(v)


@settings(max_examples=150, deadline=None, derandomize=True,  # the same examples in every run: CI is not a lottery
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(ENGINE_KEYS) + ["budget.device", "budget.ram", "budget.device_reserve",
                                                  "hardware.h2d_bytes_per_s"]), value=TOML)
def test_a_profile_value_of_any_type_is_taken_or_refused_in_one_line(tmp_path, key, value):
    table, _, name = key.rpartition(".")
    path = tmp_path / "p.toml"
    path.write_text((f"[{table}]\n" if table else "") + f"{name} = {toml_value(value)}\n")
    try:
        merge_options(EngineOptions(), load_profile(str(path)), {})
    except UserError as e:
        assert "\n" not in str(e) and name in str(e)
