"""The pre-registered study of docs/study.md: Stage 0 (one-position simulation), Task A (three-digit addition with
a strategy spark), its warm start and Gate G1, the reduced rerun, and the report built from committed CSVs."""
