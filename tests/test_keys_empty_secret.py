"""A key directory's secret file found empty: the kernel refuses `--listen`, and the fix its line names must be one a
user can follow as written (`trainbus keys generate` alone is no command, and `keys generate server` refuses an
existing server key without --force)."""

from __future__ import annotations

import re
import shlex

from kernel_process import cli
from trainbus.kernel.keys import KeyStore


def test_the_fix_named_for_an_empty_server_secret_is_a_command_that_fixes_it(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    store.generate_client("alice", "monitor")
    store.server_secret.write_bytes(b"")
    refused = cli("run", "--listen", "127.0.0.1:0", "--keys-dir", str(store.directory), "--runs-dir",
                  str(tmp_path / "runs"), timeout=120)
    assert refused.returncode == 2 and f"{store.server_secret} is empty" in refused.stderr, refused.stderr
    fix = re.search(r"`(trainbus keys [^`]+)`", refused.stderr)
    assert fix, refused.stderr
    followed = cli(*shlex.split(fix.group(1))[1:], timeout=60)
    assert followed.returncode == 0, (fix.group(1), followed.stderr)
    store.check_secrets()  # nothing left to refuse


def test_the_fix_named_for_an_empty_client_secret_on_the_host_is_one_that_fixes_it(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    secret = store.generate_client("alice", "control")[1]
    secret.write_bytes(b"")
    refused = cli("run", "--listen", "127.0.0.1:0", "--keys-dir", str(store.directory), "--runs-dir",
                  str(tmp_path / "runs"), timeout=120)
    assert refused.returncode == 2 and f"{secret} is empty" in refused.stderr, refused.stderr
    assert f"rm {secret}" in refused.stderr, refused.stderr  # the host needs only the public half
    secret.unlink()
    store.check_secrets()
    assert [k.role for k in store.clients() if k.name == "alice"] == ["control"]


def test_keys_list_says_what_a_kernel_would_refuse_to_start_with(tmp_path):
    """`keys list` showed a key directory whose server secret was empty as whole: the first the user heard of it
    was a run with --listen refusing to start."""
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    store.generate_client("alice", "monitor")
    listed = cli("keys", "list", "--keys-dir", str(store.directory), timeout=60)
    assert listed.returncode == 0 and " is empty" not in listed.stdout, listed.stdout
    store.server_secret.write_bytes(b"")
    listed = cli("keys", "list", "--keys-dir", str(store.directory), timeout=60)
    assert listed.returncode == 0, listed.stderr
    said = " ".join(listed.stdout.split())  # the line as said, whatever the width it was wrapped at
    assert f"secret key file {store.server_secret} is empty; fix: " in said and "--force" in said, listed.stdout
