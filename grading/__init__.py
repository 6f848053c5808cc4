"""The workshop's exercises: generated from the reference steps, graded by the same tests.

The parts a learner writes are marked in the reference code with two comment lines,
`# BEGIN TASK N.M` and `# END TASK N.M`. `tasks.toml` holds each task's title, time,
what to do and a hint. See `python -m grading --help` (or the Makefile's targets).
"""
