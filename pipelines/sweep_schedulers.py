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


class ASHAKeepingPreset(_PresetKept, ASHAScheduler):
    pass


class PBTKeepingPreset(_PresetKept, PopulationBasedTraining):
    pass


class PB2KeepingPreset(_PresetKept, PB2):
    pass


SCHEDULERS = {"asha": ASHAKeepingPreset, "fifo": FIFOScheduler, "pbt": PBTKeepingPreset, "pb2": PB2KeepingPreset}
