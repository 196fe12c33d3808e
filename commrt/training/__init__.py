"""The parts of ``python -m commrt.train`` around its loop (commrt/train.py).

- `cli`: the flags, their checks, the model configuration and the data;
- `distributed`: joining the job (mpirun or torchrun), the torch.distributed default
  group, torch threads per rank;
- `checkpoint`: OUT/checkpoint/step-NNNNNNN/rank-NNNNN.pt and OUT/checkpoint/latest, resume;
- `metrics`: the per-record accounting, metrics.jsonl, the progress line, summary.json,
  loss.png.

The training methods themselves are built by name through `commrt.optim.registry`.
"""
