"""Seeds keyed by (seed, step, stream): every random draw of a run is a fixed function of them, so a
resumed run and one with more processes draw the same numbers."""

from __future__ import annotations

# Streams in use, so that no two kinds of draw share random numbers:
#   1 epoch permutations (data order)     2 training t, noise, flips, drops   3 dropout
#   11 evaluation sample chunks           16 captions of training items      17 captions of evaluation samples
STREAM_EPOCH, STREAM_TRAIN_NOISE, STREAM_DROPOUT = 1, 2, 3
STREAM_EVAL = 11
STREAM_CAPTION, STREAM_EVAL_CAPTION = 16, 17


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, stream); distinct streams give unrelated generators."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    # splitmix64 finaliser, so nearby inputs give unrelated seeds
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & (2**63 - 1)
