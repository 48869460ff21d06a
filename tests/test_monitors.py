"""Resource monitors: each sampler without sockets, then a real run with all of them, then disk's reply over real sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from itertools import islice
from pathlib import Path

import psutil
import pytest

from trainbus.kernel.config import RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.plugins import _sampling, gpu_monitor
from trainbus.plugins._history import History
from trainbus.plugins._plots import PlotSize, png_bytes, resource_figures
from trainbus.plugins.cpu_monitor import CpuMonitorPlugin
from trainbus.plugins.disk_monitor import DiskMonitorPlugin
from trainbus.plugins.gpu_monitor import GpuMonitorPlugin
from trainbus.plugins.memory_monitor import MemoryMonitorPlugin
from trainbus.plugins.perf_monitor import PerfMonitorPlugin, percentile
from trainbus.plugins.visualization import plot_run
from trainbus.proto import Event
from trainbus.sdk import Harness

from conftest import TESTS_DIR
from helpers import PLUGIN_START_S
from stand_in_kernel import StandInKernel

INTERVAL_S = 0.5
TIMED = f"{TESTS_DIR / 'fixture_targets.py'}:digits_for_seconds"  # epochs of a set length, whatever the machine
MONITORS = ("cpu", "memory", "disk", "gpu", "perf")


def metrics(replies: list[dict]) -> dict[str, float]:
    return {r["name"]: r["value"] for r in replies if r["type"] == "metric"}


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# samplers, without sockets


def test_a_pid_that_is_no_process_is_said_and_the_machine_still_watched(tmp_path, monkeypatch):
    """Its process readings were left out without a word."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    plugin = CpuMonitorPlugin({"interval_s": 60.0, "pid": gone.pid}, run_dir=str(tmp_path))
    monkeypatch.setattr(plugin, "_run", lambda: None)
    h = Harness(plugin)  # its setup prepares the monitor
    said = [r["text"] for r in h.replies if r["type"] == "log"]
    h.close()
    assert said == [f"cpu monitor: no process {gone.pid} to watch (pid); its process readings are left out, the "
                    f"machine's are taken"], said


def test_cpu_sees_a_busy_process_and_every_core(tmp_path, monkeypatch):
    """This test is the sampler thread: prime, spin, tick (the plugin's own thread, whose prime or first reading
    would restart the measurement midway, does nothing). The process's % lies between what the clocks read on
    either side of prime and of tick."""
    plugin = CpuMonitorPlugin({"interval_s": 60.0, "pid": os.getpid()}, run_dir=str(tmp_path))
    monkeypatch.setattr(plugin, "_run", lambda: None)
    h = Harness(plugin)
    before_prime = _clocks()
    plugin.prime()
    after_prime = _clocks()
    busy(0.4)
    before_tick = _clocks()
    readings = plugin.tick()
    after_tick = _clocks()
    h.close()
    cores = psutil.cpu_count()
    assert {f"cpu/core{i}_percent" for i in range(cores)} <= set(readings)
    assert 0 <= readings["cpu/system_percent"] <= 100
    assert all(0 <= readings[f"cpu/core{i}_percent"] <= 100 for i in range(cores))
    # what this process really used, however loaded the machine is: the same counters psutil reads
    # (clock ticks, monotonic time), taken just outside its two reads; psutil rounds to 0.1
    lowest = _percent(after_prime, before_tick, outer=(before_prime, after_tick))
    highest = _percent(before_prime, after_tick, outer=(after_prime, before_tick))
    assert lowest - 0.05 <= readings["cpu/process_percent"] <= highest + 0.05, (lowest, highest)
    assert readings["cpu/process_percent"] > 0  # busy, not idle
    assert metrics(plugin.outbox) == readings  # each reading went out as a metric reply


def _clocks() -> tuple[float, float]:
    """(monotonic s, this process's user + system CPU s) as psutil's Process.cpu_percent reads them."""
    times = psutil.Process().cpu_times()
    return time.monotonic(), times.user + times.system


def _percent(start: tuple[float, float], end: tuple[float, float], outer: tuple) -> float:
    """CPU % of one core: the CPU used from start to end over the wall time of the `outer` pair."""
    return 100 * (end[1] - start[1]) / (outer[1][0] - outer[0][0])


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def test_sampler_thread_replies_without_waiting_for_a_handler(tmp_path):
    """The runner binds a thread-safe send; readings from the sampler thread use it, not the handler outbox."""
    plugin = MemoryMonitorPlugin({"interval_s": 0.05}, run_dir=str(tmp_path))
    sent: list[dict] = []
    plugin.bind_sender(sent.append)
    plugin.setup()
    deadline = time.monotonic() + 5
    while not any(m["type"] == "metric" for m in sent) and time.monotonic() < deadline:
        time.sleep(0.02)
    plugin.teardown()
    assert plugin.outbox == []
    names = {m["name"] for m in sent if m["type"] == "metric"}
    assert {"memory/used_bytes", "memory/total_bytes", "memory/percent", "memory/swap_percent"} <= names


def test_memory_readings_are_consistent_and_it_warns_once(tmp_path):
    plugin = MemoryMonitorPlugin({"interval_s": 60.0, "warn_percent": 0.01, "pid": os.getpid()}, run_dir=str(tmp_path))
    h = Harness(plugin)
    first, second = plugin.tick(), plugin.tick()
    h.close()
    off = MemoryMonitorPlugin({"interval_s": 60.0, "warn_percent": 0, "pid": os.getpid()}, run_dir=str(tmp_path))
    h = Harness(off)
    off.tick()
    h.close()
    # 0: never (it said "nearly exhausted"); an info line that USS cost too much on a busy box is not a warning
    assert not [r for r in off.outbox if r["type"] == "log" and r["level"] != "info"], off.outbox
    assert 0 < first["memory/used_bytes"] <= first["memory/total_bytes"]
    assert 0 <= first["memory/percent"] <= 100
    assert first["memory/process_rss_bytes"] > 10 * 1024 ** 2
    assert second["memory/process_rss_bytes"] >= 0
    warnings = [r for r in plugin.outbox if r["type"] == "log" and r["level"] == "warning"]
    assert len(warnings) == 1 and "memory nearly exhausted" in warnings[0]["text"]


@pytest.fixture
def memory_cgroup():
    """A memory cgroup of its own with a 1 GiB limit (v1 where the machine mounts it, else v2), removed after; the
    test puts a process in it. Skipped where this process cannot make one (not root, no memory controller)."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup takes root")
    v2_controls = v2 / "cgroup.subtree_control"
    if (v1 / "memory.limit_in_bytes").exists():
        group, limit_file = v1 / f"trainbus-test-{os.getpid()}", "memory.limit_in_bytes"
    elif v2_controls.exists() and "memory" in v2_controls.read_text().split():
        group, limit_file = v2 / f"trainbus-test-{os.getpid()}", "memory.max"
    else:
        pytest.skip("no memory cgroup controller to make a group with")
    try:
        group.mkdir()
        (group / limit_file).write_text(str(2**30))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    yield group
    for _ in range(100):  # its process must be gone (reaped) before the group can be removed
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def test_memory_reads_the_limit_of_the_training_processs_memory_cgroup_and_warns_near_it(tmp_path, memory_cgroup):
    """A SLURM job or a container is killed at its memory cgroup's limit, long before the machine runs out: the
    monitor read the machine's memory alone, so `warn_percent` never warned of what ends such runs. It reads the
    tightest limit over the watched process's cgroup (its own or one above: SLURM sets the job's) and warns at it."""
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdin.readline(); "
                              "held = bytearray(64 * 2**20); print('held', flush=True); time.sleep(120)"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        (memory_cgroup / "cgroup.procs").write_text(str(child.pid))
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "held\n"  # 64 MiB charged to the group since it moved in
        plugin = MemoryMonitorPlugin({"interval_s": 60.0, "warn_percent": 3.0, "pid": child.pid},
                                     run_dir=str(tmp_path))
        h = Harness(plugin)
        readings = plugin.tick()
        h.close()
    finally:
        child.kill()
        child.wait()
    assert readings["memory/limit_bytes"] == 2**30, readings
    assert 64 * 2**20 <= readings["memory/limit_used_bytes"] < 2**30
    assert readings["memory/limit_percent"] == pytest.approx(100 * readings["memory/limit_used_bytes"] / 2**30)
    [warning] = [r for r in plugin.outbox if r["type"] == "log" and r["level"] == "warning"]
    assert "within the limit of the run's memory cgroup" in warning["text"] and "of 1.0 GiB used" in warning["text"]


def test_disk_replies_checkpoint_now_once_when_space_is_low(tmp_path):
    plugin = DiskMonitorPlugin({"interval_s": 60.0, "min_free_gib": 1e9}, run_dir=str(tmp_path))
    h = Harness(plugin)
    plugin.prime()
    readings = [plugin.tick() for _ in range(3)]
    h.close()
    usage = psutil.disk_usage(str(tmp_path))
    assert readings[0]["disk/total_bytes"] == usage.total
    assert 0 < readings[0]["disk/free_bytes"] <= usage.total
    assert readings[-1]["disk/read_bytes_per_s"] >= 0
    checkpoints = [r for r in plugin.outbox if r["type"] == "checkpoint_now"]
    assert len(checkpoints) == 1 and "min_free_gib" in checkpoints[0]["reason"]
    assert sum(r["type"] == "log" and r["level"] == "warning" for r in plugin.outbox) == 1


def test_gpu_without_nvml_says_why_once_and_stays_idle(tmp_path, monkeypatch, capsys):
    class Missing:
        NVMLError = type("NVMLError", (Exception,), {})

        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    monkeypatch.setattr(gpu_monitor, "pynvml", Missing())
    plugin = GpuMonitorPlugin({"interval_s": 0.05}, run_dir=str(tmp_path))
    h = Harness(plugin)
    time.sleep(0.2)
    h.feed("end_training_session")
    h.close()
    assert plugin._thread is None  # no sampler: idle
    logs = [r for r in h.replies if r["type"] == "log"]
    assert len(logs) == 1 and "idle" in logs[0]["text"] and "NVML" in logs[0]["text"]
    assert not h.replies_of("metric")
    assert capsys.readouterr().err.count("gpu monitor idle") == 1


def test_gpu_reads_every_device_and_leaves_out_what_is_not_supported(tmp_path, monkeypatch):
    class FakeError(Exception):
        pass

    class NotSupported(FakeError):
        pass

    class FakeNvml:
        NVMLError, NVMLError_NotSupported, NVML_TEMPERATURE_GPU = FakeError, NotSupported, 0
        power_calls = 0

        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetCount(self): return 2
        def nvmlDeviceGetHandleByIndex(self, i): return i
        def nvmlDeviceGetUtilizationRates(self, h): return namedtuple("U", "gpu memory")(80 + h, 40)
        def nvmlDeviceGetMemoryInfo(self, h): return namedtuple("M", "used total")(2 * 1024 ** 3, 16 * 1024 ** 3)
        def nvmlDeviceGetTemperature(self, h, sensor): return 65

        def nvmlDeviceGetPowerUsage(self, h):
            if h == 1:
                FakeNvml.power_calls += 1
                raise NotSupported()
            return 250_000  # milliwatts

    monkeypatch.setattr(gpu_monitor, "pynvml", FakeNvml())
    plugin = GpuMonitorPlugin({"interval_s": 60.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    first, second = plugin.tick(), plugin.tick()
    h.close()
    assert first == second
    assert first["gpu/gpu0_util_percent"] == 80 and first["gpu/gpu1_util_percent"] == 81
    assert first["gpu/gpu0_memory_used_bytes"] == 2 * 1024 ** 3
    assert first["gpu/gpu1_temperature_c"] == 65
    assert first["gpu/gpu0_power_w"] == 250.0 and "gpu/gpu1_power_w" not in first
    assert FakeNvml.power_calls == 1  # not supported: asked once, then left out
    assert not [r for r in plugin.outbox if r["type"] == "log"]


class NvmlOf:
    """pynvml as a machine with these GPUs (UUIDs) shows them: a device in `lost` raises GpuIsLost at every call."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, uuids: list[str], lost: tuple[int, ...] = ()):
        self.uuids, self.lost = uuids, lost

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return len(self.uuids)
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetUUID(self, h): return self.uuids[h]

    def _device(self, h):
        if h in self.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return h

    def nvmlDeviceGetUtilizationRates(self, h): return namedtuple("U", "gpu memory")(10 * self._device(h), 40)
    def nvmlDeviceGetMemoryInfo(self, h): return namedtuple("M", "used total")(self._device(h), 16 * 1024 ** 3)
    def nvmlDeviceGetTemperature(self, h, sensor): return 60 + self._device(h)
    def nvmlDeviceGetPowerUsage(self, h): return 1000 * self._device(h)


FOUR_GPUS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-bbbb3333-0000", "GPU-dddd4444-0000"]


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2, 3]),  # unset: every GPU
    ("", []),  # the daemon's run that asked for none
    ("2,0", [2, 0]),  # CUDA numbers them in this order: cuda:0 is GPU 2
    ("1, 3", [1, 3]),
    ("1,-1,2", [1]),  # a negative one ends the list, as CUDA reads it
    ("3,9,0", [3]),  # so does one past the last GPU
    ("0,0", []),  # a repeated one shows none
    ("1gpu,2", [1, 2]),  # CUDA reads each as strtoul does
    ("GPU-dddd,GPU-aaaa1111-0000", [3, 0]),  # a UUID, or a unique start of one
    ("GPU-bbbb,GPU-aaaa", []),  # an ambiguous start ends the list: none before it
])
def test_the_gpus_cuda_visible_devices_names_are_the_nvml_devices_cuda_numbers_so(visible, expected):
    assert gpu_monitor.visible_devices(visible, FOUR_GPUS) == expected


def test_gpu_reads_only_the_gpus_the_run_sees_named_as_cuda_numbers_them(tmp_path, monkeypatch):
    """NVML shows every GPU of the machine: a run the daemon placed on GPU 2 (CUDA_VISIBLE_DEVICES=2) reported all
    four, its own as gpu2, the others' runs' GPUs as gpu0, gpu1 and gpu3."""
    monkeypatch.setattr(gpu_monitor, "pynvml", NvmlOf(FOUR_GPUS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    plugin = GpuMonitorPlugin({"interval_s": 60.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    readings = plugin.tick()
    h.close()
    assert sorted({name.split("_")[0] for name in readings}) == ["gpu/gpu0"]
    assert readings["gpu/gpu0_util_percent"] == 20 and readings["gpu/gpu0_temperature_c"] == 62


def test_gpu_with_cuda_visible_devices_empty_says_the_run_sees_no_gpu_and_stays_idle(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_monitor, "pynvml", NvmlOf(FOUR_GPUS))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    plugin = GpuMonitorPlugin({"interval_s": 0.05}, run_dir=str(tmp_path))
    h = Harness(plugin)
    h.feed("end_training_session")
    h.close()
    assert plugin._thread is None and not h.replies_of("metric")
    [log] = [r for r in h.replies if r["type"] == "log"]
    assert "CUDA_VISIBLE_DEVICES" in log["text"] and "idle" in log["text"], log


def test_a_gpu_that_is_lost_is_said_once_and_the_others_readings_go_on(tmp_path, monkeypatch):
    """A GPU fallen off the bus (NVML's GpuIsLost) raised out of the whole sample: every GPU's readings were lost,
    at every reading, for the rest of the run."""
    monkeypatch.setattr(gpu_monitor, "pynvml", NvmlOf(FOUR_GPUS[:2], lost=(1,)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plugin = GpuMonitorPlugin({"interval_s": 60.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    first, second = plugin.tick(), plugin.tick()
    h.close()
    assert first == second and first["gpu/gpu0_util_percent"] == 0 and first["gpu/gpu0_temperature_c"] == 60
    assert not [name for name in first if name.startswith("gpu/gpu1_")]
    [log] = [r for r in plugin.outbox if r["type"] == "log"]
    assert "gpu1" in log["text"] and "GPU is lost" in log["text"], log


def _batch(plugin: PerfMonitorPlugin, kind: str, index: int, ts: float, seq: list[int]) -> None:
    seq[0] += 1
    data = {"batch_index": index} if kind == "start_training_batch" else {"batch_index": index, "batch_size": 32}
    plugin.handle(Event(seq=seq[0], run="r", type=kind, ts=ts, step=index, epoch=1, data=data))


def test_perf_splits_each_step_into_data_wait_and_compute(tmp_path):
    plugin = PerfMonitorPlugin({"interval_s": 60.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    seq, t = [0], 1000.0
    plugin.handle(Event(seq=1, run="r", type="start_training_loop", ts=t, step=0, epoch=1))
    for index in range(11):  # every step: 30 ms waiting for data, then 10 ms of compute
        t += 0.030
        _batch(plugin, "start_training_batch", index, t, seq)
        t += 0.010
        _batch(plugin, "end_training_batch", index, t, seq)
    readings = plugin.tick()
    h.close()
    assert readings["perf/steps_per_s"] == pytest.approx(25.0)  # 40 ms a step
    assert readings["perf/samples_per_s"] == pytest.approx(25.0 * 32)
    assert readings["perf/step_time_p50_ms"] == pytest.approx(40.0)
    assert readings["perf/step_time_p95_ms"] == pytest.approx(40.0)
    assert readings["perf/data_wait_share"] == pytest.approx(0.75)
    assert readings["perf/compute_share"] == pytest.approx(0.25)
    assert plugin.tick() == {}  # no steps in this interval: nothing published
    assert percentile([1.0, 2.0, 3.0, 4.0, 100.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def test_perf_holds_a_bounded_sample_of_the_steps_between_two_readings(tmp_path):
    """Every step between two readings was kept: at interval_s 3600 a run of 2,000 steps a second held 7.2 million of
    them (a GB and more) in the plugin. A window keeps an even sample of at most WINDOW_STEPS_MAX, its rates and
    percentiles those of all its steps."""
    from trainbus.plugins.perf_monitor import WINDOW_STEPS_MAX

    plugin = PerfMonitorPlugin({"interval_s": 3600.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    plugin.handle(Event(seq=1, run="r", type="start_training_loop", ts=1000.0, step=0, epoch=1))
    seq, t, steps = 1, 1000.0, 5 * WINDOW_STEPS_MAX
    for index in range(steps):  # 30 ms waiting for data, then 10 ms of compute; every tenth step 100 ms more
        t += 0.030
        seq += 1
        plugin.on_start_training_batch(Event(seq=seq, run="r", type="start_training_batch", ts=t, step=index,
                                             epoch=1, data={"batch_index": index}))
        t += 0.010 + (0.100 if index % 10 == 9 else 0.0)
        seq += 1
        plugin.on_end_training_batch(Event(seq=seq, run="r", type="end_training_batch", ts=t, step=index, epoch=1,
                                           data={"batch_index": index, "batch_size": 32}))
        assert len(plugin._window.durations) <= WINDOW_STEPS_MAX
    readings = plugin.tick()
    h.close()
    assert readings["perf/steps_per_s"] == pytest.approx(1 / 0.050, rel=0.01)  # 40 ms, and 100 ms a tenth of them
    assert readings["perf/step_time_p50_ms"] == pytest.approx(40.0)
    assert readings["perf/step_time_p95_ms"] == pytest.approx(140.0)
    assert readings["perf/data_wait_share"] == pytest.approx(0.030 / 0.050, rel=0.01)


def test_readings_come_quickly_at_first_then_at_the_interval():
    assert list(islice(_sampling.reading_gaps(5.0), 7)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert list(islice(_sampling.reading_gaps(0.05), 3)) == [0.05, 0.05, 0.05]  # an interval below the first gap


def test_a_monitor_reads_as_the_session_starts_and_once_more_as_it_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(_sampling, "FIRST_READING_AFTER_S", 60.0)  # no reading on the clock during this test
    plugin = MemoryMonitorPlugin({"interval_s": 60.0}, run_dir=str(tmp_path))
    sent: list = []
    plugin.bind_sender(sent.append)
    plugin.setup()
    plugin.handle(Event(seq=1, run="r", type="start_training_session", ts=0.0, step=0, epoch=0, data={}))
    deadline = time.monotonic() + 10
    while not metrics(sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "memory/used_bytes" in metrics(sent), "no reading as the session started"
    time.sleep(2 * _sampling.MIN_INTERVAL_S)  # a reading right after another would measure nothing, and is not taken
    sent.append("teardown")
    plugin.teardown()
    assert "memory/used_bytes" in metrics(sent[sent.index("teardown") + 1:]), "no last reading as it stopped"


# a real run


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """Digits for 3 epochs of 0.8 s with every monitor (0.5 s interval), the metrics log and TensorBoard attached."""
    runs_dir = tmp_path_factory.mktemp("runs")
    plugins = [resolve_plugin(name, {"interval_s": INTERVAL_S}) for name in MONITORS]
    plugins += [resolve_plugin("metrics_log", {}), resolve_plugin("visualization", {"plots": False})]
    wall_before, cpu_before = time.monotonic(), _cpu_s()
    result = run_training(RunConfig(target=TIMED, epochs=3, runs_dir=str(runs_dir), plugins=plugins,
                                    hyperparameters={"epoch_s": 0.8}))
    result.kernel_cpu_percent = 100 * (_cpu_s() - cpu_before) / (time.monotonic() - wall_before)
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return result, records, read_events(result.run_dir)


def test_monitor_readings_reach_the_metrics_log_while_training_runs(monitored_run):
    """Ordered by seq, not by the clock: every monitor's readings are logged between the session's start (which
    wakes each for a reading) and its end, however late a busy machine runs the monitors."""
    result, records, events = monitored_run
    assert result.status == "completed", result
    assert all(p["state"] == "exited" and not p["restarts"] for p in result.plugins.values()), result.plugins
    started = next(e.seq for e in events if e.type == "start_training_session")
    ended = next(e.seq for e in events if e.type == "end_training_session")
    readings: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["kind"] == "metric":
            readings.setdefault(r["name"], []).append((r["seq"], r["value"]))
    for name in ("cpu/process_percent", "memory/used_bytes", "disk/free_bytes", "perf/steps_per_s"):
        assert name in readings, f"no {name} in the metrics log; got {sorted(readings)}"
        assert [seq for seq, _ in readings[name] if started < seq < ended], f"no {name} logged while training ran"

    values = {name: [v for _, v in points] for name, points in readings.items()}
    # Training keeps the kernel busy: its readings are far above an idle process's ~0 %, and in line with
    # what this (the kernel's) process used over the whole run, however loaded the test machine is.
    assert max(values["cpu/process_percent"]) > max(20.0, 0.5 * result.kernel_cpu_percent)
    assert all(0 <= v <= 100 for v in values["cpu/system_percent"] + values["memory/percent"])
    assert all(0 < v for v in values["memory/process_rss_bytes"])
    total = values["memory/total_bytes"][0]
    assert all(0 < v <= total for v in values["memory/used_bytes"])
    assert all(v > 0 for v in values["disk/free_bytes"] + values["perf/steps_per_s"] + values["perf/samples_per_s"])
    assert all(0 <= v <= 1 for v in values["perf/data_wait_share"] + values["perf/compute_share"])
    p50s, p95s = values["perf/step_time_p50_ms"], values["perf/step_time_p95_ms"]
    assert all(0 < a <= b for a, b in zip(p50s, p95s))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Digits for 2 epochs of 1 s with every monitor as it comes (5 s interval), and no plugin that must drain."""
    runs_dir = tmp_path_factory.mktemp("runs")
    plugins = [resolve_plugin(name, {}) for name in MONITORS]
    result = run_training(RunConfig(target=TIMED, epochs=2, runs_dir=str(runs_dir), plugins=plugins,
                                    hyperparameters={"epoch_s": 1.0}))
    assert result.status == "completed", result
    return result


def test_a_two_second_run_has_readings_from_every_monitor_and_plots_one_quantity_per_axis(short_run, tmp_path):
    history = History.from_journal(short_run.run_dir)  # what plots are drawn from: the record up to the final event
    tags = {"cpu": "cpu/process_percent", "memory": "memory/used_bytes", "disk": "disk/free_bytes",
            "perf": "perf/steps_per_s"}
    if gpu_monitor.pynvml is not None and _has_gpu():
        tags["gpu"] = "gpu/gpu0_util_percent"
    for tag in tags.values():
        readings = history.readings.get(tag, [])
        assert len(readings) >= 2, f"{tag}: {readings}; the run's readings: {sorted(history.readings)}"

    written = {path.name: path for path in plot_run(short_run.run_dir, tmp_path)}  # as `trainbus runs plot` draws
    size = PlotSize()  # the visualization plugin's default
    figures = resource_figures(history, size)
    for monitor in tags:
        name = f"resources-{monitor}.png"
        assert written[name].read_bytes() == png_bytes(figures[name], size), f"{name} is not the figure checked here"
        for ax in figures[name].axes:
            assert ax.get_ylabel(), f"{name}: a panel without a unit"
            assert any(len(line.get_xdata()) for line in ax.get_lines()), f"{name}: empty panel ({ax.get_ylabel()})"
    cpu = figures["resources-cpu.png"].axes
    assert [ax.get_ylabel() for ax in cpu] == ["% of one core", "% busy"]  # up to 100 x cores apart from 0-100
    assert [line.get_label() for line in cpu[0].get_lines()] == ["process_percent"]
    perf_units = [ax.get_ylabel() for ax in figures["resources-perf.png"].axes]
    assert {"steps/s", "samples/s", "ms", "% of step time"} == set(perf_units) and len(perf_units) == 4


def test_monitor_readings_reach_tensorboard(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = monitored_run
    accumulator = EventAccumulator(str(Path(result.run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"cpu/process_percent", "memory/percent", "disk/free_bytes", "perf/steps_per_s"} <= tags
    assert all(0 <= s.value <= 100 for s in accumulator.Scalars("memory/percent"))


def test_without_a_gpu_the_gpu_monitor_says_why_in_one_line_and_the_run_finishes(monitored_run):
    result, records, events = monitored_run
    assert result.plugins["gpu"]["state"] == "exited"
    gpu_logs = [e for e in events if e.type == "log" and e.data.get("plugin") == "gpu"]
    if gpu_monitor.pynvml is not None and _has_gpu():
        pytest.skip("this machine has a GPU")
    assert len(gpu_logs) == 1 and "idle" in gpu_logs[0].data["text"]
    assert len(gpu_logs[0].data["text"].splitlines()) == 1
    assert not [r for r in records if r["kind"] == "metric" and r["plugin"] == "gpu"]
    plugin_log = (Path(result.run_dir) / "plugins" / "gpu.log").read_text()
    assert plugin_log.count("gpu monitor idle") == 1


def _has_gpu() -> bool:
    try:
        gpu_monitor.pynvml.nvmlInit()
        return gpu_monitor.pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


# disk's reply over real sockets, against a minimal stand-in kernel on TCP (as from another machine)


def test_disk_low_space_reply_reaches_the_kernel_socket(tmp_path):
    kernel = StandInKernel("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", run_id="remote")
    proc = kernel.start_plugin("trainbus.plugins.disk_monitor:DiskMonitorPlugin", "disk",
                               {"interval_s": 0.1, "min_free_gib": 1e9}, tmp_path)
    received: list[dict] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _samples(received) < 3:
            kernel.publish("heartbeat", interval_s=1.0)
            while (got := kernel.receive(100)) is not None:
                identity, message = got
                received.append(message)
                if message["type"] == "hello":
                    kernel.welcome(identity, resume_from=1)
        kernel.publish("end_training_session")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        kernel.close()
    checkpoints = [m for m in received if m["type"] == "checkpoint_now"]
    assert len(checkpoints) == 1, received  # once, though every sample after it is still below the threshold
    assert "min_free_gib" in checkpoints[0]["reason"]
    assert any(m["type"] == "log" and m["level"] == "warning" for m in received)
    assert _samples(received) >= 3


def _samples(received: list[dict]) -> int:
    return sum(m["type"] == "metric" and m["name"] == "disk/free_bytes" for m in received)




def test_disk_low_space_in_a_real_run_triggers_a_checkpoint(tmp_path):
    """Threshold above the free space: disk warns once and asks; the kernel snapshots; the plugin writes it."""
    disk = resolve_plugin("disk", {"interval_s": 0.2, "min_free_gib": 1e9})
    checkpoint = resolve_plugin("checkpoint", {})
    result = run_training(RunConfig(target=TIMED, epochs=2, runs_dir=str(tmp_path), plugins=[disk, checkpoint],
                                    hyperparameters={"epoch_s": 0.5}, checkpoint_every_n_epochs=0,
                                    ready_timeout_s=PLUGIN_START_S))
    assert result.status == "completed"
    events = read_events(result.run_dir)
    warnings = [e for e in events if e.type == "log" and e.data.get("plugin") == "disk"]
    assert len(warnings) == 1 and "asked for a checkpoint" in warnings[0].data["text"]
    saves = [e for e in events if e.type == "save_checkpoint"]
    assert [e.data["reason"] for e in saves] == ["checkpoint_now"], "one reply, one checkpoint, none scheduled"
    saved = [e for e in events if e.type == "checkpoint_saved"]
    assert len(saved) == 1 and saved[0].data["seq"] == saves[0].seq and Path(saved[0].data["path"]).is_file()




def test_plugins_list_shows_every_builtin_with_one_line_and_its_settings():
    from trainbus.kernel.plugin_names import registered_plugins
    from trainbus.sdk.loader import describe

    env = dict(os.environ, COLUMNS="400")  # one table row per plugin, nothing wrapped
    proc = subprocess.run([str(Path(sys.executable).parent / "trainbus"), "plugins", "list"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # per plugin "name (delivery): description", then its table: │ setting │ type │ default │ allowed │ help │
    headings, rows, plugin = {}, {}, None
    for line in proc.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if " (" in line and not cells:
            plugin, _, heading = line.partition(" ")
            headings[plugin] = heading
        elif len(cells) == 5:
            rows[f"{plugin}.{cells[0]}"] = cells[1:]
    for name in (*MONITORS, "visualization", "email"):
        info = describe(registered_plugins()[name])
        assert info["description"] and "\n" not in info["description"]
        assert headings[name].endswith(info["description"]), headings.get(name)
        assert name in ("visualization", "email") or rows[f"{name}.interval_s"][:2] == ["float", "5.0"]
    assert rows["disk.min_free_gib"][1] == "1.0" and rows["email.recipients"][1] == "[]"
    assert rows["visualization.plot_every_n_epochs"][:3] == ["int", "1", ">= 0"]
