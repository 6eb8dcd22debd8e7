"""Intervals match hand-computed values; the degenerate-answer rule catches loops and blanks only."""

import math

import numpy as np
import pytest

from alignment_pipelines.evaluation.stats import (
    bootstrap_interval,
    degenerate_rate,
    is_degenerate,
    win_rate_summary,
    wilson_interval,
)


@pytest.mark.parametrize("successes, n, expected", [
    # 8/10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.71674, half-width 0.22658
    (8, 10, (0.4902, 0.9433)),
    (5, 10, (0.2366, 0.7634)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (45, 60, (0.6277, 0.8422)),
])
def test_wilson_interval_matches_known_values(successes, n, expected):
    low, high = wilson_interval(successes, n)
    assert (round(low, 4), round(high, 4)) == expected


def test_wilson_interval_without_data_is_the_whole_range_and_rejects_impossible_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)


def test_a_wider_z_gives_a_wider_interval():
    low95, high95 = wilson_interval(8, 10)
    low99, high99 = wilson_interval(8, 10, z=2.576)
    assert low99 < low95 and high99 > high95


def test_win_rate_summary_counts_ties_as_half_a_win():
    summary = win_rate_summary([1, 1, 0, 0.5])
    assert summary["wins"] == 2 and summary["losses"] == 1 and summary["ties"] == 1 and summary["n"] == 4
    assert summary["win_rate"] == pytest.approx(0.625)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))


def test_all_ties_straddle_one_half():
    summary = win_rate_summary([0.5] * 10)
    assert summary["win_rate"] == 0.5
    assert (round(summary["ci_low"], 4), round(summary["ci_high"], 4)) == (0.2366, 0.7634)


def test_win_rate_summary_of_nothing_is_nan_with_the_whole_range():
    summary = win_rate_summary([])
    assert math.isnan(summary["win_rate"]) and (summary["ci_low"], summary["ci_high"]) == (0.0, 1.0)


def test_win_rate_summary_rejects_other_outcomes():
    with pytest.raises(ValueError, match="0, 0.5 or 1"):
        win_rate_summary([1, 0.7])


def test_bootstrap_agrees_with_the_normal_approximation_on_a_large_sample():
    values = [1.0] * 80 + [0.0] * 20  # mean 0.8, standard error 0.04
    low, high = bootstrap_interval(values, n_resamples=4000, seed=1)
    assert low == pytest.approx(0.8 - 1.96 * 0.04, abs=0.02)
    assert high == pytest.approx(0.8 + 1.96 * 0.04, abs=0.02)


def test_bootstrap_is_reproducible_and_takes_any_statistic():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert bootstrap_interval(values, seed=7) == bootstrap_interval(values, seed=7)
    low, high = bootstrap_interval(values, stat=np.median, seed=7)
    assert low <= np.median(values) <= high
    assert bootstrap_interval([2.0] * 5) == (2.0, 2.0)
    assert all(math.isnan(bound) for bound in bootstrap_interval([]))


@pytest.mark.parametrize("answer", ["", "   \n", "the cat the cat the cat", "no no no no",
                                    "!!!!!!!!!!!!", "I think I think I think I think I think so"])
def test_blank_and_looping_answers_are_degenerate(answer):
    assert is_degenerate(answer)


@pytest.mark.parametrize("answer", ["Paris", "Mississippi", "yes", "no no no", "ok ok",
                                    "The capital of France is Paris, and it sits on the Seine."])
def test_short_and_ordinary_answers_are_not(answer):
    assert not is_degenerate(answer)


def test_degenerate_rate_counts_missing_eos_only_when_flags_are_given():
    answers = ["A fine answer.", "", "go go go go go", "Another fine answer that was cut"]
    assert degenerate_rate(answers) == 0.5
    assert degenerate_rate(answers, eos_flags=[True, True, True, False]) == 0.75
    assert math.isnan(degenerate_rate([]))
    with pytest.raises(ValueError, match="same length"):
        degenerate_rate(answers, eos_flags=[True])
