"""API keys: only hashes on disk (a private file, replaced atomically), scopes, the token printed once; and a
server without keys refused beyond the loopback address."""
from __future__ import annotations

import hashlib
import json
import stat

import pytest

from conftest import run_cli
from siamkit.errors import SiamkitError
from siamkit.serve.command import check_host
from siamkit.serve.keys import KeyRing, create_key


def test_keys_are_stored_hashed_in_a_private_file(tmp_path):
    path = tmp_path / "keys.json"
    write, read = create_key(path, "write"), create_key(path, "read")
    text = path.read_text()
    assert write not in text and read not in text
    stored = json.loads(text)["keys"]
    assert [k["sha256"] for k in stored] == [hashlib.sha256(t.encode()).hexdigest() for t in (write, read)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.read(path)
    assert (ring.scope_of(write), ring.scope_of(read)) == ("write", "read")
    assert ring.scope_of(write + "x") is None and ring.scope_of("") is None and ring.scope_of(None) is None
    assert write != read and len(write) > 40  # 32 random bytes, base64


def test_a_bad_keys_file_is_one_line(tmp_path):
    with pytest.raises(SiamkitError, match="does not exist; create it with siamkit serve-keys create"):
        KeyRing.read(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SiamkitError, match="is not a siamkit API keys file"):
        KeyRing.read(bad)
    bad.write_text(json.dumps({"format": "siamkit-serve-keys-v1", "keys": [{"id": "a", "sha256": "0" * 64,
                                                                              "scope": "admin"}]}))
    with pytest.raises(SiamkitError, match="unknown scope"):
        KeyRing.read(bad)
    with pytest.raises(SiamkitError, match="unknown scope"):
        create_key(tmp_path / "k.json", "admin")


def test_serve_keys_create_prints_the_token_once(tmp_path):
    path = tmp_path / "keys.json"
    done = run_cli("serve-keys", "create", "--file", str(path), "--scope", "write")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout.count("\n") == 1 and token.startswith("sk_")
    assert KeyRing.read(path).scope_of(token) == "write"
    assert token not in done.stderr and token not in path.read_text()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts_need_no_keys(host):
    check_host(host, keyed=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_other_hosts_need_keys(host):
    with pytest.raises(SiamkitError, match="without API keys"):
        check_host(host, keyed=False)
    check_host(host, keyed=True)


def test_serve_refuses_a_public_host_without_keys_in_one_line(tmp_path):
    done = run_cli("serve", "dlib", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--host 0.0.0.0" in lines[0] and "--api-keys" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before anything was made
