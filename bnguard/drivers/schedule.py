"""When the loop stops, logs and evaluates, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.validation import positive_int


@dataclass(frozen=True)
class Schedule:
    """The loop's timetable. ``epochs`` and ``max_steps`` (at least one) stop training, whichever comes
    first; evaluation runs every ``eval_every_epochs`` epochs (1 when an eval loader is given and neither is
    set) or every ``eval_every_steps`` steps."""

    epochs: int | None = None
    max_steps: int | None = None
    eval_every_epochs: int | None = None
    eval_every_steps: int | None = None
    log_every_steps: int = 10
    limit_train_batches: int | None = None

    @classmethod
    def checked(cls, *, has_eval_loader: bool, **settings: int | None) -> Schedule:
        """A schedule from the loop's arguments, each checked, with the evaluation default filled in."""
        for name, value in settings.items():
            positive_int(name, value, optional=name != "log_every_steps")
        schedule = cls(**settings)
        if schedule.epochs is None and schedule.max_steps is None:
            raise ValueError("give epochs or max_steps (or both): the loop needs to know when to stop")
        if schedule.eval_every_epochs and schedule.eval_every_steps:
            raise ValueError("give eval_every_epochs or eval_every_steps, not both")
        if (schedule.eval_every_epochs or schedule.eval_every_steps) and not has_eval_loader:
            raise ValueError("evaluation was requested (eval_every_*) but no eval_loader was given")
        if has_eval_loader and not schedule.eval_every_steps and not schedule.eval_every_epochs:
            schedule = cls(**{**settings, "eval_every_epochs": 1})
        return schedule

    def finished(self, epoch: int, step: int) -> bool:
        """Whether training is over before epoch index ``epoch`` starts, at global step ``step``."""
        return (self.epochs is not None and epoch >= self.epochs) or self.steps_done(step)

    def steps_done(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def batch_allowed(self, index: int) -> bool:
        return self.limit_train_batches is None or index < self.limit_train_batches

    def logs_at(self, step: int) -> bool:
        return step % self.log_every_steps == 0

    def evaluates_at_step(self, step: int) -> bool:
        return bool(self.eval_every_steps) and step % self.eval_every_steps == 0

    def evaluates_after_epoch(self, epoch: int) -> bool:
        return bool(self.eval_every_epochs) and (epoch + 1) % self.eval_every_epochs == 0
