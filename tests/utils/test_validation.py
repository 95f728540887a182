"""Counts are checked the same way everywhere: a clear error naming the argument."""

import numpy as np
import pytest
import torch
from torch import nn

import bnguard
from bnguard.utils.validation import positive_int
from helpers import toy_loop


@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), (True, TypeError), (2.5, TypeError),
                                          ("100", TypeError), (None, TypeError)])
def test_bad_counts_are_refused(value, error):
    with pytest.raises(error, match=r"num_samples must be a positive integer, got"):
        positive_int("num_samples", value)


def test_integers_of_any_kind_pass_and_none_where_optional():
    assert positive_int("n", np.int64(7)) == 7 and type(positive_int("n", np.int64(7))) is int
    assert positive_int("n", None, optional=True) is None


@pytest.mark.parametrize("call", [
    lambda tmp: bnguard.recalibrate(nn.BatchNorm1d(2), [torch.randn(4, 2)], num_samples=2.5),
    lambda tmp: bnguard.AutoRecalibrate(num_samples="100"),
    lambda tmp: bnguard.BNStatsLogger(every_n_steps=True),
    lambda tmp: toy_loop(tmp, epochs=True),
])
def test_every_entry_point_names_the_bad_argument(tmp_path, call):
    with pytest.raises(TypeError, match=r"(num_samples|every_n_steps|epochs) must be a positive integer"):
        call(tmp_path)
