"""danlu (丹炉): build a ChatGPT-style assistant end to end.

Heavy modules (torch, tokenizers, datatrove, fastapi) are imported lazily by the commands that need them,
so that `import danlu` and `danlu --help` stay fast.
"""

__version__ = "0.1.0"


class DanluError(Exception):
    """An error caused by the user's input (file, flag, recipe, checkpoint).

    The CLI prints its message alone, without a traceback: the message must name the problem and where.
    """
