"""TOML tables into dataclasses: every refused key, file and value is named in the error."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agentd.agent.prices import PricesUnusable, load_prices
from agentd.config import ConfigError, from_dict
from agentd.pricing import PriceTable, PriceTableError
from agentd.tomltables import TomlError, load_file, read_table, rule

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    enabled: bool = False
    count: int = 1
    ratio: float = 0.5
    label: str = ""
    since: datetime.date = datetime.date(2000, 1, 1)
    names: tuple[str, ...] = ()
    hosts: Mapping[str, str] = field(default_factory=dict)
    limit: int | None = None


@dataclass(frozen=True)
class Checked:
    name: str
    size: int = field(metadata=rule(lambda n: n > 0, "must be a positive integer"))
    retries: int | None = field(default=None, metadata=rule(lambda n: 0 <= n <= 10, "0 to 10"))


class SampleError(TomlError):
    """A caller's own error class."""


def refusal(cls: type[Any], raw: object, name: str = "[sample]", **options: Any) -> str:
    with pytest.raises(TomlError) as caught:
        read_table(cls, raw, name, **options)
    return str(caught.value)


def test_a_table_becomes_the_dataclass_its_hints_describe() -> None:
    raw = {
        "enabled": True,
        "count": 3,
        "ratio": 2,
        "label": "x",
        "since": datetime.datetime(2025, 9, 29, 12, 0),
        "names": ["a", "b"],
        "hosts": {"p1": "10.0.0.1"},
        "limit": 7,
    }
    sample = read_table(Sample, raw, "[sample]")
    assert sample == Sample(
        True, 3, 2.0, "x", datetime.date(2025, 9, 29), ("a", "b"), raw["hosts"], 7
    )
    assert isinstance(sample.ratio, float)
    with pytest.raises(TypeError):
        sample.hosts["p2"] = "10.0.0.2"  # type: ignore[index]
    assert read_table(Sample, {}, "[sample]") == Sample()


def test_an_unknown_key_is_named_with_its_table() -> None:
    assert (
        refusal(Sample, {"count": 2, "colour": 1}, separator=" ") == "[sample] colour: unknown key"
    )
    assert refusal(Sample, {"colour": 1}, "models.gpt-5", separator=".") == (
        "models.gpt-5.colour: unknown key"
    )


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("enabled", 1, "must be true or false"),
        ("count", True, "must be an integer"),
        ("count", 1.5, "must be an integer"),
        ("ratio", "half", "must be a number"),
        ("label", 3, "must be a string"),
        ("since", "2025-09-29", "must be a date (YYYY-MM-DD)"),
        ("names", "a", "must be a list of strings"),
        ("names", ["a", 1], "must be a list of strings"),
        ("hosts", {"p1": 1}, "must be a table of strings"),
        ("limit", "none", "must be an integer"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(key: str, value: object, problem: str) -> None:
    assert refusal(Sample, {key: value}, "[sample]", separator=" ") == f"[sample] {key}: {problem}"


def test_a_nested_table_is_named_by_its_full_path() -> None:
    where = "/etc/agentd/agents.toml: agents.echo"
    assert (
        refusal(Sample, {"hosts": {"p1": ["x"]}}, where)
        == f"{where}.hosts: must be a table of strings"
    )
    assert refusal(Sample, ["not", "a", "table"], where) == f"{where}: must be a table"
    data = {"vms": {"hosts": {"p1": "10.0.0.1", "p2": 2}}}
    with pytest.raises(ConfigError, match=r"^\[vms\] hosts: must be a table of strings$"):
        from_dict(data, env={})


def test_a_rule_words_every_refusal_of_its_key_and_leaves_defaults_alone() -> None:
    assert read_table(Checked, {"size": 2}, "t", fixed={"name": "n"}) == Checked("n", 2, None)
    assert (
        refusal(Checked, {"size": 0}, "t", fixed={"name": "n"})
        == "t.size: must be a positive integer"
    )
    assert refusal(Checked, {"size": "big"}, "t", fixed={"name": "n"}) == (
        "t.size: must be a positive integer"
    )
    assert refusal(Checked, {"size": 1, "retries": 11}, "t", fixed={"name": "n"}) == (
        "t.retries: 0 to 10"
    )


def test_a_required_key_left_out_is_named() -> None:
    assert refusal(Checked, {}, "t", fixed={"name": "n"}) == "t.size: required"


def test_fixed_fields_are_not_keys_of_the_table() -> None:
    assert refusal(Checked, {"size": 1, "name": "x"}, "t", fixed={"name": "n"}) == (
        "t.name: unknown key"
    )


def test_errors_are_raised_as_the_callers_class() -> None:
    with pytest.raises(SampleError) as caught:
        read_table(Sample, {"count": "x"}, "[sample]", SampleError, separator=" ")
    assert (caught.value.key, caught.value.problem) == ("[sample] count", "must be an integer")


def test_load_file_names_a_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(SampleError, match=f"^{path}: no such file$"):
        load_file(path, SampleError)


def test_load_file_names_the_file_and_the_line_of_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlisten = "tcp:1"\nport = \n')
    with pytest.raises(TomlError) as caught:
        load_file(str(path))
    assert caught.value.key == str(path)
    assert caught.value.problem.startswith("not valid TOML: ")
    assert "line 3" in caught.value.problem


def test_load_file_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(TomlError, match=f"^{tmp_path}: Is a directory$"):
        load_file(str(tmp_path))


def test_load_file_reads_the_document(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('[models."m"]\ninput = 1\n')
    assert load_file(str(path)) == {"models": {"m": {"input": 1}}}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[models."m"]\ninput = 1\noutput = 2\ncolour = 3\n', "models.m.colour: unknown key"),
        ('[models."m"]\noutput = 2\n', "models.m.input: required"),
        ('[models."m"]\ninput = -1\noutput = 2\n', "models.m.input: must be a non-negative number"),
        (
            '[models."m"]\ninput = "1"\noutput = 2\n',
            "models.m.input: must be a non-negative number",
        ),
        (
            '[models."m"]\ninput = 1\noutput = 2\neffective = "soon"\n',
            "models.m.effective: must be a date (YYYY-MM-DD)",
        ),
        (
            '[[models."m"]]\ninput = 1\noutput = 2\n[[models."m"]]\ninput = 1\n',
            "models.m.output: required",
        ),
        ("models = 3\n", "models: must be a table of model names"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_price_table_errors_name_the_model_and_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PriceTableError) as caught:
        PriceTable.load(path)
    assert problem in str(caught.value)


def test_a_missing_price_table_is_a_price_table_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(PriceTableError, match=f"^{path}: no such file$"):
        PriceTable.load(path)


def test_the_agents_missing_price_table_is_unusable_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(PricesUnusable, match=f"^{path}: no such file$"):
        load_prices({"AGENTD_PRICES": str(path)})


def test_price_table_entries_default_their_date_and_cache_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[models."m"]\ninput = 3\noutput = 15\n')
    [price] = PriceTable.load(path).models["m"]
    assert (price.effective, price.input, price.cache_read, price.cache_write) == (
        datetime.date(1970, 1, 1),
        3.0,
        0.0,
        0.0,
    )


def test_reading_the_agents_file_loads_no_twisted(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text('[agents.claude]\nprovider = "anthropic"\nmodel = "claude-x"\n')
    probe = (
        "import sys\n"
        "from agentd.agent import agents\n"
        f"assert agents.load({str(path)!r})['claude'].model == 'claude-x'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'zope')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]"
