"""Training the reference model (`mtp-ext train`): train.py, the loop and its settings; data.py,
the corpus and batches; tokenizer.py, bytes or a byte-level BPE; checkpoint.py, checkpoint files
read safely; run_dir.py, a run's checkpoints and resuming; stop_signal.py, SIGTERM and SIGINT;
distributed.py, torchrun, DDP and FSDP."""
