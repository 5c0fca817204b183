"""The Trainer and its hooks, with toy steps: events in order, budgets that count step time only,
evaluation schedules, a stop inside an epoch that continues exactly, failures before the update."""

from __future__ import annotations


import pytest
import torch

from pyrovae.infer.loop import (
    EvalSchedule,
    Hook,
    ShuffledBatches,
    StepBudget,
    StepResult,
    TimeBudget,
    Trainer,
    TrainState,
)

DATA = torch.arange(10.0).unsqueeze(-1)


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_start(self, trainer, state):
        self.events.append(("start", state.epoch, state.step))

    def on_epoch_start(self, trainer, state):
        self.events.append(("epoch_start", state.epoch, state.step))

    def on_step_end(self, trainer, state, result):
        self.events.append(("step", state.epoch, state.step))

    def on_epoch_end(self, trainer, state):
        self.events.append(("epoch_end", state.epoch, state.step))

    def on_end(self, trainer, state):
        self.events.append(("end", state.epoch, state.step))


def seen_step(seen: list):
    def step(x, index):
        seen.append(index.clone())
        return StepResult(loss=float(x.sum()))

    return step


def test_events_come_in_order_and_the_history_has_one_entry_per_epoch():
    recorder = Recorder()
    state = Trainer(seen_step([]), DATA, batch_size=4, hooks=[recorder]).run(TrainState(), epochs=2)
    steps = [("step", 0, 1), ("step", 0, 2), ("step", 0, 3)]
    assert recorder.events == [
        ("start", 0, 0), ("epoch_start", 0, 0), *steps, ("epoch_end", 1, 0),
        ("epoch_start", 1, 0), *[("step", 1, s) for s in (1, 2, 3)], ("epoch_end", 2, 0), ("end", 2, 0),
    ]
    assert state.history.epoch == [1, 2] and state.global_step == 6
    assert len(state.history.train_bound) == len(state.history.seconds) == 2


def test_an_epoch_visits_every_point_once_in_the_generators_order():
    seen: list = []
    Trainer(seen_step(seen), DATA, batch_size=4).run(TrainState(generator=torch.Generator().manual_seed(3)), 1)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(seen), order) and [len(s) for s in seen] == [4, 4, 2]


def test_a_stop_inside_an_epoch_continues_exactly_from_the_saved_position():
    full: list = []
    Trainer(seen_step(full), DATA, batch_size=3).run(TrainState(generator=torch.Generator().manual_seed(1)), 3)
    part: list = []
    first = TrainState(generator=torch.Generator().manual_seed(1))
    Trainer(seen_step(part), DATA, batch_size=3, hooks=[StepBudget(6)]).run(first, 3)
    assert first.stop == "budget" and first.epoch == 1 and first.step == 2 and first.mid_epoch
    position, generator = first.position(), first.generator.get_state()
    # A new session: a new state from what a checkpoint holds.
    second = TrainState(generator=torch.Generator(), epoch=first.epoch, history=first.history)
    second.generator.set_state(generator)
    second.restore_position(position, "cpu")
    Trainer(seen_step(part), DATA, batch_size=3).run(second, 3)
    assert len(part) == len(full) and all(torch.equal(a, b) for a, b in zip(part, full))
    assert second.history.epoch == [1, 2, 3]


def test_time_budget_counts_the_steps_not_the_evaluations(monkeypatch):
    # A fake clock (no wall-clock assertions: a loaded machine stretches real ones): each step
    # takes 10 ms of it, each evaluation 30 ms.
    from pyrovae.infer import loop

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

        process_time = perf_counter

    monkeypatch.setattr(loop, "time", Clock)

    def slow_step(x, index):
        Clock.now += 0.01
        return StepResult(loss=0.0)

    evaluations: list[int] = []

    def evaluate(state):
        evaluations.append(state.global_step)
        Clock.now += 0.03

    state = Trainer(slow_step, DATA, batch_size=2, hooks=[
        TimeBudget(0.05, clock="wall"), EvalSchedule(evaluate, lambda state: state.global_step % 2 == 0),
    ]).run(TrainState())
    # 5 steps of 10 ms reach the 50 ms budget, whatever the 30 ms evaluations in between add.
    assert state.stop == "budget" and state.global_step == 5, state.global_step
    assert state.step_seconds == pytest.approx(0.05, abs=1e-12)
    assert state.seconds > 0.05 + 0.03 * 2  # the evaluations took time too, and did not count
    assert evaluations == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="clock"):
        TimeBudget(1.0, clock="gpu")


def test_a_failed_step_stops_the_run_naming_where_and_what_the_hooks_add():
    class Note(Hook):
        ended = False

        def note(self, state):
            return "The last checkpoint is intact."

        def on_end(self, trainer, state):
            self.ended = True

    def step(x, index):
        return StepResult(loss=float("nan"), problem="the loss became nan") if x.sum() > 30 else StepResult(0.0)

    note = Note()
    trainer = Trainer(step, DATA * 4, batch_size=2, hooks=[note], advice="Lower lr.")
    with pytest.raises(FloatingPointError, match=r"the loss became nan at epoch 1, step \d of 5; this step was "
                                                 r"not applied\. The last checkpoint is intact\. Lower lr\."):
        trainer.run(TrainState(generator=torch.Generator().manual_seed(0)), 2)
    assert not note.ended


def test_lazy_batches_follow_the_state_of_the_hooks():
    # Test-time inference: every step takes the points still active, which a hook updates.
    active = torch.ones(10, dtype=torch.bool)
    index = torch.arange(10)
    seen: list = []

    class Retire(Hook):
        def on_step_end(self, trainer, state, result):
            active[state.global_step - 1] = False
            if not active.any():
                state.request_stop("converged")

    trainer = Trainer(seen_step(seen), DATA, batches=lambda state: (index[active] for _ in range(20)), hooks=[Retire()])
    state = trainer.run(TrainState(), epochs=1)
    assert [len(s) for s in seen] == list(range(10, 0, -1)) and state.stop == "converged"
    assert ShuffledBatches(10, 4).__len__() == 3 and trainer.steps_per_epoch is None
