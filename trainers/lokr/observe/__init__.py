"""Watching a run without changing it: sample images during training (`sampling`), the
TensorBoard scalars (`tblog`), the training report ``python -m trainers.lokr report RUN``
and the dataset's training-bucket section ``python -m trainers.lokr report --dataset``
(`report`), the peak-memory meter of the benchmarks (`memory`), ``--dry-run`` (`dryrun`) and the CCIP benchmark
``python -m trainers.lokr eval`` (`eval`, `eval_characters`, `eval_run`, `eval_page`, `ccip`,
`ccip_standin`).

Imports: anything below the loop — `data`, `network`, `sdxl` and the leaf modules. Never
`train`, `state` or the commands.
"""
