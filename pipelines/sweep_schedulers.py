"""Tune's schedulers as ``tune`` uses them: the preset's trial (trial 0) is never stopped early (ASHA) nor
exploited (PBT, PB2), since the sweep's verdict needs its score at the full budget; it may still be copied from.
Module-level classes: Tune pickles its scheduler with the sweep (``tune --resume``). Imports Ray: import lazily."""
from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from pipelines.sweep_trial import is_preset


class _PresetKept:
    preset_values = None  # set by pipelines.tune.make_scheduler
    final_step = None     # a trial's last step where known: no perturbation there (nothing left to train)

    def on_trial_result(self, tune_controller, trial, result):
        if self.final_step and isinstance(self, PopulationBasedTraining) and result.get("step", 0) >= self.final_step:
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        keep = decision == TrialScheduler.STOP and is_preset(trial.config, self.preset_values)
        return TrialScheduler.CONTINUE if keep else decision

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        if is_preset(trial.config, self.preset_values):
            lower_quantile = [t for t in lower_quantile if t is not trial]
        return super()._checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)


class _SynchNeverStuck:
    """Ray's synchronous PBT decides when the last live trial reports at the perturbation point. A trial that ends
    first (an error, or its time budget spent) never reports there, and the others wait, paused, for ever
    (measured: a 20-minute sweep hung with three trials PAUSED after the fourth failed). When a trial ends and
    every other live trial waits at the point, one waiting trial's last result is replayed: Ray's own decision
    runs with the trials that are there. Where that result was the one Ray already decided on (a trial's reports
    can skip a point: the one that ended went from before it straight to its last step), the replay changes
    nothing, and the point moves on one interval past the waiting trials (measured: a two-trial sweep hung, one
    trial TERMINATED at step 16, the other PAUSED at 12 for ever)."""

    def on_trial_error(self, tune_controller, trial):
        super().on_trial_error(tune_controller, trial)
        self._decide_if_the_rest_wait(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._decide_if_the_rest_wait(tune_controller, trial)

    def _decide_if_the_rest_wait(self, tune_controller, ended) -> None:
        if not self._synch:
            return
        rest = [t for t in tune_controller.get_live_trials() if t is not ended]
        states = [self._trial_state.get(t) for t in rest]
        if rest and all(s is not None and s.last_result is not None
                        and s.last_train_time >= self._next_perturbation_sync for s in states):
            self.on_trial_result(tune_controller, rest[0], states[0].last_result)
            if all(s.last_train_time >= self._next_perturbation_sync for s in states):
                self._next_perturbation_sync = max(s.last_train_time for s in states) + self._perturbation_interval


class ASHAKeepingPreset(_PresetKept, ASHAScheduler):
    pass


class PBTKeepingPreset(_SynchNeverStuck, _PresetKept, PopulationBasedTraining):
    pass


class PB2KeepingPreset(_SynchNeverStuck, _PresetKept, PB2):
    pass


SCHEDULERS = {"asha": ASHAKeepingPreset, "fifo": FIFOScheduler, "pbt": PBTKeepingPreset, "pb2": PB2KeepingPreset}
