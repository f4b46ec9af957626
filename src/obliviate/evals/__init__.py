"""Metrics and evaluation protocols of every family."""

# The evaluation protocol's version, part of every cached evaluation's key (the worlds' original and retrain models,
# a user's original): a change to what a metric computes bumps it, so no cache serves numbers of an older protocol.
# 2: generation stops on every declared end id and counts answers at the token limit; LOSS and ZLib score the end
#    tokens as OpenUnlearning does; Min-K%++ in float64.
PROTOCOL = 2
