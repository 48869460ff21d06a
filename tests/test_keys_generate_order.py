"""`trainbus keys generate client` on a host that has no server pair yet: what it says to copy must be there to
copy, or say how to make it."""

from __future__ import annotations

from kernel_process import cli


def test_a_client_key_made_before_the_server_pair_says_the_server_key_to_copy_is_not_made_yet(tmp_path):
    keys_dir = tmp_path / "keys"
    made = cli("keys", "generate", "client", "alice", "--keys-dir", str(keys_dir), timeout=60)
    assert made.returncode == 0, made.stderr
    said = " ".join(made.stdout.split())  # as printed, wrapped to the terminal's width
    assert f"trainbus keys generate server --keys-dir {keys_dir}" in said, said
    assert cli("keys", "generate", "server", "--keys-dir", str(keys_dir), timeout=60).returncode == 0
    made = cli("keys", "generate", "client", "bob", "--keys-dir", str(keys_dir), timeout=60)
    said = " ".join(made.stdout.split())
    assert "not made yet" not in said and f"{keys_dir / 'server.key'} to the client" in said, said
