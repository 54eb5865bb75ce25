"""The core: the state record, the step protocol, the phases of one update, randomness,
non-finite checks, and the inner options (precision, accumulation) of a core step."""
