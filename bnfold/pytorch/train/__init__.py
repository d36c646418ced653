"""Training, the BN paper's experiment, and BN statistics recalibration (PyTorch, imported lazily).

Modules: `data` (datasets, no torch), `paper` (Ioffe & Szegedy 2015 §4.1 on digits/MNIST),
`loop` (a small generic loop for the other sample networks), `recalibrate` (Algorithm 2),
`files` (atomic writes of checkpoints and figures).
"""
