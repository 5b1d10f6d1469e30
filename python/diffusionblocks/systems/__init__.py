"""What makes a run fit, survive and scale: offload, per-block shared copies, block-parallel
training, devices, checkpoints, signals, memory measurement and logs. The training loop
(train.py) uses them; none of them knows a task."""
