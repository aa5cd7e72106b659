"""The jobgate command line: run the stack, manage tenants and keys, serve reference replicas."""
