"""Host keys are matched as OpenSSH does: by host and port, plain or hashed; unknown, changed
and revoked keys are refused."""

from __future__ import annotations

import subprocess

import pytest
from twisted.conch.ssh.keys import Key

from agentd.transport.ssh.known_hosts import HostKeyError, KnownHosts
from tests.servers import keygen


@pytest.fixture
def keys(tmp_path):
    a = keygen(tmp_path / "a")
    b = keygen(tmp_path / "b")
    return (
        Key.fromFile(str(a)).public(),
        Key.fromFile(str(b)).public(),
        a.with_suffix(".pub").read_text().split()[:2],
        b.with_suffix(".pub").read_text().split()[:2],
    )


def write(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return KnownHosts(str(path))


def test_port_entries_match_only_their_port(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    hosts = write(tmp_path / "kh", f"[vm.internal]:2222 {t} {b64}")
    hosts.check("vm.internal", 2222, key_a)
    with pytest.raises(HostKeyError) as e:
        hosts.check("vm.internal", 22, key_a)
    assert e.value.kind == "unknown"


def test_port_22_uses_the_bare_host_name(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    hosts = write(tmp_path / "kh", f"vm.internal,10.0.0.5 {t} {b64}")
    hosts.check("10.0.0.5", 22, key_a)
    with pytest.raises(HostKeyError):
        hosts.check("10.0.0.5", 2222, key_a)


def test_a_different_key_for_a_known_host_is_changed(tmp_path, keys):
    _, key_b, (t, b64), _ = keys
    hosts = write(tmp_path / "kh", "# comment", "", f"[vm]:2222 {t} {b64}")
    with pytest.raises(HostKeyError) as e:
        hosts.check("vm", 2222, key_b)
    assert e.value.kind == "changed"


def test_hashed_entries_from_ssh_keygen_match(tmp_path, keys):
    key_a, key_b, (t, b64), _ = keys
    path = tmp_path / "kh"
    write(path, f"[vm.internal]:2222 {t} {b64}")
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    hosts = KnownHosts(str(path))
    assert path.read_text().startswith("|1|")
    hosts.check("vm.internal", 2222, key_a)
    with pytest.raises(HostKeyError):
        hosts.check("vm.internal", 2223, key_a)
    with pytest.raises(HostKeyError):
        hosts.check("vm.internal", 2222, key_b)


def test_revoked_keys_are_refused_even_if_also_listed(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    hosts = write(tmp_path / "kh", f"@revoked * {t} {b64}", f"[vm]:2222 {t} {b64}")
    with pytest.raises(HostKeyError) as e:
        hosts.check("vm", 2222, key_a)
    assert e.value.kind == "revoked"


def test_malformed_lines_match_nothing(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    malformed = ["garbage", f"[vm]:2222 {t} not-base64!", f"[vm]:2222 {t}"]
    alone = write(tmp_path / "malformed", *malformed)
    with pytest.raises(HostKeyError) as e:
        alone.check("vm", 2222, key_a)
    assert e.value.kind == "unknown"  # not even a known host with another key
    hosts = write(tmp_path / "kh", *malformed, f"[vm]:2222 {t} {b64}")
    hosts.check("vm", 2222, key_a)


def test_a_line_whose_type_field_contradicts_its_key_matches_nothing(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    other = "ssh-rsa" if t != "ssh-rsa" else "ssh-ed25519"
    for type_field in ("x", other):
        hosts = write(tmp_path / "kh", f"[vm.internal]:2222 {type_field} {b64}")
        with pytest.raises(HostKeyError) as e:
            hosts.check("vm.internal", 2222, key_a)
        assert e.value.kind == "unknown"
    write(tmp_path / "kh", f"[vm.internal]:2222 {t} {b64}").check("vm.internal", 2222, key_a)


def test_wildcard_and_negated_patterns_follow_openssh(tmp_path, keys):
    key_a, _, (t, b64), _ = keys
    hosts = write(tmp_path / "kh", f"*.vms.internal,!bad.vms.internal {t} {b64}")
    hosts.check("demo.vms.internal", 22, key_a)
    with pytest.raises(HostKeyError):
        hosts.check("bad.vms.internal", 22, key_a)
    with pytest.raises(HostKeyError):
        hosts.check("demo.vms.internal", 2222, key_a)  # "[host]:port" is a different name
