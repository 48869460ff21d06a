"""Cluster environments as their launchers set them: torchrun's variables, srun's, neither."""

from __future__ import annotations

import pytest

from trainbus.kernel.cluster import Cluster, ClusterError, detect, first_host, restarts_left

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "41000", "TORCHELASTIC_RUN_ID": "job"}
SRUN = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "train.sh"}


def test_no_launcher_is_a_single_process():
    assert detect({}) == Cluster("single") and not detect({}).distributed


def test_torchrun():
    assert detect(TORCHRUN) == Cluster("torchelastic", rank=3, world_size=4, local_rank=1, node_rank=1,
                                       local_world_size=2, main_address="10.0.0.5", main_port=41000)
    assert detect({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 2  # a group torchrun restarted


def test_a_failure_with_restarts_left_is_not_the_runs_end():
    """What the failed summary's last line says under --max-restarts: torchrun sets both in each worker's env."""
    assert restarts_left({}) == 0 and restarts_left(TORCHRUN) == 0
    assert restarts_left({**TORCHRUN, "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "1"}) == 2
    assert restarts_left({**TORCHRUN, "TORCHELASTIC_MAX_RESTARTS": "1", "TORCHELASTIC_RESTART_COUNT": "1"}) == 0
    assert restarts_left({"TORCHELASTIC_MAX_RESTARTS": "x"}) == 0


def test_srun_with_the_main_node_and_port_derived_as_lightning_does():
    assert detect(SRUN) == Cluster("slurm", rank=5, world_size=8, local_rank=1, node_rank=2,
                                   main_address="gpu07", main_port=15000 + 3456)  # how many on a node: not told
    assert detect({**SRUN, "SLURM_TASKS_PER_NODE": "2(x4)"}).local_world_size == 2
    assert detect({**SRUN, "SLURM_TASKS_PER_NODE": "3,2(x2),1"}).local_world_size == 3
    assert detect({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).main_address == "head"


def test_torchrun_inside_a_slurm_allocation_is_torchrun():
    assert detect({**SRUN, **TORCHRUN}).kind == "torchelastic"


def test_an_interactive_srun_shell_is_not_a_job():
    assert detect({**SRUN, "SLURM_JOB_NAME": "bash"}).kind == "single"


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
                                             ("a-b[3,5]", "a-b3"), ("x[010-012]", "x010")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist, first", [("node[01-02].cluster.local", "node01.cluster.local"),
                                             ("rack[1-2]-node[01-04],gpu9", "rack1-node01"),
                                             ("node[7].ib", "node7.ib")])
def test_the_first_host_keeps_what_follows_its_range(nodelist, first):
    """SLURM's hostlists name hosts with text after a range and with several ranges; the first host of
    node[01-02].cluster.local was node01, rank 0's address a name no machine has (the ranks waited 30 min)."""
    assert first_host(nodelist) == first
    assert detect({**SRUN, "SLURM_NODELIST": nodelist}).main_address == first


@pytest.mark.parametrize("env, message", [
    ({**TORCHRUN, "RANK": "4"}, "rank 4 is not below world size 4"),
    # said no way out, and an empty one (MASTER_PORT=$UNSET) read as a value
    ({**TORCHRUN, "WORLD_SIZE": "four"}, r"^WORLD_SIZE='four' is not an integer: give it a whole number, or unset it$"),
    ({**SRUN, "MASTER_PORT": ""}, r"^MASTER_PORT='' is not an integer: give it a whole number, or unset it$"),
    # what was set by hand said no way out: "SLURM_PROCID is not set, though the launcher set the others of its
    # variables"
    ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"},
     r"^WORLD_SIZE is not set, though RANK, GROUP_RANK, LOCAL_RANK and LOCAL_WORLD_SIZE are: launch the ranks with "
     r"`trainbus run --nproc N` or torchrun, which set them all, or unset them to train in one process$"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"},
     r"^SLURM_PROCID is not set, though SLURM_NTASKS is: start the tasks with srun, which sets them all, or unset "
     r"SLURM_NTASKS to train in one process$"),
    # set by hand without a port: rank 0 listened on a free one no other rank knew, and they all waited
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"},
     r"^torchelastic: 4 ranks, but MASTER_PORT is not set: set it \(and MASTER_ADDR\) to a port free on rank 0's "
     r"machine, as torchrun does, or launch with `trainbus run --nproc N` or torchrun$"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"},
     r"^slurm: 8 ranks, but MASTER_PORT is not set: set it \(and MASTER_ADDR\) to a port free on rank 0's "
     r"machine, or run the tasks in a job \(SLURM_JOB_ID gives the port\)$"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "GROUP_RANK": "0"},  # set by hand: no single run of its own
     "WORLD_SIZE is 2 but LOCAL_WORLD_SIZE not set: launch the ranks with `trainbus run --nproc N`, torchrun or srun"),
])
def test_contradicting_variables_are_one_clear_error(env, message):
    with pytest.raises(ClusterError, match=message):
        detect(env)
