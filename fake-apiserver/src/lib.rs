//! An in-process fake Kubernetes API server (real HTTP on 127.0.0.1) for tests.
