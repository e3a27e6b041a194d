"""The bottom of the stack: params, IR, errors, targets, op registry, tensor files; imports nothing above it."""
