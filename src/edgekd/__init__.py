"""edgekd: a tiny, fast edge classifier from a distilled, quantization-aware-trained student.

Subpackages, in pipeline order: `data` (scan, deduplicate, split and describe an ImageFolder tree;
the prepared format), `train` (models, augmentation, losses, the training engine, soft targets,
quantization-aware training, checkpoints), `deploy` (ONNX export, inference sessions, predict) and
`eval` (classification metrics, latency). `config` holds the params schema, `runtime` what every
stage entry point shares (logging, seeds, devices, metrics files), `errors` the one-line user errors.
The library imports no tooling (`tools/`) and no stage entry point (`stages/`).
"""
