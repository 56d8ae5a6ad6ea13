"""Image backends: the BFL API client and the local FLUX.1 worker supervisor."""
