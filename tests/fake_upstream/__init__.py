"""A fake OpenAI-compatible upstream for the gateway's tests and benchmarks: the one fake
in the test suite, standing in for the paid provider. See ``server.FakeUpstream``."""

from .behaviours import Behaviour, DirectiveError
from .recorder import Received
from .server import FakeUpstream

__all__ = ["Behaviour", "DirectiveError", "FakeUpstream", "Received"]
