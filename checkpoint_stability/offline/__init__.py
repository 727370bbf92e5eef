"""Offline tools: ``analyze`` for checkpoint series saved without the callback, and the command line.

Above the core: they use it; the core never imports them."""
