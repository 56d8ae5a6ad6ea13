"""flux-bot chat front-ends: they translate, they never decide."""
