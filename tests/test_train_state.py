"""The counters of a run move in one place, `TrainState.advance`, once per optimizer step."""

from __future__ import annotations

from ssl_ema.engine.state import TrainState


def test_an_epoch_of_11_micro_batches_with_accumulation_2() -> None:
    """Five steps of 2 micro-batches and a last one of 1 (the loader's end syncs early)."""
    st = TrainState()
    for micro in (2, 2, 2, 2, 2):
        st.advance(micro, micro * 128, epoch_batches=11, skipped=False)
    assert (st.step, st.samples_seen, st.epoch, st.batch_in_epoch) == (5, 1280, 0, 10)
    st.advance(1, 128, epoch_batches=11, skipped=False)
    assert (st.step, st.samples_seen, st.epoch, st.batch_in_epoch) == (6, 1408, 1, 0)
    # A dropped step (train.nonfinite=skip) still counts its samples and its place in the data.
    st.advance(2, 256, epoch_batches=11, skipped=True)
    assert (st.step, st.samples_seen, st.epoch, st.batch_in_epoch, st.skipped_steps) == \
        (7, 1664, 1, 2, 1)
    again = TrainState()
    again.load_state_dict(st.state_dict())
    assert again == st
