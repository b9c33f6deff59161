"""What every part shares: errors with one-line messages, atomic file output, seeds keyed by step,
and the little of torch.distributed that works the same in one process."""
