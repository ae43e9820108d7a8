"""Secret references: one module checks their form and resolves them, never showing a value."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.secrets import SecretError, check_reference, resolve_secret

SECRET = "sk-ant-api03-secret-0123456789-ABCD"


def test_an_env_reference_is_the_variable_without_surrounding_whitespace() -> None:
    assert resolve_secret("env:PROVIDER_KEY", {"PROVIDER_KEY": f"  {SECRET}\n"}) == SECRET


def test_a_file_reference_is_the_file_without_its_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET + "\n")
    assert resolve_secret(f"file:{tmp_path}/key", {}) == SECRET


@pytest.mark.parametrize("value", [SECRET, f" {SECRET} ", "sk-with:a-colon-after-a-dash"])
def test_anything_else_is_the_secret_itself(value: str) -> None:
    check_reference(value)
    assert resolve_secret(value, {}) == value.strip()


@pytest.mark.parametrize("environ", [{}, {"PROVIDER_KEY": ""}, {"PROVIDER_KEY": " \n"}])
def test_an_unset_or_blank_variable_is_refused_by_name(environ: dict[str, str]) -> None:
    with pytest.raises(SecretError) as caught:
        resolve_secret("env:PROVIDER_KEY", environ)
    assert str(caught.value) == "environment variable PROVIDER_KEY is not set"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing", "no such file"),
        ("directory", "Is a directory"),
        ("empty", "is empty"),
        ("latin1", "not ASCII text"),
    ],
)
def test_an_unusable_file_is_refused_by_path_without_its_content(
    tmp_path: Path, name: str, problem: str
) -> None:
    (tmp_path / "directory").mkdir()
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "latin1").write_bytes("sk-caf\u00e9-key".encode("latin-1"))
    path = tmp_path / name
    with pytest.raises(SecretError) as caught:
        resolve_secret(f"file:{path}", {})
    assert str(caught.value) in (f"{path}: {problem}", f"{path} {problem}")
    assert "caf" not in str(caught.value)


@pytest.mark.parametrize(
    "reference",
    ["env:", "env:1NOT_A_NAME", "env:WITH SPACE", "file:relative/path", "file:", "evn:TYPO"],
)
def test_malformed_references_are_refused_before_anything_is_read(reference: str) -> None:
    malformed = 'must be "env:NAME", "file:/absolute/path" or the secret itself'
    with pytest.raises(SecretError) as checked:
        check_reference(reference)
    assert str(checked.value) == malformed
    with pytest.raises(SecretError) as resolved:
        resolve_secret(reference, {"1NOT_A_NAME": SECRET, "WITH SPACE": SECRET})
    assert str(resolved.value) == malformed


def test_a_relative_file_is_never_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_text(SECRET)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SecretError) as caught:
        resolve_secret("file:key", {})
    assert SECRET not in str(caught.value)


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTD_TEST_SECRET", SECRET)
    assert resolve_secret("env:AGENTD_TEST_SECRET") == SECRET
