"""DivergencePolicy on sequences of numbers: no model, no torch."""

import copy
import json

import pytest

from bnguard import Decision, DivergencePolicy, Verdict


def checks(policy, pairs):
    return [policy.check(eval_value, train_value) for eval_value, train_value in pairs]


def test_within_thresholds_nothing_happens_and_the_best_is_tracked():
    policy = DivergencePolicy()
    decisions = checks(policy, [(0.80, 0.82), (0.90, 0.93), (0.88, 0.90)])
    assert [d.triggered for d in decisions] == [False, False, False]
    assert [d.reason for d in decisions] == ["within thresholds"] * 3
    assert [d.gap for d in decisions] == pytest.approx([0.02, 0.03, 0.02])
    assert decisions[0].drop is None and decisions[2].drop == pytest.approx(0.02)
    assert policy.best == 0.90


def test_a_gap_and_a_drop_are_both_named_in_the_reason():
    policy = DivergencePolicy()
    policy.check(0.95)
    decision = policy.check(0.85, 0.97)
    assert decision.triggered and decision.wants_recalibration
    assert decision.reason == ("eval acc 0.120 below train (threshold 0.05); "
                               "eval acc 0.100 below its best (threshold 0.03)")


def test_patience_counts_consecutive_evaluations_over_a_threshold():
    policy = DivergencePolicy(patience=3)
    decisions = checks(policy, [(0.8, 0.9), (0.8, 0.9), (0.9, 0.9), (0.8, 0.9), (0.8, 0.9), (0.8, 0.9)])
    assert [d.triggered for d in decisions] == [False, False, False, False, False, True]


def test_recovered_accuracy_is_stale_statistics_and_resets_the_back_off():
    policy = DivergencePolicy()
    policy.backoff = 4
    decision = policy.judge_recalibration(policy.check(0.70, 0.95), eval_after=0.93)
    assert decision.diagnosis is Verdict.STALE and decision.gained == pytest.approx(0.23)
    assert decision.eval_before == 0.70 and decision.eval_after == 0.93
    assert (policy.backoff, policy.cooldown, policy.best) == (1, 0, 0.93)


def test_an_unexplained_gap_backs_off_1_2_4_then_at_most_max_cooldown():
    policy = DivergencePolicy(max_cooldown=4)
    acted, reasons = [], []
    for _ in range(20):  # eval stays 0.3 points under train whatever the statistics
        decision = policy.check(0.60, 0.90)
        if decision.wants_recalibration:
            decision = policy.judge_recalibration(decision, eval_after=0.601)
            assert decision.diagnosis is Verdict.UNEXPLAINED
        acted.append(decision.wants_recalibration)
        reasons.append(decision.reason)
    # acts, skips 1, acts, skips 2, acts, skips 4, acts, skips 4 (the cap), ...
    assert [i for i, a in enumerate(acted) if a] == [0, 2, 5, 10, 15]
    assert reasons[3].endswith("; backing off (2 evaluation(s) of cooldown left)")
    assert reasons[4].endswith("; backing off (1 evaluation(s) of cooldown left)")


def test_lower_is_better_for_a_loss():
    policy = DivergencePolicy(monitor="loss", higher_is_better=False, gap_threshold=0.2)
    assert not policy.check(0.5, 0.4).triggered
    decision = policy.check(0.9, 0.4)
    assert decision.triggered and decision.gap == pytest.approx(0.5) and decision.drop == pytest.approx(0.4)
    assert decision.reason.startswith("eval loss 0.500 above train")
    assert policy.best == 0.5


def test_a_probe_that_agrees_rules_out_stale_statistics():
    policy = DivergencePolicy()
    decision = policy.judge_probe(policy.check(0.6, 0.9), eval_mode=0.995, train_mode=1.0)
    assert not decision.wants_recalibration and decision.diagnosis is Verdict.UNEXPLAINED
    assert decision.reason.endswith("probe: eval-mode 0.995 vs train-mode 1.000 on training data, statistics not stale")
    assert policy.cooldown == 1
    unchanged = policy.check(0.6, 0.9)  # backing off now
    kept = DivergencePolicy().check(0.6, 0.9)
    assert DivergencePolicy().judge_probe(kept, eval_mode=0.7, train_mode=1.0) == kept
    assert not unchanged.wants_recalibration


def test_state_dict_continues_the_same_decisions():
    sequence = [(0.9, 0.92), (0.6, 0.9), (0.6, 0.9), (0.6, 0.9), (0.95, 0.96), (0.5, 0.96)]
    whole, first = DivergencePolicy(), DivergencePolicy()
    expected = []
    for eval_value, train_value in sequence:
        decision = whole.check(eval_value, train_value)
        if decision.wants_recalibration:
            decision = whole.judge_recalibration(decision, eval_value + 0.001)
        expected.append(decision)
    for (eval_value, train_value), want in zip(sequence[:3], expected):
        decision = first.check(eval_value, train_value)
        if decision.wants_recalibration:
            decision = first.judge_recalibration(decision, eval_value + 0.001)
        assert decision == want
    resumed = DivergencePolicy()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for (eval_value, train_value), want in zip(sequence[3:], expected[3:]):
        decision = resumed.check(eval_value, train_value)
        if decision.wants_recalibration:
            decision = resumed.judge_recalibration(decision, eval_value + 0.001)
        assert decision == want
    assert resumed.state_dict() == whole.state_dict()


def test_decisions_read_as_plain_values():
    decision = Decision(triggered=True, findings=("eval acc 0.100 below train",), eval_before=0.8)
    noted = decision.noted("backing off")
    assert decision.reason == "eval acc 0.100 below train" and noted.reason == "eval acc 0.100 below train; backing off"
    summary = copy.deepcopy(noted).summary()
    assert summary["reason"] == noted.reason and "report" not in summary and "notes" not in summary
    verdict = json.loads(json.dumps({"diagnosis": Verdict.STALE}))["diagnosis"]
    assert verdict == "stale statistics" == f"{Verdict.STALE}" == Verdict.STALE


@pytest.mark.parametrize("kwargs, error", [({"patience": 0}, ValueError), ({"patience": True}, TypeError),
                                           ({"max_cooldown": 2.5}, TypeError)])
def test_bad_settings_name_the_argument(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        DivergencePolicy(**kwargs)


def test_a_fall_that_recalibration_does_not_help_is_never_stale_statistics():
    policy = DivergencePolicy()
    policy.check(0.95, 0.96)
    decision = policy.check(0.90, 0.91)  # 5 points below the best, no train/eval gap
    assert decision.wants_recalibration and decision.gap == pytest.approx(0.01)
    judged = policy.judge_recalibration(decision, eval_after=0.905)
    assert judged.diagnosis is Verdict.UNEXPLAINED and policy.cooldown == 1 and policy.backoff == 2
