"""Reference models built on the public fastattn API."""
