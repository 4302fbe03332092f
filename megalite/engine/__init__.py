"""The step engine: one path from microbatches to gradients for every layout and every loss.

- `setup`: groups, model context, model chunks, gradient reducer and optimizer (`Run`); frozen models too;
- `batches`: this rank's microbatches (DP slices, CP zigzag shards; extra fields travel with them);
- `losses`: the `Loss` protocol and pretraining's cross entropy;
- `step`: `forward_backward`, `forward_only`, `evaluate`, `optimizer_step` on the pipeline runtime;
- `log`: the log line and TensorBoard scalars.
See docs/architecture.md for how a step flows from the command line to the collectives.
"""
