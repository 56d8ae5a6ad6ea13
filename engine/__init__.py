"""flux-bot engine: everything that decides, queues, charges and generates."""
