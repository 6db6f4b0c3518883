"""Stubs generated from proto/emoserve/v1/emoserve.proto (protoc and
grpc_python_plugin); regenerate with clients/python/generate_stubs.sh, and
tests/python/client_package_test.py fails when they differ from the proto."""
