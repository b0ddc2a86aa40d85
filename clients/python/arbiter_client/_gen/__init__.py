"""Generated gRPC stubs of arbiter.v1 (see ../../generate.py); do not edit."""
