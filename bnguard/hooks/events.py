"""The events a training loop fires, in order. Each value is the :class:`~bnguard.Hook` method it calls."""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """Where each event fires, in :class:`bnguard.Loop` (hooks run in list order at every event)::

        FIT_START                              # trackers started, state restored when resuming
        for epoch in range(first_epoch, epochs):
            EPOCH_START
            for batch in train_loader:
                with accelerator.accumulate(model):
                    loss = loss_fn(model(inputs), targets); accelerator.backward(loss)
                    if accelerator.sync_gradients:  # every gradient_accumulation_steps batches
                        clip gradients; optimizer.step(); scheduler.step(); optimizer.zero_grad()
                        step += 1
                        STEP_END                   # state.step is the new global step
                        if evaluating every N steps and step % N == 0:
                            EVAL_START; evaluate(); EVAL_END
                if stop requested or step == max_steps: break
            TRAIN_EPOCH_END                    # state.train_metrics holds the epoch's train metrics
            if evaluating every N epochs and (epoch + 1) % N == 0:
                EVAL_START                     # model still in train mode, running statistics as trained
                evaluate()                     # eval mode, every sample counted once across processes
                EVAL_END                       # state.eval_metrics holds the new eval metrics
            EPOCH_END                          # state.record is written to metrics.jsonl after this
            checkpoint every N epochs
            if stop requested or step == max_steps: break
        FIT_END                                # final checkpoint written, trackers still open
        # any exception above: EXCEPTION (state.error set), then the exception propagates
        # whenever a hook calls state.recalibrated(report): RECALIBRATED, at once, to every hook
    """

    FIT_START = "on_fit_start"
    EPOCH_START = "on_epoch_start"
    STEP_END = "on_step_end"
    TRAIN_EPOCH_END = "on_train_epoch_end"
    EVAL_START = "on_eval_start"
    EVAL_END = "on_eval_end"
    EPOCH_END = "on_epoch_end"
    FIT_END = "on_fit_end"
    RECALIBRATED = "on_recalibrated"
    EXCEPTION = "on_exception"
