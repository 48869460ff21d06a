"""keep_freed_memory: real allocations in a fresh process, page faults and resident memory as the OS counts them."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="the knobs are glibc's")

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): malloc maps it fresh every time by default
PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")

# A fresh interpreter each time: how soon glibc reuses a freed block depends on the heap's history.
SCRIPT = """
import json, resource, sys, torch, psutil
from trainbus.kernel.memory import keep_freed_memory

def faults_per_round(rounds):
    # Minor page faults of each round of: allocate a 64 MiB tensor, write all of it, free it.
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(%d // 4, dtype=torch.float32)
        t.fill_(1.0)
        del t
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

out = {"default": faults_per_round(4)}
with keep_freed_memory(enabled=sys.argv[1] == "keep") as kept:
    out["kept"] = kept
    out["inside"] = faults_per_round(16)
    with keep_freed_memory(enabled=sys.argv[1] == "keep"):  # a second training in the process, ending first
        pass
    out["after_inner"] = faults_per_round(4)
    out["rss_inside"] = psutil.Process().memory_info().rss
out["rss_after"] = psutil.Process().memory_info().rss
print(json.dumps(out))
""" % BLOCK


def run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_freed_memory_is_reused_without_page_faults_and_given_back_after():
    r = run("keep")
    assert min(r["default"]) > PAGES // 2, r  # the default: every round pages its block in afresh
    assert r["kept"]
    assert r["inside"][0] > PAGES // 2, r  # the first round gets its pages from the OS
    # A few rounds to settle (torch asks for 64-byte alignment, so a freed block is a little too small for the next
    # request until it merges with a neighbour); from then on the same pages are reused and nothing faults.
    assert max(r["inside"][-6:]) < PAGES // 20, r
    assert max(r["after_inner"]) < PAGES // 20, r  # one training ending does not end it for another still running
    assert r["rss_inside"] - r["rss_after"] >= BLOCK, r  # on the way out, what training kept goes back to the OS


def test_disabled_changes_nothing():
    r = run("off")
    assert not r["kept"]
    assert min(r["inside"]) > PAGES // 2, r
