"""Evaluation: mean@k / pass@k / maj@k on math benchmarks with real answer grading.

Modules: `grader` (boxed-answer extraction, math-verify equivalence with a
timeout), `metrics` (the numbers from a correctness matrix), `benchmarks`
(problem sets by name or path), `runner` (`evaluate`, what the trainer calls),
`cli` (`python -m eval`), `compare` (`python -m eval.compare`).

Kept free of imports on purpose: the grader's worker process imports this
package, and it should not pay for torch.
"""
