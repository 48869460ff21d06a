"""Batches and schedules as users' own code has them: the loop on the CPU with a recording bus (no sockets: what is
tested is what the loop does with a batch, a metric, a loss and a scheduler), and the one-line errors for what it
cannot take."""

from __future__ import annotations

import copy
import gc
import random
import re
import sys
from collections import UserDict
from dataclasses import dataclass

import numpy
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainbus.kernel.batches import BatchError
from trainbus.kernel.loop import Loop
from trainbus.kernel.training_state import restore_weights, resume_problem
from trainbus.kernel.spec import SpecError, TrainingSpec, build_spec
from trainbus.kernel.training_state import seed_everything
from trainbus.proto import events as ev

from test_loop_events import RecordingBus

SAMPLES, BATCH = 20, 8  # 3 batches an epoch, the last one short (4)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SAMPLES, 5, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g)


class DictSet(Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "weight": torch.tensor(1.0)}


@dataclass
class Batch:  # a custom collate's batch, which knows how to move itself
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device):
        return Batch(self.x.to(device), self.y.to(device))


def spec(loader, validation=None, **fields) -> TrainingSpec:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    fields.setdefault("loss_fn", torch.nn.functional.cross_entropy)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_loader=loader,
                        validation_loader=validation, epochs=2, **fields)


def run(s: TrainingSpec) -> tuple[RecordingBus, object]:
    s.check()
    bus = RecordingBus()
    return bus, Loop(s, bus, torch.device("cpu")).run()


def final_weights(s: TrainingSpec) -> torch.Tensor:
    run(s)
    return s.model.weight.detach().clone()


def plain() -> TrainingSpec:
    x, y = data()
    return spec(DataLoader(TensorDataset(x, y), batch_size=BATCH))


def test_batches_of_other_shapes_train_as_the_plain_pair_does():
    reference = final_weights(plain())
    as_dicts = spec(DataLoader(DictSet(), batch_size=BATCH), unpack_batch=lambda b: (b["image"], b["label"]))
    assert torch.equal(final_weights(as_dicts), reference)
    x, y = data()
    collated = spec(DataLoader(TensorDataset(x, y), batch_size=BATCH, collate_fn=lambda items: Batch(
        torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))), unpack_batch=lambda b: (b.x, b.y))
    assert torch.equal(final_weights(collated), reference)
    # inputs and targets may be nested: (x, weights) as targets, for a loss that weighs the samples
    weighted = spec(DataLoader(DictSet(), batch_size=BATCH),
                    unpack_batch=lambda b: (b["image"], (b["label"], b["weight"])),
                    loss_fn=lambda out, t: (torch.nn.functional.cross_entropy(out, t[0], reduction="none") * t[1]).mean())
    assert torch.equal(final_weights(weighted), reference)


def test_a_batch_that_is_not_a_pair_names_what_it_is_and_unpack_batch():
    with pytest.raises(BatchError, match=r"a batch of train_loader is a dict with keys 'image', 'label', 'weight', "
                                         r"not \(inputs, targets\): give TrainingSpec\(unpack_batch=...\)"):
        run(spec(DataLoader(DictSet(), batch_size=BATCH)))
    x, y = data()
    with pytest.raises(BatchError, match="is a list of 3, not"):
        run(spec(DataLoader(TensorDataset(x, y, y), batch_size=BATCH)))


def test_the_unpack_batch_example_fits_the_batch():
    """A list batch was told `unpack_batch=lambda batch: (batch['x'], batch['y'])`, which fails on a list with a
    TypeError of its own; a dict batch is shown its own keys."""
    x, y = data()
    with pytest.raises(BatchError) as raised:
        run(spec(DataLoader(TensorDataset(x, y, y), batch_size=BATCH)))
    assert str(raised.value).endswith("e.g. unpack_batch=lambda batch: (batch[0], batch[1])"), raised.value
    with pytest.raises(BatchError) as raised:
        run(spec(DataLoader(DictSet(), batch_size=BATCH)))
    assert str(raised.value).endswith("e.g. unpack_batch=lambda batch: (batch['image'], batch['label'])"), raised.value
    for loader, example in ((DataLoader(x, batch_size=BATCH), "(batch, batch)"),  # inputs alone: an autoencoder's
                            (DataLoader(TensorDataset(x), batch_size=BATCH), "(batch[0], batch[0])")):
        with pytest.raises(BatchError) as raised:
            run(spec(loader))
        assert f"e.g. unpack_batch=lambda batch: {example} (the inputs as their own targets), or " in str(raised.value)
    # and such a spec trains, without targets too
    run(spec(DataLoader(x, batch_size=BATCH), loss_fn=lambda out, y: out.pow(2).mean(),
             unpack_batch=lambda b: (b, None)))


def test_the_unpack_batch_example_of_an_object_batch_uses_its_fields():
    """A custom collate's dataclass was told `(batch['x'], batch['y'])`, which fails on it with a TypeError of its
    own (not subscriptable); a mapping that is no dict (transformers' BatchEncoding, a UserDict) is shown its keys."""
    x, y = data()
    collate = lambda items: Batch(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))  # noqa: E731
    with pytest.raises(BatchError) as raised:
        run(spec(DataLoader(TensorDataset(x, y), batch_size=BATCH, collate_fn=collate)))
    assert str(raised.value).endswith("e.g. unpack_batch=lambda batch: (batch.x, batch.y)"), raised.value
    mapping = lambda items: UserDict(inputs=torch.stack([i[0] for i in items]),  # noqa: E731
                                     labels=torch.stack([i[1] for i in items]))
    with pytest.raises(BatchError) as raised:
        run(spec(DataLoader(TensorDataset(x, y), batch_size=BATCH, collate_fn=mapping)))
    assert str(raised.value).endswith("e.g. unpack_batch=lambda batch: (batch['inputs'], batch['labels'])"), \
        raised.value


@pytest.mark.parametrize("returned, said", [
    (lambda out, y: (out.argmax(1) == y).float(), "returned one tensor of shape (8,)"),  # per sample
    (lambda out, y: None, "returned a NoneType"),
    (lambda out, y: {"a": 1.0}, "returned a dict with keys 'a'"),
])
def test_a_metric_that_is_not_one_number_is_named(returned, said):
    s = plain()
    s.metrics = {"acc": returned}
    with pytest.raises(BatchError, match=re.escape(f"metric 'acc' {said}: a metric must return one number")):
        run(s)


def test_a_metric_of_one_element_in_a_numpy_array_is_taken_as_one_in_a_tensor_is():
    """numpy 2's float() takes a 0-d array only: a metric returning np.array([0.5]) was refused."""
    import numpy

    s = plain()
    s.metrics = {"acc": lambda out, y: numpy.array([(out.argmax(1) == y).float().mean().item()]),
                 "half": lambda out, y: numpy.full((1, 1), 0.5)}
    bus, _ = run(s)
    [end] = [data for type_, _, data in bus.events if type_ == "end_epoch"][-1:]
    assert end["training_metrics"]["half"] == 0.5 and 0 <= end["training_metrics"]["acc"] <= 1, end


def test_a_loss_that_is_not_one_number_says_so():
    s = plain()
    s.loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
    with pytest.raises(BatchError, match=r"loss_fn returned one tensor of shape \(8,\): it must return the batch's "
                                         r"loss as one number"):
        run(s)


@pytest.mark.parametrize("loss_fn", [
    lambda out, y: torch.tensor(torch.nn.functional.cross_entropy(out, y).item()),  # a number made a tensor again
    lambda out, y: torch.nn.functional.cross_entropy(out, y).detach(),
])
def test_a_loss_cut_off_from_the_model_says_so_and_how_not_torchs_element_0(loss_fn):
    """torch's own words at the backward, 'element 0 of tensors does not require grad and does not have a grad_fn',
    named neither loss_fn nor what cut it off (the kernel's backward is no frame of the user's)."""
    s = plain()
    s.loss_fn = loss_fn
    with pytest.raises(BatchError) as raised:
        run(s)
    assert str(raised.value) == (
        "loss_fn returned a loss that does not require a gradient (it has no grad_fn), so nothing would train: it was "
        "cut off from the model's outputs (.item(), .detach(), torch.tensor(...), numpy, or torch.no_grad()); compute "
        "it from the outputs with torch operations")


def test_an_epoch_without_batches_is_an_error_not_a_run_that_trains_nothing():
    x, y = data()
    with pytest.raises(BatchError, match="train_loader gave no batch in epoch 1: it is empty"):
        run(spec(DataLoader(TensorDataset(x, y), batch_size=64, drop_last=True)))
    once = iter(DataLoader(TensorDataset(x, y), batch_size=BATCH))  # a one-shot iterator: epoch 1 uses it up
    with pytest.raises(BatchError, match="train_loader gave no batch in epoch 2"):
        Loop(spec(once), RecordingBus(), torch.device("cpu")).run()  # what check() refuses, should it be skipped


def test_a_one_shot_iterator_for_more_than_one_epoch_is_refused_before_training():
    """A generator as validation_loader (Lightning takes any iterable) trained a whole epoch, and the next one's
    batches, before its validation found it used up: an error an epoch in that was knowable before the start."""
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with pytest.raises(SpecError) as raised:
        spec(loader, validation=(b for b in [(x, y)])).check()
    assert str(raised.value) == (
        "TrainingSpec.validation_loader is a generator, a one-shot iterator that the first of the run's 2 epochs "
        "uses up: give a DataLoader or a list, or an object whose __iter__ makes a fresh iterator each epoch")
    with pytest.raises(SpecError, match="train_loader is a _SingleProcessDataLoaderIter, a one-shot iterator"):
        spec(iter(loader)).check()
    class Restarting:  # an iterator of the user's own that starts again at each iter(): every epoch has batches
        def __iter__(self):
            self.i = 0
            return self

        def __next__(self):
            self.i += 1
            if self.i > 2:
                raise StopIteration
            return x[:BATCH], y[:BATCH]

    run(spec(Restarting()))
    one_epoch = spec(loader, validation=(b for b in [(x, y)]))
    one_epoch.epochs = 1
    run(one_epoch)  # one epoch: a generator gives all it has


def lrs(bus: RecordingBus) -> list[float]:
    return [data["lr"] for type_, _, data in bus.events if type_ == ev.END_EPOCH]


def test_schedulers_step_per_epoch_per_step_or_on_a_plateau_and_each_epoch_reports_the_lr_it_trained_with():
    s = plain()
    s.scheduler = torch.optim.lr_scheduler.StepLR(s.optimizer, step_size=1, gamma=0.5)
    bus, _ = run(s)
    assert lrs(bus) == [0.1, 0.05]  # epoch 1 trained at 0.1, epoch 2 at 0.05
    s = plain()
    s.scheduler, s.scheduler_interval = torch.optim.lr_scheduler.OneCycleLR(s.optimizer, max_lr=1.0, total_steps=6), \
        "step"
    run(s)
    assert s.scheduler.last_epoch == 6  # one step per optimizer step: the whole cycle in 2 epochs x 3 batches
    s = plain()
    s.scheduler, s.scheduler_interval = torch.optim.lr_scheduler.StepLR(s.optimizer, step_size=3, gamma=0.5), "step"
    bus, _ = run(s)
    assert lrs(bus) == [0.1, 0.05]  # each epoch's 3 steps at one lr: the schedule moved on after its last step
    s = plain()
    s.validation_loader = s.train_loader
    s.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(s.optimizer, patience=0, threshold=10.0)
    run(s)  # nothing "improves" by 10x: each epoch's step with its validation_loss cuts the lr
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    bad = plain()
    bad.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(bad.optimizer)
    with pytest.raises(SpecError, match="scheduler_monitor 'validation_loss' .* one of: training_loss"):
        bad.check()  # no validation_loader: nothing to watch


def _train_a_loss_of_its_own(s: TrainingSpec) -> None:
    s.loss_fn = torch.nn.CrossEntropyLoss()
    s.loss_fn.temperature = torch.nn.Parameter(torch.ones(1))
    s.optimizer.add_param_group({"params": [s.loss_fn.temperature]})


@pytest.mark.parametrize("change, message", [
    (lambda s: setattr(s, "loss_fn", torch.nn.CrossEntropyLoss),
     "TrainingSpec.loss_fn is the class CrossEntropyLoss, not one made from it: call it (CrossEntropyLoss(...))"),
    (lambda s: setattr(s, "optimizer", torch.optim.SGD),
     "TrainingSpec.optimizer is the class SGD, not one made from it: call it (SGD(...))"),
    (lambda s: setattr(s, "scheduler", "not a scheduler"),  # an epoch trained first, then an AttributeError
     "TrainingSpec.scheduler must be a torch.optim.lr_scheduler scheduler (or anything with step, state_dict and "
     "load_state_dict), got str without step, state_dict, load_state_dict"),
    (lambda s: setattr(s, "scheduler", torch.optim.lr_scheduler.StepLR),
     "TrainingSpec.scheduler is the class StepLR, not one made from it: call it (StepLR(...))"),
    (lambda s: setattr(s, "scheduler", torch.optim.lr_scheduler.StepLR(
        torch.optim.SGD(s.model.parameters(), lr=0.1), step_size=1)),
     "TrainingSpec.scheduler steps another optimizer than TrainingSpec.optimizer, which would train at an unchanged "
     "rate: make it from the spec's optimizer"),
    (lambda s: setattr(s, "train_loader", None),
     "TrainingSpec.train_loader must be iterable (a torch DataLoader, or any re-iterable of batches), got NoneType"),
    (lambda s: setattr(s, "validation_loader", 5),
     "TrainingSpec.validation_loader must be iterable (a torch DataLoader, or any re-iterable of batches), got int"),
    # Lightning's several validation loaders: each DataLoader was taken for a batch, an epoch in, and the error
    # suggested unpack_batch, which cannot help
    (lambda s: setattr(s, "validation_loader", [s.train_loader, s.train_loader]),
     "TrainingSpec.validation_loader is a list of 2 DataLoaders; it takes one loader: give one, or one over their "
     "datasets together (torch.utils.data.ConcatDataset([...]))"),
    (lambda s: setattr(s, "train_loader", {"a": s.train_loader, "b": s.train_loader}),
     "TrainingSpec.train_loader is a dict of 2 DataLoaders; it takes one loader: give one, or one over their "
     "datasets together (torch.utils.data.ConcatDataset([...]))"),
    (lambda s: setattr(s, "hyperparameters", ["lr", 0.1]),  # failed after the build, in the kernel's own code
     "TrainingSpec.hyperparameters must be a dict of name -> value, got list"),
    # a loss with learned weights (uncertainty weighting, a temperature) outside the model: what it learned was in no
    # checkpoint or final.pt, and a resume started it over
    (lambda s: _train_a_loss_of_its_own(s),
     "TrainingSpec.optimizer trains 1 parameter (1 value) that is not TrainingSpec.model's (loss_fn's own): "
     "checkpoints and final.pt hold the model's state alone, so what it learns would be lost and a resume would "
     "start it over; make it the model's (model.loss_fn = loss_fn: a submodule is saved, moved to the device and "
     "resumed with the model)"),
    (lambda s: s.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(n)) for n in (3, 2)]}),
     "TrainingSpec.optimizer trains 2 parameters (5 values) that are not TrainingSpec.model's: checkpoints and "
     "final.pt hold the model's state alone, so what they learn would be lost and a resume would start them over; "
     "make them the model's (model.extra = torch.nn.Parameter(...), or a submodule holding them)"),
    # its values took the loss's place in the checkpoints' metrics (training_loss 42.0), what top-k ranks by
    (lambda s: setattr(s, "metrics", {"loss": lambda o, t: 42.0}),
     "TrainingSpec.metrics names a metric 'loss', the name of the loss itself (training_loss, validation_loss), "
     "whose values its values would take the place of: name it otherwise"),
    (lambda s: setattr(s, "metrics", [lambda o, t: 1.0]),
     "TrainingSpec.metrics must be a dict of name -> callable(outputs, targets) -> one number, got list"),
    (lambda s: setattr(s, "metrics", {"acc": 0.5}),
     "TrainingSpec.metrics must be a dict of name -> callable(outputs, targets) -> one number, got dict whose 'acc' "
     "is a float, not callable"),
    # said as a value not callable, of a dict whose one value was a function
    (lambda s: setattr(s, "metrics", {1: lambda o, t: 1.0}),
     "TrainingSpec.metrics must be a dict of name -> callable(outputs, targets) -> one number, got dict with a name "
     "that is not a string: 1 (an int)"),
    # printed raw into the run's summary line, the terminal taking its escape sequence; an empty one as `validation_`
    (lambda s: setattr(s, "metrics", {"acc\x1b[31m": lambda o, t: 1.0}),
     "TrainingSpec.metrics names a metric 'acc\\x1b[31m': a metric's name is printable text, not empty (it is said "
     "as training_NAME and validation_NAME)"),
    (lambda s: setattr(s, "metrics", {"": lambda o, t: 1.0}),
     "TrainingSpec.metrics names a metric '': a metric's name is printable text, not empty (it is said as "
     "training_NAME and validation_NAME)"),
    # torch's own words came at the first backward: "element 0 of tensors does not require grad"
    (lambda s: [p.requires_grad_(False) for p in s.model.parameters()],
     "TrainingSpec.optimizer holds no parameter that requires a gradient, so nothing would train: give it the "
     "model's trainable parameters (model.parameters()), and check that they are not all frozen (requires_grad=False)"),
])
def test_a_spec_of_the_wrong_shape_is_refused_before_training_naming_the_field(change, message):
    s = plain()
    change(s)
    with pytest.raises(SpecError) as raised:
        s.check()
    assert str(raised.value) == message


GENERATOR_TARGET = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainbus.kernel import TrainingSpec

def build(epochs: int = 1):
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model = torch.nn.Linear(5, 3)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=torch.nn.functional.cross_entropy, epochs=1,
                        train_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                        validation_loader=((x[i:i + 4], y[i:i + 4]) for i in (0, 4)))
"""


def test_epochs_from_the_command_line_are_checked_against_a_one_shot_iterator_too(tmp_path):
    """A spec that builds 1 epoch over a generator, given --epochs 2 (run_training's epochs): refused before any
    run directory is made, as the spec's own 2 epochs are."""
    from trainbus.kernel.config import RunConfig
    from trainbus.kernel.session import run_training

    (tmp_path / "gen.py").write_text(GENERATOR_TARGET)
    runs_dir = tmp_path / "runs"
    with pytest.raises(SpecError, match="validation_loader is a generator, a one-shot iterator that the first of the "
                                        "run's 2 epochs uses up"):
        run_training(RunConfig(target=f"{tmp_path / 'gen.py'}:build", epochs=2, runs_dir=str(runs_dir), plugins=[]))
    assert not any(runs_dir.glob("2*"))


# -- resumed exactly, whatever the loader draws its order from -----------------------------------------------------


class CapturingBus(RecordingBus):
    """A RecordingBus that keeps the loop's training state as a checkpoint there would hold it: after batch `batch`
    of epoch `epoch` (mid-epoch), or at that epoch's end (batch None)."""

    def __init__(self, epoch: int, batch: int | None):
        super().__init__()
        self.at, self.loop, self.state = (epoch, batch), None, None

    def publish(self, type_: str, step: int, epoch: int, data: dict) -> None:
        super().publish(type_, step, epoch, data)
        if type_ == ev.END_TRAINING_BATCH and (epoch, data["batch_index"]) == self.at:
            self.state = copy.deepcopy(self.loop.training_state(epoch_complete=False))
        elif type_ == ev.END_EPOCH and (epoch, None) == self.at:
            self.state = copy.deepcopy(self.loop.training_state(epoch_complete=True))


def resumed_exactly(make_spec, epoch: int, batch: int | None) -> None:
    """make_spec() trained through, and again from a state taken mid-run: the same final weights, bit for bit (a
    build seeded as the session seeds it, each time)."""
    seed_everything(0)
    whole, bus = make_spec(), CapturingBus(epoch, batch)
    bus.loop = Loop(whole, bus, torch.device("cpu"))
    bus.loop.run()
    assert bus.state is not None
    seed_everything(0)
    again = make_spec()
    restore_weights(again, bus.state)
    assert resume_problem(bus.state["trainbus"]) is None
    loop = Loop(again, RecordingBus(), torch.device("cpu"))
    loop.resume(bus.state, "checkpoint.pt")
    loop.run()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), f"{name} differs after the resume"


def shuffled(**loader) -> TrainingSpec:
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    s = spec(DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, **loader))
    s.epochs = 3
    return s


@pytest.mark.parametrize("epoch, batch", [(2, 1), (1, None)])
def test_a_loader_with_its_own_generator_resumes_in_the_order_it_had(epoch, batch):
    """DataLoader(generator=torch.Generator().manual_seed(7)), the usual way to fix a loader's order: the generator's
    state was in no checkpoint, so a resumed run shuffled from the seed again (epoch 1's order in epoch 2)."""
    resumed_exactly(lambda: shuffled(generator=torch.Generator().manual_seed(7)), epoch, batch)


class PythonShuffled:
    """A loader of the user's own that shuffles with Python's random (numpy's alike), as many hand-written ones do."""

    def __init__(self, numpy_too: bool):
        self.x, self.y = torch.randn(40, 5), torch.randint(0, 3, (40,))
        self.numpy_too = numpy_too

    def __len__(self):
        return 5

    def __iter__(self):
        order = list(range(40))
        random.shuffle(order)
        if self.numpy_too:
            order = [order[i] for i in numpy.random.permutation(40)]
        for i in range(0, 40, 8):
            yield self.x[order[i:i + 8]], self.y[order[i:i + 8]]


@pytest.mark.parametrize("numpy_too", [False, True])
def test_a_loader_shuffling_with_pythons_or_numpys_random_resumes_mid_epoch_in_the_order_it_had(numpy_too):
    """The epoch's start kept torch's RNG alone: a loader drawing from random (or numpy) began the resumed epoch
    from the build's seeded state, in another order than the uninterrupted epoch had."""
    def make():
        s = spec(PythonShuffled(numpy_too))
        s.epochs = 3
        return s
    resumed_exactly(make, 2, 1)


@pytest.mark.parametrize("epoch, batch", [(2, 1), (1, None)])
def test_loaders_with_persistent_workers_resume_in_the_order_they_had(epoch, batch):
    """persistent_workers=True: a loader's first iter() starts its workers, drawing their base seed from torch's RNG,
    and each later epoch's draws only the shuffle. A resumed session's first epoch started the workers anew: one draw
    more than that epoch had uninterrupted, so another order (and, from the validation loader's, every later one)."""
    def make():
        s = shuffled(num_workers=1, persistent_workers=True)
        x, y = data()
        s.validation_loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, num_workers=1, persistent_workers=True)
        made.append(s)
        return s
    made = []
    try:
        resumed_exactly(make, epoch, batch)
    finally:  # the workers stopped now, not whenever the loaders are collected
        for s in made:
            for loader in (s.train_loader, s.validation_loader):
                loader._iterator = None
        gc.collect()


SPAWNED_TARGET = """
import torch
from torch.utils.data import DataLoader, Dataset
from trainbus.kernel import TrainingSpec

class Samples(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.full((5,), float(i)), i % 3

def build():
    model = torch.nn.Linear(5, 3)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=torch.nn.functional.cross_entropy,
                        train_loader=DataLoader(Samples(), batch_size=4, num_workers=1,
                                                multiprocessing_context="{ctx}"))
"""


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_a_dataset_class_of_the_target_file_reaches_spawned_dataloader_workers(tmp_path, context):
    """multiprocessing_context="spawn" (macOS's default, forkserver Python 3.14's on Linux): a worker unpickles the
    dataset by importing its module by name, and the file's module was named trainbus_user_train, which no process but
    the kernel knows: 'No module named trainbus_user_train' in the worker, 'DataLoader worker exited unexpectedly'
    as the run's error."""
    target = tmp_path / f"{context}_train.py"  # a name of its own: a module named so is imported by then
    target.write_text(SPAWNED_TARGET.replace("{ctx}", context))
    s = build_spec(f"{target}:build", {})
    inputs, targets = next(iter(s.train_loader))
    assert inputs.shape == (4, 5) and targets.tolist() == [0, 1, 2, 0]


def test_a_submodule_the_user_put_in_eval_mode_stays_in_it_while_training():
    """Fine-tuning with a frozen backbone kept in eval mode (its BatchNorm statistics fixed, its dropout off): the loop
    called model.train() at every epoch's start, which put the backbone back in training mode, so its running
    statistics drifted with every batch. Lightning (2.2 on) keeps each submodule's mode, as the user set it."""
    x, y = data()
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    backbone.eval().requires_grad_(False)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(4, 3))
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    seen, head = [], []
    backbone.register_forward_hook(lambda module, args, out: seen.append(module.training))
    model[1].register_forward_hook(lambda module, args, out: head.append(torch.is_grad_enabled() and module.training))
    s = TrainingSpec(model=model, optimizer=torch.optim.SGD(model[1].parameters(), lr=0.1), epochs=2,
                     loss_fn=torch.nn.functional.cross_entropy,
                     train_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
                     validation_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH))
    run(s)
    assert seen and not any(seen), "the backbone ran in training mode"
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, frozen[name]), f"the frozen backbone's {name} changed"
    assert any(head)  # what trains is in training mode


def test_a_model_built_in_eval_mode_as_a_whole_still_trains_in_training_mode():
    """A model put in eval mode as a whole (eval() after loading weights, say) trains in training mode, as before:
    that is no choice of a submodule's to keep."""
    s = plain()
    s.model.eval()
    seen = []
    s.model.register_forward_hook(lambda module, args, out: seen.append(torch.is_grad_enabled() and module.training))
    run(s)
    assert any(seen)


HYPERPARAMETERS_TARGET = """
import pathlib
import torch
from torch.utils.data import DataLoader, TensorDataset
from trainbus.kernel import TrainingSpec

def build(epochs: int = 2):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    model = torch.nn.Linear(4, 2)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=epochs,
                        loss_fn=torch.nn.functional.cross_entropy,
                        train_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                        hyperparameters={"activation": torch.nn.ReLU, "data": pathlib.Path("/data/x"),
                                         "dtype": torch.float16, "layers": (64, 32),
                                         "nested": {"init": torch.nn.init.zeros_}})
"""


def test_hyperparameters_of_any_type_are_recorded_as_their_text_and_checkpoints_are_taken(tmp_path):
    """TrainingSpec(hyperparameters={"activation": torch.nn.ReLU, ...}): start_training_session and every end_epoch
    carry the hyperparameters, and a class is nothing msgpack encodes, so their data was replaced with an error (the
    console said 'train loss ?' each epoch); with the checkpoint plugin the run failed at its first snapshot,
    'TypeError: cannot snapshot a type in the training state'."""
    from trainbus.kernel.plugin_names import resolve_plugin
    from trainbus.kernel.journal import read_events
    from trainbus.kernel.session import run_training
    from helpers import PLUGIN_START_S, run_config

    (tmp_path / "hp_train.py").write_text(HYPERPARAMETERS_TARGET)
    result = run_training(run_config(tmp_path / "runs", [resolve_plugin("checkpoint", {})], epochs=2,
                                     target=f"{tmp_path / 'hp_train.py'}:build", checkpoint_every_n_epochs=1,
                                     ready_timeout_s=PLUGIN_START_S, drain_timeout_s=60))
    assert result.status == "completed", result.error
    events = {e.type: e.data for e in read_events(result.run_dir)}
    assert events[ev.START_TRAINING_SESSION]["hyperparameters"] == events[ev.END_EPOCH]["hyperparameters"] == {
        "epochs": 2, "activation": str(torch.nn.ReLU), "data": "/data/x", "dtype": "torch.float16", "layers": [64, 32],
        "nested": {"init": str(torch.nn.init.zeros_)}}
    assert events[ev.END_EPOCH]["training_loss"] > 0
    saved = [e for e in read_events(result.run_dir) if e.type == ev.CHECKPOINT_SAVED]
    assert len(saved) == 2, [e.type for e in read_events(result.run_dir)]


def test_a_batch_of_per_sample_targets_counts_its_samples_not_the_first_samples_rows():
    """torchvision's detection collate (tuple(zip(*batch))): images of several sizes and a dict of boxes and labels per
    image. end_training_batch's batch_size (perf's samples/s) was the first image's box count, the first tensor's
    rows."""
    boxes = [3, 1, 4, 2, 5, 1, 2, 2]

    class Detection(Dataset):
        def __len__(self):
            return len(boxes)

        def __getitem__(self, i):
            return torch.ones(3, 4 + i, 4), {"boxes": torch.ones(boxes[i], 4), "labels": torch.zeros(boxes[i])}

    def loss(outputs, targets):
        return sum(o.mean() for o in outputs) + 0 * len(targets)

    model = _EachImage(torch.nn.Conv2d(3, 1, 1))
    detection = DataLoader(Detection(), batch_size=4, collate_fn=lambda b: tuple(zip(*b)))
    bus, _ = run(TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss,
                              train_loader=detection))
    assert [d["batch_size"] for t, _, d in bus.events if t == ev.END_TRAINING_BATCH] == [4, 4]


class _EachImage(torch.nn.Module):
    """A detector's shape: a tuple of images in, an output per image."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        return [self.inner(image) for image in images]


def test_a_sampler_with_its_own_generator_shared_out_across_ranks_resumes_in_its_order():
    """Under --nproc a sampler of the user's (weights, a subset) is wrapped in a ShardedSampler, which draws from the
    user's sampler and so from its generator: that generator, a level further down, was in no checkpoint."""
    from torch.utils.data import WeightedRandomSampler
    from trainbus.kernel.distributed import ShardedSampler

    def make():
        x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
        weighted = WeightedRandomSampler(torch.rand(40), 40, generator=torch.Generator().manual_seed(3))
        s = spec(DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=ShardedSampler(weighted, 1, 0, 0, False)))
        s.epochs = 3
        return s
    resumed_exactly(make, 2, 1)


def test_a_target_file_imported_already_keeps_its_module(tmp_path, monkeypatch):
    """run_training in a notebook that imported the file itself: loading it under its own name ran it again in
    sys.modules' place, so the notebook's next `import` got another module, and other classes than it holds."""
    target = tmp_path / "imported_train.py"
    target.write_text(SPAWNED_TARGET.replace("{ctx}", "fork"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    own = importlib.import_module("imported_train")
    try:
        s = build_spec(f"{target}:build", {})
        assert sys.modules["imported_train"] is own and type(s.train_loader.dataset).__module__ != "imported_train"
    finally:
        sys.modules.pop("imported_train", None)
