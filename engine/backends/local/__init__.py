"""The GPU lane's in-host workers: one FLUX.1 worker process per GPU and the supervisor that runs them.

supervisor.py (`LocalBackend`) decides when workers start, serve, recycle and die; process.py talks to one worker
process over its pipes or its Unix socket; frames.py reads the protocol's frames from a stream. The worker process
itself (`python -m engine.backends.local`, or `flux-bot worker`) is cli.py's `main`: serving.py serves the frames,
pipeline.py builds and runs FluxPipeline, faults.py holds the test-only fault switches.

Nothing is imported here: the worker process must not pay for the supervisor's imports, nor the supervisor for torch.
"""
