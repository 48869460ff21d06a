"""Precision, gradient accumulation, clipping and compile: the math on real torch, and real runs of the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kernel_process import cli
from helpers import PLUGIN_START_S, assert_same_weights
from trainbus.kernel.config import RunConfig
from trainbus.kernel.config_file import parse_config
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.kernel.stepping import Stepper, SteppingError, check_precision

SPECS = str(Path(__file__).resolve().parent / "specs.py")


def _model_and_batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g))
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    return model, batches


def test_accumulating_k_batches_is_one_step_on_their_mean_gradient():
    model, batches = _model_and_batches(4)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.5), torch.device("cpu"), accumulate_grad_batches=2)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    steps = 0
    for inputs, targets in batches:
        stepper.batch(inputs, targets, torch.nn.functional.cross_entropy)
        if stepper.due():
            stepper.step()
            steps += 1
    for pair in (batches[:2], batches[2:]):  # by hand: the mean of two batches' losses, one step
        optimizer.zero_grad()
        (sum(torch.nn.functional.cross_entropy(reference(x), y) for x, y in pair) / 2).backward()
        optimizer.step()
    assert steps == 2 and stepper.pending == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name])


def test_a_partial_accumulation_steps_when_asked_and_not_before():
    model, batches = _model_and_batches(1)
    before = model.weight.detach().clone()
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.5), torch.device("cpu"), accumulate_grad_batches=3)
    stepper.batch(*batches[0], torch.nn.functional.cross_entropy)
    assert not stepper.due() and torch.equal(model.weight, before)
    stepper.step()  # the epoch's end
    assert stepper.pending == 0 and not torch.equal(model.weight, before)


def test_clipping_bounds_the_gradient_norm_of_every_step():
    model, batches = _model_and_batches(1)
    before = [p.detach().clone() for p in model.parameters()]
    lr, clip = 1.0, 0.05
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=lr), torch.device("cpu"), gradient_clip_val=clip)
    inputs, targets = batches[0]
    stepper.batch(inputs * 100, targets, torch.nn.functional.cross_entropy)  # a gradient far over the clip
    unclipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    stepper.step()
    update = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert unclipped > 10 * clip
    assert update == pytest.approx(lr * clip, rel=1e-4)  # SGD: the step is lr times the clipped gradient


def test_bf16_mixed_runs_the_forward_in_bfloat16_and_bf16_true_the_model_itself():
    model, batches = _model_and_batches(1)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), precision="bf16-mixed").batch(
        *batches[0], torch.nn.functional.cross_entropy)
    assert seen == [torch.bfloat16] and model.weight.dtype == torch.float32
    Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), precision="bf16-true")
    assert model.weight.dtype == torch.bfloat16


def test_a_loss_module_with_class_weights_follows_the_models_device_and_bf16_true():
    """CrossEntropyLoss(weight=...) for imbalanced classes: its weight stayed float32 on the CPU while the model moved,
    so bf16-true failed its first step ('expected scalar type BFloat16 but found Float' in loss_fn), as would any
    run on a GPU (its outputs on cuda, the weight on the CPU). Lightning moves and casts a module's loss with it."""
    from trainbus.kernel.loop import Loop
    from trainbus.kernel.spec import TrainingSpec
    from test_loop_events import RecordingBus
    from torch.utils.data import DataLoader, TensorDataset

    model, batches = _model_and_batches(2)
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
    spec = TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss,
                        train_loader=DataLoader(TensorDataset(*map(torch.cat, zip(*batches))), batch_size=8))
    cpu = torch.device("cpu")
    outcome = Loop(spec, RecordingBus(), cpu, stepper=Stepper(model, spec.optimizer, cpu, precision="bf16-true")).run()
    assert outcome.epochs_completed == 1 and loss.weight.dtype == torch.bfloat16


def test_16_mixed_needs_cuda():
    with pytest.raises(SteppingError, match="16-mixed needs a CUDA device.*use bf16-mixed on the CPU"):
        check_precision("16-mixed", torch.device("cpu"))


@pytest.mark.parametrize("options", [
    {"precision": "bf16-mixed"},
    {"precision": "bf16-true"},
    {"accumulate_grad_batches": 3},
    {"gradient_clip_val": 0.5},
    pytest.param({"compile": True}, marks=pytest.mark.slow),  # torch.compile takes ~20 s on 2 cores
])
def test_each_option_trains_the_demo_and_is_recorded(tmp_path, options):
    result = run_training(RunConfig(epochs=2, device="cpu", runs_dir=str(tmp_path), plugins=[], **options))
    assert result.status == "completed"
    [start] = [e for e in read_events(result.run_dir) if e.type == "start_training_session"]
    recorded = json.loads((Path(result.run_dir) / "config.json").read_text())
    for key, value in options.items():
        assert start.data[key] == value and recorded[key] == value
    # it learns: the digits demo's 10 classes start at ~10 % accuracy
    assert result.outcome["validation_metrics"]["accuracy"] > 0.5, result.outcome


def test_resume_inside_an_accumulation_cycle_is_exact(tmp_path):
    """Checkpoints wait for the optimizer step (partly accumulated gradients are in no checkpoint), so a run
    resumed from any of its checkpoints ends with the uninterrupted run's weights."""
    def config(runs: Path, resume: str = "") -> RunConfig:
        return RunConfig(target=f"{SPECS}:tiny", epochs=3, device="cpu", runs_dir=str(runs), resume=resume,
                         plugins=[resolve_plugin("checkpoint", {"save_top_k": -1})], accumulate_grad_batches=2,
                         checkpoint_every_n_steps=1, checkpoint_every_n_epochs=0, drain_timeout_s=60,
                         ready_timeout_s=PLUGIN_START_S)

    reference = run_training(config(tmp_path / "reference"))
    assert reference.status == "completed"
    saved = [e for e in read_events(reference.run_dir) if e.type == "checkpoint_saved"]
    states = {e.data["path"]: torch.load(e.data["path"], weights_only=True)["trainbus"] for e in saved}
    # 3 batches an epoch, a step every 2: checkpoints asked for at every step land after batches 2 and 3 only
    # (some are skipped while both snapshot buffers are being written: by design, the next one lands)
    taken = [e.step for e in read_events(reference.run_dir) if e.type == "save_checkpoint"]
    assert taken and all(step % 3 in (2, 0) for step in taken), taken
    assert all(s["batches_done"] in (2, 3) for s in states.values())
    mid_epoch = next(path for path, s in states.items() if s["batches_done"] == 2 and not s["epoch_complete"])
    resumed = run_training(config(tmp_path / "resumed", resume=mid_epoch))
    assert resumed.status == "completed"
    assert_same_weights(resumed.run_dir, reference.run_dir)


@pytest.mark.parametrize("given, ours", [
    ("32-true", "32"), (32, "32"), ("32", "32"), ("16", "16-mixed"), (16, "16-mixed"), ("bf16", "bf16-mixed"),
    ("bf16-mixed", "bf16-mixed"), ("bf16-true", "bf16-true"),
])
def test_lightning_precision_spellings_are_taken_by_our_name(given, ours):
    """Lightning's Trainer(precision=...) takes 32-true, 16, bf16 and the integers 16 and 32 (its
    _PRECISION_INPUT_STR_ALIAS_CONVERSION); a [run] table written for it means the same here."""
    assert parse_config({"run": {"precision": given}, "plugins": {}}).precision == ours


def test_a_run_config_made_in_python_is_checked_as_the_command_lines_is(tmp_path):
    """run_training(RunConfig(precision="fp8")) trained in float32 and recorded "fp8"; "bf16" likewise trained in
    float32. Now the same checks as `trainbus run`'s: an error before anything is made, and Lightning's names ours."""
    from trainbus.kernel.config import ConfigError

    with pytest.raises(ConfigError, match="RunConfig: precision must be one of 32, bf16-mixed"):
        run_training(RunConfig(target=f"{SPECS}:tiny", epochs=1, device="cpu", precision="fp8", plugins=[],
                               runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
    result = run_training(RunConfig(target=f"{SPECS}:tiny", epochs=1, device="cpu", precision="bf16", plugins=[],
                                    runs_dir=str(tmp_path / "runs")))
    assert result.status == "completed" and json.loads((Path(result.run_dir) / "config.json").read_text())[
        "precision"] == "bf16-mixed"


def test_a_run_given_lightnings_precision_records_ours(tmp_path):
    proc = cli("run", f"{SPECS}:tiny", "--epochs", "1", "--device", "cpu", "--precision", "32-true",
               "--runs-dir", str(tmp_path), "--plugins", "")
    assert proc.returncode == 0, proc.stderr
    [config] = tmp_path.glob("*/config.json")
    assert json.loads(config.read_text())["precision"] == "32"
    [start] = [e for e in read_events(config.parent) if e.type == "start_training_session"]
    assert start.data["precision"] == "32"


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_gradient_clip_val_flag_that_is_no_finite_bound_is_one_line(tmp_path, value):
    """As in [run]: typer's own bound let inf through (a norm computed every step that clips nothing) and said of a
    NaN that it should be >= 0."""
    proc = cli("run", f"{SPECS}:tiny", f"--gradient-clip-val={value}", "--device", "cpu", "--runs-dir",
               str(tmp_path), "--plugins", "")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith(f"gradient_clip_val must be a finite number >= 0 (0 turns clipping off), got "
                                        f"{float(value)}"), proc.stderr
    assert not any(tmp_path.glob("*/config.json"))


# said before torch is imported, as every mistake of the command line is: the kernel's own check says it after seconds
ON_CPU = "precision 16-mixed needs a CUDA device (float16 autocast with a loss scaler) and this run asks for device cpu"


@pytest.mark.parametrize("run_table, error", [
    ('precision = "16-mixed"', ON_CPU),
    ('precision = "fp8"', "precision must be one of 32, bf16-mixed, 16-mixed, bf16-true"),
    ("accumulate_grad_batches = 0", "accumulate_grad_batches must be 1 to 1,000,000,000, got 0"),
    ("gradient_clip_val = nan", "gradient_clip_val must be a finite number >= 0 (0 turns clipping off), got nan"),
    ("gradient_clip_val = inf", "gradient_clip_val must be a finite number >= 0 (0 turns clipping off), got inf"),
    ("precision = 16", ON_CPU),  # Lightning's 16, taken as 16-mixed
    ('precision = "16-true"', "precision 16-true (float16 weights) is not supported; use 16-mixed (CUDA) or bf16-true"),
    ("precision = 64", "precision 64 (float64 weights) is not a precision here"),  # Lightning's 64, as TOML has it
    ("precision = 32.0", "precision must be one of 32, bf16-mixed, 16-mixed, bf16-true"),
])
def test_a_bad_option_is_one_line_and_exit_2_with_no_run_left(tmp_path, run_table, error):
    config = tmp_path / "run.toml"
    config.write_text(f"[run]\ndevice = \"cpu\"\n{run_table}\n")
    proc = cli("run", "--config", str(config), "--runs-dir", str(tmp_path / "runs"), "--plugins", "")
    assert proc.returncode == 2, proc.stderr
    assert error in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not any((tmp_path / "runs").glob("*/config.json"))
