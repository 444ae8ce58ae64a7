"""The grader: boxed-answer extraction, math-verify equivalence, time limits."""

import json
import re
import signal
import threading
import time

import pytest

from eval import grader
from eval.grader import extract_answer, grade, is_equivalent, normalize_answer


# ----------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is $\boxed{204}$.", "204"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last one counts
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\{1\pm\sqrt{5},-2\}}", r"\{1\pm\sqrt{5},-2\}"),  # escaped braces are not groups
        (r"\boxed{ x = 5 }", "x = 5"),
        (r"\boxed 7$ and done", "7"),  # brace-less form
        (r"\fbox{12}", "12"),
        (r"\boxed{3} and later \boxed{4", "3"),  # a truncated box falls back to the complete one
        ("no boxed answer here: 42", None),
        (r"\boxed{}", None),
        (r"\boxed{  }", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="string"):
        extract_answer(None)


def test_normalize_answer_drops_presentation_only():
    assert normalize_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == normalize_answer(r"(3,\frac{\pi}{2})")
    assert normalize_answer(r"30^\circ") == normalize_answer("30^{\\circ}") == "30"
    assert normalize_answer(r"10,\!080.") == "10,080"
    assert normalize_answer("12") != normalize_answer("21")


# ----------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        ("(3, \\pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
        ("30", r"30^\circ"),
        (r"30^{\circ}", "30"),
        ("5", r"5 \text{ cm}"),
        (r"5\text{ cm}", "5"),
        ("5", "x=5"),
        ("x=5", "5"),
        ("10080", r"10,\!080"),
        ("32348", r"\$32,\!348"),
        ("C", r"\text{(C)}"),
        ("-2,1", "1,-2"),  # a set of roots in another order
        (r"\frac{9}{5}", r"1\frac{4}{5}"),  # mixed number
        (r"2\sqrt{2}", r"\sqrt{8}"),
        ("204.0", "204"),
        (r"\begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}", r"\begin{pmatrix} -\frac13 \\ \frac23 \\ \frac53 \end{pmatrix}"),
    ],
)
def test_known_equivalences(answer, gold):
    assert is_equivalent(answer, gold)
    assert grade(f"Therefore the answer is $\\boxed{{{answer}}}$.", gold)


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("4", "3"),
        (r"\frac{1}{3}", r"\frac{1}{2}"),
        ("3.14", r"\pi"),
        ("(3,4)", "(3,4]"),
        ("6+5i", "6 - 5i"),
        (r"\sqrt{50}", r"\sqrt{51}"),
        ("1", "1,-2"),  # half of the roots
        ("x^3+3x-7", "x^3+3x-6"),
        (r"\text{(D)}", r"\text{(C)}"),
        ("2.04", "204"),
        ("90", r"\frac{\pi}{2}"),
        (r"\text{west}", r"\text{east}"),
    ],
)
def test_clear_non_equivalences(answer, gold):
    assert not is_equivalent(answer, gold)
    assert not grade(f"\\boxed{{{answer}}}", gold)


def test_grade_needs_a_boxed_answer():
    assert not grade("The answer is 204.", "204")
    assert grade("The answer is 204, i.e. \\boxed{204}", "204")


# ----------------------------------------------------------------------------
# every gold answer of the shared benchmarks


def perturb(answer: str) -> str:
    """A clearly different answer: an integer plus one, else the first digit moved by one, else `+1` appended."""
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    digit = re.search(r"\d", answer)
    if digit:
        return answer[:digit.start()] + str((int(digit.group()) + 1) % 10) + answer[digit.end():]
    return answer + "+1"


def test_perturb_changes_answers():
    assert perturb("204") == "205"
    assert perturb("-3") == "-2"
    assert perturb(r"\frac{3}{56}") == r"\frac{4}{56}"
    assert perturb(r"2516_8") == "3516_8"  # not the base: math-verify drops subscripts
    assert perturb(r"\pi") == r"\pi+1"


def test_every_gold_answer_self_verifies_and_perturbations_fail(shared_eval):
    rows = [json.loads(line) for n in ("math500", "aime24", "aime25") for line in (shared_eval / f"{n}.jsonl").open()]
    assert len(rows) == 560
    started = time.time()
    not_self, not_rejected, not_math_verify = [], [], []
    for r in rows:
        gold = r["answer"]
        if not grade(f"Putting it together, the answer is $\\boxed{{{gold}}}$.", gold):
            not_self.append((r["id"], gold))
        # The public path short-cuts identical strings; ask math-verify itself too.
        if not grader._equivalent_unbounded(gold, gold):
            not_math_verify.append((r["id"], gold))
        if grade(f"\\boxed{{{perturb(gold)}}}", gold):
            not_rejected.append((r["id"], gold, perturb(gold)))
    print(f"graded {3 * len(rows)} pairs in {time.time() - started:.1f} s")
    assert not_self == []
    assert not_math_verify == []
    assert not_rejected == []


# ----------------------------------------------------------------------------
# time limits

PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # SymPy works on this for far longer than any limit here


def test_timeout_in_main_thread_counts_as_wrong_and_restores_signal_state():
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    assert grade(PATHOLOGICAL, "5", timeout_s=0.3) is False
    assert time.monotonic() - started < 3.0
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert grade(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=2.0)  # the grader still works afterwards


def test_timeout_outside_main_thread_uses_a_worker_process():
    results = {}

    def run():
        results["normal"] = grade(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=5.0)
        results["wrong"] = grade(r"\boxed{0.5}", r"\frac{1}{3}", timeout_s=5.0)
        started = time.monotonic()
        results["slow"] = grade(PATHOLOGICAL, "5", timeout_s=0.5)
        results["slow_s"] = time.monotonic() - started
        results["after"] = grade(r"\boxed{x=5}", "5", timeout_s=30.0)  # a fresh worker takes over

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert results["normal"] is True
    assert results["wrong"] is False
    assert results["slow"] is False
    assert results["slow_s"] < 5.0
    assert results["after"] is True


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        is_equivalent("1", "2", timeout_s=0)


def test_a_callers_own_alarm_survives_grading():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert grade(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=2.0)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0  # re-armed with what was left, not cancelled
        assert signal.getsignal(signal.SIGALRM) is not grader._raise_deadline
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_string_match_grader_is_an_exact_match_of_normalised_strings():
    from eval.grader import grade_string_match
    assert grade_string_match("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}")  # normalize_answer: dfrac -> frac
    assert grade_string_match("\\boxed{ 42 }", "42")
    assert not grade_string_match("\\boxed{0.5}", "\\frac{1}{2}")  # equal values, different strings
    assert not grade_string_match("the answer is 42", "42")  # no boxed answer
