"""The run: the loop every method shares, and the run directory it keeps so that a run resumes exactly.

`loop.py` the loop (`run_distillation`); `config.py` its options (`LoopConfig`); `resume.py` the lock, config.json's
history and what `--resume` may change; `checkpoint.py` the checkpoint format; `metrics.py` metrics.csv and
TensorBoard; `health.py` dead-run detection; `final.py` the final report; `files.py` the one checked reader of each
run-directory file; `estimate.py` `distill --estimate` and the out-of-memory messages. What a run directory holds:

    RUN_DIR/config.json       the resolved configuration, the environment (threads, versions, command line, data
                              location) and a history: one entry per start, restart and resume with what changed
    RUN_DIR/checkpoint.safetensors  method state + loop state, written atomically every `checkpoint_every`
                              iterations: tensors plus a JSON tree, nothing that can run code
    RUN_DIR/.lock             flock-ed while a process runs in RUN_DIR, so a second one is refused; removed at its end
    RUN_DIR/metrics.csv       one row per iteration (loss, lr, ...) plus val accuracy at evaluations
    RUN_DIR/tb/               TensorBoard scalars (when the tensorboard package is installed)
    RUN_DIR/last.safetensors  the set at the latest evaluation
    RUN_DIR/best.safetensors  the set with the best *validation* accuracy (never selected on test, SPEC P4)
    RUN_DIR/grids/it_XXXXXX.png  an image grid per evaluation
    RUN_DIR/pending/          the set of a validation evaluation still running in the background (`--eval-overlap`)
                              when the checkpoint was written; a resume runs that evaluation again (gone at the end)
    RUN_DIR/result.json       at the end: test accuracy of best and last, measured once

The modules are imported by their own names (`distillery.run.loop`, ...): this file imports none of them, so that
`evaluation` may read run files without importing the loop, which imports `evaluation`.
"""
