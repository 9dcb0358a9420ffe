"""Errors of the transports: every message names the rank at fault and the cause."""


class TransportError(RuntimeError):
    """A peer died, hung, failed or broke the wire protocol."""


class JobAborted(TransportError):
    """Rank 0 stopped the job because another rank failed; the message carries its reason."""
