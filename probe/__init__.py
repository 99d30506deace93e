"""probe: what has this CNN learned, and how does it differ from that one?"""

__version__ = "0.1.0"
