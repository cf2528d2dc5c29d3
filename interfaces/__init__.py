"""The ways in, above everything else: the Python API (`hetero.compile`, `hetero.deploy`),
the CLI, the deploy config, serving over gRPC, Ray job submission and the torch.compile
backend. Nothing below this package imports it."""
