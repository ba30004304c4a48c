"""Infrastructure shared by training, evaluation and the converters: process groups and per-step
seeds (``distributed``), the checkpoint format and its atomic I/O (``checkpoint``), building the
run's objects from the config (``build``), run logs, progress and secrets redaction
(``run_logging``) and per-tick statistics (``stats``). It imports nothing from ``tvm.train``,
``tvm.eval`` or ``tvm.compat``: those layers sit above it."""
