"""linearize: convert softmax-attention decoder LLMs into linear and hybrid attention students."""
from .errors import UserError

__all__ = ["UserError"]
