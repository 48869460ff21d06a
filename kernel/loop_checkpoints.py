"""The loop's checkpoints: what one holds (training_state), one taken at a step or an epoch's boundary, and the
loop put back from one (resume), so that a resumed run goes on as the uninterrupted one would have."""

from __future__ import annotations

import logging
import time
from typing import Any

from trainbus.proto import events as ev

from .epoch_metrics import as_float
from .training_state import RESUME_FORMAT, get_rng, set_rng

log = logging.getLogger("trainbus.kernel")

LAST_CHECKPOINT_WAIT_S = 60.0  # the run's last checkpoint waits this long for a persister to free a buffer


class LoopCheckpoints:
    """Loop's checkpoint methods (Loop inherits them): they read and set its position (step, epoch, the epoch's
    running totals and RNG state), its outcome and its deferred checkpoint, all made in Loop.__init__."""

    def training_state(self, epoch_complete: bool, ranks_own: list | None = None) -> dict[str, Any]:
        """What a checkpoint holds: the keys users expect, plus what resume needs to continue exactly."""
        spec = self.spec
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model_state_dict": spec.model.state_dict(),
            "optimizer_state_dict": spec.optimizer.state_dict(),
            "scheduler_state_dict": spec.scheduler.state_dict() if spec.scheduler is not None else None,
            "metrics": dict(self.latest_metrics),
            # as events carry them: the snapshot's plain part travels in save_checkpoint, and one too large for it
            # made every checkpoint fail ("snapshot buffer None cannot be read"); config.json holds them whole
            "hyperparameters": dict(self._event_hyperparameters),
            "trainbus": {
                "format": RESUME_FORMAT, "epoch": self.epoch, "step": self.step,
                "epoch_complete": epoch_complete, "batches_done": self.batches_done,
                "loss_total": self.loss_total, "metric_totals": dict(self.metric_totals),
                "epoch_rng_state": self.epoch_rng_state, "rng": get_rng(python=True, generators=self._generators()),
                # across ranks, in rank order (rng, loss_total and metric_totals above are rank 0's): each rank's
                # RNG, and its share of the epoch's running totals (a resumed epoch's sums count each share once)
                "rank_rng": [own["rng"] for own in ranks_own] if ranks_own else None,
                "rank_totals": [{k: own[k] for k in ("loss_total", "metric_totals")} for own in ranks_own]
                if ranks_own else None,
                "loss_scaler": self.stepper.state_dict(),
                # the run's best so far, so a resumed run's summary names the best of all its sessions
                "best_validation_loss": self.outcome.best_validation_loss, "best_epoch": self.outcome.best_epoch,
            },
        }

    def _take_deferred_checkpoint(self) -> None:
        reason, self._deferred_checkpoint, self._agreed = self._deferred_checkpoint, None, False
        self._checkpoint(reason, epoch_complete=False)

    def _checkpoint(self, reason: str, epoch_complete: bool, last: bool = False) -> None:
        # every rank's RNG and running totals, so each resumes its own (the ranks are here together: they agreed on
        # this checkpoint)
        ranks_own = self.ranks.gather({
            "rng": get_rng(python=True, generators=self._generators()), "loss_total": as_float(self.loss_total),
            "metric_totals": {name: as_float(total) for name, total in self.metric_totals.items()},
        }) if self.ranks is not None else None
        if self.checkpointer is None:  # another rank: rank 0 takes it
            return
        if not self.checkpointer.has_persister():
            self._publish(ev.CHECKPOINT_SKIPPED, reason=self.checkpointer.why_none())
            return
        if last:  # the run's last: training is over, so wait (bounded) rather than skip what last.pt should be
            asked = time.monotonic()
            self.checkpointer.wait_for_a_free_buffer(LAST_CHECKPOINT_WAIT_S,
                                                     lambda: self.bus.journal_refused_since(asked))
        try:
            snapshot = self.checkpointer.take(self.training_state(epoch_complete, ranks_own))
        except OSError as exc:  # no room for the buffer anywhere: training goes on, the next one may fit
            log.warning("checkpoint at step %d skipped: %s", self.step, exc)
            self._publish(ev.CHECKPOINT_SKIPPED, reason=str(exc))
            return
        if snapshot is None:  # never wait for a disk: skip, say so, the next one will land
            if not self._said_busy:  # each is in the journal; once in kernel.log, where a run without console looks
                self._said_busy = True
                log.warning("checkpoint at step %d skipped: both snapshot buffers are still being persisted (the "
                            "persister writes slower than checkpoints come: checkpoint less often, or have it "
                            "write to a faster disk); said once, `trainbus runs show` counts them", self.step)
            self._publish(ev.CHECKPOINT_SKIPPED, reason="both snapshot buffers are still being persisted")
            return
        self._publish(ev.SAVE_CHECKPOINT, reason=reason, metrics=dict(self.latest_metrics), **snapshot.event_data())

    def resume(self, state: dict[str, Any], path: str) -> None:
        """Continue from a checkpoint whose weights restore_weights() loaded: same step, epoch, data order, RNG."""
        resume = dict(state["trainbus"])
        ranks, totals = resume.get("rank_rng"), resume.get("rank_totals")
        if self.ranks is not None and ranks and len(ranks) == self.ranks.world_size:
            resume["rng"] = ranks[self.ranks.rank]  # this rank's own; with another world size, rank 0's for all
            if totals:  # a checkpoint from before rank_totals: rank 0's totals on every rank, as it was
                resume.update(totals[self.ranks.rank])
        self.step, self.latest_metrics = resume["step"], dict(state.get("metrics") or {})
        self.stepper.load_state_dict(resume.get("loss_scaler"))
        if resume["epoch_complete"]:
            self.first_epoch = resume["epoch"] + 1
            set_rng(resume["rng"], self._generators())
            # what that epoch ended with is the run's until another ends (none will in a run continued from its last)
            self._restore_epoch_outcome(self.latest_metrics)
        else:
            self.first_epoch = resume["epoch"]
            self._resume = resume
        self.outcome.epochs_completed = self.first_epoch - 1  # the run's count, not this session's
        self.outcome.best_validation_loss = resume.get("best_validation_loss")  # None from an older checkpoint
        self.outcome.best_epoch = resume.get("best_epoch")
        self._loaded_from = path

    def _restore_epoch_outcome(self, flat: dict[str, float]) -> None:
        """The outcome's losses and metrics from a checkpoint's flat metrics (epoch_metrics.flat_metrics' inverse)."""
        out = self.outcome
        out.training_loss, out.validation_loss = flat.get("training_loss"), flat.get("validation_loss")
        for prefix, attribute in (("training_", "training_metrics"), ("validation_", "validation_metrics")):
            setattr(out, attribute, {name[len(prefix):]: value for name, value in flat.items()
                                 if name.startswith(prefix) and name != f"{prefix}loss"})
